"""`tgvkv`: TGV-KV — text-guided vision KV compression (TVB + TWR + TPR, and decode eviction).

Liu, Han, Zhang, Shao, Liu, Guan, Wang. "TGV-KV", ICML 2026 (PMLR v306), code
Danielement321/TGV-KV. Implemented as that code computes it, on ``Ā``, the head-mean attention, with
``T`` the text queries after the last image:

* TVB, layer budget: weight ``S_l = Σ_{i∈T} Σ_{j∈image} Ā[i, j]``; ``k_l ∝ S_l`` (clipped,
  redistributed to an exact total — the original drops the surplus).
* TWR, vision ranking: ``u_i = Σ_{i'∈T} Ā[i', i] / (m − i)`` for i ∈ T, ``r_j = Σ_{i∈T} Ā[i, j] · u_i``.
* TPR: every text token ranks above every vision token (text among itself by H2O-style column sums
  of all prompt queries); the first ``sinks`` (4) tokens and the last token are always kept. One
  index set per layer, shared by the KV heads.
* Decode: each layer keeps its prefill ratio ``k_l / m`` of all tokens seen; when over it, it evicts
  the one token with the least head-mean attention from the current query, outside the first
  ``sinks`` tokens and a protected tail as long as the post-image text kept at prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlcache.core import iter_attention_chunks, proportional_budgets
from vlcache.methods.base import DecodePolicy, LayerInput, LayerScore, Method, PromptLayout, register
from vlcache.methods.streaming import SinkSettings


def tgv_layer_scores(
    mean_attention_rows: torch.Tensor, column_sums_all: torch.Tensor, layout: PromptLayout
) -> tuple[torch.Tensor, float]:
    """Scores and TVB weight of one layer.

    Args:
        mean_attention_rows: (B, τ, m) head-mean attention of the text queries T = [v, m).
        column_sums_all: (B, m) head-mean attention summed over all prompt queries.
        layout: the prompt layout (image spans, v).

    Returns:
        scores (B, m) with every text token above every vision token; the layer weight S_l.
    """
    m = layout.prompt_len
    v = layout.post_vision_start
    image = layout.image_mask(mean_attention_rows.device)
    weight = float(mean_attention_rows[..., image].sum(dim=(-1, -2)).mean()) if image.any() else 0.0
    received = mean_attention_rows.sum(dim=1)  # (B, m)
    seen_by = torch.arange(m - v, 0, -1, device=received.device, dtype=received.dtype)  # m − i for i ∈ T
    u = received[:, v:] / seen_by  # (B, τ)
    vision = torch.einsum("bt,btm->bm", u, mean_attention_rows)
    offset = vision.max() + column_sums_all.abs().max() + 1.0
    scores = torch.where(image, vision, column_sums_all + offset)
    return scores, weight


@register
class TGVKV(Method):
    name = "tgvkv"
    paper = "Liu, Han et al., TGV-KV, ICML 2026 (PMLR v306); code Danielement321/TGV-KV"
    settings_type = SinkSettings
    settings: SinkSettings
    shared_selection = True

    def query_start(self, layout: PromptLayout) -> int:
        return 0  # text tokens are ranked by the column sums of all prompt queries

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        v = layout.post_vision_start
        b, _, m, _ = inp.keys.shape
        col_all = torch.zeros(b, m, device=inp.keys.device)
        rows = []
        for lo, probs in iter_attention_chunks(
            inp.queries, inp.keys, inp.query_start, scale=inp.scale, chunk_size=self.config.chunk_size
        ):
            mean = probs.mean(dim=1)  # (B, c, m)
            col_all += mean.sum(dim=1)
            first = inp.query_start + lo
            if first + mean.shape[1] > v:
                rows.append(mean[:, max(v - first, 0) :])
        scores, weight = tgv_layer_scores(torch.cat(rows, dim=1), col_all, layout)
        return LayerScore(scores.unsqueeze(1).expand(b, inp.keys.shape[1], m), weight)

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        w = [0.0 if x is None else x for x in weights]
        return proportional_budgets(w, self.config.budget, layout.prompt_len, self.min_keep(layout))

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        sinks = min(self.settings.sinks, k)
        return sinks, min(1, k - sinks)

    def decode_policy(self, budgets: torch.Tensor, layout: PromptLayout) -> DecodePolicy | None:
        return TGVDecodePolicy(budgets, layout, self.settings.sinks)


class TGVDecodePolicy(DecodePolicy):
    """Keeps each layer at its prefill ratio during decode by evicting one token per step.

    ``protected[l]``: size of the protected tail, the post-image text tokens layer l kept at
    prefill (set by the runner through :meth:`set_protected` once the kept indices are known).
    """

    def __init__(self, budgets: torch.Tensor, layout: PromptLayout, sinks: int) -> None:
        self.ratio = [int(k) / layout.prompt_len for k in budgets.tolist()]
        self.seen = [layout.prompt_len] * len(self.ratio)
        self.protected = [1] * len(self.ratio)
        self.post_vision_start = layout.post_vision_start
        self.sinks = sinks

    def set_protected(self, layer_idx: int, kept: torch.Tensor) -> None:
        """kept: (B, H_kv, k) prefill indices of the layer."""
        self.protected[layer_idx] = max(1, int((kept[0, 0] >= self.post_vision_start).sum()))

    def step(self, layer_idx: int, attention: torch.Tensor, cache_len: int) -> int | None:
        """attention: (B, H_q, 1, cache_len) probabilities of the new query (new token included)."""
        self.seen[layer_idx] += 1
        allowed = round(self.seen[layer_idx] * self.ratio[layer_idx])
        hi = cache_len - self.protected[layer_idx]
        if cache_len <= allowed or hi <= self.sinks:
            return None
        mean = attention[0].float().mean(dim=0)[0]  # (cache_len,)
        return self.sinks + int(mean[self.sinks : hi].argmin())
