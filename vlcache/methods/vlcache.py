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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlcache.core import (
    DEFAULT_RECENT_FRACTION,
    DEFAULT_THRESHOLD,
    allocate_budgets,
    post_vision_statistics,
    recent_window,
)
from vlcache.methods.base import (
    LayerInput,
    LayerScore,
    Method,
    MethodSettings,
    PostVisionScores,
    PromptLayout,
    register,
)


@dataclass(frozen=True)
class PostVisionSettings(MethodSettings):
    """Post-vision scoring (every VL-Cache variant).

    Attributes:
        threshold: p of the sparsity filter: attention below ``p · rowmax`` counts as zero.
        query_window: None: the post-vision span's queries score the cache; N: the last N prompt
            tokens' (the paper's speed setup used 50).
    """

    threshold: float = DEFAULT_THRESHOLD
    query_window: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {self.threshold}")
        if self.query_window is not None and self.query_window < 1:
            raise ValueError(f"query_window must be >= 1 or None, got {self.query_window}")


@dataclass(frozen=True)
class VLCacheSettings(PostVisionSettings):
    """Attributes:
    recent_fraction: f: a layer that keeps k tokens keeps its last ``max(1, floor(f · k))`` prompt
        tokens inside k and fills the rest by score (0: the paper's Algorithm 1 alone).
    """

    recent_fraction: float = DEFAULT_RECENT_FRACTION

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction < 1.0:
            raise ValueError(f"recent_fraction must lie in [0, 1), got {self.recent_fraction}")


@register
class VLCacheMethod(Method):
    name = "vlcache"
    paper = "Tu et al., VL-Cache, arXiv:2410.23317 (ICLR 2025)"
    settings_type: ClassVar[type[PostVisionSettings]] = VLCacheSettings
    settings: PostVisionSettings

    def query_start(self, layout: PromptLayout) -> int:
        if self.settings.query_window is not None:
            return max(0, layout.prompt_len - self.settings.query_window)
        return layout.post_vision_start

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        stats = post_vision_statistics(
            inp.queries,
            inp.keys,
            inp.query_start,
            threshold=self.settings.threshold,
            scale=inp.scale,
            chunk_size=self.config.chunk_size,
        )
        return PostVisionScores.layer_score(stats.scores, stats.density)

    def post_vision_scores(self) -> PostVisionScores:
        """:meth:`score` is exactly the post-vision statistics: a backend's fused op may compute them."""
        return PostVisionScores(self.settings.threshold)

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        density = [1.0 if w is None else w for w in weights]
        return allocate_budgets(density, self.config.budget, layout.prompt_len, self.min_keep(layout))

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        """No sinks; the recent window ``max(1, floor(f · k))`` (none when f = 0 or k = 0)."""
        return 0, recent_window(self.recent_fraction, k)

    @property
    def recent_fraction(self) -> float:
        """f; 0 for settings without a recent window (``vlcache-nowindow``)."""
        return self.settings.recent_fraction if isinstance(self.settings, VLCacheSettings) else 0.0


@register
class VLCacheUniform(VLCacheMethod):
    """Ablation: VL-Cache's post-vision scores with the same budget in every layer."""

    name = "vlcache-uniform"

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        return Method.allocate(self, weights, layout)


@register
class VLCacheNoWindow(VLCacheMethod):
    """Ablation: the paper's Algorithm 1 alone, without the recent window (f = 0: no
    ``recent_fraction`` setting)."""

    name = "vlcache-nowindow"
    settings_type = PostVisionSettings
