"""Serving on Triton Inference Server: the logic behind the `vlcache` Python-backend model.

Modules (light at import; torch, transformers and Triton load on first use):

* :mod:`vlcache.serving.protocol` — model name, inputs, outputs, stats keys: the one source of truth
  shared with :mod:`vlcache.client`.
* :mod:`vlcache.artifact` — the artifact directory contract (manifest.json, hf/, processor/, triton/).
* :mod:`vlcache.serving.request` — validation of one request (INVALID_ARGUMENT errors).
* :mod:`vlcache.serving.engine` — the :class:`Engine` protocol, the torch engine, :func:`load_engine`.
* :mod:`vlcache.serving.service` — the ``Service`` behind the model: in-flight batching over a KV
  pool for ONNX Runtime engines, one request at a time for the others.
* :mod:`vlcache.serving.model` — what the repository's ``model.py`` runs (``ServedModel``: hands each
  request to the service and streams its responses; exports the service's gauges as Triton metrics).
* :mod:`vlcache.serving.repository` — :func:`render_repository` from the ``triton_repo/`` templates.
* :mod:`vlcache.serving.server` — :class:`TritonServer` and :func:`~vlcache.serving.server.serve`
  (what the ``vlcache-serve`` command, :mod:`vlcache.cli.serve`, runs).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ArtifactError",
    "Engine",
    "InvalidRequest",
    "RenderError",
    "TritonServer",
    "load_engine",
    "read_manifest",
    "render_repository",
]

_EXPORTS = {
    "ArtifactError": "vlcache.artifact",
    "read_manifest": "vlcache.artifact",
    "Engine": "vlcache.serving.engine",
    "load_engine": "vlcache.serving.engine",
    "InvalidRequest": "vlcache.serving.request",
    "RenderError": "vlcache.serving.repository",
    "render_repository": "vlcache.serving.repository",
    "TritonServer": "vlcache.serving.server",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlcache.serving' has no attribute {name!r}")
