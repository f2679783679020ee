"""The trtllm backend: `vlcache-build --backend trtllm` writes TensorRT-LLM's llmapi repository without
TensorRT-LLM; the shim imports without it and says so when used; what needs TensorRT-LLM and a GPU is
marked and skips. The decisions themselves are tested in test_trtllm_plan.py."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlcache.artifact import verify_artifact
from vlcache.cli.build import main
from vlcache.config import BUILD_BACKENDS, RUNTIME_BACKENDS, CompressionConfig
from vlcache.errors import UserError


def _build(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(
        ["--model", str(checkpoint), "--backend", "trtllm", "--out", str(out), "--max-input-len", "300", *extra]
    )


@pytest.fixture(scope="module")
def artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trtllm") / "tiny"
    assert _build(checkpoint, out, "--budget", "0.15", "--threshold", "0.02", "--recent-fraction", "0.2") == 0
    return out


def test_build_writes_an_llmapi_repository_that_selects_the_compression(artifact: Path, checkpoint: Path) -> None:
    manifest = verify_artifact(artifact)
    assert manifest.backend == "trtllm"
    # the checkpoint, as it is: what LLM(model=...) reads
    for name in ("config.json", "model.safetensors"):
        assert (artifact / "hf" / name).read_bytes() == (checkpoint / name).read_bytes()
    model_dir = artifact / "triton" / "tensorrt_llm"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()) == [
        "1/model.py",
        "1/model.yaml",
        "config.pbtxt",
    ]
    text = (model_dir / "1" / "model.yaml").read_text()
    assert "ccfe61bbe11c" in text and "sparseKvCacheCompactOp.cpp" in text  # the TensorRT-LLM pin
    args = yaml.safe_load(text)
    section = args["kv_cache_compression_config"]
    assert section["algorithm"] == "vlcache" and section["count_cap"] is None
    compression = CompressionConfig.from_dict(section["compression"])
    assert compression == manifest.build.compression
    assert (compression.method, compression.budget) == ("vlcache", 0.15)
    assert compression.settings_dict() == {"threshold": 0.02, "query_window": None, "recent_fraction": 0.2}
    assert section["image_token_id"] == json.loads((checkpoint / "config.json").read_text())["image_token_index"]
    assert args["backend"] == "pytorch" and args["max_input_len"] == 300 and args["max_seq_len"] > 300
    assert args["kv_cache_config"] == {"use_kv_cache_manager_v2": True, "enable_block_reuse": False}
    assert args["triton_config"]["decoupled"] is True and args["triton_config"]["max_batch_size"] == 0
    assert ((model_dir / "1" / args["model"]).resolve() / "config.json").is_file()  # relative: the artifact moves
    config = (model_dir / "config.pbtxt").read_text()
    assert 'name: "tensorrt_llm"' in config and 'backend: "python"' in config and "${" not in config
    assert manifest.config_hash in config and "text_input" in config and "text_output" in config
    assert "vlcache.trtllm.triton_model" in (model_dir / "1" / "model.py").read_text()


def test_rendering_outside_the_artifact_names_the_checkpoint_absolutely(artifact: Path, tmp_path: Path) -> None:
    from vlcache.serving.repository import render_repository

    repo = render_repository(artifact, out=tmp_path / "repo", instances=2)
    args = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert args["model"] == str((artifact / "hf").resolve())
    assert "count: 2 kind: KIND_CPU" in (repo / "tensorrt_llm" / "config.pbtxt").read_text()


def test_the_build_prints_the_stages_the_dry_run_lists(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    _ = capsys.readouterr()
    assert _build(checkpoint, out, "--dry-run") == 0
    planned = json.loads(capsys.readouterr().out)["stages"]
    assert "copy checkpoint" in planned and not out.exists()
    assert _build(checkpoint, out) == 0
    printed = re.findall(r"^\[(\d+)/(\d+)\] (.+) \.\.\.$", capsys.readouterr().err, flags=re.MULTILINE)
    assert [name for _, _, name in printed] == planned


def test_auto_never_picks_trtllm(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlcache.builder import build as build_mod

    assert "trtllm" in BUILD_BACKENDS and "trtllm" not in RUNTIME_BACKENDS
    for available in (False, True):
        monkeypatch.setattr(build_mod, "tensorrt_available", lambda available=available: available)
        assert build_mod.resolve_backend("auto") == ("tensorrt" if available else "onnx")
    assert build_mod.resolve_backend("trtllm") == "trtllm"  # written without TensorRT-LLM or a GPU


def test_a_method_that_evicts_during_decoding_is_a_user_error(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _build(checkpoint, tmp_path / "out", "--method", "tgvkv")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "evicts during decoding" in err
    assert not (tmp_path / "out").exists()


def test_vlcache_serve_refuses_a_trtllm_artifact(artifact: Path) -> None:
    from vlcache.serving.server import TritonServer

    with pytest.raises(UserError, match="trtllm artifact.*not by vlcache-serve"):
        TritonServer.for_artifact(artifact)


# --- the shim, without TensorRT-LLM -------------------------------------------------------------


@pytest.fixture
def no_tensorrt_llm(monkeypatch: pytest.MonkeyPatch):
    """TensorRT-LLM made unimportable (it is not installed here; this also holds where it is)."""
    from vlcache.trtllm import manager

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    manager.classes.cache_clear()
    yield manager
    manager.classes.cache_clear()


def test_the_shim_imports_without_tensorrt_llm() -> None:
    for name in ("vlcache.trtllm", "vlcache.trtllm.manager", "vlcache.trtllm.triton_model", "vlcache.trtllm.llm_args"):
        importlib.import_module(name)
    # importing the shim imports neither TensorRT-LLM nor torch (a fresh interpreter, where it may be installed)
    code = (
        "import sys, vlcache.trtllm.manager, vlcache.trtllm.triton_model; "
        "print(sorted({'tensorrt_llm', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_its_entry_points_raise_a_clear_error(no_tensorrt_llm) -> None:
    manager = no_tensorrt_llm
    calls = (
        manager.require_tensorrt_llm,
        manager.classes,
        manager.install,
        lambda: manager.create_manager(object(), object()),
        lambda: manager.compression_config({"algorithm": "vlcache"}),
    )
    for call in calls:
        with pytest.raises(manager.TensorRTLLMUnavailable, match=r"needs TensorRT-LLM .* GPU host") as e:
            call()
        assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_the_triton_model_needs_tensorrt_llms_llmapi_model(tmp_path: Path) -> None:
    from vlcache.trtllm.manager import TensorRTLLMUnavailable
    from vlcache.trtllm.triton_model import model_class, resolve_model, split_compression

    with pytest.raises(TensorRTLLMUnavailable, match="llmapi Triton model is not at"):
        model_class(tmp_path / "missing.py")
    rest, section = split_compression({"model": "x", "kv_cache_compression_config": {"algorithm": "vlcache"}})
    assert rest == {"model": "x"} and section == {"algorithm": "vlcache"}
    other = {"kv_cache_compression_config": {"algorithm": "triattention"}}
    assert split_compression(other) == (other, None)
    (tmp_path / "hf").mkdir()
    version = tmp_path / "repo" / "m" / "1"
    assert resolve_model({"model": "../../../hf"}, version)["model"] == str((tmp_path / "hf").resolve())
    assert resolve_model({"model": "org/name"}, version)["model"] == "org/name"


# --- with TensorRT-LLM on a GPU (skipped here) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_the_compaction_op_matches_the_cpu_oracle() -> None:
    """TensorRT-LLM's sparse_kv_cache_compact_layers on the moves vlcache plans, against the oracle."""
    pytest.importorskip("tensorrt_llm")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from vlcache.methods import LayerScore, PromptLayout, get_method
    from vlcache.trtllm.manager import classes
    from vlcache.trtllm.plan import compaction_moves, plan_request, reference_compact_layers

    classes()  # the shim defines its classes over this TensorRT-LLM
    torch.manual_seed(0)
    num_layers, heads, d, tpb, m = 2, 2, 64, 32, 90
    method = get_method(CompressionConfig.create("vlcache", 0.2))
    scores = [LayerScore(torch.rand(1, heads, m), w) for w in (0.9, 0.1)]
    plans = [plan_request(method, scores, PromptLayout(m, ((2, 60),)))] * 2
    moves = compaction_moves(plans, [1, 0])
    pages = torch.arange(8, dtype=torch.int32).view(2, 4)
    cpu = [torch.randn(8, 2, heads, tpb, d).to(torch.bfloat16) for _ in range(num_layers)]
    gpu = [p.cuda() for p in cpu]
    reference_compact_layers(
        cpu, pages, moves.source_indices, moves.source_offsets, moves.destination_bases, moves.source_layer_indices
    )
    torch.ops.trtllm.sparse_kv_cache_compact_layers(
        gpu,
        torch.tensor([p.data_ptr() for p in gpu], dtype=torch.int64, device="cuda"),
        (pages * 2).cuda(),  # V2's K block offsets: the op decodes offset // 2
        moves.source_indices.cuda(),
        moves.source_offsets.cuda(),
        moves.destination_bases.cuda(),
        moves.source_layer_indices.cuda(),
    )
    torch.cuda.synchronize()
    for want, got in zip(cpu, gpu):
        assert torch.equal(got.cpu(), want)
