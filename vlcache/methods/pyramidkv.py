"""`pyramidkv`: PyramidKV — SnapKV scores with budgets that shrink linearly with depth.

Cai et al. "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv:2406.02069. The first layer keeps the most, the last ``1/beta`` of the mean (beta = 20).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlcache.core import DEFAULT_PYRAMID_BETA, pyramid_budgets
from vlcache.methods.base import PromptLayout, register
from vlcache.methods.snapkv import SnapKV, SnapKVSettings


@dataclass(frozen=True)
class PyramidKVSettings(SnapKVSettings):
    """SnapKV's, and ``pyramid_beta``: the ratio between the mean and the smallest layer budget."""

    pyramid_beta: float = DEFAULT_PYRAMID_BETA

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pyramid_beta < 1:
            raise ValueError(f"pyramid_beta must be >= 1, got {self.pyramid_beta}")


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = "Cai et al., PyramidKV, arXiv:2406.02069"
    settings_type = PyramidKVSettings
    settings: PyramidKVSettings

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        return pyramid_budgets(
            len(weights), self.config.budget, layout.prompt_len, self.min_keep(layout), self.settings.pyramid_beta
        )
