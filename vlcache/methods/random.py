"""`random`: keeps a uniformly random subset of each layer's tokens (seeded): the floor any
scoring rule must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlcache.methods.base import LayerInput, LayerScore, Method, MethodSettings, PromptLayout, register


@dataclass(frozen=True)
class RandomSettings(MethodSettings):
    """``seed``: of the per-layer random scores."""

    seed: int = 0


@register
class RandomEviction(Method):
    name = "random"
    paper = "none: uniform random eviction, a control"
    settings_type = RandomSettings
    settings: RandomSettings

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        b, h_kv, m, _ = inp.keys.shape
        gen = torch.Generator().manual_seed(self.settings.seed * 100_003 + inp.layer_idx)
        return LayerScore(torch.rand(b, h_kv, m, generator=gen).to(inp.keys.device))
