"""vlcache: VL-Cache KV-cache compression for vision-language models.

Lazy at import: ``import vlcache`` (and so ``vlcache.client``, ``vlcache.serving.protocol``,
``vlcache.cli``) loads no framework. ``vlcache.CompressionConfig`` and ``allocate_budgets`` load
torch on first use; ``VLCache`` / ``generate`` also load transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionStats",
    "GenerationResult",
    "VLCache",
    "__version__",
    "allocate_budgets",
    "generate",
]

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "CompressionConfig": "vlcache.config",
    "allocate_budgets": "vlcache.core",
    "VLCache": "vlcache.hf",
    "generate": "vlcache.hf",
    "CompressionStats": "vlcache.pipeline",
    "GenerationResult": "vlcache.hf",
}

if TYPE_CHECKING:
    from vlcache.config import CompressionConfig
    from vlcache.core import allocate_budgets
    from vlcache.hf import GenerationResult, VLCache, generate
    from vlcache.pipeline import CompressionStats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlcache' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value
