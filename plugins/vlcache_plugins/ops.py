"""Launch wrappers of the Triton kernels: shape checks, output allocation, the density reduction.

Each wrapper has the semantics of its reference in :mod:`vlcache.core` (see the op contracts in
:mod:`vlcache.export.names`). The tensors must live on a CUDA device, or on the CPU with
``TRITON_INTERPRET=1`` set (Triton's interpreter: slow, for tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlcache.core.sparsity import DEFAULT_THRESHOLD

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_K = 32


@dataclass(frozen=True)
class PostVisionKernelStats:
    """Outputs of the fused post-vision kernel for one layer.

    Attributes:
        scores: (B, H_kv, m) float32, Σ over the post-vision rows of the causal softmax, averaged
            over each GQA group (:func:`vlcache.core.vlcache_scores`).
        density: (B,) float32, the layer density ``d_l`` (:func:`vlcache.core.layer_density`).
        group_sparsity: (B, H_kv) float32, zeroed / visible averaged over each group's query heads;
            ``density = 1 − group_sparsity.mean(1)``.
        row_max: (B, H_q, τ) float32, the row max of the scaled, causally masked logits.
        row_sum: (B, H_q, τ) float32, ``Σ_j exp(logit_j − row_max)``; so
            ``log softmax = logit − row_max − log(row_sum)``.
    """

    scores: torch.Tensor
    density: torch.Tensor
    group_sparsity: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor


def _check_block(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def _check_device(*tensors: torch.Tensor) -> None:
    from vlcache_plugins.kernels import interpreting

    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "the vlcache Triton kernels run on CUDA tensors; on the CPU set TRITON_INTERPRET=1 (Triton's "
            "interpreter, slow) or use the reference in vlcache.core"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}")


def post_vision_stats(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_start: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_n: int = DEFAULT_BLOCK_N,
) -> PostVisionKernelStats:
    """VL-Cache scores and density of one layer with the fused Triton kernel.

    Same semantics as :func:`vlcache.core.post_vision_statistics` (and the ``PostVisionStats`` op):
    row ``i`` of ``queries`` sits at absolute position ``query_start + i`` and sees keys
    ``0 .. query_start + i``; an entry counts as zero when ``A < threshold · rowmax``.

    Args:
        queries: (B, H_q, τ, D) post-vision queries after RoPE; float32, float16 or bfloat16.
        keys: (B, H_kv, m, D) all prompt keys after RoPE, same dtype; ``H_q % H_kv == 0``.
        query_start: absolute position of the first query row; ``0 ≤ query_start``, ``query_start + τ ≤ m``.
        threshold: p in [0, 1).
        scale: softmax scale, default ``1/√D`` (0 or None mean the default, as in the op contract).
        block_q, block_n: tile sizes (powers of two ≥ 16): rows of the stacked GQA group × keys.

    Returns:
        :class:`PostVisionKernelStats`; logits are computed in float32 (16-bit inputs are exact in
        float32 products), as in the reference.
    """
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(
            f"queries must be (B, H_q, τ, D) and keys (B, H_kv, m, D), got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    b, h_q, tau, head_dim = queries.shape
    b_k, h_kv, m, d_k = keys.shape
    if b != b_k or head_dim != d_k:
        raise ValueError(f"batch/head_dim mismatch: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key heads ({h_kv})")
    if queries.dtype not in FLOAT_DTYPES or keys.dtype != queries.dtype:
        raise ValueError(f"queries and keys must share a dtype among {FLOAT_DTYPES}, got {queries.dtype}, {keys.dtype}")
    query_start = int(query_start)
    if query_start < 0 or query_start + tau > m:
        raise ValueError(f"query rows [{query_start}, {query_start + tau}) fall outside the {m} keys")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold p must lie in [0, 1), got {threshold}")
    if scale is not None and not (scale >= 0.0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number >= 0 (0 = 1/sqrt(D)), got {scale}")
    if max(b, h_q, head_dim, m) >= 2**31 or h_q * max(tau, 1) >= 2**31:
        raise ValueError("dimensions must fit in 32-bit integers")
    _check_block("block_q", block_q)
    _check_block("block_n", block_n)
    _check_device(queries, keys)
    scale = 1.0 / math.sqrt(head_dim) if not scale else float(scale)

    device = keys.device
    f32 = torch.float32
    scores = torch.empty(b, h_kv, m, dtype=f32, device=device)
    sparsity = torch.empty(b, h_kv, dtype=f32, device=device)
    row_max = torch.empty(b, h_q, tau, dtype=f32, device=device)
    row_sum = torch.empty(b, h_q, tau, dtype=f32, device=device)
    if b * h_kv * m == 0 or head_dim == 0:  # nothing to launch: no keys, or no heads
        scores.zero_()
        sparsity.zero_()
        density = torch.ones(b, dtype=f32, device=device)
        return PostVisionKernelStats(scores, density, sparsity, row_max.zero_(), row_sum.zero_())

    from vlcache_plugins.kernels import block_d, interpreting, jit, post_vision_stats_kernel

    qs = torch.tensor([query_start], dtype=torch.int64, device=device)
    kernel = jit(post_vision_stats_kernel)
    kernel[(b, h_kv)](
        queries.contiguous(),
        keys.contiguous(),
        qs,
        h_q,
        h_kv,
        tau,
        m,
        scores,
        sparsity,
        row_max,
        row_sum,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d(head_dim),
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        THRESHOLD=float(threshold),
        SCALE=scale,
        UPCAST=interpreting() or queries.dtype == torch.float32,
    )
    density = 1.0 - sparsity.mean(dim=1)
    return PostVisionKernelStats(scores, density, sparsity, row_max, row_sum)


def compact_kv(
    kv: torch.Tensor, indices: torch.Tensor, *, validate: bool = True, block_k: int = DEFAULT_BLOCK_K
) -> torch.Tensor:
    """Gather the kept positions of every KV head into new storage (the ``CompactKV`` op).

    Same result as :func:`vlcache.core.compact`.

    Args:
        kv: (B, H_kv, m, D) keys or values, any floating dtype.
        indices: (B, H_kv, k) int64 (int32 accepted) positions in ``[0, m)``; ascending by contract,
            though the gather does not depend on it.
        validate: check the index range first (one host synchronisation). Without it an index out of
            range gives a zero row, never an out-of-bounds read.
        block_k: kept rows per program (power of two ≥ 16).

    Returns:
        (B, H_kv, k, D) contiguous, kv's dtype.
    """
    if kv.dim() != 4 or indices.dim() != 3 or tuple(indices.shape[:2]) != tuple(kv.shape[:2]):
        raise ValueError(f"indices {tuple(indices.shape)} do not match kv {tuple(kv.shape)}: need (B, H_kv, k)")
    if not kv.dtype.is_floating_point:
        raise ValueError(f"kv must be a floating tensor, got {kv.dtype}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be int64 or int32, got {indices.dtype}")
    _check_block("block_k", block_k)
    _check_device(kv, indices)
    b, h_kv, m, head_dim = kv.shape
    k = indices.shape[2]
    if max(b * h_kv, m, k, head_dim) >= 2**31:
        raise ValueError("dimensions must fit in 32-bit integers")
    if validate and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= m):
        raise ValueError(f"indices must lie in [0, {m}), got [{int(indices.min())}, {int(indices.max())}]")
    out = torch.empty(b, h_kv, k, head_dim, dtype=kv.dtype, device=kv.device)
    if out.numel() == 0:
        return out

    from vlcache_plugins.kernels import block_d, compact_kv_kernel, jit

    kernel = jit(compact_kv_kernel)
    kernel[(b * h_kv, (k + block_k - 1) // block_k)](
        kv.contiguous(),
        indices.to(torch.int64).contiguous(),
        m,
        k,
        out,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d(head_dim),
        BLOCK_K=block_k,
    )
    return out
