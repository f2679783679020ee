"""Choosing the kept tokens of a layer and compacting its K/V.

A layer keeps ``k`` of its ``m`` prompt tokens: first the forced ones (``sinks`` leading tokens, then
the ``recent`` trailing ones, in that priority, as far as ``k`` allows), then the highest scores
among the rest. Selection is per KV head (each head its own set, all of size k, so the cache stays
a dense (B, H_kv, k, d) tensor) or shared (one set per layer from the head-mean score). Indices are
returned in original order, so the relative order of the kept tokens never changes.
"""

from __future__ import annotations

import math

import torch

#: VL-Cache's recent window, as a fraction f of each layer's budget: the paper's experiments keep
#: 10% (read so by the public reimplementations MosaicKV and EffiVLM-Bench; DESIGN.md, step 5).
DEFAULT_RECENT_FRACTION = 0.1


def recent_window(fraction: float, k: int) -> int:
    """w = max(1, floor(f · k)) trailing prompt tokens kept inside a budget of k; 0 when f or k is 0."""
    if fraction <= 0 or k <= 0:
        return 0
    return min(k, max(1, math.floor(fraction * k + 1e-9)))


def forced_positions(prompt_len: int, k: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """(f,) positions always kept, f ≤ k: the first ``sinks``, then the last ``recent`` tokens."""
    if min(prompt_len, k, sinks, recent) < 0:
        raise ValueError("prompt_len, k, sinks and recent must be >= 0")
    head = list(range(min(sinks, prompt_len)))
    tail = [p for p in range(max(prompt_len - recent, 0), prompt_len) if p >= len(head)]
    # Priority: sinks, then the most recent tokens.
    order = head + tail[::-1]
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def select_kept(
    scores: torch.Tensor, k: int, *, per_head: bool = True, sinks: int = 0, recent: int = 0
) -> torch.Tensor:
    """Indices of the kept tokens of one layer.

    Args:
        scores: (B, H_kv, m) higher = more important.
        k: tokens kept, 0 ≤ k ≤ m.
        per_head: True: each KV head keeps its own top-k; False: one set per layer from the mean
            score over heads, repeated for every head.
        sinks, recent: positions forced into the kept set (see :func:`forced_positions`).

    Returns:
        (B, H_kv, k) int64 indices, ascending along the last dim.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, H_kv, m), got {tuple(scores.shape)}")
    b, h, m = scores.shape
    if not 0 <= k <= m:
        raise ValueError(f"k must lie in [0, {m}], got {k}")
    s = scores.float() if per_head else scores.float().mean(dim=1, keepdim=True)
    forced = forced_positions(m, k, sinks, recent).to(scores.device)
    free = k - forced.numel()
    if forced.numel():
        s = s.index_fill(-1, forced, float("-inf"))
    top = (
        torch.topk(s, free, dim=-1, sorted=False).indices if free else s.new_zeros((*s.shape[:2], 0), dtype=torch.long)
    )
    idx = torch.cat([forced.expand(*s.shape[:2], -1), top], dim=-1)
    idx = idx.sort(dim=-1).values
    return idx.expand(b, h, k) if not per_head else idx


def compact(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather kept entries along the sequence axis into new storage (the old one can be freed).

    Args:
        tensor: (B, H_kv, m, d) keys or values.
        indices: (B, H_kv, k) kept positions.

    Returns:
        (B, H_kv, k, d) contiguous.
    """
    if tensor.dim() != 4 or indices.shape != tensor.shape[:2] + indices.shape[2:]:
        raise ValueError(f"indices {tuple(indices.shape)} do not match tensor {tuple(tensor.shape)}")
    gather_idx = indices.unsqueeze(-1).expand(*indices.shape, tensor.shape[-1])
    return torch.gather(tensor, 2, gather_idx).contiguous()
