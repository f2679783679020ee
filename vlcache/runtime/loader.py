"""`load_runtime(dir)`: the runner for an export directory, for the builder and serving to call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlcache.config import RUNTIME_BACKENDS
from vlcache.export.spec import ExportSpec
from vlcache.runtime.base import Runner


def load_runtime(directory: str | Path, backend: str = "auto", **options: Any) -> Runner:
    """Open an export directory (``export.json`` and its graphs / engines).

    Args:
        directory: written by :func:`vlcache.export.export_llava` (and a TensorRT build, if any).
        backend: ``onnx`` (ONNX Runtime), ``tensorrt`` (engines listed in ``export.json``) or
            ``auto``: tensorrt where engines, TensorRT and a CUDA device all exist, else onnx.
        **options: passed to the runner (``threads=``, ``providers=`` for onnx; ``device=`` for tensorrt).
    """
    if backend not in RUNTIME_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(RUNTIME_BACKENDS)}, got {backend!r}")
    spec = ExportSpec.load(directory)
    if backend == "auto":
        from vlcache.runtime.tensorrt_support import tensorrt_available

        backend = "tensorrt" if spec.engines and tensorrt_available() else "onnx"
    if backend == "tensorrt":
        from vlcache.runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(directory, spec, **options)
    from vlcache.runtime.onnx_runner import OnnxRunner

    return OnnxRunner(directory, spec, **options)
