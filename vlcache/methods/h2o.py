"""`h2o`: Heavy-Hitter Oracle — accumulated attention of every prompt query, plus recent tokens.

Zhang et al. "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", arXiv:2306.14048 (NeurIPS 2023). Half of a layer's budget goes to the most recent tokens,
half to the keys with the largest column sums of the whole prompt's attention (per KV head).
"""

from __future__ import annotations

from vlcache.core import attention_column_sums, group_mean
from vlcache.methods.base import LayerInput, LayerScore, Method, PromptLayout, register


@register
class H2O(Method):
    name = "h2o"
    paper = "Zhang et al., H2O, arXiv:2306.14048 (NeurIPS 2023)"

    def query_start(self, layout: PromptLayout) -> int:
        return 0

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        sums = attention_column_sums(
            inp.queries, inp.keys, inp.query_start, scale=inp.scale, chunk_size=self.config.chunk_size
        )
        return LayerScore(group_mean(sums, inp.keys.shape[1]))

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        return 0, k // 2
