"""VL-Cache statistics of the post-vision attention: layer density and per-key scores.

VL-Cache (Tu et al., 2024, arXiv:2410.23317), Eq. 1 and Algorithm 1: an entry ``A_qj`` of the
post-vision attention counts as zero when ``A_qj < p · max_j A_qj`` (p = 0.01). A head's sparsity is
the fraction of zeroed entries among the causally visible ones, and a layer's density is
``d_l = 1 − mean_h(sparsity_h)``. The per-key score is the plain column sum over the post-vision
rows, ``s_j = Σ_{q∈P} A_qj``, averaged over the query heads of a GQA group.

:func:`layer_density` and :func:`vlcache_scores` are the readable reference on a materialised
attention; :func:`post_vision_statistics` computes both chunk by chunk with O(chunk · m) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlcache.core.attention import DEFAULT_CHUNK, group_mean, iter_unnormalised_chunks, visible_counts

DEFAULT_THRESHOLD = 0.01


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold p must lie in [0, 1), got {threshold}")


def _zeroed_per_head(probs: torch.Tensor, row_start: int, threshold: float) -> torch.Tensor:
    """(B, H, c, m) probabilities of rows at positions row_start.. -> (B, H) zeroed visible entries."""
    c, m = probs.shape[-2:]
    rowmax = probs.amax(dim=-1, keepdim=True)
    key_pos = torch.arange(m, device=probs.device)
    row_pos = torch.arange(row_start, row_start + c, device=probs.device)
    visible = key_pos[None, :] <= row_pos[:, None]  # (c, m)
    below = (probs < threshold * rowmax) & visible
    return below.sum(dim=(-1, -2))


def layer_density(attention: torch.Tensor, query_start: int, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Density ``d_l`` of one layer's post-vision attention.

    Args:
        attention: (B, H_q, τ, m) probabilities of the rows at positions ``query_start .. query_start+τ-1``.
        query_start: absolute position of the first row.
        threshold: p; entries below ``p · rowmax`` count as zero.

    Returns:
        (B,) float32 in [0, 1]: 1 − mean over heads of (zeroed / causally visible).
    """
    _check_threshold(threshold)
    tau = attention.shape[2]
    zeroed = _zeroed_per_head(attention.float(), query_start, threshold).float()
    visible = visible_counts(query_start, tau, attention.device).sum().float()
    return 1.0 - (zeroed / visible).mean(dim=1)


def vlcache_scores(attention: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """VL-Cache key scores ``s_j = Σ_{q∈P} A_qj`` per KV head.

    Args:
        attention: (B, H_q, τ, m) post-vision probabilities.
        num_kv_heads: H_kv; scores are averaged over each group of ``H_q / H_kv`` query heads.

    Returns:
        (B, H_kv, m) float32.
    """
    return group_mean(attention.float().sum(dim=2), num_kv_heads)


@dataclass
class PostVisionStats:
    """What VL-Cache needs from one layer's prefill.

    Attributes:
        column_sums: (B, H_q, m) Σ over post-vision rows of the attention, per query head.
        density: (B,) the layer density d_l.
        scores: (B, H_kv, m) column sums averaged over each GQA group.
    """

    column_sums: torch.Tensor
    density: torch.Tensor
    scores: torch.Tensor


def post_vision_statistics(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_start: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> PostVisionStats:
    """Scores and density of one layer without materialising τ × m beyond a chunk.

    Args:
        queries: (B, H_q, τ, d) post-vision query rows (after RoPE), positions ``query_start..m-1``.
        keys: (B, H_kv, m, d) all prompt keys (after RoPE).
        query_start: absolute position of the first query row (v in the paper).
        threshold: p of the sparsity filter.

    Returns:
        :class:`PostVisionStats`; equal to :func:`vlcache_scores` and :func:`layer_density` applied
        to :func:`~vlcache.core.attention.post_vision_attention`.
    """
    _check_threshold(threshold)
    b, h_q, tau, _ = queries.shape
    m = keys.shape[2]
    column_sums = torch.zeros(b, h_q, 1, m, dtype=torch.float32, device=keys.device)
    zeroed = torch.zeros(b, h_q, dtype=torch.float32, device=keys.device)
    for lo, e, z in iter_unnormalised_chunks(queries, keys, query_start, scale=scale, chunk_size=chunk_size):
        # A_qj < p · max_j A_qj  <=>  e_qj < p, since A = e / z and max_j e_qj = 1.
        below = (e < threshold).sum(dim=(-1, -2)).float()
        if threshold > 0:  # hidden keys have e = 0 < p: take them back out
            c = e.shape[2]
            first = query_start + lo
            below -= float(c * m - (visible_counts(first, c).sum()))
        zeroed += below
        column_sums += torch.matmul(z.reciprocal().transpose(-1, -2), e)  # Σ_q e_qj / z_q
    column_sums = column_sums.squeeze(2)
    visible = visible_counts(query_start, tau, keys.device).sum().float()
    density = 1.0 - (zeroed / visible).mean(dim=1) if tau else torch.ones(b, device=keys.device)
    return PostVisionStats(column_sums, density, group_mean(column_sums, keys.shape[1]))
