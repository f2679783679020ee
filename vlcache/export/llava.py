"""ONNX export of LLaVA-1.5 (``LlavaForConditionalGeneration``): vision, embedding and decoder graphs.

:func:`export_llava` writes into ``out_dir`` (file names in :mod:`vlcache.export.names`):

``vision.onnx``
    ``pixel_values`` (N, 3, H, W) float -> ``image_features`` (N, P, hidden): the CLIP tower up to
    ``vision_feature_layer`` (an int or a list, concatenated), the ``vision_feature_select_strategy``
    (``default`` drops CLS) and the multimodal projector — the rows the runtime scatters, in order,
    into the ``image_token_id`` positions of the token embeddings.
``embed.onnx``
    ``input_ids`` (B, n) int64 -> ``inputs_embeds`` (B, n, hidden).
``decoder.onnx``
    The language model, one graph for prefill and decode, in one of two variants
    (``export_llava(attention=...)``, recorded as ``ExportSpec.attention``). Common inputs:
    ``inputs_embeds`` (B, n, hidden), ``position_ids`` (B, n) int64 (absolute positions: after
    eviction they keep counting from the prompt length, so position ≠ cache length). Common outputs:
    ``logits`` (B, 1, V) of the **last** row only; per layer l ``present_key.l`` /
    ``present_value.l`` (keys after RoPE, see below) and ``query.l`` (B, H_q, n, D), the new rows'
    queries after RoPE — what scoring needs: the runtime scores layer l's prompt from ``query.l`` rows
    ``[query_start, m)`` and the cached keys with the ``vlcache.PostVisionStats`` op (or a method in
    :mod:`vlcache.methods`). RoPE is computed in the graph in both variants.

    ``attention="fused"`` (default; ONNX Runtime): per layer ``past_key.l`` / ``past_value.l``
    (B, H_kv, C_l, D) are **buffers** of capacity C_l, every C_l its own dynamic axis, and
    ``past_length.l`` (B,) int64 says how many entries of each row are valid — layers and rows hold
    different lengths (ragged after eviction; length 0 for prefill). Attention is ONNX Runtime's
    ``com.microsoft.GroupQueryAttention`` (a fused CPU kernel: no n × (p+n) score tensor in the
    graph): it writes the n new keys/values at rows ``past_length.l[b] ..`` of ``present_key.l`` /
    ``present_value.l`` (B, H_kv, max(C_l, total), D), and row b's query i sees the keys
    ``j <= past_length.l[b] + i``. A runner that binds ``present_*`` to the same OrtValue as
    ``past_*`` (IOBinding) gets the append in place: the kernel sees one buffer and copies nothing.
    Needs head_dim % 8 == 0. Several new rows after a non-empty past are accepted at batch size 1
    only (ONNX Runtime's CPU rule); single-token steps take any per-row lengths.

    ``attention="standard"`` (standard ONNX ops only: what TensorRT builds from): ``past_key.l`` /
    ``past_value.l`` (B, H_kv, p_l, D) hold exactly the valid entries (every p_l its own axis);
    ``present_*`` (B, H_kv, p_l + n, D) is the past with the new entries appended by ``Concat``.
    Masks are built inside the graph from the shapes: in layer l row i of n sees the ``p_l`` past
    entries and the new ones up to itself — bottom-right-aligned causal, per layer; scores are
    MatMul→Softmax→MatMul, multiplying the G = H_q / H_kv query heads of a group against their
    shared key head (no key copies).

    In both, evicted entries are gone (compacted), never masked.
``post_vision_stats.onnx`` / ``compact_kv.onnx``
    One ``vlcache``-domain node each (:mod:`vlcache.export.ops`), with its local function.
``export.json``
    :class:`~vlcache.export.spec.ExportSpec`: shapes, ids, graph files and I/O names.

Supported: LLaVA-1.5 with a CLIP vision tower and a Llama-like decoder (Llama / Mistral / Qwen2
layout: RMSNorm, RoPE, q/k/v/o projections with optional bias, gated MLP); the runtime's loop runs
one prompt at a time (the graphs have a batch axis). Graphs are float32: a TensorRT build lowers precision itself. LLaVA-NeXT (anyres tiles, image
newline tokens, unpadding) is refused with a ValueError: its feature packing is not exported yet.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from vlcache.export import names
from vlcache.export.graph import GraphBuilder, check_opset, tensor_info, to_numpy
from vlcache.export.ops import compact_kv_model, post_vision_stats_model, register_schemas
from vlcache.export.spec import ExportSpec

SUPPORTED_DTYPES = ("float32",)
#: models larger than this are saved with their weights in one external-data file next to the graph
EXTERNAL_DATA_BYTES = 1 << 30
_UNSUPPORTED_ROPE = ("dynamic", "longrope")


# --- checks ------------------------------------------------------------------------------------
def _check_llava(model: Any) -> None:
    kind = type(model).__name__
    if kind.startswith("LlavaNext") or kind.startswith("LlavaOnevision"):
        raise ValueError(
            f"{kind}: LLaVA-NeXT's anyres feature packing (tiles, unpadding, image newlines) is not exported "
            "to ONNX yet; use the torch backend (vlcache.generate) for this model"
        )
    if kind != "LlavaForConditionalGeneration":
        raise ValueError(f"export_llava takes a transformers LlavaForConditionalGeneration, got {kind}")
    tower = model.model.vision_tower
    if type(tower).__name__ != "CLIPVisionModel":
        raise ValueError(
            f"vision tower {type(tower).__name__} is not supported by the ONNX export (supported: CLIPVisionModel)"
        )


def _text_parts(model: Any) -> tuple[Any, Any]:
    """(decoder stack, lm_head), checked for the Llama-like layout the decoder graph implements."""
    stack = model.model.language_model
    for i, layer in enumerate(stack.layers):
        attn, mlp = layer.self_attn, layer.mlp
        need = {
            "self_attn": (attn, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")),
            "mlp": (mlp, ("gate_proj", "up_proj", "down_proj")),
        }
        for part, (mod, attrs) in need.items():
            missing = [a for a in attrs if not hasattr(mod, a)]
            if missing:
                raise ValueError(f"layer {i} {part} ({type(mod).__name__}) lacks {missing}: not a Llama-like decoder")
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            raise ValueError(f"layer {i}: per-head q/k norms (Qwen3-style) are not supported by the ONNX export")
        if getattr(attn, "sliding_window", None):
            raise ValueError(f"layer {i}: sliding-window attention is not supported by the ONNX export")
    rope = stack.rotary_emb
    rope_type = str(getattr(rope, "rope_type", "default"))
    if any(t in rope_type for t in _UNSUPPORTED_ROPE):
        raise ValueError(f"rope_type {rope_type!r} changes with the sequence length; not supported by the ONNX export")
    return stack, model.lm_head


def _eps(norm: Any) -> float:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(norm, attr, None)
        if value is not None:
            return float(value)
    raise ValueError(f"norm {type(norm).__name__} has no epsilon")


# --- vision ------------------------------------------------------------------------------------
def vision_graph(llava: nn.Module, opset: int = 17) -> onnx.ModelProto:
    """``pixel_values`` (N, 3, H, W) -> ``image_features`` (N, P, hidden); N dynamic."""
    _check_llava(llava)
    model: Any = llava
    cfg: Any = model.config
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)  # transformers 5.24 flattened CLIPVisionModel
    vcfg = cfg.vision_config
    b = GraphBuilder(opset)
    emb = vm.embeddings
    c = int(vcfg.hidden_size)
    patch = int(vcfg.patch_size)
    size = int(vcfg.image_size)
    conv_w = b.weight("vision.patch_embedding.weight", to_numpy(emb.patch_embedding.weight))
    conv_inputs = [names.PIXEL_VALUES, conv_w]
    if emb.patch_embedding.bias is not None:
        conv_inputs.append(b.weight("vision.patch_embedding.bias", to_numpy(emb.patch_embedding.bias)))
    x = b.op("Conv", conv_inputs, kernel_shape=[patch, patch], strides=[patch, patch])  # (N, C, h, w)
    x = b.op("Transpose", [b.op("Reshape", [x, b.const([0, c, -1])])], perm=[0, 2, 1])  # (N, P, C)
    cls = b.weight("vision.class_embedding", to_numpy(emb.class_embedding).reshape(1, 1, c))
    cls_shape = b.op("Concat", [b.shape_dim(x, 0), b.const([1, c])], axis=0)
    x = b.op("Concat", [b.op("Expand", [cls, cls_shape]), x], axis=1)  # (N, P+1, C)
    x = b.op("Add", [x, b.weight("vision.position_embedding", to_numpy(emb.position_embedding.weight))])
    x = b.layer_norm(x, vm.pre_layrnorm, "vision.pre_layrnorm")
    layers = vm.encoder.layers
    feature_layer = cfg.vision_feature_layer
    wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    idx = [i if i >= 0 else len(layers) + 1 + i for i in wanted]  # into (embeddings, layer 1, ..., layer L)
    if any(not 0 <= i <= len(layers) for i in idx):
        raise ValueError(f"vision_feature_layer {feature_layer} is out of range for {len(layers)} layers")
    hidden = [x]
    for li, layer in enumerate(layers[: max(idx)]):
        hidden.append(_clip_layer(b, hidden[-1], layer, vcfg, f"vision.layers.{li}"))
    feats = [hidden[i] for i in idx]
    if cfg.vision_feature_select_strategy == "default":
        feats = [b.op("Slice", [f, b.const([1]), b.const([2**62]), b.const([1])]) for f in feats]
    elif cfg.vision_feature_select_strategy != "full":
        raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} is not supported")
    x = feats[0] if len(feats) == 1 else b.op("Concat", feats, axis=-1)
    proj = model.model.multi_modal_projector
    x = b.linear(x, proj.linear_1, "projector.linear_1")
    x = b.activation(x, str(cfg.projector_hidden_act))
    x = b.linear(x, proj.linear_2, "projector.linear_2")
    b.rename(x, names.IMAGE_FEATURES)
    n_feat = (size // patch) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    hidden_text = int(cfg.text_config.hidden_size)
    return b.model(
        "llava_vision",
        [tensor_info(names.PIXEL_VALUES, TensorProto.FLOAT, ["num_images", 3, size, size])],
        [tensor_info(names.IMAGE_FEATURES, TensorProto.FLOAT, ["num_images", n_feat, hidden_text])],
    )


def _clip_layer(b: GraphBuilder, x: str, layer: Any, vcfg: Any, name: str) -> str:
    attn = layer.self_attn
    heads = int(vcfg.num_attention_heads)
    c = int(vcfg.hidden_size)
    hd = c // heads
    h = b.layer_norm(x, layer.layer_norm1, f"{name}.layer_norm1")

    def split(t: str, perm: list[int]) -> str:
        return b.op("Transpose", [b.op("Reshape", [t, b.const([0, 0, heads, hd])])], perm=perm)

    q = split(b.linear(h, attn.q_proj, f"{name}.q_proj"), [0, 2, 1, 3])  # (N, h, S, hd)
    k = split(b.linear(h, attn.k_proj, f"{name}.k_proj"), [0, 2, 3, 1])  # (N, h, hd, S)
    v = split(b.linear(h, attn.v_proj, f"{name}.v_proj"), [0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const(float(attn.scale), np.float32)])
    o = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    o = b.op("Reshape", [b.op("Transpose", [o], perm=[0, 2, 1, 3]), b.const([0, 0, c])])
    x = b.op("Add", [x, b.linear(o, attn.out_proj, f"{name}.out_proj")])
    h = b.layer_norm(x, layer.layer_norm2, f"{name}.layer_norm2")
    h = b.linear(
        b.activation(b.linear(h, layer.mlp.fc1, f"{name}.fc1"), str(vcfg.hidden_act)), layer.mlp.fc2, f"{name}.fc2"
    )
    return b.op("Add", [x, h])


# --- embedding ---------------------------------------------------------------------------------
def embed_graph(llava: nn.Module, opset: int = 17) -> onnx.ModelProto:
    """``input_ids`` (B, n) int64 -> ``inputs_embeds`` (B, n, hidden)."""
    model: Any = llava
    table = model.get_input_embeddings().weight
    b = GraphBuilder(opset)
    w = b.weight("embed_tokens.weight", to_numpy(table))
    b.op("Gather", [w, names.INPUT_IDS], axis=0, outputs=[names.INPUTS_EMBEDS])
    return b.model(
        "llava_embed",
        [tensor_info(names.INPUT_IDS, TensorProto.INT64, ["batch", "seq"])],
        [tensor_info(names.INPUTS_EMBEDS, TensorProto.FLOAT, ["batch", "seq", int(table.shape[1])])],
    )


# --- decoder -----------------------------------------------------------------------------------
def decoder_graph(llava: nn.Module, opset: int = 17, attention: str = names.ATTENTION_FUSED) -> onnx.ModelProto:
    """The language model with explicit, independently sized per-layer KV (see the module docstring).

    ``attention``: ``fused`` (ONNX Runtime's ``com.microsoft.GroupQueryAttention`` on preallocated
    buffers with ``past_length.l`` inputs) or ``standard`` (standard ops, Concat-appended KV).
    """
    if attention not in names.ATTENTION_VARIANTS:
        raise ValueError(f"attention must be one of {', '.join(names.ATTENTION_VARIANTS)}, got {attention!r}")
    fused = attention == names.ATTENTION_FUSED
    model: Any = llava
    stack, lm_head = _text_parts(model)
    tcfg: Any = model.config.text_config
    layers = list(stack.layers)
    first = layers[0].self_attn
    d = int(first.head_dim)
    h_q = first.q_proj.out_features // d
    h_kv = first.k_proj.out_features // d
    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads do not split into {h_kv} KV head groups")
    if fused and d % 8:
        raise ValueError(
            f"head_dim {d} is not a multiple of 8, which ONNX Runtime's GroupQueryAttention requires; "
            "export with attention='standard'"
        )
    group = h_q // h_kv
    hidden = int(tcfg.hidden_size)
    b = GraphBuilder(opset)
    f32 = np.float32

    # RoPE tables for the given positions: cos/sin (B, n, D), float32 as in transformers; broadcast
    # over heads as (B, 1, n, D) for the standard graph's (B, H, n, D) layout, (B, n, 1, D) for the
    # fused graph's (B, n, H, D) (GroupQueryAttention takes (B, n, H·D) rows).
    rope = stack.rotary_emb
    inv_freq = b.weight("rotary.inv_freq", to_numpy(rope.inv_freq))
    pos = b.unsqueeze(b.op("Cast", [names.POSITION_IDS], to=TensorProto.FLOAT), [-1])  # (B, n, 1)
    freqs = b.op("Mul", [pos, inv_freq])  # (B, n, D/2)
    angles = b.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = b.op("Cos", [angles]), b.op("Sin", [angles])
    scaling = float(getattr(rope, "attention_scaling", 1.0))
    if scaling != 1.0:
        cos, sin = b.op("Mul", [cos, b.const(scaling, f32)]), b.op("Mul", [sin, b.const(scaling, f32)])
    head_axis = 2 if fused else 1
    cos, sin = b.unsqueeze(cos, [head_axis]), b.unsqueeze(sin, [head_axis])
    half = d // 2
    first_half = (b.const([0]), b.const([half]), b.const([3]))
    second_half = (b.const([half]), b.const([d]), b.const([3]))

    def rotate(t: str) -> str:
        x1 = b.op("Slice", [t, *first_half])
        x2 = b.op("Slice", [t, *second_half])
        rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=3)
        return b.op("Add", [b.op("Mul", [t, cos]), b.op("Mul", [rotated, sin])])

    n_new = b.shape_dim(names.INPUTS_EMBEDS, 1)  # (1,)
    mask_values = ("", "") if fused else (b.const(float("-inf"), f32), b.const(0.0, f32))
    inputs = [
        tensor_info(names.INPUTS_EMBEDS, TensorProto.FLOAT, ["batch", "seq", hidden]),
        tensor_info(names.POSITION_IDS, TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [tensor_info(names.LOGITS, TensorProto.FLOAT, ["batch", 1, int(lm_head.weight.shape[0])])]
    x = names.INPUTS_EMBEDS
    for li, layer in enumerate(layers):
        pk, pv = names.past_key(li), names.past_value(li)
        past_axis = f"past_{li}"
        inputs += [
            tensor_info(pk, TensorProto.FLOAT, ["batch", h_kv, past_axis, d]),
            tensor_info(pv, TensorProto.FLOAT, ["batch", h_kv, past_axis, d]),
        ]
        if fused:
            inputs.append(tensor_info(names.past_length(li), TensorProto.INT64, ["batch"]))
        total_axis = f"total_{li}"
        outputs += [
            tensor_info(names.present_key(li), TensorProto.FLOAT, ["batch", h_kv, total_axis, d]),
            tensor_info(names.present_value(li), TensorProto.FLOAT, ["batch", h_kv, total_axis, d]),
            tensor_info(names.query(li), TensorProto.FLOAT, ["batch", h_q, "seq", d]),
        ]
        attn, mlp = layer.self_attn, layer.mlp
        p = f"layers.{li}"
        h = b.rms_norm(x, layer.input_layernorm.weight, _eps(layer.input_layernorm), f"{p}.input_layernorm")
        if fused:
            o = _fused_attention(b, h, attn, li, rotate, n_new, h_q, h_kv, d)
        else:
            o = _standard_attention(b, h, attn, li, rotate, n_new, mask_values, h_q, h_kv, d, group)
        x = b.op("Add", [x, b.linear(o, attn.o_proj, f"{p}.o_proj")])
        h = b.rms_norm(
            x,
            layer.post_attention_layernorm.weight,
            _eps(layer.post_attention_layernorm),
            f"{p}.post_attention_layernorm",
        )
        act = str(getattr(mlp, "config", tcfg).hidden_act)
        gate = b.activation(b.linear(h, mlp.gate_proj, f"{p}.gate_proj"), act)
        h = b.linear(b.op("Mul", [gate, b.linear(h, mlp.up_proj, f"{p}.up_proj")]), mlp.down_proj, f"{p}.down_proj")
        x = b.op("Add", [x, h])
    last = b.op("Gather", [x, b.const(-1)], axis=1)  # (B, hidden): only the last row's logits
    last = b.rms_norm(last, stack.norm.weight, _eps(stack.norm), "norm")
    logits = b.linear(last, lm_head, "lm_head")
    b.op("Unsqueeze", [logits, b.const([1])], outputs=[names.LOGITS])
    extra = [(names.GQA_DOMAIN, names.GQA_OPSET_VERSION)] if fused else []
    return b.model("llava_decoder", inputs, outputs, extra_opsets=extra, doc=__doc__ or "")


def _standard_attention(
    b: GraphBuilder,
    h: str,
    attn: Any,
    li: int,
    rotate: Any,
    n_new: str,
    mask_values: tuple[str, str],
    h_q: int,
    h_kv: int,
    d: int,
    group: int,
) -> str:
    """Standard ops: Concat-appended KV, an explicit mask, MatMul→Softmax→MatMul; returns (B, n, H_q·D)."""
    p = f"layers.{li}"
    pk, pv = names.past_key(li), names.past_value(li)
    neg_inf, zero = mask_values

    def heads(t: str, count: int) -> str:
        return b.op("Transpose", [b.op("Reshape", [t, b.const([0, 0, count, d])])], perm=[0, 2, 1, 3])

    q = rotate(heads(b.linear(h, attn.q_proj, f"{p}.q_proj"), h_q))  # (B, H_q, n, D)
    k = rotate(heads(b.linear(h, attn.k_proj, f"{p}.k_proj"), h_kv))
    v = heads(b.linear(h, attn.v_proj, f"{p}.v_proj"), h_kv)
    b.rename(q, names.query(li))
    keys = b.op("Concat", [pk, k], axis=2, outputs=[names.present_key(li)])
    values = b.op("Concat", [pv, v], axis=2, outputs=[names.present_value(li)])
    # mask (n, p_l + n): row i sees keys j <= p_l + i
    past_len = b.shape_dim(pk, 2)
    total = b.op("Add", [past_len, n_new])
    rows = b.unsqueeze(b.op("Range", [b.scalar(past_len), b.scalar(total), b.const(1)]), [1])
    cols = b.op("Range", [b.const(0), b.scalar(total), b.const(1)])
    mask = b.op("Where", [b.op("Greater", [cols, rows]), neg_inf, zero])
    if group > 1:
        mask = b.op("Tile", [mask, b.const([group, 1])])  # rows of the G heads of a group, stacked
    qg = b.op("Reshape", [q, b.const([0, h_kv, -1, d])])  # (B, H_kv, G·n, D)
    qg = b.op("Mul", [qg, b.const(float(attn.scaling), np.float32)])  # scale the n·D queries, not the n·T logits
    logits = b.op("Add", [b.op("MatMul", [qg, b.op("Transpose", [keys], perm=[0, 1, 3, 2])]), mask])
    o = b.op("MatMul", [b.op("Softmax", [logits], axis=-1), values])  # (B, H_kv, G·n, D)
    o = b.op("Reshape", [o, b.const([0, h_q, -1, d])])
    return b.op("Reshape", [b.op("Transpose", [o], perm=[0, 2, 1, 3]), b.const([0, 0, h_q * d])])


def _fused_attention(
    b: GraphBuilder, h: str, attn: Any, li: int, rotate: Any, n_new: str, h_q: int, h_kv: int, d: int
) -> str:
    """``com.microsoft.GroupQueryAttention`` on the layer's KV buffers; returns (B, n, H_q·D).

    RoPE stays in the graph (the op's ``do_rotary`` is off): ``query.l`` must be the rotated queries
    and the cache the rotated keys, at explicit positions. Row b of the buffers holds
    ``past_length.l[b]`` valid entries; the op writes the n new ones after them (in place when the
    runner binds ``present_*`` to the ``past_*`` buffers) and row b's query i sees keys
    ``j <= past_length.l[b] + i``. ONNX Runtime's CPU kernel takes several new rows after a
    non-empty past only at batch size 1; single-token steps take any per-row lengths.
    """
    p = f"layers.{li}"

    def heads(t: str, count: int) -> str:
        return b.op("Reshape", [t, b.const([0, 0, count, d])])  # (B, n, H, D)

    q = rotate(heads(b.linear(h, attn.q_proj, f"{p}.q_proj"), h_q))
    k = rotate(heads(b.linear(h, attn.k_proj, f"{p}.k_proj"), h_kv))
    v = b.linear(h, attn.v_proj, f"{p}.v_proj")  # (B, n, H_kv·D)
    b.op("Transpose", [q], perm=[0, 2, 1, 3], outputs=[names.query(li)])  # (B, H_q, n, D)
    q = b.op("Reshape", [q, b.const([0, 0, h_q * d])])
    k = b.op("Reshape", [k, b.const([0, 0, h_kv * d])])
    totals = b.op("Add", [names.past_length(li), n_new])  # (B,) entries after this step
    seqlens_k = b.op("Cast", [b.op("Sub", [totals, b.const(1)])], to=TensorProto.INT32)
    total = b.op("Cast", [b.reduce("ReduceMax", totals, [0], keepdims=0)], to=TensorProto.INT32)  # scalar
    out = b.fresh("attention")
    b.op(
        names.GQA_OP,
        [q, k, v, names.past_key(li), names.past_value(li), seqlens_k, total],
        outputs=[out, names.present_key(li), names.present_value(li)],
        domain=names.GQA_DOMAIN,
        num_heads=h_q,
        kv_num_heads=h_kv,
        scale=float(attn.scaling),
    )
    return out


# --- entry point -------------------------------------------------------------------------------
def _save(model: onnx.ModelProto, path: Path) -> Path:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
    return path


def _io(model: onnx.ModelProto) -> dict[str, list[str]]:
    return {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}


def _eos_ids(model: Any) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.text_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def export_llava(
    model: nn.Module,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    opset: int = 17,
    max_input_len: int | None = None,
    attention: str = names.ATTENTION_FUSED,
) -> dict[str, Path]:
    """Export a LLaVA-1.5 model to ONNX graphs that :func:`vlcache.runtime.load_runtime` runs.

    Args:
        model: a transformers ``LlavaForConditionalGeneration`` (CLIP tower, Llama-like decoder).
        out_dir: directory to write (created; existing files of the same names are replaced).
        dtype: precision of the graphs; only ``"float32"`` (TensorRT lowers precision at build time).
        opset: default-domain opset, 17 to 21.
        max_input_len: longest prompt + generation the artifacts are meant for (recorded for
            engine builders and checked by the runtime); default the model's ``max_position_embeddings``.
        attention: the decoder's attention: ``"fused"`` (ONNX Runtime's GroupQueryAttention on
            preallocated KV buffers; the ONNX Runtime backend's default) or ``"standard"`` (standard
            ONNX ops only: what a TensorRT build needs). Recorded in ``export.json``.

    Returns:
        role -> path: ``vision``, ``embed``, ``decoder``, ``post_vision_stats``, ``compact_kv``, ``spec``.
    """
    check_opset(opset)
    if attention not in names.ATTENTION_VARIANTS:
        raise ValueError(f"attention must be one of {', '.join(names.ATTENTION_VARIANTS)}, got {attention!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported by the ONNX export (supported: {', '.join(SUPPORTED_DTYPES)}); "
            "TensorRT builds lower-precision engines from the float32 graphs"
        )
    _check_llava(model)
    stack, _ = _text_parts(model)
    llava: Any = model
    cfg: Any = model.config
    tcfg = cfg.text_config
    limit = int(getattr(tcfg, "max_position_embeddings", 0) or 0)
    if max_input_len is None:
        max_input_len = limit or 4096
    if not isinstance(max_input_len, int) or max_input_len < 1:
        raise ValueError(f"max_input_len must be a positive integer, got {max_input_len!r}")
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before exporting")
    register_schemas()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {
        "vision": (names.VISION_GRAPH, vision_graph(model, opset)),
        "embed": (names.EMBED_GRAPH, embed_graph(model, opset)),
        "decoder": (names.DECODER_GRAPH, decoder_graph(model, opset, attention)),
        "post_vision_stats": (names.SCORE_GRAPH, post_vision_stats_model(opset)),
        "compact_kv": (names.COMPACT_GRAPH, compact_kv_model(opset)),
    }
    paths: dict[str, Path] = {}
    for role, (file, proto) in graphs.items():
        paths[role] = _save(proto, out / file)
    attn = stack.layers[0].self_attn
    d = int(attn.head_dim)
    size = int(cfg.vision_config.image_size)
    spec = ExportSpec(
        num_layers=len(stack.layers),
        num_heads=attn.q_proj.out_features // d,
        num_kv_heads=attn.k_proj.out_features // d,
        head_dim=d,
        hidden_size=int(tcfg.hidden_size),
        vocab_size=int(llava.lm_head.weight.shape[0]),
        attention_scale=float(attn.scaling) if attn.scaling is not None else 1.0 / math.sqrt(d),
        image_token_id=int(
            cfg.image_token_index if getattr(cfg, "image_token_index", None) is not None else cfg.image_token_id
        ),
        image_size=(size, size),
        image_seq_length=int(graphs["vision"][1].graph.output[0].type.tensor_type.shape.dim[1].dim_value),
        eos_token_id=_eos_ids(model),
        max_input_len=max_input_len,
        opset=opset,
        dtype=dtype,
        attention=attention,
        graphs={role: file for role, (file, _) in graphs.items()},
        io={role: _io(proto) for role, (_, proto) in graphs.items()},
        source={"class": type(model).__name__, "name_or_path": str(getattr(cfg, "_name_or_path", "") or "")},
    )
    paths["spec"] = spec.save(out)
    return paths
