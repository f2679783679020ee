"""`snapkv`: SnapKV — the last prompt tokens' attention, max-pooled, per KV head.

Li et al. "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469
(NeurIPS 2024). The observation window (last ``window`` prompt tokens) is always kept; the other
keys are ranked by the window's summed attention, smoothed by 1-D max pooling (kernel 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlcache.core import attention_column_sums, group_mean
from vlcache.methods.base import LayerInput, LayerScore, Method, MethodSettings, PromptLayout, check_positive, register


@dataclass(frozen=True)
class SnapKVSettings(MethodSettings):
    """Attributes:
    window: the observation window: the last ``window`` prompt tokens score the cache and are kept.
    pool_kernel: the max-pooling kernel over key scores (odd).
    """

    window: int = 32
    pool_kernel: int = 5

    def __post_init__(self) -> None:
        check_positive("window", self.window)
        check_positive("pool_kernel", self.pool_kernel)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")


def pooled_window_scores(inp: LayerInput, kernel: int, chunk_size: int) -> torch.Tensor:
    """(B, H_kv, m): window attention summed per key, group-averaged, max-pooled along keys."""
    sums = attention_column_sums(inp.queries, inp.keys, inp.query_start, scale=inp.scale, chunk_size=chunk_size)
    scores = group_mean(sums, inp.keys.shape[1])
    b, h, m = scores.shape
    pooled = F.max_pool1d(scores.reshape(b * h, 1, m), kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(b, h, m)


@register
class SnapKV(Method):
    name = "snapkv"
    paper = "Li et al., SnapKV, arXiv:2404.14469 (NeurIPS 2024)"
    settings_type = SnapKVSettings
    settings: SnapKVSettings

    def query_start(self, layout: PromptLayout) -> int:
        return max(0, layout.prompt_len - self.settings.window)

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        return LayerScore(pooled_window_scores(inp, self.settings.pool_kernel, self.config.chunk_size))

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        return 0, min(self.settings.window, k)
