"""OpenAI Triton kernels of the VL-Cache ops (contracts in :mod:`vlcache.export.names`).

The kernel functions below are plain Python functions in Triton's language; they are turned into
kernels lazily (:func:`jit`) so that the same source serves three uses:

* on a GPU, launched from :mod:`vlcache_plugins.ops` (``triton.jit``);
* on a CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the tests check them
  against :mod:`vlcache.core` — the choice is made when first launched, not at import;
* compiled ahead of time to PTX (:mod:`vlcache_plugins.aot`) for the TensorRT plugins.

Both kernels take their arguments in the order TensorRT's ahead-of-time plugins launch with:
input pointers, then 32-bit integer scalars, then output pointers; everything else is a
``tl.constexpr`` baked in at compile time. Tensors are dense row-major (TensorRT ``LINEAR``).

``post_vision_stats_kernel`` — one program per (batch, KV head), grid ``(B, H_kv)``. The ``G = H_q /
H_kv`` query heads of a group are stacked into ``G · τ`` rows that share one key head, so keys are
never repeated. Two passes over the keys, each tiled ``BLOCK_Q × BLOCK_N``:

1. online softmax per row: the row max of the scaled logits and the normaliser
   ``Σ_j exp(logit_j − rowmax)``, written to ``row_max`` / ``row_sum``;
2. per key tile, for every row: ``e = exp(logit − rowmax)``; the tile's column sums of ``e / row_sum``
   accumulate in registers (the program owns its KV head's scores: no atomics, deterministic, no
   zero-initialised output needed), and the visible entries with ``e < p`` are counted
   (``A < p · rowmax ⟺ e < p`` because ``A = e / row_sum`` and the row max of ``e`` is 1).

It writes ``scores`` (B, H_kv, m) = column sums averaged over the group and ``group_sparsity``
(B, H_kv) = zeroed / visible averaged over the group's query heads. The layer density is
``1 − mean over KV heads of group_sparsity`` (every group has G heads, so this is the mean over
all query heads), computed outside the kernel: a single kernel cannot reduce across programs
without atomics on zero-initialised memory, which TensorRT's AOT plugins cannot provide.
Never more than one ``BLOCK_Q × BLOCK_N`` tile of the τ × m attention exists at a time.

``compact_kv_kernel`` — grid ``(B · H_kv, cdiv(k, BLOCK_K))``: gathers ``BLOCK_K`` kept rows of
``HEAD_DIM`` values per program. An index outside ``[0, m)`` yields a zero row (never a read out of
bounds); :func:`vlcache_plugins.ops.compact_kv` rejects such indices before launching.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_JITTED: dict[tuple[str, bool], Any] = {}

# Reductions go through the builtin ``tl.reduce`` with Triton's own combine functions rather than
# ``tl.sum`` / ``tl.max``: those are ``@triton.jit`` helpers fixed to one mode when triton is first
# imported, so they break the interpreter in a process that imported triton before setting
# TRITON_INTERPRET (as a test session does). The interpreter recognises these two combine functions
# and reduces with numpy; the compiler inlines them. Likewise ``tl.full`` replaces ``tl.zeros``.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max


def compilable() -> bool:
    """False when triton was imported with TRITON_INTERPRET set: its language helpers are then
    interpreter-only and the kernels cannot be compiled (to a GPU or ahead of time) in this process."""
    from triton.runtime.jit import JITFunction

    return isinstance(_SUM, JITFunction)


def jit(fn: Callable[..., None], *, interpret: bool | None = None) -> Any:
    """The launchable kernel for ``fn``: interpreted or compiled, decided now (not at import).

    ``triton.jit`` picks the interpreter when it decorates, so decorating at import time would tie
    the module to the environment of whoever imported it first. Cached per (kernel, mode).
    """
    mode = interpreting() if interpret is None else interpret
    key = (fn.__name__, mode)
    if key not in _JITTED:
        if mode:
            from triton.runtime.interpreter import InterpretedFunction

            _JITTED[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _JITTED[key] = JITFunction(fn)
    return _JITTED[key]


def post_vision_stats_kernel(
    q_ptr,  # (B, H_q, τ, D) queries, float32 / float16 / bfloat16
    k_ptr,  # (B, H_kv, m, D) keys, same dtype
    qs_ptr,  # (1,) or () int64: query_start, the absolute position of q's first row
    h_q,  # int32 H_q
    h_kv,  # int32 H_kv
    tau,  # int32 τ
    m,  # int32 m
    scores_ptr,  # out (B, H_kv, m) float32
    sparsity_ptr,  # out (B, H_kv) float32
    row_max_ptr,  # out (B, H_q, τ) float32: max_j of the scaled, causally masked logits
    row_sum_ptr,  # out (B, H_q, τ) float32: Σ_j exp(logit_j − row_max)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(HEAD_DIM, 16)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    THRESHOLD: tl.constexpr,  # p
    SCALE: tl.constexpr,  # softmax scale (1/√D by default, resolved by the caller)
    UPCAST: tl.constexpr,  # dot products in float32 (the interpreter needs it for 16-bit inputs)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    group = h_q // h_kv
    n_rows = group * tau  # the group's query heads stacked: row r is head r // τ, row r % τ
    qs = tl.load(qs_ptr).to(tl.int64)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    head0 = b.to(tl.int64) * h_q + kvh * group  # first query head of the group
    q_base = q_ptr + head0 * tau * HEAD_DIM
    k_base = k_ptr + (b.to(tl.int64) * h_kv + kvh) * m * HEAD_DIM
    stats_off = head0 * tau

    # Pass 1: row max and normaliser (online softmax), only over keys some row of the tile sees.
    for r0 in range(0, n_rows, BLOCK_Q):
        rows = r0 + tl.arange(0, BLOCK_Q)
        row_ok = rows < n_rows
        pos = qs + (rows % tau)
        q = tl.load(q_base + rows[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        hi = tl.minimum(tl.reduce(tl.where(row_ok, pos, 0), 0, _MAX) + 1, m)
        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_Q], 0.0, dtype=tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kt = tl.load(
                k_base + cols[:, None] * HEAD_DIM + d[None, :], mask=(cols < m)[:, None] & d_ok[None, :], other=0.0
            )
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision="ieee") * SCALE
            visible = row_ok[:, None] & (cols[None, :] <= pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.reduce(tl.exp(s - m_safe[:, None]), 1, _SUM)
            m_i = m_new
        tl.store(row_max_ptr + stats_off + rows, m_i, mask=row_ok)
        tl.store(row_sum_ptr + stats_off + rows, l_i, mask=row_ok)

    # Pass 2 reads the row statistics other threads of this program wrote.
    tl.debug_barrier()

    zeroed = tl.full([BLOCK_N], 0, dtype=tl.int32)
    for n0 in range(0, m, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(
            k_base + cols[:, None] * HEAD_DIM + d[None, :], mask=(cols < m)[:, None] & d_ok[None, :], other=0.0
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        acc = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_Q):
            rows = r0 + tl.arange(0, BLOCK_Q)
            row_ok = rows < n_rows
            pos = qs + (rows % tau)
            q = tl.load(q_base + rows[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            mx = tl.load(row_max_ptr + stats_off + rows, mask=row_ok, other=0.0)
            sm = tl.load(row_sum_ptr + stats_off + rows, mask=row_ok, other=1.0)
            s = tl.dot(q, tl.trans(kt), input_precision="ieee") * SCALE
            visible = row_ok[:, None] & (cols[None, :] <= pos[:, None])
            e = tl.where(visible, tl.exp(s - mx[:, None]), 0.0)
            acc += tl.reduce(e / sm[:, None], 0, _SUM)
            zeroed += tl.reduce(tl.where(visible & (e < THRESHOLD), 1, 0), 0, _SUM)
        tl.store(scores_ptr + (b.to(tl.int64) * h_kv + kvh) * m + cols, acc / group, mask=cols < m)

    # Causally visible entries per head: Σ_i (query_start + i + 1).
    visible_total = tau * (qs + 1) + (tau * (tau - 1)) // 2
    denom = tl.maximum(visible_total * group, 1).to(tl.float32)
    sparsity = tl.reduce(zeroed, 0, _SUM).to(tl.float32) / denom
    tl.store(sparsity_ptr + b * h_kv + kvh, sparsity)


def compact_kv_kernel(
    kv_ptr,  # (B, H_kv, m, D) keys or values, any float dtype
    idx_ptr,  # (B, H_kv, k) int64 kept positions
    m,  # int32 m
    k,  # int32 k
    out_ptr,  # out (B, H_kv, k, D), kv's dtype
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = slots < k
    idx = tl.load(idx_ptr + bh * k + slots, mask=ok, other=0)
    valid = ok & (idx >= 0) & (idx < m)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows = tl.load(
        kv_ptr + (bh * m + idx)[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0
    )
    tl.store(out_ptr + (bh * k + slots)[:, None] * HEAD_DIM + d[None, :], rows, mask=ok[:, None] & d_ok[None, :])


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two ≥ max(head_dim, 16) (``tl.dot`` needs ≥ 16)."""
    return max(16, triton.next_power_of_2(head_dim))
