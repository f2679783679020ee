"""`full`: no eviction, the reference every method is measured against."""

from __future__ import annotations

import torch

from vlcache.methods.base import LayerInput, LayerScore, Method, PromptLayout, register


@register
class Full(Method):
    name = "full"
    paper = "none: the uncompressed KV cache"
    compresses = False

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        b, h_kv, m, _ = inp.keys.shape
        return LayerScore(torch.ones(b, h_kv, m))

    def allocate(self, weights, layout):  # type: ignore[no-untyped-def]
        return torch.full((len(weights),), layout.prompt_len, dtype=torch.long)
