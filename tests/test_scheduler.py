"""The scheduler and the KV pool (:mod:`vlcache.engine`) on a fresh random LLaVA exported with the fused decoder.

Reference: each request run alone (:func:`vlcache.runtime.generate`). Batched greedy tokens and
compression stats must be identical for mixed methods, budgets, prompt lengths and max_tokens; the
pool never goes above its capacity, queues what does not fit and gets every byte back.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vlcache import CompressionConfig
from vlcache.config import settings_read_by
from vlcache.engine.pool import BatchKV, KVPool, RowSource, pool_bytes
from vlcache.engine.scheduler import Scheduler
from vlcache.export import export_llava
from vlcache.hf.tiny import llava_inputs, tiny_llava
from vlcache.runtime import generate, load_runtime

#: (method, budget, question length, max_tokens): mixed in one batch
MIX = [
    ("vlcache", 0.1, 9, 7),
    ("full", 1.0, 5, 5),
    ("snapkv", 0.3, 13, 9),
    ("tgvkv", 0.2, 11, 8),
    ("vlcache", 0.5, 7, 3),
    ("pyramidkv", 0.2, 15, 6),
    ("streaming", 0.25, 6, 8),
    ("h2o", 0.15, 10, 4),
    ("random", 0.3, 8, 5),
    ("vlcache", 1.0, 12, 9),
]


@pytest.fixture(scope="module")
def model_and_runner(tmp_path_factory):
    model = tiny_llava(seed=23, layers=2)
    out = tmp_path_factory.mktemp("scheduler-export")
    export_llava(model, out, max_input_len=256, attention="fused")
    return model, load_runtime(out, backend="onnx", threads=1)


def _requests(model, seed: int = 0):
    reqs = []
    for n, (method, budget, qlen, max_tokens) in enumerate(MIX):
        inputs = llava_inputs(model, question_len=qlen, seed=seed + 300 + n)
        config = CompressionConfig.create(method, budget, **settings_read_by(method, {"window": 4}))
        reqs.append((inputs, config, max_tokens))
    return reqs


def _solo(runner, reqs):
    return [
        generate(runner, i["input_ids"], i["pixel_values"], c, max_new_tokens=t, eos_token_id=()) for i, c, t in reqs
    ]


def _submit_all(scheduler, reqs, **kw):
    seqs = []
    for inputs, config, max_tokens in reqs:
        seqs.append(scheduler.submit(inputs["input_ids"], inputs["pixel_values"], config, max_tokens=max_tokens, **kw))
    for seq in seqs:
        assert seq.done.wait(60), "a request never finished"
    return seqs


def _assert_solo_results(seqs, solo, reqs) -> None:
    """Each request's tokens, kept sets and decode evictions are those of its solo run."""
    for seq, ref, (_, config, _) in zip(seqs, solo, reqs, strict=True):
        where = f"{config.method} at {config.budget}"
        assert seq.error is None, (where, seq.error)
        assert seq.tokens == ref.tokens, where
        assert seq.stats is not None and seq.stats.kept_per_layer == ref.stats.kept_per_layer, where
        assert seq.stats.decode_evictions == ref.stats.decode_evictions, where


@pytest.mark.parametrize("max_batch_size", [1, 4, 16])
def test_batched_tokens_and_stats_equal_solo_runs_for_mixed_methods_and_budgets(model_and_runner, max_batch_size):
    model, runner = model_and_runner
    reqs = _requests(model)
    solo = _solo(runner, reqs)
    sched = Scheduler(runner, pool_bytes=64 * 2**20, max_batch_size=max_batch_size)
    try:
        seqs = _submit_all(sched, reqs)
    finally:
        sched.close()
    _assert_solo_results(seqs, solo, reqs)
    assert all(seq.finish_reason == "length" for seq in seqs)
    sizes = [max(s.batch_sizes, default=0) for s in seqs]
    assert max(sizes) <= max_batch_size
    if max_batch_size > 1:
        assert max(sizes) > 1, "requests submitted together never decoded together"
    assert sched.pool.used == 0 and sched.pool.peak <= sched.pool.capacity


@pytest.mark.parametrize("max_prefill_tokens", [5, 10, 0])
def test_chunked_prefills_interleave_with_decode_steps_and_change_no_token(
    model_and_runner, monkeypatch, max_prefill_tokens
):
    """With a chunk of 5 prompt tokens, prefills run piece by piece between the running batch's decode
    steps, at most ``max_prefill_tokens`` prompt tokens between two steps (whole chunks, at least
    one; 0: every waiting request is prefilled before the next step), and every request's tokens,
    kept sets and evictions are still those of its solo, whole-prompt run."""
    from vlcache.engine import scheduler as scheduler_module

    model, runner = model_and_runner
    reqs = _requests(model, seed=70)
    solo = _solo(runner, reqs)
    log: list[tuple[str, int]] = []  # ("chunk", tokens fed) and ("step", rows left after it), in order

    class Logged(scheduler_module.PromptPrefill):
        def advance(self) -> bool:
            before = self.fed
            done = super().advance()
            log.append(("chunk", self.fed - before))
            return done

    original_step = Scheduler._step

    def logged_step(self) -> None:
        original_step(self)
        log.append(("step", len(self.batch)))

    monkeypatch.setattr(scheduler_module, "PromptPrefill", Logged)
    monkeypatch.setattr(Scheduler, "_step", logged_step)
    monkeypatch.setattr(runner, "prefill_chunk", 5)
    sched = Scheduler(runner, pool_bytes=64 * 2**20, max_batch_size=16, max_prefill_tokens=max_prefill_tokens)
    try:
        seqs = _submit_all(sched, reqs)
    finally:
        sched.close()
    _assert_solo_results(seqs, solo, reqs)
    assert min(-(-s.prompt_len // 5) for s in seqs) > 2  # every prompt takes several chunks
    # prompt tokens fed between two decode steps, after steps that left rows decoding
    first_step = next(i for i, (kind, _) in enumerate(log) if kind == "step")
    between, fed, running = [], 0, False
    for kind, n in log[first_step:]:
        if kind == "step":
            if running:
                between.append(fed)
            fed, running = 0, n > 0
        else:
            fed += n
    prefill_tokens = sum(s.prompt_len for s in seqs)
    if max_prefill_tokens:
        assert max(between) <= max_prefill_tokens, between
        assert any(between), "no prefill ran between two decode steps of a running batch"
        if max_prefill_tokens == 10:
            assert max(between) == 10  # two chunks between two steps
    else:
        # every request was prefilled before the first step
        assert sum(n for kind, n in log[:first_step] if kind == "chunk") == prefill_tokens
        assert between == [0] * len(between)
    assert sched.pool.used == 0


def test_max_prefill_tokens_is_checked(model_and_runner):
    _, runner = model_and_runner
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_prefill_tokens"):
            Scheduler(runner, pool_bytes=2**20, max_prefill_tokens=bad)


def test_tokens_are_streamed_in_order_on_the_scheduler_thread(model_and_runner):
    model, runner = model_and_runner
    reqs = _requests(model, seed=40)[:4]
    streamed: dict[int, list[int]] = {}
    sched = Scheduler(runner, pool_bytes=64 * 2**20, max_batch_size=4)
    try:
        seqs = []
        for n, (inputs, config, max_tokens) in enumerate(reqs):
            streamed[n] = []
            seqs.append(
                sched.submit(
                    inputs["input_ids"],
                    inputs["pixel_values"],
                    config,
                    max_tokens=max_tokens,
                    on_token=streamed[n].append,
                )
            )
        for seq in seqs:
            assert seq.done.wait(60)
    finally:
        sched.close()
    for n, seq in enumerate(seqs):
        assert streamed[n] == seq.tokens and len(seq.tokens) == reqs[n][2]


def test_a_small_pool_queues_and_then_serves_everything(model_and_runner):
    """A pool that holds about two prefills: requests wait (queue time > 0), none is lost, the pool never
    goes above its capacity, and every byte comes back."""
    model, runner = model_and_runner
    reqs = _requests(model, seed=80)
    solo = _solo(runner, reqs)
    probe = Scheduler(runner, pool_bytes=2**30)
    biggest = max(probe.prefill_bytes(int(i["input_ids"].shape[1]), t) for i, _, t in reqs)
    probe.close()
    seen: list[float] = []
    sched = Scheduler(
        runner,
        pool_bytes=int(2.2 * biggest),
        max_batch_size=16,
        listener=lambda m: seen.append(m.pool_used_bytes / m.pool_capacity_bytes),
    )
    try:
        seqs = _submit_all(sched, reqs)
    finally:
        sched.close()
    assert [s.tokens for s in seqs] == [r.tokens for r in solo]
    assert max(seen) <= 1.0 and sched.pool.peak <= sched.pool.capacity
    assert sum(s.queue_seconds > 0 for s in seqs) >= 3
    assert sched.pool.used == 0


def test_a_compressed_batch_admits_more_rows_than_the_full_cache_in_the_same_pool(model_and_runner):
    """Same prompts, same pool: at budget 0.1 more requests decode together than at 1.0."""
    model, runner = model_and_runner
    prompts = [llava_inputs(model, question_len=10, seed=500 + n) for n in range(10)]
    probe = Scheduler(runner, pool_bytes=2**30)
    unit = probe.prefill_bytes(int(prompts[0]["input_ids"].shape[1]), 30)
    probe.close()
    largest = {}
    for budget in (1.0, 0.1):
        sched = Scheduler(runner, pool_bytes=3 * unit, max_batch_size=16)
        config = CompressionConfig.create("vlcache" if budget < 1 else "full", budget)
        try:
            seqs = [sched.submit(p["input_ids"], p["pixel_values"], config, max_tokens=30) for p in prompts]
            for seq in seqs:
                assert seq.done.wait(60)
        finally:
            sched.close()
        largest[budget] = max(max(s.batch_sizes) for s in seqs)
    assert largest[1.0] == 3
    assert largest[0.1] >= 2 * largest[1.0]


def test_cancelling_frees_the_row_at_once_and_others_go_on(model_and_runner):
    model, runner = model_and_runner
    reqs = _requests(model, seed=120)[:3]
    flag = threading.Event()
    sched = Scheduler(runner, pool_bytes=64 * 2**20, max_batch_size=4)
    try:
        inputs, config, _ = reqs[0]
        long = sched.submit(
            inputs["input_ids"],
            inputs["pixel_values"],
            config,
            max_tokens=150,
            on_token=lambda t: flag.set() if len(long.tokens) >= 3 else None,
            cancelled=lambda: flag.is_set(),
        )
        others = [sched.submit(i["input_ids"], i["pixel_values"], c, max_tokens=t) for i, c, t in reqs[1:]]
        assert long.done.wait(60)
        assert long.finish_reason == "cancelled" and 3 <= len(long.tokens) < 150
        for seq in others:
            assert seq.done.wait(60) and seq.error is None and seq.finish_reason == "length"
        deadline = time.time() + 10
        while sched.metrics().pool_used_bytes and time.time() < deadline:
            time.sleep(0.01)
        assert sched.metrics().pool_used_bytes == 0
    finally:
        sched.close()


def test_a_request_that_fails_in_prefill_fails_alone(model_and_runner):
    model, runner = model_and_runner
    reqs = _requests(model, seed=160)[:3]
    sched = Scheduler(runner, pool_bytes=64 * 2**20, max_batch_size=4)
    try:
        good = [sched.submit(i["input_ids"], i["pixel_values"], c, max_tokens=t) for i, c, t in reqs]
        inputs, config, _ = reqs[0]
        bad_pixels = np.zeros((1, 3, 5, 5), np.float32)  # the vision tower's size is checked in prefill
        bad = sched.submit(inputs["input_ids"], bad_pixels, config, max_tokens=4)
        assert bad.done.wait(60) and isinstance(bad.error, ValueError) and not bad.tokens
        for seq in good:
            assert seq.done.wait(60) and seq.error is None
    finally:
        sched.close()
    assert sched.pool.used == 0


def test_impossible_requests_are_refused_at_submit(model_and_runner):
    model, runner = model_and_runner
    inputs = llava_inputs(model, question_len=8, seed=1)
    config = CompressionConfig()
    sched = Scheduler(runner, pool_bytes=4096)
    try:
        with pytest.raises(ValueError, match="more than the whole pool"):
            sched.submit(inputs["input_ids"], inputs["pixel_values"], config, max_tokens=4)
        with pytest.raises(ValueError, match="max_input_len"):
            sched.submit(inputs["input_ids"], inputs["pixel_values"], config, max_tokens=10_000)
        with pytest.raises(ValueError, match="max_tokens"):
            sched.submit(inputs["input_ids"], inputs["pixel_values"], config, max_tokens=0)
    finally:
        sched.close()


def test_close_ends_open_requests_with_an_error(model_and_runner):
    model, runner = model_and_runner
    inputs = llava_inputs(model, question_len=8, seed=2)
    started = threading.Event()
    sched = Scheduler(runner, pool_bytes=64 * 2**20, max_batch_size=1)
    seqs = [
        sched.submit(
            inputs["input_ids"],
            inputs["pixel_values"],
            CompressionConfig(),
            max_tokens=150,
            on_token=lambda t: started.set(),
        )
        for _ in range(3)
    ]
    assert started.wait(30)
    sched.close()
    for seq in seqs:
        assert seq.done.wait(10)
    assert all(s.error is not None or s.finish_reason == "length" for s in seqs)
    assert sum(s.error is not None for s in seqs) >= 2  # at least the two that were still waiting
    assert sched.pool.used == 0


def test_batch_buffers_are_sized_per_layer_by_the_largest_need_and_rebuilt_exactly():
    kv = BatchKV(num_layers=2, num_kv_heads=2, head_dim=4)
    rng = np.random.default_rng(0)

    def source(lengths, cap=12):
        keys = [rng.standard_normal((2, cap, 4)).astype(np.float32) for _ in lengths]
        values = [rng.standard_normal((2, cap, 4)).astype(np.float32) for _ in lengths]
        return RowSource(keys, values, list(lengths))

    a, b = source([3, 7]), source([5, 2])
    needs = [[3 + 4, 7 + 4], [5 + 1, 2 + 1]]
    assert kv.bytes_for(needs) == 2 * (7 + 11) * kv.entry_bytes
    kv.rebuild([a, b], needs)
    assert [layer.keys.shape[2] for layer in kv.layers] == [7, 11]
    assert kv.nbytes == kv.bytes_for(needs)
    np.testing.assert_array_equal(kv.layers[1].keys[0, :, :7], a.keys[1][:, :7])
    np.testing.assert_array_equal(kv.layers[0].values[1, :, :5], b.values[0][:, :5])
    kv.evict(0, 1, 2)
    assert kv.layers[1].lengths.tolist() == [6, 2]
    np.testing.assert_array_equal(kv.layers[1].keys[0, :, 2:6], a.keys[1][:, 3:7])
    kv.rebuild([kv.row(1)], [[6, 3]])  # row 0 leaves: buffers shrink to row 1's need
    assert kv.rows == 1 and [layer.keys.shape[2] for layer in kv.layers] == [6, 3]
    np.testing.assert_array_equal(kv.layers[1].keys[0, :, :2], b.keys[1][:, :2])


def test_pool_accounting_and_sizes():
    pool = KVPool(1000)
    pool.stage(300)
    pool.set_batch(600)
    assert pool.used == 900 and pool.free == 100 and pool.peak == 900
    pool.unstage(300)
    assert pool.used == 600 and pool.peak == 900
    with pytest.raises(RuntimeError):
        pool.unstage(1)
    with pytest.raises(ValueError):
        KVPool(0)
    assert pool_bytes(2.5) == int(2.5 * 2**20)
    assert 0 < pool_bytes(fraction=0.01) < pool_bytes(fraction=0.5)
    for bad in ({"megabytes": 0}, {"megabytes": -1}, {"fraction": 0}, {"fraction": 1.5}):
        with pytest.raises(ValueError):
            pool_bytes(**bad)
