"""vlcache: VL-Cache KV-cache compression for vision-language models.

Light at import: ``vlcache.core``, ``vlcache.config`` and ``vlcache.methods`` need only torch;
the transformers adapter loads on first use of ``VLCache`` or ``generate``.
"""

from __future__ import annotations

from typing import Any

from vlcache.config import CompressionConfig
from vlcache.core import allocate_budgets

__version__ = "0.1.0"

__all__ = ["CompressionConfig", "VLCache", "__version__", "allocate_budgets", "generate"]


def __getattr__(name: str) -> Any:
    if name in ("VLCache", "generate", "CompressionStats", "GenerationResult"):
        from vlcache import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'vlcache' has no attribute {name!r}")
