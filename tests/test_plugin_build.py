"""The TensorRT engine build's CPU-checkable part: the optimization profile of every graph input and
the graphs the engines are built from (:func:`prepare_sources`). (The engine build itself needs
TensorRT and a GPU; it has never run.)"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from vlcache.export import export_llava  # noqa: E402
from vlcache.export.spec import ExportSpec  # noqa: E402
from vlcache.hf.tiny import tiny_llava  # noqa: E402
from vlcache.runtime.tensorrt_support import PLUGIN_SETTINGS_FILE, PluginSettings  # noqa: E402
from vlcache_plugins.build import ROLES, build_engines, optimization_profile, prepare_sources  # noqa: E402


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportSpec, Path]:
    out = tmp_path_factory.mktemp("export")
    # the standard decoder: what TensorRT builds from
    export_llava(tiny_llava(seed=0, layers=2), out, max_input_len=128, attention="standard")
    return ExportSpec.load(out), out


def test_fused_decoder_exports_are_refused(tmp_path: Path) -> None:
    export_llava(tiny_llava(seed=0, layers=1), tmp_path, max_input_len=64)  # default: fused attention
    with pytest.raises(ValueError, match="attention='standard'"):
        optimization_profile(ExportSpec.load(tmp_path), "decoder")
    with pytest.raises(ValueError, match="attention='standard'"):
        build_engines(tmp_path, tmp_path / "engines")


def test_profile_covers_every_dynamic_input_with_ordered_ranges(spec: tuple[ExportSpec, Path]) -> None:
    import onnx

    s, folder = spec
    for role in ROLES:
        graph = onnx.load(str(folder / s.graphs[role]), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        dynamic = {
            i.name
            for i in graph.input
            if i.name not in initializers
            and any(d.dim_param or not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
        }
        prof = optimization_profile(s, role, 100)
        assert dynamic <= set(prof), (role, dynamic - set(prof))
        for name, (lo, opt, hi) in prof.items():
            assert len(lo) == len(opt) == len(hi)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (role, name)
            # fixed dims agree with the graph's
            inp = next(i for i in graph.input if i.name == name)
            for k, d in enumerate(inp.type.tensor_type.shape.dim):
                if d.HasField("dim_value"):
                    assert lo[k] == hi[k] == d.dim_value, (role, name, k)
    dec = optimization_profile(s, "decoder", 100)
    past = [v for k, v in dec.items() if k.startswith("past_")]
    assert len(past) == 2 * s.num_layers and all(lo[2] == 0 and hi[2] == 100 for lo, _, hi in past)


def test_bad_role_and_missing_tensorrt_are_clear(spec: tuple[ExportSpec, Path], tmp_path: Path) -> None:
    s, folder = spec
    with pytest.raises(ValueError, match="unknown role"):
        optimization_profile(s, "nope")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from vlcache_plugins.tensorrt_plugins import TensorRTUnavailableError

        with pytest.raises(TensorRTUnavailableError):
            build_engines(folder, tmp_path / "engines")
        assert not (tmp_path / "engines").exists()


def test_prepare_sources_writes_the_plugin_graphs_and_their_constants(
    spec: tuple[ExportSpec, Path], tmp_path: Path
) -> None:
    import json

    import onnx

    from vlcache_plugins.graph import PLUGIN_DOMAIN, plugin_nodes

    s, folder = spec
    out = tmp_path / "engines"
    got, sources = prepare_sources(folder, out, threshold=0.02)
    assert got.graphs == s.graphs and not got.engines
    assert set(sources) == set(ROLES)
    for role in ("post_vision_stats", "compact_kv"):  # the plugin graphs, rewritten, beside the engines
        assert sources[role] == out / f"{role}.trt.onnx"
        model = onnx.load(str(sources[role]))
        onnx.checker.check_model(model, full_check=True)
        (node,) = plugin_nodes(model)
        assert node.domain == PLUGIN_DOMAIN
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"vlcache" and attrs["aot"] == 1
        if role == "post_vision_stats":  # the build's threshold and the model's own scale, never 0
            assert attrs["threshold"] == pytest.approx(0.02) and attrs["scale"] == pytest.approx(s.attention_scale)
    for role in ("vision", "embed", "decoder"):
        assert sources[role] == folder / s.graphs[role]
    assert all((out / file).is_file() for file in s.graphs.values())  # the graphs travel with the engines
    assert json.loads((out / PLUGIN_SETTINGS_FILE).read_text()) == {"threshold": 0.02, "scale": s.attention_scale}
    assert PluginSettings.load(out).serves(0.02, s.attention_scale)
    assert not PluginSettings.load(out).serves(0.01, s.attention_scale)


def test_exports_without_the_op_graphs_are_refused(spec: tuple[ExportSpec, Path], tmp_path: Path) -> None:
    s, folder = spec
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in s.graphs.values():
        (partial / file).write_bytes((folder / file).read_bytes())
    s2 = ExportSpec.load(folder)
    del s2.graphs["compact_kv"]
    s2.save(partial)
    with pytest.raises(ValueError, match="no compact_kv graph"):
        prepare_sources(partial, tmp_path / "engines")
    with pytest.raises(ValueError, match="no compact_kv graph"):
        build_engines(partial, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()
