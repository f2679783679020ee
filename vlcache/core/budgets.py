"""Per-layer KV budgets: how many of the m prompt tokens each of the L layers keeps.

Every allocator returns a LongTensor ``k`` of shape (L,) with ``Σ k = round(budget · L · m)``
exactly and ``min_keep' ≤ k_l ≤ m`` where ``min_keep' = min(min_keep, m)``, whenever that is
feasible. When the total is below ``L · min_keep'`` (a prompt shorter than the budget floor) every
layer keeps ``min_keep'`` tokens and the total exceeds the target: the floor wins.

:func:`allocate_budgets` is VL-Cache's sparsity-aware rule (Tu et al., 2024, Eq. 2):
``β_l = α · L · d_l / Σ_j d_j`` clipped to [β_min, 1]. The paper only clips, so its realised total
drifts from α; here the clipped mass is redistributed over the unclipped layers (water-filling:
``k_l = clip(λ · d_l, min_keep, m)`` with λ solved so that the sum is exact), then rounded to
integers by largest remainder, which keeps the order: a denser layer never gets fewer tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: PyramidKV's ratio between the mean and the smallest layer budget (the paper's β = 20).
DEFAULT_PYRAMID_BETA = 20.0


def total_budget(budget: float, num_layers: int, prompt_len: int) -> int:
    """``round(budget · L · m)``: the number of KV entries (tokens × layers) kept after prefill."""
    check_budget(budget)
    return int(round(budget * num_layers * prompt_len))


def check_budget(budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget must be a fraction in (0, 1] of the prompt's KV entries kept, got {budget!r}")


def _as_weights(weights: torch.Tensor | Sequence[float]) -> list[float]:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().tolist()
    if not w:
        raise ValueError("need at least one layer")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"layer weights must be finite and non-negative, got {w}")
    top = max(w)
    if top == 0:  # nothing to go by: share evenly
        return [1.0] * len(w)
    # Normalise; shares below 1e-12 of the largest are zero (keeps the solve finite).
    return [x / top if x / top > 1e-12 else 0.0 for x in w]


def proportional_budgets(
    weights: torch.Tensor | Sequence[float], budget: float, prompt_len: int, min_keep: int = 1
) -> torch.Tensor:
    """Split ``round(budget · L · m)`` tokens over layers in proportion to ``weights``.

    Args:
        weights: (L,) non-negative layer weights (VL-Cache: density; TGV-KV: image attention mass).
        budget: α in (0, 1], the fraction of the prompt's KV entries kept.
        prompt_len: m.
        min_keep: floor per layer in tokens (clipped to m).

    Returns:
        (L,) int64 tokens kept per layer.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    w = _as_weights(weights)
    raw = torch.as_tensor(weights, dtype=torch.float64).flatten().tolist()  # ties: the heavier raw weight wins
    n = len(w)
    total = total_budget(budget, n, prompt_len)
    lo, hi = min(min_keep, prompt_len), prompt_len
    if total <= n * lo:
        return torch.full((n,), lo, dtype=torch.long)
    if total >= n * hi:
        return torch.full((n,), hi, dtype=torch.long)

    def filled(lam: float) -> list[float]:
        return [min(max(lam * x, lo), hi) for x in w]

    # Σ clip(λ·w, lo, hi) is continuous and non-decreasing in λ: bisect for the exact total.
    lam_lo, lam_hi = 0.0, hi / min(x for x in w if x > 0)
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if sum(filled(mid)) < total:
            lam_lo = mid
        else:
            lam_hi = mid
    real = filled(lam_hi)
    ints = [min(int(math.floor(x + 1e-9)), hi) for x in real]
    # Largest remainder; ties go to the heavier layer, so the order of weights is kept.
    order = sorted(range(n), key=lambda i: (-(real[i] - ints[i]), -raw[i], i))
    short = total - sum(ints)
    while short > 0:
        progressed = False
        for i in order:
            if short == 0:
                break
            if ints[i] < hi:
                ints[i] += 1
                short -= 1
                progressed = True
        if not progressed:  # pragma: no cover - unreachable when total <= n * hi
            break
    while short < 0:  # float slack the other way: take from the lightest layers above the floor
        for i in reversed(order):
            if short == 0:
                break
            if ints[i] > lo:
                ints[i] -= 1
                short += 1
    return torch.tensor(ints, dtype=torch.long)


def allocate_budgets(
    density: torch.Tensor | Sequence[float], budget: float, prompt_len: int, min_keep: int = 1
) -> torch.Tensor:
    """VL-Cache's sparsity-aware layer budgets.

    Args:
        density: (L,) layer densities d_l in [0, 1] (see :func:`vlcache.core.layer_density`).
        budget: α in (0, 1].
        prompt_len: m, the prompt's length in tokens.
        min_keep: k_min, the fewest tokens a layer keeps (clipped to m).

    Returns:
        (L,) int64 ``k_l`` with ``Σ k_l = round(α · L · m)`` (when feasible) and ``min_keep ≤ k_l ≤ m``.
    """
    return proportional_budgets(density, budget, prompt_len, min_keep)


def uniform_budgets(num_layers: int, budget: float, prompt_len: int, min_keep: int = 1) -> torch.Tensor:
    """The same share for every layer (differing by at most one token), exact total."""
    return proportional_budgets([1.0] * num_layers, budget, prompt_len, min_keep)


def pyramid_budgets(
    num_layers: int, budget: float, prompt_len: int, min_keep: int = 1, beta: float = DEFAULT_PYRAMID_BETA
) -> torch.Tensor:
    """PyramidKV's schedule (Cai et al., 2024, arXiv:2406.02069): budgets fall linearly with depth.

    The top layer gets ``mean / beta`` and the first ``2 · mean − mean / beta`` (their mean is the
    uniform share); the shape is then scaled to the exact total like the other allocators.
    """
    if beta < 1:
        raise ValueError(f"beta must be >= 1, got {beta}")
    if num_layers == 1:
        return uniform_budgets(1, budget, prompt_len, min_keep)
    low, high = 1.0 / beta, 2.0 - 1.0 / beta
    shape = [high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
    return proportional_budgets(shape, budget, prompt_len, min_keep)
