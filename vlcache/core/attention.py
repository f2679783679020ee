"""Post-vision attention, computed in chunks of query rows.

Contract: queries and keys carry RoPE already (keys are what the KV cache holds). The queries are
the prompt rows ``[query_start, m)``; row ``i`` sits at absolute position ``query_start + i`` and
sees keys ``0 .. query_start + i`` (causal). Grouped-query attention is handled by viewing the
``H_q`` query heads as ``H_kv`` groups of ``G = H_q / H_kv`` heads that share one key head, so keys
are never repeated in memory. Peak memory per call is O(B · H_q · chunk · m): never m × m.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

#: Query rows per chunk of the attention statistics (memory, not results).
DEFAULT_CHUNK = 256


def _check_shapes(queries: torch.Tensor, keys: torch.Tensor, query_start: int) -> tuple[int, int]:
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError("queries must be (B, H_q, n, d) and keys (B, H_kv, m, d)")
    b, h_q, n, d = queries.shape
    b_k, h_kv, m, d_k = keys.shape
    if b != b_k or d != d_k:
        raise ValueError(f"batch/head_dim mismatch: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}")
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key heads ({h_kv})")
    if not 0 <= query_start or query_start + n > m:
        raise ValueError(f"query rows [{query_start}, {query_start + n}) fall outside the {m} keys")
    return h_q // h_kv, m


def chunk_logits(queries: torch.Tensor, keys_t: torch.Tensor, row_start: int, scale: float, group: int) -> torch.Tensor:
    """Scaled, causally masked logits of one chunk of query rows.

    Args:
        queries: (B, H_q, c, d) rows at positions ``row_start ..``.
        keys_t: (B, H_kv, d, m) float32 keys, transposed.
        group: G = H_q / H_kv.

    Returns:
        (B, H_q, c, m) float32, ``-inf`` where the causal mask hides a key. The G query heads of a
        group are stacked into one matmul against their shared key head: no key is copied.
    """
    b, h_q, c, d = queries.shape
    h_kv, m = keys_t.shape[1], keys_t.shape[3]
    q = queries.float().reshape(b, h_kv, group * c, d)
    logits = torch.matmul(q, keys_t).mul_(scale).view(b, h_kv, group, c, m)
    if row_start + 1 < m:  # only keys after the first row's position can be hidden
        cols = torch.arange(row_start + 1, m, device=keys_t.device)
        rows = torch.arange(row_start, row_start + c, device=keys_t.device)
        logits[..., row_start + 1 :].masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
    return logits.view(b, h_q, c, m)


def _iter_logits(
    queries: torch.Tensor, keys: torch.Tensor, query_start: int, scale: float | None, chunk_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row_offset, logits)``: :func:`chunk_logits` of each chunk of ``chunk_size`` query rows
    (shapes checked, ``scale`` defaulted and the keys transposed once, on the first ``next``)."""
    group, _ = _check_shapes(queries, keys, query_start)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    scale = 1.0 / math.sqrt(queries.shape[-1]) if scale is None else scale
    keys_t = keys.float().transpose(-1, -2)
    n = queries.shape[2]
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        yield lo, chunk_logits(queries[:, :, lo:hi], keys_t, query_start + lo, scale, group)


def iter_attention_chunks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_start: int,
    *,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(row_offset, probs)`` chunk by chunk.

    Args:
        queries: (B, H_q, n, d) query rows at positions ``query_start .. query_start + n - 1``.
        keys: (B, H_kv, m, d) all prompt keys.
        query_start: absolute position of the first query row.
        scale: softmax scale, default ``1/sqrt(d)``.
        chunk_size: query rows per chunk.

    Yields:
        row_offset: index (into ``queries``) of the chunk's first row.
        probs: (B, H_q, c, m) float32 softmax over keys, exactly 0 where the causal mask hides a key.
    """
    for lo, logits in _iter_logits(queries, keys, query_start, scale, chunk_size):
        yield lo, torch.softmax(logits, dim=-1)


def iter_unnormalised_chunks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_start: int,
    *,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Like :func:`iter_attention_chunks`, without the division: yields ``(row_offset, e, z)`` with
    ``e = exp(logits − rowmax)`` (B, H_q, c, m) in [0, 1] (the row max is exactly 1) and ``z`` its
    row sums (B, H_q, c, 1), so ``probs = e / z``. Saves a full pass when only ratios to the row
    max (thresholds) and weighted column sums are needed."""
    for lo, e in _iter_logits(queries, keys, query_start, scale, chunk_size):
        e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
        yield lo, e, e.sum(dim=-1, keepdim=True)


def post_vision_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_start: int,
    *,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Materialise the post-vision attention ``softmax(Q_P · K_allᵀ / √d + causal)``.

    Args:
        queries: (B, H_q, τ, d) the post-vision rows (positions ``query_start .. m-1``).
        keys: (B, H_kv, m, d).

    Returns:
        (B, H_q, τ, m) float32 probabilities. τ × m per head; use :func:`post_vision_statistics`
        when only scores and density are needed.
    """
    chunks = [p for _, p in iter_attention_chunks(queries, keys, query_start, scale=scale, chunk_size=chunk_size)]
    if not chunks:
        b, h_q, _, _ = queries.shape
        return queries.new_zeros((b, h_q, 0, keys.shape[2]), dtype=torch.float32)
    return torch.cat(chunks, dim=2)


def visible_counts(query_start: int, num_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """(n,) number of keys row ``i`` sees under the causal mask: ``query_start + i + 1``."""
    return torch.arange(query_start + 1, query_start + num_rows + 1, device=device)


def group_mean(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H_q, ...) -> (B, H_kv, ...): mean over the query heads of each GQA group."""
    b, h_q = per_query_head.shape[:2]
    if h_q % num_kv_heads:
        raise ValueError(f"{h_q} query heads do not split into {num_kv_heads} groups")
    return per_query_head.reshape(b, num_kv_heads, h_q // num_kv_heads, *per_query_head.shape[2:]).mean(2)


def attention_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_start: int,
    *,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """(B, H_q, m) float32: attention each key receives, summed over the given query rows."""
    b, h_q = queries.shape[:2]
    total = torch.zeros(b, h_q, 1, keys.shape[2], dtype=torch.float32, device=keys.device)
    for _, e, z in iter_unnormalised_chunks(queries, keys, query_start, scale=scale, chunk_size=chunk_size):
        total += torch.matmul(z.reciprocal().transpose(-1, -2), e)
    return total.squeeze(2)
