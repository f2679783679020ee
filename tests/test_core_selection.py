"""Selection and compaction (:mod:`vlcache.core.selection`): which positions a layer keeps, and the gather."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache.core import compact, forced_positions, select_kept


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 1000),
    m=st.integers(1, 30),
    kfrac=st.floats(0, 1),
    sinks=st.integers(0, 5),
    recent=st.integers(0, 5),
    per_head=st.booleans(),
)
def test_kept_set_is_exactly_the_top_scores(seed, m, kfrac, sinks, recent, per_head):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, m, generator=g)
    k = int(round(kfrac * m))
    idx = select_kept(scores, k, per_head=per_head, sinks=sinks, recent=recent)
    assert idx.shape == (2, 3, k)
    assert bool((idx.diff(dim=-1) > 0).all())  # ascending, no duplicates
    forced = set(forced_positions(m, k, sinks, recent).tolist())
    ref_scores = scores if per_head else scores.mean(dim=1, keepdim=True).expand_as(scores)
    for b in range(2):
        for h in range(3):
            kept = set(idx[b, h].tolist())
            assert forced <= kept
            free_kept = [ref_scores[b, h, j] for j in kept - forced]
            dropped = [ref_scores[b, h, j] for j in set(range(m)) - kept]
            if free_kept and dropped:
                assert min(free_kept) >= max(dropped)
    if not per_head:
        assert bool((idx == idx[:, :1]).all())


def test_forced_positions_priority():
    assert forced_positions(10, 6, sinks=4, recent=3).tolist() == [0, 1, 2, 3, 8, 9]
    assert forced_positions(10, 3, sinks=4, recent=3).tolist() == [0, 1, 2]
    assert forced_positions(3, 3, sinks=4, recent=3).tolist() == [0, 1, 2]


def test_compact_gathers_along_sequence():
    t = torch.randn(1, 2, 6, 3)
    idx = torch.tensor([[[0, 2, 5], [1, 3, 4]]])
    out = compact(t, idx)
    assert out.shape == (1, 2, 3, 3) and out.is_contiguous()
    torch.testing.assert_close(out[0, 0], t[0, 0, [0, 2, 5]])
    torch.testing.assert_close(out[0, 1], t[0, 1, [1, 3, 4]])
    with pytest.raises(ValueError):
        compact(t, torch.zeros(1, 3, 2, dtype=torch.long))
