"""The transformers integration on tiny random LLaVA-1.5 and LLaVA-NeXT models."""

import pytest
import torch

import vlcache
from tests.oracle import oracle_generate
from vlcache import CompressionConfig, VLCache
from vlcache.hf import decoder_stack, find_image_spans, project_queries
from vlcache.hf.adapter import cache_argument
from vlcache.hf.tiny import IMAGE_TOKEN, llava_inputs, llava_next_inputs, tiny_llava

NEW = 6
COMPRESSING = ["vlcache", "vlcache-uniform", "tgvkv", "snapkv", "h2o", "pyramidkv", "streaming", "random"]


def plain(model, inputs, n=NEW):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, out.logits


def assert_logits_close(a, b, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("method", COMPRESSING + ["full"])
def test_budget_one_equals_plain_generate(llava, method):
    inputs = llava_inputs(llava, seed=1)
    seq, logits = plain(llava, inputs)
    r = vlcache.generate(
        llava, inputs, CompressionConfig(method=method, budget=1.0), max_new_tokens=NEW, return_logits=True
    )
    assert torch.equal(r.sequences, seq)
    assert_logits_close(r.logits, logits, atol=1e-5)
    m = inputs["input_ids"].shape[-1]
    assert r.stats.kept_per_layer == [m] * 3 and r.stats.kv_bytes_after == r.stats.kv_bytes_before


@pytest.mark.parametrize("fixture", ["llava_eager", "llava_next"])
def test_budget_one_equals_plain_generate_eager_and_next(fixture, request):
    model = request.getfixturevalue(fixture)
    inputs = llava_next_inputs(model, seed=2) if fixture == "llava_next" else llava_inputs(model, seed=2)
    seq, logits = plain(model, inputs)
    r = vlcache.generate(model, inputs, CompressionConfig(budget=1.0), max_new_tokens=NEW, return_logits=True)
    assert torch.equal(r.sequences, seq)
    assert_logits_close(r.logits, logits, atol=1e-5)


ORACLE_CASES = [
    ("llava", "vlcache", True),
    ("llava", "vlcache", False),
    ("llava", "snapkv", True),
    ("llava", "h2o", True),
    ("llava", "pyramidkv", True),
    ("llava", "streaming", True),
    ("llava", "random", True),
    ("llava_eager", "vlcache", True),
    ("llava_next", "vlcache", True),
    ("llava_next", "vlcache-uniform", False),
]


@pytest.mark.parametrize("fixture,method,per_head", ORACLE_CASES)
def test_masking_oracle(fixture, method, per_head, request):
    """Compacted ragged cache == full cache with exactly the evicted keys masked, step by step."""
    model = request.getfixturevalue(fixture)
    inputs = llava_next_inputs(model, seed=3) if fixture == "llava_next" else llava_inputs(model, seed=3)
    session = VLCache(CompressionConfig(method=method, budget=0.3, per_head=per_head))
    with session.apply(model), torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    m = inputs["input_ids"].shape[-1]
    kept = session.kept_indices
    assert all(k is not None for k in kept)
    assert [int(k.shape[-1]) for k in kept] == session.stats.kept_per_layer
    assert sum(session.stats.kept_per_layer) == round(0.3 * 3 * m)
    if not per_head:
        assert all(bool((k == k[:, :1]).all()) for k in kept)
    seq, logits = oracle_generate(model, inputs, kept, NEW)
    assert torch.equal(out.sequences, seq)
    assert_logits_close(out.logits, logits, atol=1e-4)
    # and compression did change something (the oracle is not trivially equal to the full cache)
    _, full_logits = plain(model, inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits[1:], full_logits[1:])) > 1e-3


def test_positions_keep_counting_from_prompt_length(llava):
    inputs = llava_inputs(llava, seed=4)
    m = inputs["input_ids"].shape[-1]
    seen = []
    rotary = decoder_stack(llava).rotary_emb
    handle = rotary.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs.get("position_ids", args[-1]).flatten().tolist()),
        with_kwargs=True,
    )
    try:
        r = vlcache.generate(llava, inputs, CompressionConfig(budget=0.1), max_new_tokens=4)
    finally:
        handle.remove()
    assert seen[0] == list(range(m))
    assert [s[0] for s in seen[1:]] == [m, m + 1, m + 2]
    assert max(r.stats.kept_per_layer) < m // 2  # the cache is much shorter than the positions


def test_queries_recomputed_by_hooks_match_the_model(llava_eager):
    """The RoPE'd queries the hooks rebuild give exactly the attention the eager model computed."""
    inputs = llava_inputs(llava_eager, seed=5)
    captured = {}
    stack = decoder_stack(llava_eager)
    attn0 = stack.layers[1].self_attn

    def hook(mod, args, kwargs, out):
        captured["q"] = project_queries(mod, kwargs["hidden_states"], kwargs["position_embeddings"])
        captured["k"] = cache_argument(kwargs).layers[1].keys
        captured["w"] = out[1]

    h = attn0.register_forward_hook(hook, with_kwargs=True)
    try:
        from transformers import DynamicCache

        with torch.no_grad():
            llava_eager(
                **inputs,
                past_key_values=DynamicCache(config=llava_eager.config),
                use_cache=True,
                output_attentions=True,
            )
    finally:
        h.remove()
    q, k = captured["q"], captured["k"]
    from vlcache.core import post_vision_attention

    mine = post_vision_attention(q, k, 0, scale=attn0.scaling)
    torch.testing.assert_close(mine, captured["w"].float(), atol=1e-5, rtol=1e-4)


def test_image_spans_and_post_vision_window(llava):
    inputs = llava_inputs(llava, num_images=2, seed=6)
    ids = inputs["input_ids"][0]
    spans = find_image_spans(ids, IMAGE_TOKEN)
    n = llava.config.image_seq_length
    assert len(spans) == 2 and all(e - s == n for s, e in spans)
    assert spans[0][1] < spans[1][0]
    r = vlcache.generate(llava, inputs, CompressionConfig(budget=0.2), max_new_tokens=2)
    assert r.stats.image_tokens == 2 * n
    assert find_image_spans([5, 120, 120, 7, 120], 120) == ((1, 3), (4, 5))
    assert find_image_spans([5, 6], None) == ()


def test_text_only_prompt(llava):
    ids = torch.tensor([[1] + list(range(10, 40))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    session = VLCache(CompressionConfig(budget=0.5))
    with session.apply(llava), torch.no_grad():
        out = llava.generate(
            **inputs, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert session.stats.image_tokens == 0 and sum(session.stats.kept_per_layer) == round(0.5 * 3 * 31)
    seq, logits = oracle_generate(llava, inputs, session.kept_indices, NEW)
    assert torch.equal(out.sequences, seq)
    assert_logits_close(out.logits, logits, atol=1e-4)


def test_prompt_shorter_than_budget_floor(llava):
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    r = vlcache.generate(llava, {"input_ids": ids}, CompressionConfig(budget=0.1), max_new_tokens=3)
    # round(0.1 * 3 * 5) = 2 < 3 layers: every layer keeps the 1-token floor, generation proceeds.
    assert r.stats.kept_per_layer == [1, 1, 1]
    assert r.new_tokens.numel() == 3


def test_tgvkv_decode_eviction_keeps_ratio(llava):
    inputs = llava_inputs(llava, seed=7)
    m = inputs["input_ids"].shape[-1]
    session = VLCache(CompressionConfig(method="tgvkv", budget=0.2))
    with session.apply(llava), torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
    kept = session.stats.kept_per_layer
    for layer, k in zip(cache.layers, kept):
        # 7 decode forwards appended 7 entries; the policy holds each layer near its ratio of m + 7.
        assert layer.keys.shape[2] <= round((m + 7) * k / m) + 1
    assert session.stats.decode_evictions > 0


def test_memory_is_released(llava):
    inputs = llava_inputs(llava, seed=8)
    with VLCache(CompressionConfig(budget=0.1)).apply(llava) as s, torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    for layer, k in zip(out.past_key_values.layers, s.stats.kept_per_layer):
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()
        assert layer.keys.shape[2] == k
    ratio = s.stats.kv_bytes_after / s.stats.kv_bytes_before
    assert ratio == pytest.approx(s.stats.kept_fraction) and abs(ratio - 0.1) < 0.01


def test_batch_larger_than_one_is_refused_but_full_works(llava):
    """vlcache.generate (the token stream) takes one prompt; a session around model.generate takes a
    batch with method full, and refuses it for a compressing method."""
    a, b = llava_inputs(llava, seed=9), llava_inputs(llava, seed=10)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}
    for method in ("vlcache", "full"):
        with pytest.raises(ValueError, match="one prompt at a time"):
            vlcache.generate(llava, batch, CompressionConfig(method=method), max_new_tokens=2)
    with pytest.raises(ValueError, match="one prompt at a time"), torch.no_grad():
        with VLCache(CompressionConfig(budget=0.5)).apply(llava):
            llava.generate(**batch, max_new_tokens=2, do_sample=False)
    session = VLCache(CompressionConfig(method="full"))
    with session.apply(llava), torch.no_grad():
        out = llava.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2 and session.stats is not None and session.stats.kept_fraction == 1.0


def test_padded_prompt_is_refused(llava):
    inputs = llava_inputs(llava, seed=11)
    inputs["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        vlcache.generate(llava, inputs, CompressionConfig(budget=0.5), max_new_tokens=2)


def test_hooks_and_attention_are_restored_even_on_error(llava):
    stack = decoder_stack(llava)
    before = (
        stack.config._attn_implementation,
        len(stack.layers[0].self_attn._forward_hooks),
        len(llava._forward_pre_hooks),
    )
    with pytest.raises(RuntimeError, match="boom"):
        with VLCache(CompressionConfig()).apply(llava):
            assert stack.config._attn_implementation == "vlcache_sdpa"
            raise RuntimeError("boom")
    after = (
        stack.config._attn_implementation,
        len(stack.layers[0].self_attn._forward_hooks),
        len(llava._forward_pre_hooks),
    )
    assert before == after == ("sdpa", 0, 0)


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="not a supported model"):
        with VLCache().apply(torch.nn.Linear(2, 2)):
            pass


def test_flash_attention_is_refused():
    model = tiny_llava(layers=1)
    decoder_stack(model).config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        with VLCache().apply(model):
            pass


@pytest.mark.parametrize("method", ["vlcache", "snapkv"])
def test_followup_on_compressed_cache_matches_oracle(llava, method):
    """A second question appended to the compressed cache == the full sequence with the evicted
    prompt keys masked for every row after the prompt."""
    from vlcache.hf.continuation import continue_greedy

    inputs = llava_inputs(llava, seed=12)
    m = inputs["input_ids"].shape[-1]
    q2 = torch.tensor([[5, 6, 7, 8, 9]])
    session = VLCache(CompressionConfig(method=method, budget=0.3))
    with session.apply(llava), torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        seq = out.sequences
        cont = continue_greedy(llava, out.past_key_values, torch.cat([seq[:, -1:], q2], 1), seq.shape[1] - 1, 4)
    full = torch.cat([seq, q2], 1)
    oracle_inputs = {"input_ids": full, "attention_mask": torch.ones_like(full), "pixel_values": inputs["pixel_values"]}
    oracle_seq, _ = oracle_generate(llava, oracle_inputs, session.kept_indices, 4, prompt_len=m)
    assert oracle_seq[0, full.shape[1] :].tolist() == cont.tolist()
    with pytest.raises(ValueError):
        continue_greedy(llava, out.past_key_values, torch.zeros(1, 0, dtype=torch.long), 0, 1)


def test_a_cancelled_torch_stream_frees_its_cache_and_leaves_no_hooks(llava):
    """Closing vlcache.hf.stream mid-generation releases the compressed cache at once; the hooks
    are only installed for each forward, so none is left on the model."""
    import weakref

    from vlcache.hf import stream

    inputs = llava_inputs(llava, seed=14)
    tokens = stream(llava, inputs, CompressionConfig(budget=0.2), max_new_tokens=20, eos_token_id=())
    assert [next(tokens), next(tokens)]
    cache = weakref.ref(tokens.decoder.cache)
    keys = [weakref.ref(layer.keys) for layer in tokens.decoder.cache.layers]
    assert cache() is not None and all(k() is not None for k in keys)
    tokens.close()
    assert tokens.finish_reason == "cancelled" and cache() is None and all(k() is None for k in keys)
    assert tokens.stats is not None and tokens.stats.new_tokens == 2 and tokens.stats.backend == "torch"
    stack = decoder_stack(llava)
    assert stack.config._attn_implementation == "sdpa" and not stack.layers[0].self_attn._forward_hooks


def test_streams_take_turns_on_one_model(llava):
    """Token streams of several configs (TGV-KV's decode policy among them) interleaved step by step
    on one model give what each gives alone: each forward runs in its own session."""
    from vlcache.hf import stream

    inputs = llava_inputs(llava, seed=15)
    configs = [CompressionConfig.create("tgvkv", 0.2), CompressionConfig(budget=0.1), CompressionConfig(method="full")]
    alone = [vlcache.generate(llava, inputs, c, max_new_tokens=7, eos_token_id=()) for c in configs]
    streams = [stream(llava, inputs, c, max_new_tokens=7, eos_token_id=()) for c in configs]
    together: list[list[int]] = [[] for _ in configs]
    for _ in range(7):
        for out, tokens in zip(together, streams):
            out.append(next(tokens))
    assert together == [r.new_tokens.tolist() for r in alone]
    assert [t.stats.decode_evictions for t in streams] == [r.stats.decode_evictions for r in alone]
    assert alone[0].stats.decode_evictions > 0


def test_manual_decode_without_position_ids_gets_true_positions(llava):
    """A hand-written loop that passes no position_ids decodes like one that passes m + t."""
    from transformers import DynamicCache

    inputs = llava_inputs(llava, seed=13)
    m = inputs["input_ids"].shape[-1]
    runs = []
    for explicit in (True, False):
        with VLCache(CompressionConfig(budget=0.2)).apply(llava), torch.no_grad():
            cache = DynamicCache(config=llava.config)
            logits = llava(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]
            steps = []
            for t in range(3):
                tok = logits.argmax(-1, keepdim=True)
                kw = {"position_ids": torch.tensor([[m + t]])} if explicit else {}
                logits = llava(input_ids=tok, past_key_values=cache, use_cache=True, **kw).logits[:, -1]
                steps.append(logits)
        runs.append(torch.cat(steps))
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


# --- what a processor and a model are handed (vlcache.hf.inputs) ----------------------------------
def test_image_prompt_with_and_without_a_chat_template():
    """One source for the prompt of an image and a question: the processor's image token and the
    question without a chat template (the digits task's format), the chat template when there is one."""
    import copy

    from vlcache.digits import IMAGE_SIZE, format_prompt, vocabulary
    from vlcache.hf.inputs import has_chat_template, image_prompt, image_token_text
    from vlcache.hf.tiny import bundled_processor
    from vlcache.tokens import IMAGE_TOKEN_TEXT

    plain_processor = bundled_processor(vocabulary(), IMAGE_SIZE)
    q = "how many 3 ?"
    assert not has_chat_template(plain_processor) and image_token_text(plain_processor) == IMAGE_TOKEN_TEXT
    assert image_prompt(plain_processor, q) == image_prompt(plain_processor, q, chat=False) == format_prompt(q)
    assert image_prompt(plain_processor, q, separator="\n") == f"{IMAGE_TOKEN_TEXT}\n{q}"
    with pytest.raises(ValueError, match="chat template"):
        image_prompt(plain_processor, q, chat=True)
    chat_processor = copy.deepcopy(plain_processor)
    chat_processor.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}[img]"
        "{% else %}({{ c['text'] }}){% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ={% endif %}"
    )
    assert has_chat_template(chat_processor)
    assert image_prompt(chat_processor, q) == image_prompt(chat_processor, q, chat=True) == f"[img]({q}) ="
    assert image_prompt(chat_processor, q, chat=False) == format_prompt(q)
    assert image_token_text(object()) == IMAGE_TOKEN_TEXT  # a processor that names no image token


def test_move_inputs_casts_floats_only():
    from vlcache.hf.inputs import move_inputs

    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 2, 2), "n": 7}
    moved = move_inputs(batch, "cpu", torch.float16)
    assert moved["input_ids"].dtype == torch.long and moved["pixel_values"].dtype == torch.float16
    assert moved["n"] == 7 and moved.keys() == batch.keys()
