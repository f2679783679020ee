"""Every method on a hand-built attention pattern where the right kept set is known."""

import pytest
import torch

from tests.conftest import peaked_qk
from vlcache.config import CompressionConfig
from vlcache.methods import LayerInput, PromptLayout, available, get_method

M = 16
LAYOUT = PromptLayout(M, ((3, 10),))  # text 0-2, image 3-9, text (the question) 10-15


def run(method_name, targets_for_rows, k, layers=1, **cfg):
    """Score one layer whose query row at position p attends only to targets_for_rows(p); select k."""
    method = get_method(CompressionConfig.create(method_name, 0.5, **cfg))
    start = method.query_start(LAYOUT)
    targets = [targets_for_rows(p) for p in range(start, M)]
    q, kk = peaked_qk(targets, M, start, q_heads=2, kv_heads=1) if targets else peaked_qk([0], M, M - 1)
    if not targets:
        q = q[:, :, :0]
    inp = LayerInput(q, kk, start, 1.0, 0, layers)
    out = method.score(inp, LAYOUT)
    assert out.scores.shape == (1, 1, M)
    return method, out, set(method.select(out.scores, k, LAYOUT)[0, 0].tolist())


def pattern(p):
    """Image rows (3-9) look at key 1; question rows look at image key 5, text key 11 and image key 8;
    the last rows look at key 5."""
    if p < 10:
        return min(p, 1)
    return {10: 5, 11: 11, 12: 8, 13: 5, 14: 5, 15: 5}[p]


def test_available_lists_every_method():
    assert set(available()) >= {
        "full",
        "vlcache",
        "vlcache-uniform",
        "vlcache-nowindow",
        "tgvkv",
        "snapkv",
        "h2o",
        "pyramidkv",
        "streaming",
        "random",
    }


def test_vlcache_keeps_what_the_question_attends_to():
    method, out, kept = run("vlcache-nowindow", pattern, 3)
    assert method.query_start(LAYOUT) == 10  # post-vision window only
    assert kept == {5, 8, 11}  # not key 1, which only the image rows attended to
    # with the recent window (max(1, floor(0.1 · 4)) = 1 token) the last prompt token comes first
    _, _, kept = run("vlcache", pattern, 4)
    assert kept == {5, 8, 11, M - 1}
    # Peaked rows are sparse: low density.
    assert out.weight is not None and out.weight < 0.3


def test_vlcache_query_window_limits_rows():
    method = get_method(CompressionConfig.create("vlcache", query_window=2))
    assert method.query_start(LAYOUT) == M - 2


def test_vlcache_budgets_follow_density():
    method = get_method(CompressionConfig(method="vlcache", budget=0.25))
    k = method.allocate([0.9, 0.1, 0.5], PromptLayout(100))
    assert int(k.sum()) == 75 and k[0] > k[2] > k[1]
    uni = get_method(CompressionConfig(method="vlcache-uniform", budget=0.25)).allocate(
        [0.9, 0.1, 0.5], PromptLayout(100)
    )
    assert uni.tolist() == [25, 25, 25]


def test_h2o_sums_all_queries_and_keeps_recent_half():
    method, _, kept = run("h2o", pattern, 4)
    assert method.query_start(LAYOUT) == 0
    # recent half: 14, 15; heavy hitters over all rows: key 1 (rows 1-9) and key 5 (4 rows)
    assert kept == {14, 15, 1, 5}


def test_snapkv_uses_the_observation_window_and_keeps_it():
    method, out, kept = run("snapkv", pattern, 4, window=3, pool_kernel=1)
    assert method.query_start(LAYOUT) == 13
    assert kept == {13, 14, 15, 5}


def test_snapkv_pooling_spreads_to_neighbours():
    _, out, _ = run("snapkv", pattern, 4, window=3, pool_kernel=5)
    s = out.scores[0, 0]
    assert float(s[3]) == pytest.approx(float(s[5])) == pytest.approx(float(s[7]))
    assert float(s[8]) < float(s[5])


def test_pyramidkv_budgets_decrease_with_depth():
    method = get_method(CompressionConfig(method="pyramidkv", budget=0.2))
    k = method.allocate([None] * 6, PromptLayout(200)).tolist()
    assert sum(k) == 240 and k == sorted(k, reverse=True) and k[0] > k[-1]


def test_streaming_keeps_sinks_and_recent():
    _, _, kept = run("streaming", pattern, 7)
    assert kept == {0, 1, 2, 3, 13, 14, 15}


def test_random_is_seeded():
    _, _, a = run("random", pattern, 5, seed=1)
    _, _, b = run("random", pattern, 5, seed=1)
    _, _, c = run("random", pattern, 5, seed=2)
    assert a == b and len(a) == 5 and a != c


def tgv_pattern(p):
    """Question rows: 10 looks at image key 5, 12 at image key 8, and 13-15 at text token 12, which
    makes 12 an important text token (u_12 = 3/4) while nobody looks at 10 (u_10 ~ 0)."""
    if p < 10:
        return min(p, 1)
    return {10: 5, 11: 11, 12: 8, 13: 12, 14: 12, 15: 12}[p]


def test_tgvkv_ranks_text_first_then_vision_by_text_guidance():
    method, out, kept = run("tgvkv", tgv_pattern, 11)
    assert method.per_head is False
    # sinks 0-3 (the first 4 tokens, image or not), all question text 10-15, then one vision token:
    # 8, looked at by the important text token 12 (TWR), not 5, looked at by the unimportant 10.
    assert kept == {0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8}
    s = out.scores[0, 0]
    assert float(s[8]) == pytest.approx(0.75, abs=1e-3) and float(s[5]) < 1e-3
    text = [0, 1, 2, 10, 11, 12, 13, 14, 15]
    assert float(s[text].min()) > float(s[3:10].max())
    # TVB weight: question rows' attention mass on image keys (rows 10 and 12).
    assert out.weight == pytest.approx(2.0, abs=1e-3)


def test_tgvkv_always_keeps_sinks_and_last_token():
    _, _, kept = run("tgvkv", pattern, 5)
    assert {0, 1, 2, 3, 15} == kept


def test_tgvkv_decode_policy_evicts_to_the_ratio():
    method = get_method(CompressionConfig(method="tgvkv", budget=0.5))
    layout = PromptLayout(10, ((2, 6),))
    policy = method.decode_policy(torch.tensor([5]), layout)
    policy.set_protected(0, torch.tensor([[[0, 1, 3, 8, 9]]]))  # 2 post-image tokens kept -> protected tail 2
    attn = torch.full((1, 2, 1, 6), 0.1)
    attn[..., 4] = 0.0  # the least-attended position outside sinks and tail
    # seen = 11 tokens, ratio 0.5 -> 6 allowed; a 6-entry cache is within budget.
    assert policy.step(0, attn, 6) is None
    attn7 = torch.full((1, 2, 1, 7), 0.1)
    attn7[..., 4] = 0.0
    attn7[..., 5] = 0.0  # inside the protected tail (positions 5, 6) -> never chosen
    # seen = 12 -> 6 allowed; 7 entries -> evict one, the argmin in [sinks=4, 7-2) = position 4.
    assert policy.step(0, attn7, 7) == 4


def test_full_does_not_compress():
    method = get_method(CompressionConfig(method="full"))
    assert method.compresses is False
    assert method.allocate([None, None], PromptLayout(7)).tolist() == [7, 7]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_vlcache_recent_window_is_inside_the_budget_and_keeps_the_last_token(fraction):
    """Layer l keeps its last max(1, floor(f·k)) prompt positions inside k, then the top rest by score."""
    gen = torch.Generator().manual_seed(int(fraction * 1000))
    m = 64
    layout = PromptLayout(m, ((4, 40),))
    method = get_method(CompressionConfig.create("vlcache", recent_fraction=fraction))
    for k in (1, 3, 9, 10, 20, 64):
        scores = torch.rand(2, 3, m, generator=gen)
        scores[..., -12:] = -1.0  # the recent tokens score lowest: only the window can keep them
        kept = method.select(scores, k, layout)
        w = max(1, int(fraction * k + 1e-9))
        assert kept.shape == (2, 3, k)
        for row in kept.reshape(-1, k).tolist():
            assert row == sorted(set(row))  # k distinct positions, original order
            assert set(range(m - w, m)) <= set(row)  # the window, inside k
            assert m - 1 in row  # the last prompt token, always
            rest = [p for p in row if p < m - w]
            assert len(rest) == k - w  # the rest is filled by score
        # the rest is exactly the top k - w of the positions before the window
        for b in range(2):
            for h in range(3):
                top = torch.topk(scores[b, h, : m - w], k - w).indices.sort().values.tolist()
                assert kept[b, h, : k - w].tolist() == top


def test_vlcache_without_window_is_algorithm_1():
    """f = 0 (and the `vlcache-nowindow` ablation) select exactly the top-k by score, nothing forced."""
    gen = torch.Generator().manual_seed(11)
    m = 40
    layout = PromptLayout(m, ((2, 30),))
    scores = torch.rand(1, 2, m, generator=gen)
    scores[..., -5:] = -1.0
    zero = get_method(CompressionConfig.create("vlcache", recent_fraction=0.0))
    ablation = get_method(CompressionConfig(method="vlcache-nowindow"))  # default f ignored
    windowed = get_method(CompressionConfig(method="vlcache"))
    for k in (1, 4, 12):
        top = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(zero.select(scores, k, layout), top)
        assert torch.equal(ablation.select(scores, k, layout), top)
        assert m - 1 not in top.flatten().tolist()
        assert m - 1 in windowed.select(scores, k, layout).flatten().tolist()
    # the ablation scores and allocates like vlcache
    assert torch.equal(ablation.allocate([0.9, 0.2], layout), windowed.allocate([0.9, 0.2], layout))


def test_recent_fraction_is_validated_and_hashed():
    with pytest.raises(ValueError, match="recent_fraction"):
        CompressionConfig.create(recent_fraction=1.0)
    with pytest.raises(ValueError, match="recent_fraction"):
        CompressionConfig.create(recent_fraction=-0.1)
    assert CompressionConfig.create(recent_fraction=0.2).compute_hash() != CompressionConfig().compute_hash()


def test_full_is_never_scored():
    """`full` does not compress, so the runners never score it; asking is a clear error, not ones."""
    method = get_method(CompressionConfig(method="full"))
    assert not method.compresses
    q, k = peaked_qk([0], M, M - 1)
    with pytest.raises(NotImplementedError, match="full"):
        method.score(LayerInput(q, k, M - 1, 1.0, 0, 1), LAYOUT)
    assert method.allocate([None, None], LAYOUT).tolist() == [M, M]
