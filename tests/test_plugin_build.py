"""The TensorRT engine build's CPU-checkable part: the optimization profile of every graph input.
(The engine build itself needs TensorRT and a GPU; it has never run.)"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from vlcache.export import export_llava  # noqa: E402
from vlcache.export.spec import ExportSpec  # noqa: E402
from vlcache.hf.tiny import tiny_llava  # noqa: E402
from vlcache_plugins.build import ROLES, build_engines, optimization_profile  # noqa: E402


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
