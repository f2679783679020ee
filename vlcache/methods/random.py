"""`random`: keeps a uniformly random subset of each layer's tokens (seeded): the floor any
scoring rule must beat."""

from __future__ import annotations

import torch

from vlcache.methods.base import LayerInput, LayerScore, Method, PromptLayout, register


@register
class RandomEviction(Method):
    name = "random"
    paper = "none: uniform random eviction, a control"

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        b, h_kv, m, _ = inp.keys.shape
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + inp.layer_idx)
        return LayerScore(torch.rand(b, h_kv, m, generator=gen).to(inp.keys.device))
