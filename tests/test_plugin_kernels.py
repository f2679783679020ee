"""The plugin's Triton kernels, run by Triton's CPU interpreter, against vlcache.core.

Shapes are tiny (the interpreter is slow) but chosen to hit the edges: GQA groups whose stacked rows
span several row tiles, τ and m that are not multiples of the tiles, a head dim that is not a power of
two, query windows that start at 0, end before m, or are empty.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

pytest.importorskip("triton")

from vlcache.core import compact, post_vision_statistics, select_kept, visible_counts  # noqa: E402
from vlcache_plugins import compact_kv, post_vision_stats  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _qk(b, h_q, h_kv, tau, m, d, dtype, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h_q, tau, d, generator=g) * spread).to(dtype)
    k = (torch.randn(b, h_kv, m, d, generator=g) * spread).to(dtype)
    return q, k


def _reference_row_stats(q, k, query_start, scale):
    """(B, H_q, τ) row max of the scaled causal logits and Σ exp(logit − max), materialised."""
    group = q.shape[1] // k.shape[1]
    logits = torch.matmul(q.float(), k.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    tau, m = q.shape[2], k.shape[2]
    hidden = torch.arange(m)[None, :] > (query_start + torch.arange(tau))[:, None]
    logits = logits.masked_fill(hidden, float("-inf"))
    row_max = logits.amax(-1)
    return row_max, torch.exp(logits - row_max[..., None]).sum(-1)


# (B, H_q, H_kv, τ, m, D, query_start, block_q, block_n)
CASES = {
    "gqa2-tail": (2, 4, 2, 5, 37, 16, 32, 16, 16),
    "gqa3-rows-span-tiles": (1, 6, 2, 13, 50, 24, 37, 16, 16),
    "whole-prompt": (1, 2, 1, 20, 20, 16, 0, 16, 32),
    "window-before-end": (1, 2, 2, 7, 40, 16, 10, 16, 16),
    "mha-one-row": (2, 3, 3, 1, 19, 8, 18, 16, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_post_vision_stats_matches_core(case: str, dtype: torch.dtype) -> None:
    b, h_q, h_kv, tau, m, d, qs, block_q, block_n = CASES[case]
    q, k = _qk(b, h_q, h_kv, tau, m, d, dtype, seed=zlib.crc32(case.encode()))
    out = post_vision_stats(q, k, qs, block_q=block_q, block_n=block_n)
    ref = post_vision_statistics(q, k, qs)

    assert out.scores.shape == (b, h_kv, m) and out.scores.dtype == torch.float32
    assert out.density.shape == (b,) and out.group_sparsity.shape == (b, h_kv)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-3, 1e-4)
    torch.testing.assert_close(out.scores, ref.scores, rtol=rtol, atol=atol)
    # Density counts entries: at most a couple may flip across the threshold on rounding.
    visible = int(visible_counts(qs, tau).sum())
    torch.testing.assert_close(out.density, ref.density, rtol=0, atol=2.0 / (h_q * visible) + 1e-6)
    # Each query row's attention sums to 1: the column sums add up to τ per head.
    torch.testing.assert_close(out.scores.sum(-1), torch.full((b, h_kv), float(tau)), rtol=1e-4, atol=1e-4)

    row_max, row_sum = _reference_row_stats(q, k, qs, 1.0 / math.sqrt(d))
    torch.testing.assert_close(out.row_max, row_max, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.row_sum, row_sum, rtol=1e-4, atol=1e-5)


def test_density_is_not_trivial() -> None:
    """The cases above exercise the threshold count: the reference density is strictly inside (0, 1)."""
    for case in ("gqa2-tail", "gqa3-rows-span-tiles"):
        b, h_q, h_kv, tau, m, d, qs, *_ = CASES[case]
        q, k = _qk(b, h_q, h_kv, tau, m, d, torch.float32, seed=zlib.crc32(case.encode()))
        density = post_vision_statistics(q, k, qs).density
        assert ((density > 0.05) & (density < 0.95)).all(), density


@pytest.mark.parametrize("threshold,scale", [(0.0, None), (0.05, 0.3), (0.5, 0.0)])
def test_threshold_and_scale(threshold: float, scale: float | None) -> None:
    q, k = _qk(1, 4, 1, 9, 33, 16, torch.float32, seed=7)
    out = post_vision_stats(q, k, 24, threshold=threshold, scale=scale, block_q=16, block_n=16)
    ref = post_vision_statistics(q, k, 24, threshold=threshold, scale=scale or None)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.density, ref.density, rtol=0, atol=2.0 / (4 * 9 * 29) + 1e-6)
    if threshold == 0.0:
        assert torch.equal(out.density, torch.ones(1))


def test_empty_window_and_prompt() -> None:
    q, k = _qk(2, 2, 1, 0, 11, 16, torch.float32, seed=3)
    out = post_vision_stats(q, k, 11, block_q=16, block_n=16)
    ref = post_vision_statistics(q, k, 11)
    assert torch.equal(out.scores, torch.zeros(2, 1, 11)) and torch.equal(out.density, ref.density)
    q, k = _qk(1, 2, 2, 0, 0, 16, torch.float32, seed=3)
    assert post_vision_stats(q, k, 0).scores.shape == (1, 2, 0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda q, k: post_vision_stats(q[0], k, 3),  # 3-D queries
        lambda q, k: post_vision_stats(q, k[:, :, :, :8], 3),  # head dim mismatch
        lambda q, k: post_vision_stats(q[:, :3], k, 3),  # 3 query heads over 2 KV heads
        lambda q, k: post_vision_stats(q, k, 9),  # rows past the last key
        lambda q, k: post_vision_stats(q, k.half(), 3),  # dtype mismatch
        lambda q, k: post_vision_stats(q, k, 3, threshold=1.0),
        lambda q, k: post_vision_stats(q, k, 3, block_q=24),
    ],
)
def test_post_vision_stats_rejects_bad_input(bad) -> None:
    q, k = _qk(1, 4, 2, 4, 12, 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        bad(q, k)


def test_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k = _qk(1, 2, 1, 3, 8, 16, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        post_vision_stats(q, k, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_compact_kv_matches_core(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    b, h_kv, m, d, k = 2, 3, 45, 24, 19  # k spans two 16-row tiles, D is not a power of two
    kv = torch.randn(b, h_kv, m, d, generator=g).to(dtype)
    indices = select_kept(torch.rand(b, h_kv, m, generator=g), k, per_head=True)
    kept = compact_kv(kv, indices, block_k=16)
    assert kept.dtype == dtype and kept.shape == (b, h_kv, k, d) and kept.is_contiguous()
    assert torch.equal(kept, compact(kv, indices))


def test_compact_kv_edges() -> None:
    kv = torch.randn(1, 2, 10, 16)
    assert compact_kv(kv, torch.zeros(1, 2, 0, dtype=torch.long)).shape == (1, 2, 0, 16)
    bad = torch.tensor([[[0, 3, 10]], [[1, 2, 3]]]).reshape(1, 2, 3)
    with pytest.raises(ValueError, match="indices must lie"):
        compact_kv(kv, bad)
    # Without validation an out-of-range index reads nothing and yields a zero row.
    out = compact_kv(kv, bad, validate=False, block_k=16)
    assert torch.equal(out[0, 0, 2], torch.zeros(16)) and torch.equal(out[0, 0, :2], kv[0, 0, [0, 3]])
    with pytest.raises(ValueError):
        compact_kv(kv, torch.zeros(1, 3, 2, dtype=torch.long))  # head count mismatch
    with pytest.raises(ValueError):
        compact_kv(kv, torch.zeros(1, 2, 2))  # float indices


def test_aot_compiles_to_ptx_for_tensorrt() -> None:
    """Both kernels compile to PTX for sm_90 without a GPU, with the launch contract TensorRT needs."""
    from vlcache_plugins.aot import compile_compact_kv, compile_post_vision_stats
    from vlcache_plugins.kernels import compilable

    if not compilable():
        pytest.skip("triton was imported under TRITON_INTERPRET: nothing can be compiled in this process")

    ckv = compile_compact_kv(dtype="bf16", head_dim=24, arch=90)
    assert ckv.name == "compact_kv_kernel" and ".target sm_90" in ckv.ptx and f".entry {ckv.name}(" in ckv.ptx
    # 5 runtime parameters (kv, indices, m, k, out) plus Triton's hidden scratch pointers, if any.
    assert ckv.num_params >= 5 and ckv.block_x == ckv.num_warps * 32

    pvs = compile_post_vision_stats(
        dtype="fp16", head_dim=16, threshold=0.01, scale=0.25, block_q=16, block_n=16, arch=90
    )
    assert pvs.name == "post_vision_stats_kernel" and pvs.num_params >= 11 and pvs.shared_mem <= 48 * 1024
    with pytest.raises(ValueError):
        compile_compact_kv(dtype="fp64", head_dim=16, arch=90)
