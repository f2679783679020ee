"""TensorRT engines from an ONNX export directory: what ``vlcache-build --backend tensorrt`` runs.

**Never run on a GPU or against a real TensorRT** (it cannot be installed on the machines this project
is developed on). What does not need TensorRT is tested on CPU: :func:`optimization_profile` (the
shape ranges of every dynamic input), :func:`prepare_sources` (the graphs TensorRT would parse, and
``plugins.json``) and the graph pass it relies on (:func:`vlcache_plugins.graph.to_tensorrt_plugins`);
the plugin graphs it writes also run on CPU in :class:`vlcache_plugins.standin.InterpretedEngine`,
which is how ``tests/test_tensorrt_runner.py`` drives :class:`vlcache.runtime.TensorRTRunner`.

:func:`build_engines` registers the plugins; :func:`prepare_sources` sets the PostVisionStats node's
threshold and scale to the build's (the model's attention scale), rewrites the ``vlcache`` nodes of
the scoring and compaction graphs into plugin nodes and records the two constants in ``plugins.json``
(:class:`vlcache.runtime.tensorrt_support.PluginSettings`: the kernel bakes them in, so the runner
must know what the engine serves); then each graph is parsed by TensorRT's ONNX parser, every
dynamic input gets one optimization profile (prompt length 1..max_input_len, each layer's past length
0..max_input_len), serialized engines are built (fp16 / bf16 flags from ``dtype``) and ``export.json``
is written beside them with ``engines`` filled in, so :class:`vlcache.runtime.TensorRTRunner` loads
the folder alone. The runner scores with the ``post_vision_stats`` engine and compacts with the
``compact_kv`` engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vlcache.core.sparsity import DEFAULT_THRESHOLD
from vlcache.export import names
from vlcache.export.spec import ExportSpec
from vlcache.runtime.tensorrt_support import COMPACT_ROLE, PLUGIN_ROLES, SCORE_ROLE, PluginSettings

#: graphs of an export (``ExportSpec.graphs`` roles) that get an engine, when the export has them
ROLES = ("vision", "embed", "decoder", SCORE_ROLE, COMPACT_ROLE)

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


def _set_score_constants(model: Any, threshold: float, scale: float) -> None:
    """Give every ``vlcache.PostVisionStats`` node of ``model`` these ``threshold`` and ``scale``."""
    from onnx import helper

    found = 0
    for node in model.graph.node:
        if node.domain == names.DOMAIN and node.op_type == names.POST_VISION_STATS:
            kept = [a for a in node.attribute if a.name not in ("threshold", "scale")]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.extend(
                [helper.make_attribute("threshold", float(threshold)), helper.make_attribute("scale", float(scale))]
            )
            found += 1
    if not found:
        raise ValueError(f"the {SCORE_ROLE} graph holds no {names.DOMAIN}.{names.POST_VISION_STATS} node")


def _buildable_spec(onnx_dir: Path) -> ExportSpec:
    spec = ExportSpec.load(onnx_dir)
    if spec.attention != names.ATTENTION_STANDARD:
        raise ValueError(
            f"{onnx_dir}: the decoder uses {spec.attention!r} attention (an ONNX Runtime op TensorRT cannot parse); "
            "export with attention='standard' for a TensorRT build"
        )
    missing = [role for role in PLUGIN_ROLES if role not in spec.graphs]
    if missing:
        raise ValueError(
            f"{onnx_dir}: the export has no {', '.join(missing)} graph; the TensorRT runner scores and compacts "
            "with the plugin engines built from them (re-export with vlcache.export.export_llava)"
        )
    return spec


def prepare_sources(
    onnx_dir: Path, out_dir: Path, *, threshold: float = DEFAULT_THRESHOLD
) -> tuple[ExportSpec, dict[str, Path]]:
    """The part of the build that needs no TensorRT: what each engine is built from.

    Copies the export's graphs into ``out_dir`` (they stay beside the engines for inspection and
    fallbacks), writes the plugin graphs ``post_vision_stats.trt.onnx`` (threshold ``threshold``,
    scale the model's ``attention_scale``) and ``compact_kv.trt.onnx`` rewritten by
    :func:`~vlcache_plugins.graph.to_tensorrt_plugins`, and ``plugins.json`` with those two constants.

    Returns:
        The export's spec (``engines`` not filled in yet) and role -> the ONNX file TensorRT parses.

    Raises:
        ValueError: the export's decoder is not the standard one, or it lacks a plugin graph.
    """
    import onnx

    from vlcache_plugins.graph import to_tensorrt_plugins

    spec = _buildable_spec(onnx_dir)
    settings = PluginSettings(threshold=float(threshold), scale=float(spec.attention_scale))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in spec.graphs.values():
        for name in (file, f"{file}.data"):  # a large graph's weights live in an external data file
            if (Path(onnx_dir) / name).is_file():
                shutil.copy2(Path(onnx_dir) / name, out_dir / name)
    sources: dict[str, Path] = {}
    for role in ROLES:
        if role not in spec.graphs:
            continue
        source = Path(onnx_dir) / spec.graphs[role]
        if role in PLUGIN_ROLES:  # vlcache nodes -> plugin nodes
            model = onnx.load(str(source))
            if role == SCORE_ROLE:
                _set_score_constants(model, settings.threshold, settings.scale)
            source = out_dir / f"{role}.trt.onnx"
            onnx.save(to_tensorrt_plugins(model), str(source))
        sources[role] = source
    settings.save(out_dir)
    return spec, sources


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "float16",
    max_input_len: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Path:
    """Build one engine per graph of ``onnx_dir`` into ``out_dir``; returns ``out_dir/export.json``.

    ``threshold``: the sparsity threshold p the PostVisionStats engine is compiled for (the runner
    refuses requests for another one).
    """
    from vlcache_plugins.tensorrt_plugins import import_plugin_api, register_tensorrt_plugins

    _buildable_spec(onnx_dir)  # a clear error about the export before one about TensorRT
    trt, _ = import_plugin_api()
    register_tensorrt_plugins()
    spec, sources = prepare_sources(onnx_dir, out_dir, threshold=threshold)
    engines: dict[str, str] = {}
    for role, source in sources.items():
        engine = Path(out_dir) / f"{role}.engine"
        _build_one(trt, source, engine, optimization_profile(spec, role, max_input_len), dtype)
        engines[role] = engine.name
    spec.engines = engines
    return spec.save(out_dir)
