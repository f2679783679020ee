"""`full`: no eviction, the reference every method is measured against.

``compresses = False``: the runners skip scoring and compaction, so it has no :meth:`score` (the
base class's raises NotImplementedError, saying so).
"""

from __future__ import annotations

import torch

from vlcache.methods.base import Method, register


@register
class Full(Method):
    name = "full"
    paper = "none: the uncompressed KV cache"
    compresses = False

    def allocate(self, weights, layout):  # type: ignore[no-untyped-def]
        return torch.full((len(weights),), layout.prompt_len, dtype=torch.long)
