"""Registration of the VL-Cache kernels as TensorRT plugins (TensorRT's Python plugin API).

**Never run on a GPU or against a real TensorRT**: TensorRT cannot be installed on the machines this
project is developed and tested on. The code follows TensorRT's quickly-deployable-plugin API
(``tensorrt.plugin``, TensorRT ≥ 10.9 for ahead-of-time kernels) as documented; the pieces that do
not need TensorRT — the kernels (interpreter tests), their PTX compilation (:mod:`vlcache_plugins.aot`)
and the ONNX graph pass (:mod:`vlcache_plugins.graph`) — are tested on CPU.

Plugins (ids from :data:`vlcache.export.names.PLUGIN_IDS`):

``vlcache::PostVisionStats(q, k, query_start; threshold: float, scale: float)``
    → ``scores`` (B, H_kv, m) f32, ``group_sparsity`` (B, H_kv) f32, ``row_max`` (B, H_q, τ) f32,
    ``row_sum`` (B, H_q, τ) f32. The op's ``density`` is ``1 − ReduceMean(group_sparsity, axis 1)``,
    which :func:`vlcache_plugins.graph.to_tensorrt_plugins` adds as standard ONNX nodes (one kernel
    cannot reduce across its programs; see :mod:`vlcache_plugins.kernels`).
``vlcache::CompactKV(kv, indices)`` → ``kept`` (B, H_kv, k, D), kv's dtype.

Only ahead-of-time implementations are registered: the kernels are compiled to PTX while the engine
is built and baked into it, so the engine runs without Python (trtexec, Triton's TensorRT backend)
as long as the TensorRT version, GPU architecture and a driver new enough for the PTX match. The
build itself must run in Python after :func:`register_tensorrt_plugins` (the creators live in the
Python process), with the graph rewritten by the graph pass; its nodes carry ``aot=1``.

Annotations here are real objects, not strings (no ``from __future__ import annotations``): the
plugin API reads them to tell tensors from attributes.
"""

import math
from typing import Any

from vlcache.export.names import COMPACT_KV, PLUGIN_IDS, POST_VISION_STATS
from vlcache.runtime.tensorrt_support import TensorRTUnavailableError, import_tensorrt

#: First TensorRT release with ahead-of-time Python plugins (``tensorrt.plugin.aot_impl``).
MIN_TENSORRT = (10, 9)

_registered: tuple[str, ...] = ()


def import_plugin_api() -> tuple[Any, Any]:
    """``(tensorrt, tensorrt.plugin)``, imported now, with OpenAI Triton (which compiles the kernels).

    Raises:
        TensorRTUnavailableError: TensorRT ≥ :data:`MIN_TENSORRT` with ``tensorrt.plugin``, or Triton,
            is missing (:func:`vlcache.runtime.tensorrt_support.import_tensorrt` says which).
    """
    trt = import_tensorrt(
        needed_by="the vlcache TensorRT plugins (TensorRT's Python plugin API)", min_version=MIN_TENSORRT
    )
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTUnavailableError(f"TensorRT {trt.__version__} has no tensorrt.plugin module") from exc
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailableError(
            "the plugins' kernels are compiled with OpenAI Triton: pip install 'vlcache[plugins]'"
        ) from exc
    return trt, trtp


def _triton_dtype(trt: Any, dtype: Any) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    if dtype not in names:
        raise ValueError(f"unsupported tensor type {dtype}: the vlcache plugins take float32, float16 or bfloat16")
    return names[dtype]


def _constant(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"{what} must be a build-time constant (a fixed dimension in the ONNX graph)")
    return int(expr.constant_value)


def register_tensorrt_plugins(*, arch: int | None = None, ptx_version: int | None = None) -> tuple[str, ...]:
    """Register the vlcache plugins with TensorRT's plugin registry (idempotent).

    Call before parsing the rewritten ONNX graph (``trt.OnnxParser``) or adding the plugins with
    ``network.add_plugin(trtp.op.vlcache.PostVisionStats(...), aot=True)``.

    Args:
        arch: compute capability to compile for (90 for H100); None: the GPU of this process.
        ptx_version: cap the PTX ISA version for older drivers.

    Returns:
        The registered plugin ids, ``("vlcache::PostVisionStats", "vlcache::CompactKV")``.

    Raises:
        TensorRTUnavailableError: TensorRT ≥ 10.9 with ``tensorrt.plugin``, or Triton, is missing.
    """
    global _registered
    if _registered:
        return _registered
    trt, trtp = import_plugin_api()

    from vlcache_plugins.aot import COMPACT_BLOCK_K, compile_compact_kv, compile_post_vision_stats

    pvs_id = PLUGIN_IDS[POST_VISION_STATS]
    ckv_id = PLUGIN_IDS[COMPACT_KV]
    desc = trtp.TensorDesc
    # The plugin API validates these annotations: `outputs` must be tuple[TensorDesc] (no `...`).
    outs = tuple[desc]
    aot_return = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    # PostVisionStats: shapes and types of the outputs.
    @trtp.register(pvs_id)
    def _post_vision_stats_desc(
        q: desc, k: desc, query_start: desc, threshold: float, scale: float
    ) -> tuple[desc, desc, desc, desc]:
        qs, ks = q.shape_expr, k.shape_expr
        scores = trtp.from_shape_expr((ks[0], ks[1], ks[2]), dtype=trt.float32)
        sparsity = trtp.from_shape_expr((ks[0], ks[1]), dtype=trt.float32)
        row_max = trtp.from_shape_expr((qs[0], qs[1], qs[2]), dtype=trt.float32)
        row_sum = trtp.from_shape_expr((qs[0], qs[1], qs[2]), dtype=trt.float32)
        return scores, sparsity, row_max, row_sum

    @trtp.autotune(pvs_id)
    def _post_vision_stats_autotune(
        q: desc, k: desc, query_start: desc, threshold: float, scale: float, outputs: outs
    ) -> list[trtp.AutoTuneCombination]:
        # q and k choose their type together; query_start is int64; the outputs are float32.
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, INT64, FP32, FP32, FP32, FP32", "LINEAR")]

    @trtp.aot_impl(pvs_id)
    def _post_vision_stats_aot(
        q: desc, k: desc, query_start: desc, threshold: float, scale: float, outputs: outs, tactic: int
    ) -> aot_return:
        head_dim = _constant(q.shape_expr[3], "the head dim of q")
        compiled = compile_post_vision_stats(
            dtype=_triton_dtype(trt, q.dtype),
            head_dim=head_dim,
            threshold=float(threshold),
            scale=float(scale) if scale > 0 else 1.0 / math.sqrt(head_dim),
            arch=arch,
            ptx_version=ptx_version,
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x = k.shape_expr[0]
        launch.grid_y = k.shape_expr[1]
        launch.block_x = compiled.block_x
        launch.shared_mem = compiled.shared_mem
        scalars = (q.shape_expr[1], k.shape_expr[1], q.shape_expr[2], k.shape_expr[2])  # H_q, H_kv, τ, m
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return compiled.name, compiled.ptx, launch, extra

    # CompactKV.
    @trtp.register(ckv_id)
    def _compact_kv_desc(kv: desc, indices: desc) -> desc:
        kvs = kv.shape_expr
        return trtp.from_shape_expr((kvs[0], kvs[1], indices.shape_expr[2], kvs[3]), dtype=kv.dtype)

    @trtp.autotune(ckv_id)
    def _compact_kv_autotune(kv: desc, indices: desc, outputs: outs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT64, FP32|FP16|BF16", "LINEAR")]

    @trtp.aot_impl(ckv_id)
    def _compact_kv_aot(kv: desc, indices: desc, outputs: outs, tactic: int) -> aot_return:
        block_k = COMPACT_BLOCK_K
        compiled = compile_compact_kv(
            dtype=_triton_dtype(trt, kv.dtype),
            head_dim=_constant(kv.shape_expr[3], "the head dim of kv"),
            block_k=block_k,
            arch=arch,
            ptx_version=ptx_version,
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x = kv.shape_expr[0] * kv.shape_expr[1]
        launch.grid_y = trtp.cdiv(indices.shape_expr[2], block_k)
        launch.block_x = compiled.block_x
        launch.shared_mem = compiled.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(kv.shape_expr[2]), trtp.SymInt32(indices.shape_expr[2])])
        return compiled.name, compiled.ptx, launch, extra

    _registered = (pvs_id, ckv_id)
    return _registered
