"""`streaming`: StreamingLLM — attention sinks plus the most recent tokens.

Xiao et al. "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453
(ICLR 2024). Keeps the first ``sinks`` (4) tokens and fills the rest of the budget with the last ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlcache.methods.base import LayerInput, LayerScore, Method, MethodSettings, PromptLayout, register


@dataclass(frozen=True)
class SinkSettings(MethodSettings):
    """``sinks``: leading prompt tokens always kept (StreamingLLM's attention sinks; TGV-KV's too)."""

    sinks: int = 4

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")


@register
class StreamingLLM(Method):
    name = "streaming"
    paper = "Xiao et al., StreamingLLM, arXiv:2309.17453 (ICLR 2024)"
    settings_type = SinkSettings
    settings: SinkSettings

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        b, h_kv, m, _ = inp.keys.shape
        return LayerScore(torch.arange(m, dtype=torch.float32).expand(b, h_kv, m))

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        sinks = min(self.settings.sinks, k)
        return sinks, k - sinks
