"""TensorRT engines from an ONNX export directory: what ``vlcache-build --backend tensorrt`` runs.

**Never run on a GPU or against a real TensorRT** (it cannot be installed on the machines this project
is developed on). What does not need TensorRT is tested on CPU: :func:`optimization_profile` (the
shape ranges of every dynamic input) and the graph pass it relies on
(:func:`vlcache_plugins.graph.to_tensorrt_plugins`).

:func:`build_engines` registers the plugins, rewrites the ``vlcache`` nodes of the scoring and
compaction graphs into plugin nodes, parses each graph with TensorRT's ONNX parser, gives every
dynamic input one optimization profile (prompt length 1..max_input_len, each layer's past length
0..max_input_len), builds serialized engines (fp16 / bf16 flags from ``dtype``) and writes
``export.json`` beside them with ``engines`` filled in, so :class:`vlcache.runtime.TensorRTRunner`
loads the folder alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vlcache.export import names
from vlcache.export.spec import ExportSpec

#: graphs of an export (``ExportSpec.graphs`` roles) that get an engine, when the export has them
ROLES = ("vision", "embed", "decoder", "post_vision_stats", "compact_kv")

Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def optimization_profile(spec: ExportSpec, role: str, max_input_len: int | None = None) -> dict[str, Range]:
    """(min, opt, max) shape of every input of one graph, batch size 1.

    The decoder serves prefill (n = prompt length, empty past) and decode (n = 1, past up to the
    longest sequence); each layer's past length has its own range because layers keep different
    numbers of tokens after eviction.
    """
    if role == "decoder" and spec.attention != names.ATTENTION_STANDARD:
        raise ValueError(
            f"the decoder of this export uses {spec.attention!r} attention (ONNX Runtime's GroupQueryAttention); "
            "TensorRT builds from export_llava(..., attention='standard')"
        )
    n_max = max_input_len or spec.max_input_len
    if n_max < 2:
        raise ValueError(f"max_input_len must be >= 2, got {n_max}")
    opt = max(1, n_max // 2)
    h, kv, d, hidden = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    if role == "vision":
        if spec.image_size is None:
            raise ValueError("this export has no vision graph")
        hh, ww = spec.image_size
        return {names.PIXEL_VALUES: ((1, 3, hh, ww), (1, 3, hh, ww), (4, 3, hh, ww))}
    if role == "embed":
        return {names.INPUT_IDS: ((1, 1), (1, opt), (1, n_max))}
    if role == "decoder":
        prof: dict[str, Range] = {
            names.INPUTS_EMBEDS: ((1, 1, hidden), (1, 1, hidden), (1, n_max, hidden)),
            names.POSITION_IDS: ((1, 1), (1, 1), (1, n_max)),
        }
        for layer in range(spec.num_layers):
            for name in (names.past_key(layer), names.past_value(layer)):
                prof[name] = ((1, kv, 0, d), (1, kv, opt, d), (1, kv, n_max, d))
        return prof
    if role == "post_vision_stats":
        return {
            names.SCORE_QUERIES: ((1, h, 1, d), (1, h, 64, d), (1, h, n_max, d)),
            names.SCORE_KEYS: ((1, kv, 1, d), (1, kv, opt, d), (1, kv, n_max, d)),
        }
    if role == "compact_kv":
        return {
            names.COMPACT_KV_INPUT: ((1, kv, 1, d), (1, kv, opt, d), (1, kv, n_max, d)),
            names.COMPACT_INDICES: (
                (
                    1,
                    kv,
                    0,
                ),
                (1, kv, opt // 10 or 1),
                (1, kv, n_max),
            ),
        }
    raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def _build_one(trt: Any, onnx_path: Path, engine_path: Path, profile: dict[str, Range], dtype: str) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if dtype == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == "bfloat16":
        config.set_flag(trt.BuilderFlag.BF16)
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in profile and -1 in tuple(tensor.shape):
            lo, mid, hi = profile[tensor.name]
            prof.set_shape(tensor.name, lo, mid, hi)
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))


def build_engines(onnx_dir: Path, out_dir: Path, *, dtype: str = "float16", max_input_len: int | None = None) -> Path:
    """Build one engine per graph of ``onnx_dir`` into ``out_dir``; returns ``out_dir/export.json``."""
    import onnx

    from vlcache_plugins.graph import to_tensorrt_plugins
    from vlcache_plugins.tensorrt_plugins import import_plugin_api, register_tensorrt_plugins

    spec = ExportSpec.load(onnx_dir)
    if spec.attention != names.ATTENTION_STANDARD:
        raise ValueError(
            f"{onnx_dir}: the decoder uses {spec.attention!r} attention (an ONNX Runtime op TensorRT cannot parse); "
            "export with attention='standard' for a TensorRT build"
        )
    trt, _ = import_plugin_api()
    register_tensorrt_plugins()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engines: dict[str, str] = {}
    for role in ROLES:
        if role not in spec.graphs:
            continue
        source = Path(onnx_dir) / spec.graphs[role]
        if role in ("post_vision_stats", "compact_kv"):  # vlcache nodes -> plugin nodes
            rewritten = out_dir / f"{role}.trt.onnx"
            onnx.save(to_tensorrt_plugins(onnx.load(str(source))), str(rewritten))
            source = rewritten
        engine = out_dir / f"{role}.engine"
        _build_one(trt, source, engine, optimization_profile(spec, role, max_input_len), dtype)
        engines[role] = engine.name
    for file in spec.graphs.values():  # the graphs stay beside the engines (inspection, fallbacks)
        shutil.copy2(Path(onnx_dir) / file, out_dir / file)
    spec.engines = engines
    return spec.save(out_dir)
