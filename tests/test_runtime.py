"""The ONNX Runtime backend against the torch backend: same greedy tokens, logits, kept indices, stats.

Reference: :func:`vlcache.generate` / :class:`vlcache.VLCache` on the same transformers model the
graphs were exported from, on fresh prompts (random tiny LLaVA from configs, and a random-weight
checkpoint in the bundled ``llava-tiny`` format loaded with ``from_pretrained`` + its processor).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import vlcache
from vlcache import CompressionConfig, VLCache
from vlcache.core import allocate_budgets
from vlcache.export import export_llava
from vlcache.hf.tiny import llava_inputs
from vlcache.runtime import generate, load_runtime

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def export_dir(llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runtime-export")
    export_llava(llava, out, max_input_len=256)
    return out


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
    cfg = CompressionConfig(method=method, budget=budget, window=8)
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
    cfg = CompressionConfig(method=method, budget=0.1, recent_fraction=recent_fraction)
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
    assert sum(s.kept_per_layer) == round(0.2 * 3 * m)
    assert s.new_tokens == len(res.tokens) == 4
    assert s.prefill_seconds > 0 and s.scoring_seconds > 0 and s.decode_seconds > 0
    d = s.to_dict()
    assert (
        d["backend"] == "onnx" and d["decode_ms_per_token"] > 0 and d["kept_fraction"] == pytest.approx(s.kept_fraction)
    )


def test_llava_tiny_format_checkpoint_matches_torch(checkpoint, tmp_path_factory):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlcache.eval.tasks import format_prompt

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    out = tmp_path_factory.mktemp("tiny-format-export")
    export_llava(model, out)
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
