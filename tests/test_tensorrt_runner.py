"""`TensorRTRunner` scores and compacts through the plugin engines, checked on CPU through its engine seam.

TensorRT needs a GPU, so the runner is built with ``engine_loader=``: the plugin roles
(``post_vision_stats``, ``compact_kv``) are :class:`vlcache_plugins.standin.InterpretedEngine` on the
very graphs a TensorRT build parses (``prepare_sources``: the export's op graphs rewritten into
plugin nodes, threshold and scale set), whose plugin nodes launch the plugin's Triton kernels under
``TRITON_INTERPRET=1``; the graph roles (embed, decoder, vision) are ONNX Runtime sessions on the
export's standard graphs. The runner's ``post_vision_stats`` / ``compact`` / ``compact_layer`` must
equal :mod:`vlcache.core`, go through the plugin roles (never torch), and a whole generation must
equal the ONNX Runtime backend's. ``test_engines_match_onnx_runtime`` does the same with real
engines; it needs a GPU and TensorRT and has never run.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import vlcache.core  # noqa: E402
import vlcache.runtime.base  # noqa: E402
import vlcache.runtime.loop  # noqa: E402
from vlcache import CompressionConfig  # noqa: E402
from vlcache.core import DEFAULT_THRESHOLD, compact, post_vision_statistics, select_kept, visible_counts  # noqa: E402
from vlcache.export import export_llava  # noqa: E402
from vlcache.export.names import COMPACT_KV, POST_VISION_STATS  # noqa: E402
from vlcache.export.spec import ExportSpec  # noqa: E402
from vlcache.hf.tiny import llava_inputs, tiny_llava  # noqa: E402
from vlcache.runtime import generate, load_runtime  # noqa: E402
from vlcache.runtime.base import LayerKV  # noqa: E402
from vlcache.runtime.tensorrt_runner import Engine, TensorRTRunner  # noqa: E402
from vlcache.runtime.tensorrt_support import (  # noqa: E402
    COMPACT_ROLE,
    PLUGIN_ROLES,
    PLUGIN_SETTINGS_FILE,
    SCORE_ROLE,
    tensorrt_available,
)
from vlcache_plugins.build import prepare_sources  # noqa: E402
from vlcache_plugins.standin import InterpretedEngine  # noqa: E402

NEW_TOKENS = 4


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class OrtEngine:
    """An ONNX Runtime session on an exported graph, standing in for the engine TensorRT builds from it."""

    def __init__(self, path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {name: t.detach().cpu().contiguous().numpy() for name, t in feeds.items()}
        return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(self.output_names, self.session.run(None, arrays))}


def standin_loader(opened: dict[str, Engine]):
    def load(role: str, path: Path) -> Engine:
        engine: Engine = InterpretedEngine(path) if role in PLUGIN_ROLES else OrtEngine(path)
        opened[role] = engine
        return engine

    return load


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0, layers=2)


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the ONNX export with the standard decoder, a TensorRT build folder whose "engine files" are
    the graphs TensorRT would parse)."""
    onnx_dir = tmp_path_factory.mktemp("export-standard")
    export_llava(model, onnx_dir, max_input_len=128, attention="standard")
    build = tmp_path_factory.mktemp("trt-build")
    spec, sources = prepare_sources(onnx_dir, build)
    spec.engines = {role: path.name for role, path in sources.items()}
    spec.save(build)
    return onnx_dir, build


def _runner(build: Path) -> tuple[TensorRTRunner, dict[str, Engine]]:
    opened: dict[str, Engine] = {}
    return TensorRTRunner(build, device="cpu", engine_loader=standin_loader(opened)), opened


def _launches(opened: Mapping[str, Engine]) -> dict[str, int]:
    score, comp = opened[SCORE_ROLE], opened[COMPACT_ROLE]
    assert isinstance(score, InterpretedEngine) and isinstance(comp, InterpretedEngine)
    return {POST_VISION_STATS: score.launches[POST_VISION_STATS], COMPACT_KV: comp.launches[COMPACT_KV]}


def test_the_plugin_graphs_are_what_the_engines_are_built_from(folders) -> None:
    _, build = folders
    spec = ExportSpec.load(build)
    assert (
        spec.engines[SCORE_ROLE] == "post_vision_stats.trt.onnx" and spec.engines[COMPACT_ROLE] == "compact_kv.trt.onnx"
    )
    settings = json.loads((build / PLUGIN_SETTINGS_FILE).read_text())
    assert settings == {"threshold": DEFAULT_THRESHOLD, "scale": spec.attention_scale}


@pytest.mark.parametrize("query_start", [40, 75, 0])
def test_ops_equal_core(folders, query_start: int) -> None:
    _, build = folders
    runner, opened = _runner(build)
    spec = runner.spec
    g = torch.Generator().manual_seed(query_start)
    m = 80
    tau = m - query_start
    q = torch.randn(1, spec.num_heads, tau, spec.head_dim, generator=g) * 3
    k = torch.randn(1, spec.num_kv_heads, m, spec.head_dim, generator=g) * 3
    v = torch.randn(1, spec.num_kv_heads, m, spec.head_dim, generator=g)

    scores, density = runner.post_vision_stats(q, k, query_start, DEFAULT_THRESHOLD, spec.attention_scale)
    ref = post_vision_statistics(q, k, query_start, threshold=DEFAULT_THRESHOLD, scale=spec.attention_scale)
    assert scores.shape == ref.scores.shape and scores.dtype == torch.float32 and density.shape == (1,)
    torch.testing.assert_close(scores, ref.scores, rtol=1e-5, atol=1e-6)
    visible = int(visible_counts(query_start, tau).sum())  # a count may flip across p on rounding
    torch.testing.assert_close(density, ref.density, rtol=0, atol=2.0 / (spec.num_heads * visible) + 1e-6)
    keep = 23
    kept = select_kept(scores, keep)
    assert torch.equal(kept, select_kept(ref.scores, keep))

    assert torch.equal(runner.compact(k, kept), compact(k, kept))
    layer = runner.compact_layer(LayerKV(k, v, np.array([m])), kept, keep + 8)
    assert torch.equal(layer.keys, compact(k, kept)) and torch.equal(layer.values, compact(v, kept))
    assert layer.lengths.tolist() == [keep]
    assert _launches(opened) == {POST_VISION_STATS: 1, COMPACT_KV: 3}  # compact + keys and values


def test_eviction_and_empty_compaction_go_through_the_plugin(folders) -> None:
    _, build = folders
    runner, opened = _runner(build)
    spec = runner.spec
    k = torch.randn(1, spec.num_kv_heads, 9, spec.head_dim)
    v = torch.randn(1, spec.num_kv_heads, 9, spec.head_dim)
    out = runner.evict(LayerKV(k, v, np.array([9])), 4)
    keep = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8]).expand(1, spec.num_kv_heads, 8)
    assert torch.equal(out.keys, compact(k, keep)) and torch.equal(out.values, compact(v, keep))
    none = torch.zeros(1, spec.num_kv_heads, 0, dtype=torch.int64)
    assert runner.compact(k, none).shape == (1, spec.num_kv_heads, 0, spec.head_dim)
    assert _launches(opened)[COMPACT_KV] == 3


def _forbid_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make vlcache.core's scoring and compaction raise wherever the runtime holds them."""

    def boom(*args, **kwargs):
        raise AssertionError("the tensorrt runner scored or compacted with torch (vlcache.core)")

    targets = {id(vlcache.core.post_vision_statistics), id(vlcache.core.compact)}
    users = [
        m for name, m in sys.modules.items() if name.startswith("vlcache.") and not name.startswith("vlcache.core")
    ]
    assert vlcache.runtime.base in users and vlcache.runtime.loop in users
    for module in users:
        for name, value in list(vars(module).items()):
            if id(value) in targets:
                monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize(("method", "budget"), [("vlcache", 0.1), ("tgvkv", 0.2)])
def test_generation_uses_the_plugin_engines_and_equals_onnx_runtime(
    model, folders, monkeypatch: pytest.MonkeyPatch, method: str, budget: float
) -> None:
    onnx_dir, build = folders
    inputs = llava_inputs(model, question_len=10, seed=3)
    cfg = CompressionConfig.create(method, budget)
    ref = generate(
        load_runtime(onnx_dir, backend="onnx", threads=1),
        inputs["input_ids"],
        inputs["pixel_values"],
        cfg,
        max_new_tokens=NEW_TOKENS,
        return_logits=True,
    )

    runner, opened = _runner(build)
    calls: list[str] = []
    run = runner._run
    monkeypatch.setattr(runner, "_run", lambda role, feeds: (calls.append(role), run(role, feeds))[1])
    _forbid_torch_ops(monkeypatch)
    res = generate(
        runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=NEW_TOKENS, return_logits=True
    )

    assert res.tokens == ref.tokens
    assert res.stats.kept_per_layer == ref.stats.kept_per_layer
    for mine, theirs in zip(res.kept_indices, ref.kept_indices):
        assert (mine is None) == (theirs is None) and (mine is None or torch.equal(mine, theirs))
    assert res.logits is not None and ref.logits is not None
    for mine_logits, theirs_logits in zip(res.logits, ref.logits):
        np.testing.assert_allclose(mine_logits, theirs_logits, rtol=1e-4, atol=1e-4)

    layers = runner.spec.num_layers
    compacted = sum(i is not None for i in res.kept_indices)
    assert compacted > 0
    launches = _launches(opened)
    if method == "vlcache":  # VL-Cache scores with the plugin; other methods score with their own torch scorer
        assert calls.count(SCORE_ROLE) == layers == launches[POST_VISION_STATS]
    else:
        assert SCORE_ROLE not in calls
    assert calls.count(COMPACT_ROLE) == launches[COMPACT_KV] >= 2 * compacted
    assert calls.count("decoder") == NEW_TOKENS  # the prefill and NEW_TOKENS - 1 steps


def test_missing_plugin_engines_are_refused(folders, tmp_path: Path) -> None:
    _, build = folders
    spec = ExportSpec.load(build)
    for role in PLUGIN_ROLES:
        folder = tmp_path / role
        folder.mkdir()
        for file in build.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        spec.engines = {r: f for r, f in ExportSpec.load(build).engines.items() if r != role}
        spec.save(folder)
        with pytest.raises(ValueError, match=rf"no TensorRT engine for \['{role}'\].*plugin engines"):
            _runner(folder)
    # an export.json listing no engines at all (an ONNX-only export) names every missing role
    spec.engines = {}
    spec.save(tmp_path / SCORE_ROLE)
    with pytest.raises(ValueError, match="embed.*decoder.*post_vision_stats.*compact_kv"):
        _runner(tmp_path / SCORE_ROLE)


def test_missing_settings_and_other_thresholds_are_refused(folders, tmp_path: Path) -> None:
    _, build = folders
    for file in build.iterdir():
        if file.name != PLUGIN_SETTINGS_FILE:
            (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match="plugins.json.*rebuild"):
        _runner(tmp_path)

    runner, opened = _runner(build)
    spec = runner.spec
    q = torch.randn(1, spec.num_heads, 3, spec.head_dim)
    k = torch.randn(1, spec.num_kv_heads, 10, spec.head_dim)
    with pytest.raises(ValueError, match=r"compiled for threshold p=0\.01.*asks for p=0\.05"):
        runner.post_vision_stats(q, k, 7, 0.05, spec.attention_scale)
    with pytest.raises(ValueError, match="scale"):
        runner.post_vision_stats(q, k, 7, DEFAULT_THRESHOLD, 2 * spec.attention_scale)
    assert _launches(opened)[POST_VISION_STATS] == 0
    if math.isclose(spec.attention_scale, spec.head_dim**-0.5, rel_tol=1e-6):  # scale 0 means 1/√D
        runner.post_vision_stats(q, k, 7, DEFAULT_THRESHOLD, 0.0)
        assert _launches(opened)[POST_VISION_STATS] == 1


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA GPU")
def test_engines_match_onnx_runtime(model, folders, tmp_path: Path) -> None:  # pragma: no cover - never run yet
    """Real engines (plugins compiled ahead of time): the same generation as the ONNX Runtime backend."""
    from vlcache_plugins.build import build_engines

    onnx_dir, _ = folders
    build_engines(onnx_dir, tmp_path, dtype="float32")
    runner = load_runtime(tmp_path, backend="tensorrt")
    assert isinstance(runner, TensorRTRunner)
    inputs = llava_inputs(model, question_len=10, seed=3)
    cfg = CompressionConfig.create("vlcache", 0.1)
    ref = generate(load_runtime(onnx_dir, backend="onnx"), inputs["input_ids"], inputs["pixel_values"], cfg)
    res = generate(runner, inputs["input_ids"], inputs["pixel_values"], cfg)
    assert res.tokens == ref.tokens and res.stats.kept_per_layer == ref.stats.kept_per_layer
