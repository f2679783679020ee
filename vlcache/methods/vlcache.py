"""`vlcache`: VL-Cache — sparsity- and modality-aware KV compression for VLMs.

Tu, Vashchilenko, Lu, Xu. "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration", arXiv:2410.23317 (ICLR 2025).

Scores keys by the attention they receive from the post-vision window (the prompt after the last
image token), gives each layer a budget in proportion to its post-vision attention density, and
keeps per layer a recent window of its last ``w_l = max(1, floor(f · k_l))`` prompt tokens
(``recent_fraction`` f, 0.1 as in the paper's experiments; the last prompt token is always kept)
plus the top ``k_l − w_l`` of the rest by score, in original order.

Ablations: `vlcache-uniform` (VL-Cache scores and window, uniform budgets) and `vlcache-nowindow`
(f = 0: the paper's Algorithm 1 alone, which can evict the question itself: docs/fidelity.md).
"""

from __future__ import annotations

import math
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

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        """No sinks; the recent window ``max(1, floor(f · k))`` (none when f = 0 or k = 0)."""
        return 0, recent_window(self.recent_fraction, k)

    @property
    def recent_fraction(self) -> float:
        return self.config.recent_fraction


def recent_window(fraction: float, k: int) -> int:
    """w = max(1, floor(f · k)) trailing prompt tokens kept inside a budget of k; 0 when f or k is 0."""
    if fraction <= 0 or k <= 0:
        return 0
    return min(k, max(1, math.floor(fraction * k + 1e-9)))


@register
class VLCacheUniform(VLCacheMethod):
    """Ablation: VL-Cache's post-vision scores with the same budget in every layer."""

    name = "vlcache-uniform"

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        return Method.allocate(self, weights, layout)


@register
class VLCacheNoWindow(VLCacheMethod):
    """Ablation: the paper's Algorithm 1 alone, without the recent window (f = 0 whatever the config)."""

    name = "vlcache-nowindow"

    @property
    def recent_fraction(self) -> float:
        return 0.0
