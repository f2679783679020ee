import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache.core import (
    attention_column_sums,
    layer_density,
    post_vision_attention,
    post_vision_statistics,
    vlcache_scores,
)


def naive_attention(queries, keys, query_start, scale):
    """Per-head loop with repeated keys and a full causal mask: the obvious reference."""
    b, h_q, n, d = queries.shape
    h_kv, m = keys.shape[1], keys.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, h_q, n, m, dtype=torch.float64)
    for bi in range(b):
        for h in range(h_q):
            k = keys[bi, h // group].double()
            for i in range(n):
                pos = query_start + i
                logits = (queries[bi, h, i].double() @ k[: pos + 1].T) * scale
                out[bi, h, i, : pos + 1] = torch.softmax(logits, dim=-1)
    return out


def naive_density(attn, threshold):
    b, h, n, m = attn.shape
    dens = []
    for bi in range(b):
        sparsity = []
        for hi in range(h):
            zeroed = visible = 0
            for i in range(n):
                row = attn[bi, hi, i]
                vis = row[row > 0] if True else row
                nvis = int((row > 0).sum())
                visible += nvis
                zeroed += int((vis < threshold * row.max()).sum())
            sparsity.append(zeroed / visible)
        dens.append(1 - sum(sparsity) / h)
    return torch.tensor(dens, dtype=torch.float64)


def random_qk(b=1, h_q=4, h_kv=2, n=5, m=11, d=8, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h_q, n, d, generator=g) * spread, torch.randn(b, h_kv, m, d, generator=g) * spread


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    h_kv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    m=st.integers(1, 24),
    tau_frac=st.floats(0.05, 1.0),
    chunk=st.integers(1, 9),
)
def test_chunked_statistics_equal_naive_reference(seed, h_kv, group, m, tau_frac, chunk):
    n = max(1, int(round(tau_frac * m)))
    start = m - n
    q, k = random_qk(b=2, h_q=h_kv * group, h_kv=h_kv, n=n, m=m, seed=seed)
    scale = 1 / math.sqrt(q.shape[-1])
    ref = naive_attention(q, k, start, scale)
    full = post_vision_attention(q, k, start, chunk_size=chunk)
    torch.testing.assert_close(full.double(), ref, atol=1e-5, rtol=1e-5)
    stats = post_vision_statistics(q, k, start, threshold=0.01, chunk_size=chunk)
    # GQA: scores are the mean over each group's query heads of the naive per-head column sums.
    ref_scores = ref.sum(dim=2).reshape(2, h_kv, group, m).mean(dim=2)
    torch.testing.assert_close(stats.scores.double(), ref_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.density.double(), naive_density(ref, 0.01), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer_density(full, start), stats.density)
    torch.testing.assert_close(vlcache_scores(full, h_kv), stats.scores)
    torch.testing.assert_close(attention_column_sums(q, k, start, chunk_size=chunk), stats.column_sums)


def test_chunking_does_not_change_results():
    q, k = random_qk(n=40, m=64, seed=3)
    a = post_vision_statistics(q, k, 24, chunk_size=64)
    for c in (1, 7, 16):
        b = post_vision_statistics(q, k, 24, chunk_size=c)
        torch.testing.assert_close(a.scores, b.scores)
        torch.testing.assert_close(a.density, b.density)


def test_density_on_a_hand_built_pattern():
    # 1 head, 2 rows at positions 2 and 3 of a 4-token prompt.
    attn = torch.tensor([[[[0.5, 0.495, 0.005, 0.0], [0.97, 0.001, 0.001, 0.028]]]])
    # row 0: 3 visible, 1 below 0.01*0.5 (0.005 is not below 0.005) -> 0 zeroed;
    # row 1: 4 visible, 0.001 and 0.001 below 0.0097 -> 2 zeroed. sparsity 2/7.
    torch.testing.assert_close(layer_density(attn, 2, 0.01), torch.tensor([1 - 2 / 7]))


def test_peaked_attention_is_sparse_and_uniform_is_dense():
    m, start = 32, 16
    k = torch.zeros(1, 1, m, 4)  # all-equal keys -> uniform rows
    q = torch.zeros(1, 1, m - start, 4)
    assert float(post_vision_statistics(q, k, start).density) == pytest.approx(1.0)
    from tests.conftest import peaked_qk

    q2, k2 = peaked_qk([0] * (m - start), m, start, q_heads=1)
    assert float(post_vision_statistics(q2, k2, start, scale=1.0).density) < 0.1


def test_bad_shapes_raise():
    q, k = random_qk(h_q=3, h_kv=2)
    with pytest.raises(ValueError):
        post_vision_statistics(q, k, 6)
    q, k = random_qk()
    with pytest.raises(ValueError):
        post_vision_statistics(q, k, 7)  # 5 rows from 7 overflow 11 keys
    with pytest.raises(ValueError):
        post_vision_statistics(q, k, 6, threshold=1.5)
