"""`pyramidkv`: PyramidKV — SnapKV scores with budgets that shrink linearly with depth.

Cai et al. "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv:2406.02069. The first layer keeps the most, the last ``1/beta`` of the mean (beta = 20).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlcache.core import pyramid_budgets
from vlcache.methods.base import PromptLayout, register
from vlcache.methods.snapkv import SnapKV


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = "Cai et al., PyramidKV, arXiv:2406.02069"

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        return pyramid_budgets(
            len(weights), self.config.budget, layout.prompt_len, self.min_keep(layout), self.config.pyramid_beta
        )
