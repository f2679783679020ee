"""TensorRT plugin registration.

TensorRT cannot be installed on the development and CI machines, so:

* the CPU tests run the registration code against a *stand-in* for ``tensorrt`` / ``tensorrt.plugin``
  that records the decorated functions and checks the signature rules TensorRT documents (tensors
  first, then attributes in registration order; ``outputs`` a tuple of TensorDesc; ``tactic`` last;
  real annotations, not strings). They then call the shape function and the ahead-of-time
  implementation with symbolic stand-in shapes: the kernels really compile to PTX for sm_90, and
  the launch grid and scalar arguments must name the right dimensions. This checks our glue, not
  TensorRT.
* ``test_engine_matches_core`` builds and runs a real engine; marked ``gpu`` and ``tensorrt``, it
  skips unless both exist. It has never run.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
import typing

import pytest

from vlcache.export.names import COMPACT_KV, PLUGIN_IDS, POST_VISION_STATS


class _Expr:
    """A symbolic dimension: records the arithmetic done on it as a string."""

    def __init__(self, text: str, value: int | None = None) -> None:
        self.text, self.value = text, value

    def __mul__(self, other: object) -> _Expr:
        return _Expr(f"({self.text}*{other})")

    def __str__(self) -> str:
        return self.text

    @property
    def is_constant(self) -> bool:
        return self.value is not None

    @property
    def constant_value(self) -> int:
        assert self.value is not None
        return self.value


class _TensorDesc:
    def __init__(self, dims: typing.Sequence[_Expr | str], dtype: str) -> None:
        self.shape_expr = [d if isinstance(d, _Expr) else _Expr(d) for d in dims]
        self.dtype = dtype


class _SymExprs(list):
    pass


class _SymIntExprs(_SymExprs):
    @classmethod
    def from_tuple(cls, items: typing.Iterable[object]) -> _SymIntExprs:
        items = list(items)
        assert all(isinstance(i, _SymInt32) for i in items), "every extra argument must be a SymInt32"
        return cls(items)


class _SymInt32:
    def __init__(self, expr: object) -> None:
        self.expr = expr


class _LaunchParams:
    grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
    shared_mem = 0


def _check_annotations(fn: typing.Callable[..., object], kind: str, reg: inspect.Signature | None) -> None:
    sig = inspect.signature(fn)
    for name, param in sig.parameters.items():
        assert not isinstance(param.annotation, str), f"{fn.__name__}: annotation of {name} is a string"
        if name == "outputs":
            args = typing.get_args(param.annotation)
            assert typing.get_origin(param.annotation) is tuple and args, "outputs must be tuple[TensorDesc]"
            assert all(inspect.isclass(a) and issubclass(a, _TensorDesc) for a in args), "outputs: TensorDesc only"
    names = list(sig.parameters)
    if kind == "register":
        kinds = [
            inspect.isclass(p.annotation) and issubclass(p.annotation, _TensorDesc) for p in sig.parameters.values()
        ]
        assert kinds == sorted(kinds, reverse=True), "tensors must come before attributes"
        assert all(p.default is inspect.Parameter.empty for p in sig.parameters.values()), "no defaults allowed"
        ret = sig.return_annotation
        ret_args = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
        assert all(inspect.isclass(a) and issubclass(a, _TensorDesc) for a in ret_args)
        return
    assert reg is not None
    expected = list(reg.parameters) + (["outputs", "tactic"] if kind == "aot_impl" else ["outputs"])
    assert names == expected, f"{kind} parameters {names} != {expected}"
    if kind == "aot_impl":
        ret = typing.get_args(sig.return_annotation)
        assert len(ret) == 4 and ret[2] is _LaunchParams and issubclass(ret[3], _SymExprs)


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], typing.Callable[..., object]]:
    """Install stand-ins for tensorrt and tensorrt.plugin; returns what was registered."""
    registry: dict[tuple[str, str], typing.Callable[..., object]] = {}

    def decorator(kind: str) -> typing.Callable[[str], typing.Callable[..., object]]:
        def by_id(plugin_id: str) -> typing.Callable[..., object]:
            def record(fn: typing.Callable[..., object]) -> typing.Callable[..., object]:
                assert (plugin_id, kind) not in registry, f"{plugin_id} {kind} registered twice"
                reg = inspect.signature(registry[(plugin_id, "register")]) if kind != "register" else None
                _check_annotations(fn, kind, reg)
                registry[(plugin_id, kind)] = fn
                return fn

            return record

        return by_id

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"  # type: ignore[attr-defined]
    trt.float32, trt.float16, trt.bfloat16, trt.int64 = "FP32", "FP16", "BF16", "INT64"  # type: ignore[attr-defined]
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.register = decorator("register")  # type: ignore[attr-defined]
    trtp.autotune = decorator("autotune")  # type: ignore[attr-defined]
    trtp.aot_impl = decorator("aot_impl")  # type: ignore[attr-defined]
    trtp.TensorDesc = _TensorDesc  # type: ignore[attr-defined]
    trtp.from_shape_expr = lambda dims, dtype: _TensorDesc(dims, dtype)  # type: ignore[attr-defined]
    trtp.KernelLaunchParams = _LaunchParams  # type: ignore[attr-defined]
    trtp.SymExprs, trtp.SymIntExprs, trtp.SymInt32 = _SymExprs, _SymIntExprs, _SymInt32  # type: ignore[attr-defined]
    trtp.AutoTuneCombination = lambda types_, formats="LINEAR": (types_, formats)  # type: ignore[attr-defined]
    trtp.cdiv = lambda a, b: _Expr(f"cdiv({a},{b})")  # type: ignore[attr-defined]
    trt.plugin = trtp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)

    from vlcache_plugins import tensorrt_plugins

    monkeypatch.setattr(tensorrt_plugins, "_registered", ())
    return registry


def test_registration_against_a_stand_in(fake_tensorrt) -> None:
    pytest.importorskip("triton")
    from vlcache_plugins import register_tensorrt_plugins
    from vlcache_plugins.kernels import compilable

    if not compilable():
        pytest.skip("triton was imported under TRITON_INTERPRET: nothing can be compiled in this process")

    ids = register_tensorrt_plugins(arch=90)
    assert ids == (PLUGIN_IDS[POST_VISION_STATS], PLUGIN_IDS[COMPACT_KV])
    assert register_tensorrt_plugins(arch=90) == ids  # idempotent: nothing registered twice
    reg = fake_tensorrt
    assert {kind for (_, kind) in reg} == {"register", "autotune", "aot_impl"} and len(reg) == 6

    pvs = PLUGIN_IDS[POST_VISION_STATS]
    q = _TensorDesc(["B", "Hq", "T", _Expr("16", 16)], "FP16")
    k = _TensorDesc(["B", "Hkv", "M", _Expr("16", 16)], "FP16")
    qs = _TensorDesc([], "INT64")
    outputs = reg[(pvs, "register")](q, k, qs, 0.01, 0.0)
    assert [[str(e) for e in o.shape_expr] for o in outputs] == [["B", "Hkv", "M"], ["B", "Hkv"], ["B", "Hq", "T"]] + [
        ["B", "Hq", "T"]
    ]
    assert all(o.dtype == "FP32" for o in outputs)
    ((types_, formats),) = reg[(pvs, "autotune")](q, k, qs, 0.01, 0.0, outputs)
    assert len(types_.split(",")) == 7 and formats == "LINEAR"  # 3 inputs + 4 outputs

    name, ptx, launch, extra = reg[(pvs, "aot_impl")](q, k, qs, 0.01, 0.0, outputs, 0)
    assert name == "post_vision_stats_kernel" and f".entry {name}(" in ptx and ".target sm_90" in ptx
    assert (str(launch.grid_x), str(launch.grid_y)) == ("B", "Hkv") and launch.block_x % 32 == 0
    # Kernel scalar order: H_q, H_kv, τ, m.
    assert [str(a.expr) for a in extra] == ["Hq", "Hkv", "T", "M"]
    # scale 0 means 1/√D: the compiled kernel bakes 0.25 for D = 16 (appears in the PTX as a float).
    assert ptx.count("0f3E800000") >= 1, "1/sqrt(16) = 0.25 should be baked into the kernel"
    assert math.isclose(1 / math.sqrt(16), 0.25)

    ckv = PLUGIN_IDS[COMPACT_KV]
    kv = _TensorDesc(["B", "Hkv", "M", _Expr("16", 16)], "BF16")
    idx = _TensorDesc(["B", "Hkv", "K"], "INT64")
    (kept,) = [reg[(ckv, "register")](kv, idx)]
    assert [str(e) for e in kept.shape_expr] == ["B", "Hkv", "K", "16"] and kept.dtype == "BF16"
    name, ptx, launch, extra = reg[(ckv, "aot_impl")](kv, idx, (kept,), 0)
    assert name == "compact_kv_kernel" and str(launch.grid_x) == "(B*Hkv)" and str(launch.grid_y) == "cdiv(K,32)"
    assert [str(a.expr) for a in extra] == ["M", "K"]

    with pytest.raises(ValueError, match="build-time constant"):
        reg[(ckv, "aot_impl")](_TensorDesc(["B", "Hkv", "M", "D"], "BF16"), idx, (kept,), 0)
    with pytest.raises(ValueError, match="unsupported tensor type"):
        reg[(ckv, "aot_impl")](_TensorDesc(["B", "Hkv", "M", _Expr("16", 16)], "INT64"), idx, (kept,), 0)


def test_missing_tensorrt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlcache_plugins import TensorRTUnavailableError, register_tensorrt_plugins, tensorrt_plugins

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(tensorrt_plugins, "_registered", ())
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        register_tensorrt_plugins()


def test_old_tensorrt_is_refused(fake_tensorrt) -> None:
    from vlcache_plugins import TensorRTUnavailableError, register_tensorrt_plugins

    sys.modules["tensorrt"].__version__ = "10.8.0"  # type: ignore[attr-defined]
    with pytest.raises(TensorRTUnavailableError, match="too old"):
        register_tensorrt_plugins()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_core(tmp_path) -> None:  # pragma: no cover - needs a GPU and TensorRT; never run yet
    """Build an engine from a rewritten ONNX graph with both plugins and compare with vlcache.core."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from vlcache.core import compact, post_vision_statistics, select_kept
    from vlcache.export.names import DOMAIN
    from vlcache_plugins import register_tensorrt_plugins, to_tensorrt_plugins

    register_tensorrt_plugins()
    b, h_q, h_kv, tau, m, d, k_keep, qs = 1, 8, 2, 12, 200, 64, 50, 188
    F, I64 = TensorProto.FLOAT16, TensorProto.INT64
    nodes = [
        helper.make_node(POST_VISION_STATS, ["q", "k", "qs"], ["scores", "density"], domain=DOMAIN, threshold=0.01),
        helper.make_node(COMPACT_KV, ["k", "idx"], ["kept"], domain=DOMAIN),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("q", F, [b, h_q, tau, d]),
            helper.make_tensor_value_info("k", F, [b, h_kv, m, d]),
            helper.make_tensor_value_info("qs", I64, []),
            helper.make_tensor_value_info("idx", I64, [b, h_kv, k_keep]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [b, h_kv, m]),
            helper.make_tensor_value_info("density", TensorProto.FLOAT, [b]),
            helper.make_tensor_value_info("kept", F, [b, h_kv, k_keep, d]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)], ir_version=9
    )
    model = to_tensorrt_plugins(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None
    (tmp_path / "model.plan").write_bytes(bytes(plan))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h_q, tau, d, device="cuda", dtype=torch.float16, generator=gen)
    keys = torch.randn(b, h_kv, m, d, device="cuda", dtype=torch.float16, generator=gen)
    ref = post_vision_statistics(q, keys, qs)
    idx = select_kept(ref.scores, k_keep)
    io = {
        "q": q,
        "k": keys,
        "qs": torch.tensor(qs, device="cuda", dtype=torch.int64),
        "idx": idx.contiguous(),
        "scores": torch.empty(b, h_kv, m, device="cuda"),
        "density": torch.empty(b, device="cuda"),
        "kept": torch.empty(b, h_kv, k_keep, d, device="cuda", dtype=torch.float16),
    }
    for name, tensor in io.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    torch.testing.assert_close(io["scores"], ref.scores, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(io["density"], ref.density, rtol=0, atol=1e-3)
    assert torch.equal(io["kept"], compact(keys, idx))
