"""ONNX export: graphs pass the checker, match transformers, and the `vlcache` ops match `vlcache.core`.

Every comparison is against the reference on fresh random inputs: HF's own vision features and
logits, and `vlcache.core.post_vision_statistics` / `compact` / `select_kept` for the ops.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vlcache.core import allocate_budgets, compact, post_vision_statistics, select_kept
from vlcache.export import ExportSpec, export_llava, names
from vlcache.export.ops import compact_kv_model, post_vision_stats_model, register_schemas
from vlcache.hf.tiny import llava_inputs, tiny_llava

LAYERS = 3


def _session(path_or_model: Path | onnx.ModelProto) -> ort.InferenceSession:
    src = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3, layers=LAYERS)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, Path]:
    return export_llava(model, tmp_path_factory.mktemp("onnx-export"))


# --- the files -------------------------------------------------------------------------------------
def test_graphs_pass_the_checker_with_opset_17_and_local_functions(exported):
    register_schemas()
    for role in ("vision", "embed", "decoder", "post_vision_stats", "compact_kv"):
        proto = onnx.load(str(exported[role]))
        onnx.checker.check_model(proto, full_check=True)
        opsets = {o.domain: o.version for o in proto.opset_import}
        assert opsets[""] == 17
        assert proto.ir_version <= 10  # what ONNX Runtime >= 1.20 loads
    for role, op in (("post_vision_stats", names.POST_VISION_STATS), ("compact_kv", names.COMPACT_KV)):
        proto = onnx.load(str(exported[role]))
        assert [(n.domain, n.op_type) for n in proto.graph.node] == [(names.DOMAIN, op)]
        assert [(f.domain, f.name) for f in proto.functions] == [(names.DOMAIN, op)]
        assert {o.domain for o in proto.opset_import} == {"", names.DOMAIN}
    assert onnx.defs.has(names.POST_VISION_STATS, names.DOMAIN) and onnx.defs.has(names.COMPACT_KV, names.DOMAIN)


def test_spec_describes_the_directory(exported, model):
    spec = ExportSpec.load(exported["spec"].parent)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (LAYERS, 4, 2, 16)
    assert spec.hidden_size == model.config.text_config.hidden_size
    assert spec.vocab_size == model.config.text_config.vocab_size
    assert spec.image_token_id == model.config.image_token_index
    assert spec.image_seq_length == model.config.image_seq_length
    assert spec.attention_scale == pytest.approx(16**-0.5)
    dec = spec.io["decoder"]
    assert dec["inputs"][:2] == [names.INPUTS_EMBEDS, names.POSITION_IDS]
    assert names.past_key(LAYERS - 1) in dec["inputs"] and names.query(LAYERS - 1) in dec["outputs"]
    for role, file in spec.graphs.items():
        assert (exported["spec"].parent / file).is_file(), role


def test_decoder_past_lengths_are_independent_axes(exported):
    proto = onnx.load(str(exported["decoder"]))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    past_axes = {dims[names.past_key(layer)][2] for layer in range(LAYERS)}
    assert len(past_axes) == LAYERS  # one symbolic length per layer
    assert dims[names.past_key(0)][2] == dims[names.past_value(0)][2]


# --- numerics against transformers -----------------------------------------------------------------
def test_vision_graph_matches_hf_features(model, exported):
    g = torch.Generator().manual_seed(11)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    (feats,) = _session(exported["vision"]).run(None, {names.PIXEL_VALUES: pixels.numpy()})
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    ref = torch.stack(list(out.pooler_output if hasattr(out, "pooler_output") else out))
    assert feats.shape == tuple(ref.shape)
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5, rtol=1e-4)


def test_decoder_prefill_logits_queries_and_keys_match_hf(model, exported):
    inputs = llava_inputs(model, question_len=9, seed=5)
    ids = inputs["input_ids"]
    m = ids.shape[1]
    (embeds,) = _session(exported["embed"]).run(None, {names.INPUT_IDS: ids.numpy()})
    (feats,) = _session(exported["vision"]).run(None, {names.PIXEL_VALUES: inputs["pixel_values"].numpy()})
    embeds[0, (ids[0] == model.config.image_token_index).numpy()] = feats.reshape(-1, feats.shape[-1])
    feed = {names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: np.arange(m)[None]}
    for layer in range(LAYERS):
        feed[names.past_key(layer)] = feed[names.past_value(layer)] = np.zeros((1, 2, 0, 16), np.float32)
    dec = _session(exported["decoder"])
    out = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, feed)))
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
    np.testing.assert_allclose(out[names.LOGITS][0, 0], ref.logits[0, -1].numpy(), atol=1e-4, rtol=1e-4)
    for layer in range(LAYERS):
        cached = ref.past_key_values.layers[layer]
        np.testing.assert_allclose(out[names.present_key(layer)], cached.keys.numpy(), atol=1e-5)
        np.testing.assert_allclose(out[names.present_value(layer)], cached.values.numpy(), atol=1e-5)
        assert out[names.query(layer)].shape == (1, 4, m, 16)


def test_decoder_ragged_step_matches_hf_on_compacted_caches(model, exported):
    """A decode step on per-layer caches of different lengths (after eviction) at position m equals
    transformers on the same compacted DynamicCache, run through the torch backend's ragged attention."""
    from transformers import DynamicCache

    from vlcache.hf.attention import ragged_name

    g = torch.Generator().manual_seed(7)
    m = 20
    embeds = torch.randn(1, m + 1, 64, generator=g)
    dec = _session(exported["decoder"])
    order = [o.name for o in dec.get_outputs()]
    feed = {names.INPUTS_EMBEDS: embeds[:, :m].numpy(), names.POSITION_IDS: np.arange(m)[None]}
    for layer in range(LAYERS):
        feed[names.past_key(layer)] = feed[names.past_value(layer)] = np.zeros((1, 2, 0, 16), np.float32)
    pre = dict(zip(order, dec.run(None, feed)))
    stack = model.model.language_model
    # transformers >= 5.24 calls the cache argument `cache` (`past_key_values` before)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        model(inputs_embeds=embeds[:, :m], position_ids=torch.arange(m)[None], use_cache=True, **{cache_kw: cache})
    step = {names.INPUTS_EMBEDS: embeds[:, m:].numpy(), names.POSITION_IDS: np.array([[m]])}
    kept = (5, 13, 1)
    for layer, k in enumerate(kept):
        idx = select_kept(torch.rand(1, 2, m, generator=g), k)  # per KV head
        for past, present in ((names.past_key, names.present_key), (names.past_value, names.present_value)):
            step[past(layer)] = compact(torch.from_numpy(pre[present(layer)]), idx).numpy()
        hf_layer = cache.layers[layer]
        hf_layer.keys, hf_layer.values = compact(hf_layer.keys, idx), compact(hf_layer.values, idx)
    out = dict(zip(order, dec.run(None, step)))
    original = stack.config._attn_implementation
    try:
        stack.config._attn_implementation = ragged_name(original)
        with torch.no_grad():
            ref = model(
                inputs_embeds=embeds[:, m:], position_ids=torch.tensor([[m]]), use_cache=True, **{cache_kw: cache}
            )
    finally:
        stack.config._attn_implementation = original
    np.testing.assert_allclose(out[names.LOGITS][0, 0], ref.logits[0, -1].numpy(), atol=1e-4, rtol=1e-4)
    for layer, k in enumerate(kept):
        assert out[names.present_key(layer)].shape == (1, 2, k + 1, 16)
        np.testing.assert_allclose(out[names.present_key(layer)], cache.layers[layer].keys.numpy(), atol=1e-5)


@pytest.mark.parametrize(("opset", "kv_heads"), [(18, 2), (21, 4), (17, 1)])
def test_other_opsets_and_head_layouts_match_hf(opset, kv_heads, tmp_path):
    """Opsets 18+ (reduction axes as inputs), MHA (no group tiling) and MQA export correctly too."""
    from transformers import LlavaForConditionalGeneration

    base = tiny_llava(seed=opset, layers=2)
    cfg = base.config
    cfg.text_config.num_key_value_heads = kv_heads
    torch.manual_seed(opset)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    paths = export_llava(model, tmp_path, opset=opset)
    inputs = llava_inputs(model, question_len=5, seed=opset)
    ids = inputs["input_ids"]
    (embeds,) = _session(paths["embed"]).run(None, {names.INPUT_IDS: ids.numpy()})
    (feats,) = _session(paths["vision"]).run(None, {names.PIXEL_VALUES: inputs["pixel_values"].numpy()})
    embeds[0, (ids[0] == cfg.image_token_index).numpy()] = feats.reshape(-1, feats.shape[-1])
    feed = {names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: np.arange(ids.shape[1])[None]}
    for layer in range(2):
        feed[names.past_key(layer)] = feed[names.past_value(layer)] = np.zeros((1, kv_heads, 0, 16), np.float32)
    (logits, *_) = _session(paths["decoder"]).run(None, feed)
    with torch.no_grad():
        ref = model(**inputs).logits[0, -1]
    np.testing.assert_allclose(logits[0, 0], ref.numpy(), atol=1e-4, rtol=1e-4)


# --- the vlcache ops against vlcache.core ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("h_q", "h_kv", "tau", "m", "query_start", "threshold"),
    [
        (4, 4, 6, 19, 13, 0.01),
        (8, 2, 9, 40, 31, 0.05),
        (6, 1, 17, 17, 0, 0.01),
        (4, 2, 1, 33, 32, 0.0),
        (4, 2, 5, 12, 3, 0.2),
    ],
)
def test_post_vision_stats_node_matches_core(h_q, h_kv, tau, m, query_start, threshold):
    g = torch.Generator().manual_seed(h_q * 1000 + m * 10 + query_start)
    q = torch.randn(1, h_q, tau, 16, generator=g) * 2.5
    k = torch.randn(1, h_kv, m, 16, generator=g) * 2.5
    scale = float(torch.rand(1, generator=g)) * 0.5 + 0.1
    sess = _session(post_vision_stats_model(17, threshold=threshold, scale=scale))
    scores, density = sess.run(None, {"queries": q.numpy(), "keys": k.numpy(), "query_start": np.array(query_start)})
    ref = post_vision_statistics(q, k, query_start, threshold=threshold, scale=scale)
    np.testing.assert_allclose(scores, ref.scores.numpy(), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(density, ref.density.numpy(), atol=1e-6)
    # selection and budgets from the node's outputs equal core's own
    for kk in (1, m // 3, m):
        assert torch.equal(select_kept(torch.from_numpy(scores), kk), select_kept(ref.scores, kk))


def test_post_vision_stats_default_attributes_use_inverse_sqrt_d(exported):
    g = torch.Generator().manual_seed(99)
    q, k = torch.randn(1, 4, 7, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    scores, density = _session(exported["post_vision_stats"]).run(
        None, {"queries": q.numpy(), "keys": k.numpy(), "query_start": np.array(23)}
    )
    ref = post_vision_statistics(q, k, 23)
    np.testing.assert_allclose(scores, ref.scores.numpy(), atol=2e-6)
    np.testing.assert_allclose(density, ref.density.numpy(), atol=1e-6)


def test_layer_budgets_from_node_densities_equal_core():
    g = torch.Generator().manual_seed(5)
    dens_node, dens_core = [], []
    sess = _session(post_vision_stats_model(18))
    for _ in range(4):
        q = torch.randn(1, 4, 8, 16, generator=g) * float(torch.rand(1, generator=g) * 4 + 0.5)
        k = torch.randn(1, 2, 50, 16, generator=g) * 2
        dens_node.append(
            float(sess.run(None, {"queries": q.numpy(), "keys": k.numpy(), "query_start": np.array(42)})[1][0])
        )
        dens_core.append(float(post_vision_statistics(q, k, 42).density[0]))
    np.testing.assert_allclose(dens_node, dens_core, atol=1e-6)
    assert torch.equal(allocate_budgets(dens_node, 0.1, 50, 1), allocate_budgets(dens_core, 0.1, 50, 1))


def test_compact_kv_node_matches_core(exported):
    g = torch.Generator().manual_seed(8)
    kv = torch.randn(1, 2, 25, 16, generator=g)
    idx = select_kept(torch.rand(1, 2, 25, generator=g), 9)  # per head, ascending
    (kept,) = _session(exported["compact_kv"]).run(None, {"kv": kv.numpy(), "indices": idx.numpy()})
    assert np.array_equal(kept, compact(kv, idx).numpy())
    (kept18,) = _session(compact_kv_model(18)).run(None, {"kv": kv.numpy(), "indices": idx.numpy()})
    assert np.array_equal(kept18, kept)


# --- errors --------------------------------------------------------------------------------------------
def test_export_refuses_what_it_cannot_do(model, llava_next, tmp_path):
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        export_llava(llava_next, tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        export_llava(model, tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="opset"):
        export_llava(model, tmp_path, opset=13)
    with pytest.raises(ValueError, match="max_input_len"):
        export_llava(model, tmp_path, max_input_len=0)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        export_llava(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        post_vision_stats_model(17, threshold=1.5)
    with pytest.raises(ValueError, match="export.json"):
        ExportSpec.load(tmp_path / "nowhere")
