"""`vlcache`: VL-Cache — sparsity- and modality-aware KV compression for VLMs.

Tu, Vashchilenko, Lu, Xu. "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration", arXiv:2410.23317 (ICLR 2025).

Scores keys by the attention they receive from the post-vision window (the prompt after the last
image token), gives each layer a budget in proportion to its post-vision attention density, and
keeps the top-k per layer. `vlcache-uniform` is the ablation with VL-Cache scores and uniform budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlcache.core import allocate_budgets, post_vision_statistics
from vlcache.methods.base import LayerInput, LayerScore, Method, PromptLayout, register


@register
class VLCacheMethod(Method):
    name = "vlcache"
    paper = "Tu et al., VL-Cache, arXiv:2410.23317 (ICLR 2025)"

    def query_start(self, layout: PromptLayout) -> int:
        if self.config.query_window is not None:
            return max(0, layout.prompt_len - self.config.query_window)
        return layout.post_vision_start

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        stats = post_vision_statistics(
            inp.queries,
            inp.keys,
            inp.query_start,
            threshold=self.config.threshold,
            scale=inp.scale,
            chunk_size=self.config.chunk_size,
        )
        return LayerScore(stats.scores, float(stats.density.mean()))

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        density = [1.0 if w is None else w for w in weights]
        return allocate_budgets(density, self.config.budget, layout.prompt_len, self.min_keep(layout))


@register
class VLCacheUniform(VLCacheMethod):
    """Ablation: VL-Cache's post-vision scores with the same budget in every layer."""

    name = "vlcache-uniform"

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        return Method.allocate(self, weights, layout)
