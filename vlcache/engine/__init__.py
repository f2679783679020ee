"""In-flight batching: the scheduler (:mod:`vlcache.engine.scheduler`) and the KV pool (:mod:`vlcache.engine.pool`).

Requests join the running decode batch between steps and leave it when they finish; each holds, per
layer, only what its budget kept. Served through :class:`vlcache.serving.service.Service`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "BatchKV", "KVPool", "Scheduler", "SchedulerMetrics", "Sequence", "pool_bytes"]

_WHERE = {
    "DEFAULT_MAX_BATCH_SIZE": "vlcache.config",
    "Scheduler": "vlcache.engine.scheduler",
    "SchedulerMetrics": "vlcache.engine.scheduler",
    "Sequence": "vlcache.engine.scheduler",
    "BatchKV": "vlcache.engine.pool",
    "KVPool": "vlcache.engine.pool",
    "pool_bytes": "vlcache.engine.pool",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'vlcache.engine' has no attribute {name!r}")
