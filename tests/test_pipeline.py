"""The one compression pipeline (vlcache.pipeline) and the one token generator (vlcache.stream),
on plain tensors and scripted decoders: no model, no backend."""

from __future__ import annotations

import pytest
import torch

from vlcache.config import CompressionConfig
from vlcache.core import compact, post_vision_statistics
from vlcache.methods import LayerScore, PromptLayout, available, get_method
from vlcache.pipeline import CacheOps, Compression, CompressionStats
from vlcache.stream import TokenStream, stop_ids

M, LAYERS, H_Q, H_KV, D = 24, 3, 4, 2, 8
LAYOUT = PromptLayout(M, ((2, 14),))


class TensorOps(CacheOps):
    """A cache of plain torch tensors, counting the ops the pipeline asks for."""

    def __init__(self, keys: list[torch.Tensor], *, fused: bool) -> None:
        self.has_post_vision_op = fused  # type: ignore[misc]
        self.k = [k.clone() for k in keys]
        self.v = [k.clone() + 1 for k in keys]
        self.op_calls = 0
        self.evicted: list[tuple[int, int]] = []

    def post_vision_stats(self, queries, keys, query_start, threshold, scale):
        self.op_calls += 1
        stats = post_vision_statistics(queries, keys, query_start, threshold=threshold, scale=scale)
        return stats.scores, stats.density

    def keys(self, layer):
        return self.k[layer]

    def keep(self, layer, indices):
        self.k[layer], self.v[layer] = compact(self.k[layer], indices), compact(self.v[layer], indices)

    def evict(self, layer, index):
        self.evicted.append((layer, index))
        keep = torch.tensor([i for i in range(self.k[layer].shape[2]) if i != index])
        self.k[layer], self.v[layer] = self.k[layer][:, :, keep], self.v[layer][:, :, keep]

    def lengths(self):
        return [int(k.shape[2]) for k in self.k]

    def kv_bytes(self):
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.k, self.v))


def _tensors(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, H_KV, M, D, generator=g) for _ in range(LAYERS)]
    queries = [torch.randn(1, H_Q, M, D, generator=g) for _ in range(LAYERS)]
    return queries, keys


def _run(method: str, budget: float, *, fused: bool) -> tuple[Compression, TensorOps]:
    queries, keys = _tensors()
    ops = TensorOps(keys, fused=fused)
    compression = Compression(get_method(CompressionConfig.create(method, budget)), LAYOUT, LAYERS, backend="test")
    if compression.method.compresses:
        start = compression.query_start
        for layer in range(LAYERS):
            compression.score_layer(ops, layer, queries[layer][:, :, start:], ops.keys(layer), 0.3)
    compression.compress(ops)
    return compression, ops


@pytest.mark.parametrize("method", available())
def test_the_backend_op_scores_exactly_the_methods_that_declare_post_vision_scores(method: str) -> None:
    """A backend's fused op is asked for the statistics of a method that declares them (the vlcache
    family), once per layer; every other method scores itself. Either way the same kept sets."""
    with_op, ops = _run(method, 0.3, fused=True)
    without_op, plain = _run(method, 0.3, fused=False)
    declares = get_method(CompressionConfig.create(method, 0.3)).post_vision_scores() is not None
    assert declares == method.startswith("vlcache")
    assert ops.op_calls == (LAYERS if declares else 0) and plain.op_calls == 0
    for a, b in zip(with_op.kept_indices, without_op.kept_indices):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert with_op.stats is not None and without_op.stats is not None
    assert with_op.stats.to_dict().keys() == without_op.stats.to_dict().keys()
    assert with_op.stats.kept_per_layer == without_op.stats.kept_per_layer == ops.lengths()


def test_compress_allocates_the_exact_total_compacts_and_records_the_stats() -> None:
    compression, ops = _run("vlcache", 0.25, fused=True)
    stats = compression.stats
    assert isinstance(stats, CompressionStats) and stats.backend == "test"
    assert compression.budgets is not None and int(compression.budgets.sum()) == round(0.25 * LAYERS * M)
    assert stats.kept_per_layer == compression.budgets.tolist() == ops.lengths()
    per_entry = 2 * H_KV * D * 4
    assert stats.kv_bytes_before == LAYERS * M * per_entry and stats.kv_bytes_after == sum(ops.lengths()) * per_entry
    assert stats.kv_bytes_reserved == stats.kv_bytes_after  # the default: tensors sized exactly
    assert len(stats.layer_weights) == LAYERS and stats.image_tokens == 12 and stats.prompt_tokens == M
    assert compression.compacted and compression.policy is None
    assert set(CompressionStats.TIMINGS) <= set(stats.to_dict())


def test_full_is_recorded_without_scoring() -> None:
    compression, ops = _run("full", 1.0, fused=True)
    assert compression.query_start == M and ops.op_calls == 0 and not compression.compacted
    assert compression.stats is not None and compression.stats.kept_per_layer == [M] * LAYERS


def test_an_unscored_layer_is_an_error() -> None:
    _, keys = _tensors()
    compression = Compression(get_method(CompressionConfig(budget=0.5)), LAYOUT, LAYERS, backend="test")
    with pytest.raises(RuntimeError, match="not scored"):
        compression.compress(TensorOps(keys, fused=False))
    compression.use_scores([LayerScore(torch.rand(1, H_KV, M), 0.5)] * LAYERS)
    assert compression.compress(TensorOps(keys, fused=False)).kept_per_layer == compression.budgets.tolist()


def test_decode_policy_evicts_through_the_backend_and_counts() -> None:
    """TGV-KV's policy is armed with each layer's kept set and evicts through ``CacheOps.evict``."""
    compression, ops = _run("tgvkv", 0.25, fused=False)
    assert compression.policy is not None and compression.stats is not None
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for layer in range(LAYERS):  # a decode step appends one entry, then the policy runs
            ops.k[layer] = torch.cat([ops.k[layer], torch.randn(1, H_KV, 1, D, generator=g)], 2)
            ops.v[layer] = torch.cat([ops.v[layer], torch.randn(1, H_KV, 1, D, generator=g)], 2)
            compression.decode_step(ops, layer, torch.randn(1, H_Q, 1, D, generator=g), 0.3)
    assert compression.stats.decode_evictions == len(ops.evicted) > 0


# --- the token generator ----------------------------------------------------------------------------
class Scripted:
    """A decoder whose greedy token after feeding t is ``script[t]`` (the prefill's: ``first``)."""

    def __init__(self, first: int, script: dict[int, int]) -> None:
        self.stats = CompressionStats("vlcache", 0.1, 4, 0, [2], 10, 5)
        self.current = first
        self.script = script
        self.fed: list[int] = []
        self.closed = 0

    @property
    def logits(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(self.current), 10).float()

    def greedy(self) -> int:
        return int(self.logits.argmax())

    def step(self, token: int) -> None:
        self.fed.append(token)
        self.current = self.script[token]

    def close(self) -> None:
        self.closed += 1


def test_the_stream_feeds_each_token_and_stops_after_eos_or_the_length() -> None:
    decoder = Scripted(3, {3: 5, 5: 7, 7: 9, 9: 1})
    with TokenStream(decoder, max_new_tokens=10, stop={7}, keep_logits=True) as tokens:
        assert list(tokens) == [3, 5, 7] and tokens.finish_reason == "stop"
        assert decoder.fed == [3, 5]  # the last token is not fed
        assert tokens.logits is not None and [int(t.argmax()) for t in tokens.logits] == [3, 5, 7]
        assert tokens.stats is decoder.stats and decoder.stats.new_tokens == 3
        assert len(tokens.step_seconds) == 2 and decoder.stats.decode_seconds == pytest.approx(sum(tokens.step_seconds))
        assert tokens.decoder is decoder  # kept after the end, for a follow-up
    assert decoder.closed == 1 and tokens.decoder is None and tokens.finish_reason == "stop"
    short = TokenStream(Scripted(3, {3: 5, 5: 7}), max_new_tokens=2)
    assert list(short) == [3, 5] and short.finish_reason == "length" and next(short, None) is None


def test_closing_a_stream_cancels_it_and_releases_the_decoder_once() -> None:
    decoder = Scripted(3, {3: 5, 5: 7, 7: 9})
    tokens = TokenStream(decoder, max_new_tokens=10)
    assert next(tokens) == 3 and next(tokens) == 5
    tokens.close()
    tokens.close()
    assert tokens.finish_reason == "cancelled" and decoder.closed == 1 and list(tokens) == []
    assert tokens.stats is not None and tokens.stats.new_tokens == 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        TokenStream(Scripted(0, {}), max_new_tokens=0)


def test_stop_ids() -> None:
    assert stop_ids(None) == stop_ids(()) == frozenset()
    assert stop_ids(2) == stop_ids([2]) == stop_ids(torch.tensor(2)) == frozenset({2})
    assert stop_ids((1, 2)) == frozenset({1, 2})
