"""ONNX export: graphs pass the checker, match transformers, and the `vlcache` ops match `vlcache.core`.

Every comparison is against the reference on fresh random inputs: HF's own vision features and
logits, and `vlcache.core.post_vision_statistics` / `compact` / `select_kept` for the ops. The
decoder is checked in both variants (``attention="fused"``: ONNX Runtime's GroupQueryAttention on
KV buffers; ``"standard"``: standard ops), plus the fused graph's in-place append.
"""

from __future__ import annotations

import inspect
import json
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
ATTENTION = list(names.ATTENTION_VARIANTS)


def _session(path_or_model: Path | onnx.ModelProto) -> ort.InferenceSession:
    src = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3, layers=LAYERS)


@pytest.fixture(scope="module", params=ATTENTION)
def exported(model, tmp_path_factory, request) -> dict[str, Path]:
    return export_llava(model, tmp_path_factory.mktemp(f"onnx-export-{request.param}"), attention=request.param)


def _feed(
    session: ort.InferenceSession,
    embeds: np.ndarray,
    positions: np.ndarray,
    caches: list[tuple[np.ndarray, np.ndarray]],
) -> dict[str, np.ndarray]:
    """A decoder feed from per-layer (keys, values) that hold exactly their valid entries; the fused
    graph also gets each layer's ``past_length`` (every row: the tensors' length)."""
    feed = {names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: positions}
    wanted = {i.name for i in session.get_inputs()}
    for layer, (k, v) in enumerate(caches):
        feed[names.past_key(layer)], feed[names.past_value(layer)] = k, v
        if names.past_length(layer) in wanted:
            feed[names.past_length(layer)] = np.full(k.shape[0], k.shape[2], np.int64)
    return feed


def _empty(layers: int, kv_heads: int = 2, d: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    empty = np.zeros((1, kv_heads, 0, d), np.float32)
    return [(empty, empty)] * layers


# --- the files -------------------------------------------------------------------------------------
def test_graphs_pass_the_checker_with_opset_17_and_local_functions(exported):
    register_schemas()
    for role in ("vision", "embed", "decoder", "post_vision_stats", "compact_kv"):
        proto = onnx.load(str(exported[role]))
        onnx.checker.check_model(proto, full_check=True)
        opsets = {o.domain: o.version for o in proto.opset_import}
        assert opsets[""] == 17
        assert proto.ir_version <= 10  # what ONNX Runtime >= 1.20 loads
    spec = ExportSpec.load(exported["spec"].parent)
    decoder = onnx.load(str(exported["decoder"]))
    ops = {(n.domain, n.op_type) for n in decoder.graph.node}
    if spec.attention == "fused":  # one fused attention per layer, no score matrix in the graph
        gqa = [n for n in decoder.graph.node if (n.domain, n.op_type) == (names.GQA_DOMAIN, names.GQA_OP)]
        assert len(gqa) == LAYERS and ("", "Softmax") not in ops and ("", "Concat") in ops  # Concat: RoPE halves
        assert {o.domain: o.version for o in decoder.opset_import}[names.GQA_DOMAIN] == names.GQA_OPSET_VERSION
    else:  # standard ops only: what TensorRT parses
        assert {d for d, _ in ops} == {""} and ("", "Softmax") in ops
        assert {o.domain for o in decoder.opset_import} == {""}
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
    assert spec.attention in names.ATTENTION_VARIANTS
    assert (names.past_length(0) in dec["inputs"]) == (spec.attention == "fused")
    for role, file in spec.graphs.items():
        assert (exported["spec"].parent / file).is_file(), role


def test_decoder_past_lengths_are_independent_axes(exported):
    proto = onnx.load(str(exported["decoder"]))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    past_axes = {dims[names.past_key(layer)][2] for layer in range(LAYERS)}
    assert len(past_axes) == LAYERS  # one symbolic length per layer
    assert dims[names.past_key(0)][2] == dims[names.past_value(0)][2]
    if names.past_length(0) in dims:  # fused: per-row lengths, batch axis shared with the buffers
        assert dims[names.past_length(0)] == [dims[names.past_key(0)][0]]


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
    dec = _session(exported["decoder"])
    out = dict(
        zip([o.name for o in dec.get_outputs()], dec.run(None, _feed(dec, embeds, np.arange(m)[None], _empty(LAYERS))))
    )
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
    pre = dict(zip(order, dec.run(None, _feed(dec, embeds[:, :m].numpy(), np.arange(m)[None], _empty(LAYERS)))))
    stack = model.model.language_model
    # transformers >= 5.24 calls the cache argument `cache` (`past_key_values` before)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        model(inputs_embeds=embeds[:, :m], position_ids=torch.arange(m)[None], use_cache=True, **{cache_kw: cache})
    kept = (5, 13, 1)
    caches = []
    for layer, k in enumerate(kept):
        idx = select_kept(torch.rand(1, 2, m, generator=g), k)  # per KV head
        caches.append(
            tuple(
                compact(torch.from_numpy(pre[p(layer)]), idx).numpy() for p in (names.present_key, names.present_value)
            )
        )
        hf_layer = cache.layers[layer]
        hf_layer.keys, hf_layer.values = compact(hf_layer.keys, idx), compact(hf_layer.values, idx)
    out = dict(zip(order, dec.run(None, _feed(dec, embeds[:, m:].numpy(), np.array([[m]]), caches))))
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


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize(("opset", "kv_heads"), [(18, 2), (21, 4), (17, 1)])
def test_other_opsets_and_head_layouts_match_hf(opset, kv_heads, attention, tmp_path):
    """Opsets 18+ (reduction axes as inputs), MHA (no group tiling) and MQA export correctly too."""
    from transformers import LlavaForConditionalGeneration

    base = tiny_llava(seed=opset, layers=2)
    cfg = base.config
    cfg.text_config.num_key_value_heads = kv_heads
    torch.manual_seed(opset)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    paths = export_llava(model, tmp_path, opset=opset, attention=attention)
    inputs = llava_inputs(model, question_len=5, seed=opset)
    ids = inputs["input_ids"]
    (embeds,) = _session(paths["embed"]).run(None, {names.INPUT_IDS: ids.numpy()})
    (feats,) = _session(paths["vision"]).run(None, {names.PIXEL_VALUES: inputs["pixel_values"].numpy()})
    embeds[0, (ids[0] == cfg.image_token_index).numpy()] = feats.reshape(-1, feats.shape[-1])
    dec = _session(paths["decoder"])
    (logits, *_) = dec.run(None, _feed(dec, embeds, np.arange(ids.shape[1])[None], _empty(2, kv_heads)))
    with torch.no_grad():
        ref = model(**inputs).logits[0, -1]
    np.testing.assert_allclose(logits[0, 0], ref.numpy(), atol=1e-4, rtol=1e-4)


def _fused_step(
    dec: ort.InferenceSession,
    x: np.ndarray,
    pos: np.ndarray,
    buffers: list[tuple[ort.OrtValue, ort.OrtValue]],
    length: int,
) -> dict[str, np.ndarray]:
    """One fused decoder call with present_* bound to the same OrtValues as past_* (as OnnxRunner does)."""
    io = dec.io_binding()
    io.bind_cpu_input(names.INPUTS_EMBEDS, x)
    io.bind_cpu_input(names.POSITION_IDS, pos)
    lengths = np.array([length], np.int64)
    for layer, (k, v) in enumerate(buffers):
        io.bind_cpu_input(names.past_length(layer), lengths)
        io.bind_ortvalue_input(names.past_key(layer), k)
        io.bind_ortvalue_output(names.present_key(layer), k)
        io.bind_ortvalue_input(names.past_value(layer), v)
        io.bind_ortvalue_output(names.present_value(layer), v)
    bound = [names.LOGITS] + [names.query(layer) for layer in range(len(buffers))]
    for name in bound:
        io.bind_output(name, "cpu")
    dec.run_with_iobinding(io)
    outs = io.get_outputs()
    got = dict(zip(bound, (o.numpy() for o in outs[2 * len(buffers) :])))
    for layer in range(len(buffers)):  # the bound present outputs are the buffers themselves
        assert outs[2 * layer].data_ptr() == buffers[layer][0].data_ptr()
        assert outs[2 * layer + 1].data_ptr() == buffers[layer][1].data_ptr()
    return got


def test_fused_decoder_appends_in_place_into_one_buffer_and_equals_the_standard_graph(model, tmp_path):
    """Bound to one OrtValue as past and present, the fused decoder writes only the new entries into
    the buffer: its address never changes and the entries past the valid length keep their old
    contents — whereas ONNX Runtime's kernel zeroes a separate present buffer before copying the past
    into it (the control below), so the kernel did see one shared buffer. Prefill and decode steps
    equal the standard (Concat) graph's logits, queries and caches."""
    fused = _session(export_llava(model, tmp_path / "fused", attention="fused")["decoder"])
    std = _session(export_llava(model, tmp_path / "standard", attention="standard")["decoder"])
    std_order = [o.name for o in std.get_outputs()]
    g = torch.Generator().manual_seed(21)
    m, steps, capacity, sentinel = 12, 3, 24, 7.0
    embeds = torch.randn(1, m + steps, 64, generator=g).numpy()
    arrays = [tuple(np.full((1, 2, capacity, 16), sentinel, np.float32) for _ in range(2)) for _ in range(LAYERS)]
    buffers = [(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)) for k, v in arrays]
    addresses = [(k.data_ptr(), v.data_ptr()) for k, v in buffers]
    assert addresses == [(k.ctypes.data, v.ctypes.data) for k, v in arrays]  # OrtValues over the numpy memory
    std_cache = _empty(LAYERS)
    length = 0
    for start, n in [(0, m)] + [(m + i, 1) for i in range(steps)]:
        x, pos = embeds[:, start : start + n], np.arange(start, start + n)[None]
        got = _fused_step(fused, x, pos, buffers, length)
        ref = dict(zip(std_order, std.run(None, _feed(std, x, pos, std_cache))))
        std_cache = [(ref[names.present_key(i)], ref[names.present_value(i)]) for i in range(LAYERS)]
        length += n
        np.testing.assert_allclose(got[names.LOGITS], ref[names.LOGITS], atol=1e-5, rtol=1e-5)
        assert [(k.data_ptr(), v.data_ptr()) for k, v in buffers] == addresses
        for layer, (k, v) in enumerate(arrays):
            np.testing.assert_allclose(got[names.query(layer)], ref[names.query(layer)], atol=1e-5)
            np.testing.assert_allclose(k[:, :, :length], ref[names.present_key(layer)], atol=1e-5)
            np.testing.assert_allclose(v[:, :, :length], ref[names.present_value(layer)], atol=1e-5)
            assert (k[:, :, length:] == sentinel).all() and (v[:, :, length:] == sentinel).all()
    # control: present bound apart from past -> the kernel allocates it and zeroes what is past the length
    io = fused.io_binding()
    io.bind_cpu_input(names.INPUTS_EMBEDS, embeds[:, -1:])
    io.bind_cpu_input(names.POSITION_IDS, np.array([[m + steps]]))
    for layer, (k, v) in enumerate(buffers):
        io.bind_cpu_input(names.past_length(layer), np.array([length], np.int64))
        io.bind_ortvalue_input(names.past_key(layer), k)
        io.bind_ortvalue_input(names.past_value(layer), v)
    io.bind_output(names.present_key(0), "cpu")
    fused.run_with_iobinding(io)
    (present,) = io.get_outputs()
    assert present.data_ptr() != addresses[0][0] and present.shape() == [1, 2, capacity, 16]
    assert (present.numpy()[:, :, length + 1 :] == 0).all() and (arrays[0][0][:, :, length:] == sentinel).all()


def test_fused_decoder_takes_a_length_per_row(model, tmp_path):
    """One single-token call on two rows whose buffers hold different numbers of valid entries equals
    two separate calls (the graph has a real batch axis; each row attends to its own entries)."""
    dec = _session(export_llava(model, tmp_path, attention="fused")["decoder"])
    order = [o.name for o in dec.get_outputs()]
    g = torch.Generator().manual_seed(5)
    capacity, lengths = 20, (13, 6)
    keys = torch.randn(2, LAYERS, 2, capacity, 16, generator=g).numpy()  # (row, layer, ...)
    values = torch.randn(2, LAYERS, 2, capacity, 16, generator=g).numpy()
    x = torch.randn(2, 1, 64, generator=g).numpy()
    pos = np.array([[17], [30]])  # positions != lengths, as after eviction

    def feed(rows: list[int]) -> dict[str, np.ndarray]:
        f = {names.INPUTS_EMBEDS: x[rows], names.POSITION_IDS: pos[rows]}
        for layer in range(LAYERS):
            f[names.past_key(layer)] = np.ascontiguousarray(keys[rows, layer])
            f[names.past_value(layer)] = np.ascontiguousarray(values[rows, layer])
            f[names.past_length(layer)] = np.array([lengths[r] for r in rows], np.int64)
        return f

    both = dict(zip(order, dec.run(None, feed([0, 1]))))
    for row in (0, 1):
        one = dict(zip(order, dec.run(None, feed([row]))))
        np.testing.assert_allclose(both[names.LOGITS][row], one[names.LOGITS][0], atol=1e-5, rtol=1e-5)
        n = lengths[row] + 1
        for layer in range(LAYERS):
            np.testing.assert_allclose(both[names.query(layer)][row], one[names.query(layer)][0], atol=1e-6)
            for name in (names.present_key(layer), names.present_value(layer)):
                np.testing.assert_allclose(both[name][row, :, :n], one[name][0, :, :n], atol=1e-6)


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
def test_spec_reads_format_1_as_the_standard_decoder_and_checks_attention(exported, tmp_path):
    data = json.loads(exported["spec"].read_text())
    assert data["format_version"] == 2
    data.pop("attention")
    data["format_version"] = 1
    (tmp_path / names.SPEC_FILE).write_text(json.dumps(data))
    assert ExportSpec.load(tmp_path).attention == "standard"  # format 1 had only the standard decoder
    data.update(format_version=2, attention="flash")
    (tmp_path / names.SPEC_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="attention"):
        ExportSpec.load(tmp_path)


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
    with pytest.raises(ValueError, match="attention"):
        export_llava(model, tmp_path, attention="flash")
    odd = tiny_llava(seed=4, layers=1)
    odd.config.text_config.head_dim = 12  # GroupQueryAttention needs head_dim % 8 == 0
    from transformers import LlavaForConditionalGeneration

    odd = LlavaForConditionalGeneration(odd.config).eval()
    with pytest.raises(ValueError, match="multiple of 8"):
        export_llava(odd, tmp_path / "odd")
    export_llava(odd, tmp_path / "odd", attention="standard")  # the standard decoder takes it
    with pytest.raises(ValueError, match="export.json"):
        ExportSpec.load(tmp_path / "nowhere")
