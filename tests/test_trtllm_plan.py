"""The trtllm backend's decisions (vlcache.trtllm.plan, vlcache.trtllm.stash) against vlcache.core, on
random inputs: layer budgets, per-layer per-head selection under TensorRT-LLM's one count per request,
the compaction moves (through a CPU oracle of its op), and the whole context-end path against the
pipeline every other backend runs. No TensorRT-LLM here."""

from __future__ import annotations

import math

import pytest
import torch

from vlcache.config import CompressionConfig
from vlcache.core import allocate_budgets, compact, recent_window, select_kept, uniform_budgets
from vlcache.methods import LayerScore, PromptLayout, get_method
from vlcache.pipeline import CacheOps, Compression
from vlcache.trtllm.plan import (
    CompactionMoves,
    ContextCompressor,
    check_method,
    check_move_contract,
    compaction_moves,
    count_cap,
    gather_layer,
    keep_all,
    layer_budgets,
    pad_selection,
    plan_request,
    prompt_layout,
    reference_compact_layers,
)
from vlcache.trtllm.stash import QueryStash, rope_neox, split_context_rows

BUDGETS = [0.05, 0.1, 0.3, 0.7, 1.0]


def _random_scores(num_layers: int, heads: int, m: int, seed: int) -> tuple[list[LayerScore], list[float]]:
    g = torch.Generator().manual_seed(seed)
    density = (torch.rand(num_layers, generator=g) ** 3).tolist()  # skewed, as real layers are
    scores = [LayerScore(torch.rand(1, heads, m, generator=g), d) for d in density]
    return scores, density


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_matches_core_under_one_count(budget: float, per_head: bool, seed: int) -> None:
    num_layers, heads, m = 6, 3, 53 + 7 * seed
    config = CompressionConfig.create("vlcache", budget, per_head=per_head, min_layer_budget=0.02)
    method = get_method(config)
    layout = PromptLayout(m, ((3, 30),))
    scores, density = _random_scores(num_layers, heads, m, seed)

    plan = plan_request(method, scores, layout)

    # budgets: VL-Cache's allocator itself, exact total
    expected = allocate_budgets(density, budget, m, config.min_keep(m))
    assert torch.equal(plan.budgets, expected)
    # one count for every layer and head: max padding
    assert plan.count == int(expected.max())
    assert plan.kept.shape == plan.logical.shape == (num_layers, heads, plan.count)
    assert plan.evicted == m - plan.count
    for layer, (score, k) in enumerate(zip(scores, expected.tolist())):
        kept, own = plan.kept[layer], plan.logical[layer]
        assert bool((kept.diff(dim=-1) > 0).all())  # ascending, no repeats
        # what VL-Cache keeps is exactly vlcache.core's selection, recent window included
        core = select_kept(score.scores, k, per_head=per_head, recent=recent_window(0.1, k))[0]
        assert int(own.sum(dim=-1).unique().item()) == k
        for h in range(heads):
            assert torch.equal(kept[h][own[h]], core[h])
            # the padding is the next-best of the rest, by the same (head or head-mean) scores
            s = score.scores[0, h] if per_head else score.scores[0].mean(0)
            rest = torch.ones(m, dtype=torch.bool)
            rest[core[h]] = False
            pad = kept[h][~own[h]]
            assert pad.numel() == plan.count - k
            left = rest & ~torch.isin(torch.arange(m), pad)
            if pad.numel() and bool(left.any()):
                assert float(s[pad].min()) >= float(s[left].max())
        if not per_head:
            assert bool((kept == kept[:1]).all())


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("cap", [None, 0.05, 0.2, 0.5, 1.0])
def test_count_cap_keeps_the_total_and_bounds_the_count(budget: float, cap: float | None) -> None:
    num_layers, heads, m = 8, 2, 97
    config = CompressionConfig.create("vlcache", budget)
    method = get_method(config)
    layout = PromptLayout(m, ((2, 60),))
    scores, density = _random_scores(num_layers, heads, m, seed=7)
    uncapped = allocate_budgets(density, budget, m, config.min_keep(m))
    total = int(uncapped.sum())
    limit = count_cap(cap, total, num_layers, m)
    assert limit >= math.ceil(total / num_layers)

    budgets = layer_budgets(method, [s.weight for s in scores], layout, cap)
    assert int(budgets.sum()) == total and int(budgets.max()) <= limit
    assert int(budgets.min()) >= config.min_keep(m)
    if cap is None or int(uncapped.max()) <= limit:
        assert torch.equal(budgets, uncapped)
    else:  # a denser layer never gets fewer tokens than a sparser one
        order = sorted(range(num_layers), key=lambda i: density[i])
        assert budgets[order].diff().min() >= 0
    plan = plan_request(method, scores, layout, cap)
    assert plan.count == int(budgets.max()) <= limit


def test_uniform_methods_need_no_padding() -> None:
    method = get_method(CompressionConfig.create("vlcache-uniform", 0.2))
    m, layout = 50, PromptLayout(50, ((0, 30),))
    scores, _ = _random_scores(4, 2, m, seed=3)
    plan = plan_request(method, scores, layout)
    assert torch.equal(plan.budgets, uniform_budgets(4, 0.2, m, method.min_keep(layout)))
    assert plan.count == int(plan.budgets.max()) and int(plan.budgets.max() - plan.budgets.min()) <= 1


def test_pad_selection_rejects_a_short_count_and_keeps_exact_sets() -> None:
    scores = torch.rand(1, 2, 10)
    kept = select_kept(scores, 4)
    idx, own = pad_selection(scores, kept, 4, per_head=True)
    assert torch.equal(idx, kept) and bool(own.all())
    with pytest.raises(ValueError, match="count"):
        pad_selection(scores, kept, 3, per_head=True)


def _write(pool: torch.Tensor, dense: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Write one request's dense (2, H, n, D) K/V into ``pool`` (pages, 2, H, tpb, D) at ``pages``."""
    _, h, n, d = dense.shape
    tpb = pool.shape[3]
    padded = torch.randn(2, h, pages.numel() * tpb, d)  # the last page's tail holds garbage
    padded[:, :, :n] = dense
    pool[pages] = padded.view(2, h, pages.numel(), tpb, d).permute(2, 0, 1, 3, 4)
    return pool


@pytest.mark.parametrize("per_head", [True, False])
def test_compaction_moves_reproduce_core_compact(per_head: bool) -> None:
    torch.manual_seed(0)
    num_layers, heads, d, tpb = 3, 2, 4, 8
    lengths, tails = [37, 50], [0, 2]
    method = get_method(CompressionConfig.create("vlcache", 0.2, per_head=per_head))
    plans, dense = [], []
    for r, m in enumerate(lengths):
        scores, _ = _random_scores(num_layers, heads, m, seed=10 + r)
        plans.append(plan_request(method, scores, PromptLayout(m, ((1, m // 2),))))
        dense.append([torch.randn(2, heads, m + tails[r], d) for _ in range(num_layers)])
    moves = compaction_moves(plans, tails)
    check_move_contract(moves)
    assert moves.new_lengths == [p.count + t for p, t in zip(plans, tails)]
    assert moves.source_indices.dtype == moves.source_offsets.dtype == torch.int32
    assert moves.source_indices.shape == (num_layers, heads, sum(moves.new_lengths))

    max_pages = max(math.ceil((m + t) / tpb) for m, t in zip(lengths, tails))
    perm = torch.randperm(2 * max_pages + 3)  # pages scattered over a shared pool
    page_table = perm[: 2 * max_pages].view(2, max_pages)
    pools = []
    for layer in range(num_layers):
        pool = torch.randn(perm.numel(), 2, heads, tpb, d)
        for r in range(2):
            n = lengths[r] + tails[r]
            _write(pool, dense[r][layer], page_table[r, : math.ceil(n / tpb)])
        pools.append(pool)
    reference_compact_layers(
        pools,
        page_table,
        moves.source_indices,
        moves.source_offsets,
        moves.destination_bases,
        moves.source_layer_indices,
    )
    for r, (plan, tail) in enumerate(zip(plans, tails)):
        for layer in range(num_layers):
            for plane in (0, 1):
                got = gather_layer(pools[layer], page_table[r], moves.new_lengths[r], plane)
                full = dense[r][layer][plane].unsqueeze(0)
                want = compact(full[:, :, : plan.prompt_len], plan.kept[layer].unsqueeze(0))
                want = torch.cat([want, full[:, :, plan.prompt_len : plan.prompt_len + tail]], dim=2)
                assert torch.equal(got, want)


def test_the_move_contract_is_checked() -> None:
    bad = CompactionMoves(
        source_indices=torch.tensor([[[3, 1, 5]]], dtype=torch.int32),
        source_offsets=torch.tensor([0, 3], dtype=torch.int32),
        destination_bases=torch.zeros(1, dtype=torch.int32),
        source_layer_indices=torch.zeros(1, dtype=torch.int32),
        new_lengths=[3],
    )
    with pytest.raises(ValueError, match="ascend"):
        check_move_contract(bad)
    with pytest.raises(ValueError, match="one non-negative tail per request"):
        compaction_moves([keep_all(4, 1, 1)], [1, 2])


def test_methods_that_evict_during_decoding_are_refused() -> None:
    with pytest.raises(ValueError, match="evicts during decoding"):
        check_method("tgvkv")
    for name in ("vlcache", "vlcache-uniform", "snapkv", "pyramidkv", "h2o", "streaming", "random", "full"):
        check_method(name)


def test_prompt_layout_from_token_ids() -> None:
    assert prompt_layout([1, 9, 9, 9, 2, 3], image_token_id=9).image_spans == ((1, 4),)
    two = prompt_layout([9, 9, 5, 100, 101, 6], image_token_id=9, vocab_size=50)
    assert two.image_spans == ((0, 2), (3, 5)) and two.post_vision_start == 5
    assert prompt_layout([1, 2, 3], image_token_id=9).image_spans == ()


def test_rope_matches_transformers() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n, h, d = 5, 3, 8
    x = torch.randn(n, h, d)
    positions = torch.tensor([4, 5, 6, 9, 10])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([positions[:, None] * inv_freq[None]] * 2, dim=-1)
    q = x.permute(1, 0, 2).unsqueeze(0)  # (1, H, n, D)
    want, _ = apply_rotary_pos_emb(q, q, emb.cos()[None], emb.sin()[None])
    got = rope_neox(x, positions, inv_freq)
    assert torch.allclose(got.permute(1, 0, 2).unsqueeze(0), want, atol=1e-6)


def test_stash_keeps_the_window_and_says_what_is_missing() -> None:
    stash = QueryStash()
    stash.begin(7, query_start=5, prompt_len=9, num_layers=1)
    assert stash.add(7, 0, torch.randn(4, 2, 3), start=0) == 0  # all before the window
    assert stash.add(8, 0, torch.randn(4, 2, 3), start=0) == 0  # unknown request
    first = torch.randn(3, 2, 3)
    assert stash.add(7, 0, first, start=4) == 2  # positions 5, 6
    assert not stash.ready(7)
    with pytest.raises(ValueError, match="rows 7..8 missing"):
        stash.queries(7, 0)
    second = torch.randn(4, 2, 3)
    assert stash.add(7, 0, second, start=7) == 2  # 7, 8; 9 and 10 are past the prompt
    assert stash.ready(7)
    q = stash.queries(7, 0)
    assert q.shape == (1, 2, 4, 3) and torch.equal(q[0, :, 0], first[1]) and torch.equal(q[0, :, 3], second[1])
    stash.pop(7)
    assert 7 not in stash


class _DenseOps(CacheOps):
    """The dense reference cache the other backends' pipeline runs on (batch 1)."""

    def __init__(self, keys: list[torch.Tensor]) -> None:
        self.k = [k.clone() for k in keys]

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def keep(self, layer: int, indices: torch.Tensor) -> None:
        self.k[layer] = compact(self.k[layer], indices)

    def evict(self, layer: int, index: int) -> None:  # pragma: no cover - no decode policy here
        raise NotImplementedError

    def lengths(self) -> list[int]:
        return [k.shape[2] for k in self.k]

    def kv_bytes(self) -> int:
        return sum(k.numel() * k.element_size() for k in self.k)


@pytest.mark.parametrize(
    ("method", "budget", "settings"),
    [("vlcache", 0.1, {}), ("vlcache", 0.3, {"query_window": 6}), ("snapkv", 0.2, {}), ("pyramidkv", 0.25, {})],
)
def test_context_compressor_matches_the_pipeline(method: str, budget: float, settings: dict) -> None:
    """Two requests prefilled in two chunks each (packed, as TensorRT-LLM's attention sees them):
    the stashed queries and paged keys give the kept sets the shared pipeline keeps."""
    torch.manual_seed(1)
    num_layers, h_q, h_kv, d, tpb = 3, 4, 2, 8, 16
    config = CompressionConfig.create(method, budget, **settings)
    compressor = ContextCompressor(config)
    scale = 1.0 / math.sqrt(d)
    tokens = [[1] * 3 + [9] * 30 + [2] * 12, [9] * 20 + [3] * 9]  # image token 9
    layouts = [prompt_layout(t, image_token_id=9) for t in tokens]
    queries = [[torch.randn(len(t), h_q, d) for _ in range(num_layers)] for t in tokens]
    keys = [[torch.randn(1, h_kv, len(t), d) for _ in range(num_layers)] for t in tokens]

    stash = QueryStash()
    for rid, layout in enumerate(layouts):
        stash.begin(rid, compressor.query_start(layout), layout.prompt_len, num_layers)
    splits = [(0, 20), (20, None)]  # chunked prefill: both requests in both steps
    for lo, hi in splits:
        lens = [len(t[lo:hi]) for t in tokens]
        for layer in range(num_layers):
            packed = torch.cat([queries[r][layer][lo:hi].reshape(n, h_q * d) for r, n in enumerate(lens)])
            fused = torch.cat([packed, torch.randn(packed.shape[0], 2 * h_kv * d)], dim=1)  # q | k | v
            for rid, rows in enumerate(split_context_rows(fused, lens, h_q, d)):
                stash.add(rid, layer, rows, start=lo)

    for rid, layout in enumerate(layouts):
        assert stash.ready(rid)
        m = layout.prompt_len
        pages = torch.randperm(8)[: math.ceil(m / tpb)]
        pools = []
        for layer in range(num_layers):
            kv = torch.cat([keys[rid][layer], torch.randn(1, h_kv, m, d)])  # (2, H, m, D)
            pools.append(_write(torch.randn(8, 2, h_kv, tpb, d), kv, pages))
        plan = compressor.plan(
            layout,
            num_layers,
            lambda layer, rid=rid: stash.queries(rid, layer),
            lambda layer, pools=pools, pages=pages, m=m: gather_layer(pools[layer], pages, m),
            scale,
        )

        reference = Compression(get_method(config), layout, num_layers, backend="test")
        start = reference.query_start
        ops = _DenseOps(keys[rid])
        for layer in range(num_layers):
            q = queries[rid][layer][start:].permute(1, 0, 2).unsqueeze(0)
            reference.score_layer(ops, layer, q, keys[rid][layer], scale)
        reference.compress(ops)
        assert reference.budgets is not None and torch.equal(plan.budgets, reference.budgets)
        for layer in range(num_layers):
            kept = reference.kept_indices[layer]
            want = torch.arange(m).expand(h_kv, m) if kept is None else kept[0]
            for h in range(h_kv):
                assert torch.equal(plan.kept[layer, h][plan.logical[layer, h]], want[h])


def test_a_method_without_compression_keeps_everything() -> None:
    compressor = ContextCompressor(CompressionConfig.create("full", 1.0))
    layout = PromptLayout(12, ((0, 5),))
    assert compressor.query_start(layout) == 12
    plan = compressor.plan(layout, 2, lambda layer: torch.empty(0), lambda layer: torch.zeros(1, 3, 12, 4), 1.0)
    assert plan.count == 12 and plan.evicted == 0 and plan.kept.shape == (2, 3, 12)
