"""Runners that execute exported graphs, and one generation loop for all of them.

``load_runtime(dir)`` opens an export directory (ONNX Runtime on CPU, or TensorRT engines on a
GPU); ``stream(runner, input_ids, pixel_values, config)`` runs prefill → the compression pipeline
(:mod:`vlcache.pipeline`) and yields the greedy tokens (:class:`vlcache.stream.TokenStream`);
``generate(...)`` collects them with the stats. onnxruntime and tensorrt are imported only when a
runner of that kind is built.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CompressionStats",
    "GenerationState",
    "OnnxRunner",
    "PromptPrefill",
    "Runner",
    "RunnerCache",
    "RuntimeResult",
    "TensorRTRunner",
    "TokenStream",
    "generate",
    "load_runtime",
    "prefill",
    "stream",
]

_WHERE = {
    "Runner": "vlcache.runtime.base",
    "CompressionStats": "vlcache.pipeline",
    "TokenStream": "vlcache.stream",
    "RunnerCache": "vlcache.runtime.loop",
    "RuntimeResult": "vlcache.runtime.loop",
    "generate": "vlcache.runtime.loop",
    "prefill": "vlcache.runtime.loop",
    "PromptPrefill": "vlcache.runtime.loop",
    "stream": "vlcache.runtime.loop",
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
