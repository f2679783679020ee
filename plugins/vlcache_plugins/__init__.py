"""vlcache_plugins: the VL-Cache ops as OpenAI Triton kernels and TensorRT plugins.

Public API (each import is lazy, so ``import vlcache_plugins`` needs neither triton, onnx nor
TensorRT; the name you use pulls in what it needs):

* :func:`post_vision_stats`, :func:`compact_kv` — kernel launch wrappers (``vlcache_plugins.ops``;
  need ``triton``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
* :func:`to_tensorrt_plugins` — ONNX graph pass for the TensorRT build (``vlcache_plugins.graph``;
  needs ``onnx``).
* :func:`register_tensorrt_plugins` — registers the plugins with TensorRT
  (``vlcache_plugins.tensorrt_plugins``; needs TensorRT ≥ 10.9 and a GPU host; never run yet).
* ``vlcache_plugins.aot`` — compiles the kernels to PTX for a given GPU architecture.
* ``vlcache_plugins.build`` — the engines of an export directory (``build_engines``; never run).
* :class:`InterpretedEngine` — a CPU stand-in for a plugin engine: the rewritten graph with its
  plugin nodes launching the kernels (``vlcache_plugins.standin``; needs ``onnx`` and ``triton``).

Contracts of the ops: :mod:`vlcache.export.names`; reference semantics: :mod:`vlcache.core`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "post_vision_stats": "vlcache_plugins.ops",
    "compact_kv": "vlcache_plugins.ops",
    "PostVisionKernelStats": "vlcache_plugins.ops",
    "to_tensorrt_plugins": "vlcache_plugins.graph",
    "PLUGIN_DOMAIN": "vlcache_plugins.graph",
    "register_tensorrt_plugins": "vlcache_plugins.tensorrt_plugins",
    "TensorRTUnavailableError": "vlcache_plugins.tensorrt_plugins",
    "InterpretedEngine": "vlcache_plugins.standin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlcache_plugins' has no attribute {name!r}")
