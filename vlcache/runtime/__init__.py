"""Runners that execute exported graphs, and one generation loop for all of them.

``load_runtime(dir)`` opens an export directory (ONNX Runtime on CPU, or TensorRT engines on a
GPU); ``generate(runner, input_ids, pixel_values, config)`` runs prefill → score → allocate →
compact → greedy decode and returns tokens and stats. onnxruntime and tensorrt are imported only
when a runner of that kind is built.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GenerationState",
    "OnnxRunner",
    "Runner",
    "RuntimeResult",
    "RuntimeStats",
    "TensorRTRunner",
    "generate",
    "load_runtime",
    "prefill",
]

_WHERE = {
    "Runner": "vlcache.runtime.base",
    "RuntimeResult": "vlcache.runtime.loop",
    "RuntimeStats": "vlcache.runtime.loop",
    "generate": "vlcache.runtime.loop",
    "prefill": "vlcache.runtime.loop",
    "GenerationState": "vlcache.runtime.loop",
    "load_runtime": "vlcache.runtime.loader",
    "OnnxRunner": "vlcache.runtime.onnx_runner",
    "TensorRTRunner": "vlcache.runtime.tensorrt_runner",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'vlcache.runtime' has no attribute {name!r}")
