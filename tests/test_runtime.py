"""The ONNX Runtime backend against the torch backend: same greedy tokens, logits, kept indices, stats.

Reference: :func:`vlcache.generate` / :class:`vlcache.VLCache` on the same transformers model the
graphs were exported from, on fresh prompts (random tiny LLaVA from configs, and a random-weight
checkpoint in the bundled ``llava-tiny`` format loaded with ``from_pretrained`` + its processor).
Every comparison runs on both decoder graphs (``fused``: GroupQueryAttention on preallocated KV
buffers written in place; ``standard``: Concat), plus the fused runner's buffer properties: one
buffer per layer for the whole decode, sized by the budget, and per-row lengths in one call.
"""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import vlcache
from vlcache import CompressionConfig, VLCache
from vlcache.config import settings_read_by
from vlcache.core import allocate_budgets
from vlcache.export import export_llava
from vlcache.export.names import ATTENTION_VARIANTS
from vlcache.hf.tiny import llava_inputs, tiny_llava
from vlcache.methods import available
from vlcache.pipeline import CompressionStats
from vlcache.runtime import generate, load_runtime, prefill, stream
from vlcache.runtime.base import LayerKV

NEW_TOKENS = 10


@pytest.fixture(scope="module", params=ATTENTION_VARIANTS)
def export_dir(llava, tmp_path_factory, request) -> Path:
    out = tmp_path_factory.mktemp(f"runtime-export-{request.param}")
    export_llava(llava, out, max_input_len=256, attention=request.param)
    return out


@pytest.fixture(scope="module")
def fused_runner(llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime-export-fused-only")
    export_llava(llava, out, max_input_len=256, attention="fused")
    return load_runtime(out, backend="onnx", threads=1)


@pytest.fixture(scope="module")
def runner(export_dir):
    return load_runtime(export_dir, backend="onnx", threads=1)


CASES = [
    ("vlcache", 1.0),
    ("vlcache", 0.1),
    ("snapkv", 1.0),
    ("snapkv", 0.1),
    ("pyramidkv", 0.1),
    ("tgvkv", 0.1),
    ("full", 1.0),
]


@pytest.mark.parametrize(("method", "budget"), CASES)
def test_greedy_tokens_logits_and_stats_equal_torch(llava, runner, method, budget):
    inputs = llava_inputs(llava, question_len=18, seed=CASES.index((method, budget)) + 100)
    cfg = CompressionConfig.create(method, budget, **settings_read_by(method, {"window": 8}))
    ref = vlcache.generate(llava, inputs, cfg, max_new_tokens=NEW_TOKENS, return_logits=True)
    streamed: list[int] = []
    res = generate(
        runner,
        inputs["input_ids"],
        inputs["pixel_values"],
        cfg,
        max_new_tokens=NEW_TOKENS,
        on_token=streamed.append,
        return_logits=True,
    )
    assert res.tokens == ref.new_tokens.tolist()
    assert streamed == res.tokens
    assert res.logits is not None and ref.logits is not None and len(res.logits) == len(ref.logits)
    for ours, theirs in zip(res.logits, ref.logits):
        np.testing.assert_allclose(ours, theirs[0].numpy(), atol=1e-4, rtol=1e-4)
    s, r = res.stats, ref.stats
    assert s.kept_per_layer == r.kept_per_layer
    assert (s.kv_bytes_before, s.kv_bytes_after) == (r.kv_bytes_before, r.kv_bytes_after)
    assert (s.prompt_tokens, s.image_tokens) == (r.prompt_tokens, r.image_tokens)
    assert s.decode_evictions == r.decode_evictions
    if budget < 1.0:
        assert s.kv_bytes_after < s.kv_bytes_before


@pytest.mark.parametrize(
    ("method", "recent_fraction"),
    [("vlcache", 0.1), ("vlcache", 0.3), ("vlcache-nowindow", 0.1), ("vlcache-uniform", 0.1)],
)
def test_kept_indices_budgets_and_densities_equal_the_torch_session(llava, runner, method, recent_fraction):
    inputs = llava_inputs(llava, question_len=25, seed=int(torch.randint(0, 10_000, ())))
    m = inputs["input_ids"].shape[1]
    cfg = CompressionConfig.create(method, 0.1, **settings_read_by(method, {"recent_fraction": recent_fraction}))
    session = VLCache(cfg)
    with session.apply(llava), torch.no_grad():
        llava.generate(**inputs, max_new_tokens=1, do_sample=False)
    res = generate(runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=1)
    assert session.stats is not None
    np.testing.assert_allclose(res.stats.layer_weights, session.stats.layer_weights, atol=1e-6)
    assert res.budgets is not None
    if method != "vlcache-uniform":
        assert torch.equal(res.budgets, allocate_budgets(session.stats.layer_weights, 0.1, m, cfg.min_keep(m)))
    assert len(res.kept_indices) == len(session.kept_indices)
    window = method != "vlcache-nowindow"
    for ours, theirs, k in zip(res.kept_indices, session.kept_indices, res.budgets.tolist()):
        assert ours is not None and theirs is not None
        assert torch.equal(ours, theirs)
        # the recent window is in both, inside the layer's budget
        w = max(1, int(recent_fraction * k + 1e-9)) if window else 0
        assert ours.shape[-1] == k
        assert all(set(range(m - w, m)) <= set(row) for row in ours.reshape(-1, k).tolist())


def test_stats_account_for_bytes_and_time(llava, runner):
    inputs = llava_inputs(llava, question_len=10, seed=3)
    res = generate(
        runner,
        inputs["input_ids"],
        inputs["pixel_values"],
        CompressionConfig(budget=0.2),
        max_new_tokens=4,
        eos_token_id=(),
    )
    s = res.stats
    m = inputs["input_ids"].shape[1]
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head dim 16, float32
    assert s.kv_bytes_before == 3 * m * per_token
    assert s.kv_bytes_after == sum(s.kept_per_layer) * per_token
    if runner.fused:  # each layer's buffer: its kept entries + room for the 4 new tokens
        assert s.kv_bytes_reserved == sum(k + 4 for k in s.kept_per_layer) * per_token
    else:  # tensors sized exactly
        assert s.kv_bytes_reserved == s.kv_bytes_after
    assert sum(s.kept_per_layer) == round(0.2 * 3 * m)
    assert s.new_tokens == len(res.tokens) == 4
    assert s.prefill_seconds > 0 and s.scoring_seconds > 0 and s.decode_seconds > 0
    d = s.to_dict()
    assert (
        d["backend"] == "onnx" and d["decode_ms_per_token"] > 0 and d["kept_fraction"] == pytest.approx(s.kept_fraction)
    )


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_llava_tiny_format_checkpoint_matches_torch(checkpoint, tmp_path_factory, attention):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlcache.digits import format_prompt

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    out = tmp_path_factory.mktemp("tiny-format-export")
    export_llava(model, out, attention=attention)
    runner = load_runtime(out, threads=1)
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    inputs = processor(images=image, text=format_prompt("what is at row 1 col 2 ?"), return_tensors="pt")
    for budget in (1.0, 0.1):
        cfg = CompressionConfig(method="vlcache", budget=budget)
        ref = vlcache.generate(model, inputs, cfg, max_new_tokens=6, return_logits=True)
        res = generate(runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=6, return_logits=True)
        assert res.tokens == ref.new_tokens.tolist()
        assert res.stats.kept_per_layer == ref.stats.kept_per_layer
        assert res.logits is not None and ref.logits is not None
        np.testing.assert_allclose(res.logits[0], ref.logits[0][0].numpy(), atol=1e-4, rtol=1e-4)


# --- every method, on a fresh random model ----------------------------------------------------------
@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A fresh random LLaVA (its own seed, 2 layers) exported in both decoder forms."""
    model = tiny_llava(seed=11, layers=2)
    runners = {}
    for attention in ATTENTION_VARIANTS:
        out = tmp_path_factory.mktemp(f"fresh-{attention}")
        export_llava(model, out, max_input_len=128, attention=attention)
        runners[attention] = load_runtime(out, backend="onnx", threads=1)
    return model, runners


#: what legitimately differs between two backends' stats dicts: the timings, the backend's name, and
#: the bytes reserved (the fused runner's buffers keep room for the decode); the layer weights are
#: floats computed by two runtimes (compared to 1e-5)
BACKEND_SPECIFIC = {*CompressionStats.TIMINGS, "backend", "kv_bytes_reserved", "layer_weights"}


@pytest.mark.parametrize("method", available())
def test_every_method_keeps_generates_and_reports_the_same_on_torch_and_onnx(fresh, method):
    """For every registered method at several budgets: the torch backend and both ONNX Runtime
    decoders keep the same indices in every layer, generate the same greedy tokens and report the
    same stats dict apart from timings."""
    model, runners = fresh
    for n, budget in enumerate((0.05, 0.2, 0.5)):
        inputs = llava_inputs(model, question_len=9 + 4 * n, seed=200 + n)
        cfg = CompressionConfig.create(method, budget, **settings_read_by(method, {"window": 6}))
        ref = vlcache.generate(model, inputs, cfg, max_new_tokens=6, eos_token_id=())
        ref_stats = ref.stats.to_dict()
        assert ref.kept_indices is not None
        for attention, runner in runners.items():
            res = generate(runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=6, eos_token_id=())
            where = f"{method} at {budget} ({attention})"
            assert res.tokens == ref.new_tokens.tolist(), where
            for layer, (ours, theirs) in enumerate(zip(res.kept_indices, ref.kept_indices, strict=True)):
                assert (ours is None) == (theirs is None), (where, layer)
                assert ours is None or torch.equal(ours, theirs), (where, layer)
            assert (res.budgets is None) == (ref.budgets is None)
            assert res.budgets is None or torch.equal(res.budgets, ref.budgets)
            stats = res.stats.to_dict()
            assert stats.keys() == ref_stats.keys()
            assert {k: v for k, v in stats.items() if k not in BACKEND_SPECIFIC} == {
                k: v for k, v in ref_stats.items() if k not in BACKEND_SPECIFIC
            }, where
            assert stats["backend"] == "onnx" and ref_stats["backend"] == "torch"
            np.testing.assert_allclose(
                np.array(stats["layer_weights"], dtype=float),
                np.array(ref_stats["layer_weights"], dtype=float),
                atol=1e-5,
            )
            reserved = stats["kv_bytes_after"]
            if runner.fused:  # room for the 6 new tokens in every compacted layer, m + 6 in the others
                per_token = stats["kv_bytes_after"] // sum(stats["kept_per_layer"])
                reserved = sum(k + 6 for k in stats["kept_per_layer"]) * per_token
            assert (
                stats["kv_bytes_reserved"] == reserved and ref_stats["kv_bytes_reserved"] == ref_stats["kv_bytes_after"]
            )
            assert stats["new_tokens"] == ref_stats["new_tokens"] == 6


@pytest.mark.parametrize("method", ["vlcache", "snapkv", "h2o", "tgvkv", "full"])
def test_a_chunked_prefill_equals_the_whole_prompt_pass(fresh, method):
    """Feeding the prompt in chunks (1, 5 or 16 tokens per decoder call, each after the ones before in
    the same buffers) gives the whole-prompt pass's tokens, logits, kept sets and stats, on both
    decoder graphs; the chunks' query rows reach scoring complete."""
    model, runners = fresh
    inputs = llava_inputs(model, question_len=11, seed=230)
    cfg = CompressionConfig.create(method, 0.2, **settings_read_by(method, {"window": 6}))
    for attention, runner in runners.items():
        old = runner.prefill_chunk
        try:
            runner.prefill_chunk = None
            ref = generate(
                runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=5, return_logits=True
            )
            for chunk in (1, 5, 16):
                runner.prefill_chunk = chunk
                res = generate(
                    runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=5, return_logits=True
                )
                where = f"{method}, {attention}, chunk {chunk}"
                assert res.tokens == ref.tokens, where
                np.testing.assert_allclose(np.stack(res.logits), np.stack(ref.logits), atol=1e-5, err_msg=where)
                for ours, theirs in zip(res.kept_indices, ref.kept_indices, strict=True):
                    assert (ours is None) == (theirs is None) and (ours is None or torch.equal(ours, theirs)), where
                stats, ref_stats = res.stats.to_dict(), ref.stats.to_dict()
                assert {k: v for k, v in stats.items() if k not in CompressionStats.TIMINGS} == {
                    k: v for k, v in ref_stats.items() if k not in CompressionStats.TIMINGS
                }, where
        finally:
            runner.prefill_chunk = old


def test_prefill_chunk_must_be_positive(export_dir):
    with pytest.raises(ValueError, match="prefill_chunk"):
        load_runtime(export_dir, backend="onnx", prefill_chunk=0)


def test_a_cancelled_stream_frees_its_buffers(llava, fused_runner):
    """Closing a runner's token stream mid-generation is cancelling it: the per-layer KV buffers are
    released at once (nothing else holds them), the stats stay."""
    inputs = llava_inputs(llava, question_len=10, seed=61)
    tokens = stream(
        fused_runner, inputs["input_ids"], inputs["pixel_values"], CompressionConfig(budget=0.2), max_new_tokens=20
    )
    assert [next(tokens), next(tokens)]
    buffers = [weakref.ref(a) for kv in tokens.decoder.cache for a in (kv.keys, kv.values)]
    assert all(ref() is not None for ref in buffers)
    tokens.close()
    assert tokens.finish_reason == "cancelled" and tokens.decoder is None
    assert all(ref() is None for ref in buffers)
    assert tokens.stats is not None and tokens.stats.new_tokens == 2 and len(tokens.tokens) == 2
    assert next(tokens, None) is None
    with stream(fused_runner, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=20) as tokens:
        next(tokens)
        buffers = [weakref.ref(kv.keys) for kv in tokens.decoder.cache]
    assert all(ref() is None for ref in buffers) and tokens.finish_reason == "cancelled"


# --- the fused runner's KV buffers -------------------------------------------------------------------
@pytest.mark.parametrize(("method", "budget"), [("vlcache", 0.1), ("full", 1.0), ("tgvkv", 0.1)])
def test_fused_runner_decodes_in_place_in_buffers_sized_by_the_budget(llava, fused_runner, method, budget):
    """After compaction each layer holds one buffer of capacity k_l + max_new_tokens (m +
    max_new_tokens for the full cache); every decode step (and TGV-KV's evictions) writes into those
    same buffers: same arrays, same addresses, no new allocation per step."""
    runner, steps = fused_runner, 6
    inputs = llava_inputs(llava, question_len=12, seed=41)
    m = inputs["input_ids"].shape[1]
    cfg = CompressionConfig.create(method, budget)
    seq = prefill(runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=steps + 1)
    kept = seq.stats.kept_per_layer
    assert [kv.keys.shape[2] for kv in seq.cache] == [k + steps + 1 for k in kept]
    if method == "full":
        assert kept == [m] * 3
    else:
        assert all(k < m for k in kept)
    arrays = [(kv.keys, kv.values) for kv in seq.cache]
    addresses = [(k.ctypes.data, v.ctypes.data) for k, v in arrays]
    lengths = [kv.length for kv in seq.cache]
    for _ in range(steps):
        seq.step(seq.greedy())
        assert all(kv.keys is k and kv.values is v for kv, (k, v) in zip(seq.cache, arrays))  # same buffers ...
        assert [(kv.keys.ctypes.data, kv.values.ctypes.data) for kv in seq.cache] == addresses  # ... memory
    grown = [kv.length - n for kv, n in zip(seq.cache, lengths)]
    assert sum(grown) == 3 * steps - seq.stats.decode_evictions  # appended every step, minus evictions
    if method == "tgvkv":
        assert seq.stats.decode_evictions > 0


def test_fused_runner_grows_a_full_buffer_and_keeps_generating(llava, fused_runner):
    """Stepping past the max_new_tokens the buffers were sized for copies into a larger buffer once
    and keeps the tokens of a generation sized for it from the start."""
    inputs = llava_inputs(llava, question_len=8, seed=43)
    cfg = CompressionConfig(budget=0.2)
    ref = generate(fused_runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=6, eos_token_id=())
    seq = prefill(fused_runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=1)
    capacity = [kv.keys.shape[2] for kv in seq.cache]
    tokens = [seq.greedy()]
    for _ in range(5):
        seq.step(tokens[-1])
        tokens.append(seq.greedy())
    assert tokens == ref.tokens
    assert all(kv.keys.shape[2] > c for kv, c in zip(seq.cache, capacity))


def test_fused_runner_takes_rows_with_different_lengths_in_one_call(llava, fused_runner):
    """Two prompts compacted to different per-layer lengths, stacked as the two rows of one batch
    (lengths per row and per layer): one decode call equals two separate calls, row by row."""
    runner = fused_runner
    rows = []
    for question, seed, budget in ((14, 51, 0.3), (6, 52, 0.1)):
        inputs = llava_inputs(llava, question_len=question, seed=seed)
        seq = prefill(
            runner, inputs["input_ids"], inputs["pixel_values"], CompressionConfig(budget=budget), max_new_tokens=2
        )
        rows.append(seq)
    lengths = [[kv.length for kv in seq.cache] for seq in rows]
    assert lengths[0] != lengths[1] and len(set(lengths[0])) > 1  # ragged across rows and layers
    capacity = max(max(row) for row in lengths) + 1
    batch = []
    for layer in range(3):
        kv = LayerKV(*(np.zeros((2, 2, capacity, 16), np.float32) for _ in range(2)), np.zeros(2, np.int64))
        for r, seq in enumerate(rows):
            n = seq.cache[layer].length
            kv.keys[r, :, :n] = seq.cache[layer].keys[0, :, :n]
            kv.values[r, :, :n] = seq.cache[layer].values[0, :, :n]
            kv.lengths[r] = n
        batch.append(kv)
    embeds = np.concatenate([runner.embed(np.array([[seq.greedy()]])) for seq in rows])
    positions = np.array([[seq.position] for seq in rows])
    both = runner.forward(embeds, positions, batch)
    assert both.logits.shape == (2, runner.spec.vocab_size)
    for r, seq in enumerate(rows):
        alone = runner.forward(embeds[r : r + 1], positions[r : r + 1], seq.cache)
        np.testing.assert_allclose(both.logits[r], alone.logits[0], atol=1e-5, rtol=1e-5)
        for layer in range(3):
            n = lengths[r][layer] + 1
            assert both.cache[layer].lengths[r] == alone.cache[layer].length == n
            np.testing.assert_allclose(both.cache[layer].keys[r, :, :n], alone.cache[layer].keys[0, :, :n], atol=1e-6)
            np.testing.assert_allclose(
                both.cache[layer].values[r, :, :n], alone.cache[layer].values[0, :, :n], atol=1e-6
            )
            np.testing.assert_allclose(
                runner.to_torch(both.queries[layer])[r], runner.to_torch(alone.queries[layer])[0], atol=1e-6
            )
    with pytest.raises(ValueError, match="batch size 1"):  # ONNX Runtime's rule for multi-token steps
        runner.forward(np.concatenate([embeds, embeds], axis=1), np.concatenate([positions, positions + 1], 1), batch)


# --- errors --------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_value_errors(llava, runner, tmp_path):
    inputs = llava_inputs(llava, question_len=6, seed=1)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(ValueError, match="batch size 1"):
        generate(runner, ids.repeat(2, 1), pixels)
    with pytest.raises(ValueError, match="no pixel_values"):
        generate(runner, ids, None)
    with pytest.raises(ValueError, match="image tokens"):
        generate(runner, ids[:, 6:], pixels)  # cuts into the image span
    with pytest.raises(ValueError, match="pixel_values must be"):
        generate(runner, ids, pixels[:, :, :16])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(runner, ids, pixels, max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        generate(runner, torch.tensor([[1, 5, 10_000]]))
    with pytest.raises(ValueError, match="max_input_len"):
        generate(runner, torch.tensor([[1] * 250]), max_new_tokens=10)
    with pytest.raises(ValueError, match="export.json"):
        load_runtime(tmp_path)
    with pytest.raises(ValueError, match="backend"):
        load_runtime(tmp_path, backend="tensorflow")


def test_text_only_prompt_runs_like_the_torch_session(llava, runner):
    ids = torch.tensor([[1, 5, 7, 9]])
    assert not (ids == runner.spec.image_token_id).any()  # premise: no image token in the prompt
    cfg = CompressionConfig(budget=0.5)
    text_only = generate(runner, ids, max_new_tokens=2, config=cfg)
    ref = vlcache.generate(llava, {"input_ids": ids}, cfg, max_new_tokens=2)
    assert text_only.stats.image_tokens == 0 and text_only.stats.prompt_tokens == 4
    assert text_only.tokens == ref.new_tokens.tolist()
    assert text_only.stats.kept_per_layer == ref.stats.kept_per_layer
    assert sum(text_only.stats.kept_per_layer) == round(0.5 * 3 * 4)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_runner_says_tensorrt_is_missing(export_dir):
    with pytest.raises(RuntimeError, match="TensorRT"):
        load_runtime(export_dir, backend="tensorrt")
    assert type(load_runtime(export_dir)).__name__ == "OnnxRunner"  # auto falls back to ONNX Runtime
