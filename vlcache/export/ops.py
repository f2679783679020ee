"""The VL-Cache operations as ONNX nodes of domain ``vlcache``: schemas and local functions.

Each op (names and contracts in :mod:`vlcache.export.names`) is

* registered as an :class:`onnx.defs.OpSchema` (:func:`register_schemas`, idempotent), so
  ``onnx.checker`` and ``onnx.shape_inference`` accept graphs that use it, and
* defined by an ONNX **local function** (a :class:`onnx.FunctionProto` of standard ops, opset >= 17)
  stored in every model that uses it, so ONNX Runtime runs the node natively, with no custom-op
  library. A TensorRT build swaps the nodes for plugin layers (``names.PLUGIN_IDS``).

``PostVisionStats(queries, keys, query_start) -> (scores, density)``, attributes ``threshold``
(p) and ``scale`` (0 means 1/√D). The function computes, with G = H_q / H_kv query heads per key
head (keys are never repeated)::

    logits (B, H_kv, G·τ, m) = (queries viewed as G·τ rows per key head) · keysᵀ · scale
                               + (−inf where key j > query_start + row)
    e = exp(logits − rowmax);  A = e / Σ_j e
    scores  (B, H_kv, m) = Σ over the G·τ rows of A  /  G     (vlcache.core.vlcache_scores)
    density (B,)         = 1 − #{visible entries with e < p} / (H_q · Σ_rows visible keys)
                                                                (vlcache.core.layer_density)

The τ × m attention of each head is materialised once (never m × m); the fused, tiled kernels are
the TensorRT plugin's business. Computed in float32 whatever the input type.

``CompactKV(kv, indices) -> kept``: ``GatherElements`` along the sequence axis
(:func:`vlcache.core.compact`).
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, defs, helper

from vlcache.core.sparsity import DEFAULT_THRESHOLD
from vlcache.export import names
from vlcache.export.graph import GraphBuilder, check_opset, tensor_info

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schemas() -> list[defs.OpSchema]:
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    stats = defs.OpSchema(
        names.POST_VISION_STATS,
        names.DOMAIN,
        names.OPSET_VERSION,
        "VL-Cache post-vision attention statistics of one layer: per-key scores and the layer density.",
        inputs=[
            P("queries", "T", "(B, H_q, tau, D) post-vision queries after RoPE"),
            P("keys", "T", "(B, H_kv, m, D) prompt keys after RoPE"),
            P("query_start", "tensor(int64)", "() absolute position of the first query row"),
        ],
        outputs=[
            P("scores", "tensor(float)", "(B, H_kv, m) column sums of the causal softmax, GQA-group mean"),
            P("density", "tensor(float)", "(B,) 1 - fraction of visible entries below threshold * rowmax"),
        ],
        type_constraints=[("T", FLOAT_TYPES, "queries and keys")],
        attributes=[
            A(
                "threshold",
                helper.make_attribute("threshold", DEFAULT_THRESHOLD),
                "p: entries below p * rowmax count as zero",
            ),
            A("scale", helper.make_attribute("scale", names.DEFAULT_SCALE), "softmax scale; 0 means 1/sqrt(D)"),
        ],
    )
    compact = defs.OpSchema(
        names.COMPACT_KV,
        names.DOMAIN,
        names.OPSET_VERSION,
        "Gather the kept entries of a layer's keys or values along the sequence axis.",
        inputs=[
            P("kv", "T", "(B, H_kv, m, D) keys or values"),
            P("indices", "tensor(int64)", "(B, H_kv, k) kept positions, ascending"),
        ],
        outputs=[P("kept", "T", "(B, H_kv, k, D)")],
        type_constraints=[("T", FLOAT_TYPES, "cache type")],
    )
    return [stats, compact]


def register_schemas() -> None:
    """Register the ``vlcache`` op schemas with onnx (once per process)."""
    for schema in _schemas():
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


def _attr_constant(out: str, attr: str) -> onnx.NodeProto:
    """A Constant node whose float value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(helper.make_attribute_ref("value_float", AttributeProto.FLOAT, ref_attr_name=attr))
    return node


def post_vision_stats_function(opset: int) -> onnx.FunctionProto:
    """The :class:`~onnx.FunctionProto` defining ``vlcache.PostVisionStats`` with standard ops.

    Written for few passes over the (B, H_kv, G, τ, m) attention, the only large tensor: the scale
    multiplies the τ·D queries, the causal mask (τ, m) broadcasts over heads, ``Softmax`` gives the
    probabilities in one kernel, and the density counts ``probs < p · rowmax(probs)`` (the same
    entries as ``e < p`` with e = exp(logit − rowmax): probs = e / Σe and rowmax(probs) = 1 / Σe).
    Hidden entries have probability 0, so they are counted too when p > 0 and subtracted in closed
    form: H_q · (τ·m − Σ_r (query_start + r + 1)).
    """
    b = GraphBuilder(check_opset(opset), prefix="pvs_")
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    q = b.op("Cast", ["queries"], to=f32)
    k = b.op("Cast", ["keys"], to=f32)
    bsz, h_q, tau, d = (b.shape_dim(q, i) for i in range(4))
    h_kv, m = b.shape_dim(k, 1), b.shape_dim(k, 2)
    group = b.op("Div", [h_q, h_kv])  # (1,) int64
    # scale attribute, 0 -> 1/sqrt(D); applied to the τ·D queries, not the τ·m logits
    b.nodes.append(_attr_constant("pvs_scale_attr", "scale"))
    default_scale = b.op("Reciprocal", [b.op("Sqrt", [b.op("Cast", [d], to=f32)])])
    is_zero = b.op("Equal", ["pvs_scale_attr", b.const(0.0, "float32")])
    scale = b.op("Where", [is_zero, default_scale, "pvs_scale_attr"])
    rows_per_kv = b.op("Concat", [bsz, h_kv, b.const([-1]), d], axis=0)
    qg = b.op("Reshape", [b.op("Mul", [q, scale]), rows_per_kv])  # (B, H_kv, G·τ, D): a group's heads stacked
    logits = b.op("MatMul", [qg, b.op("Transpose", [k], perm=[0, 1, 3, 2])])  # (B, H_kv, G·τ, m)
    logits = b.op("Reshape", [logits, b.op("Concat", [bsz, h_kv, group, tau, m], axis=0)])  # (B, H_kv, G, τ, m)
    # causal mask of the τ rows at positions query_start.., broadcast over batch, heads and group
    start = "query_start"
    n_rows = b.scalar(tau)
    rows = b.unsqueeze(b.op("Range", [start, b.op("Add", [start, n_rows]), b.const(1)]), [1])  # (τ, 1)
    cols = b.op("Range", [b.const(0), b.scalar(m), b.const(1)])  # (m,)
    hidden = b.op("Greater", [cols, rows])  # (τ, m)
    neg = b.op("Where", [hidden, b.const(float("-inf"), "float32"), b.const(0.0, "float32")])
    probs = b.op("Softmax", [b.op("Add", [logits, neg])], axis=-1)
    col_sums = b.reduce("ReduceSum", probs, [2, 3], keepdims=0)  # (B, H_kv, m): Σ over the group's rows
    b.op("Div", [col_sums, b.op("Cast", [group], to=f32)], outputs=["scores"])
    # density = 1 − zeroed / (H_q · Σ_rows visible); per-row counts stay exact in float32 (m < 2^24)
    b.nodes.append(_attr_constant("pvs_threshold", "threshold"))
    cut = b.op("Mul", [b.reduce("ReduceMax", probs, [-1]), "pvs_threshold"])
    below_rows = b.reduce("ReduceSum", b.op("Cast", [b.op("Less", [probs, cut])], to=f32), [-1], keepdims=0)
    below = b.reduce("ReduceSum", b.op("Cast", [below_rows], to=f64), [1, 2, 3], keepdims=0)  # (B,)
    # Σ_{r<τ} (query_start + r + 1) = τ·query_start + τ(τ+1)/2
    tri = b.op("Div", [b.op("Mul", [n_rows, b.op("Add", [n_rows, b.const(1)])]), b.const(2)])
    seen = b.op("Add", [b.op("Mul", [n_rows, start]), tri])
    total = b.op("Cast", [b.op("Mul", [b.scalar(h_q), seen])], to=f64)
    hidden_count = b.op(
        "Cast", [b.op("Mul", [b.scalar(h_q), b.op("Sub", [b.op("Mul", [n_rows, b.scalar(m)]), seen])])], to=f64
    )
    counts_hidden = b.op("Greater", ["pvs_threshold", b.const(0.0, "float32")])  # 0 < p·rowmax: hidden 0s are below
    zeroed = b.op("Sub", [below, b.op("Where", [counts_hidden, hidden_count, b.const(0.0, "float64")])])
    safe_total = b.op("Max", [total, b.const(1.0, "float64")])
    dens = b.op("Sub", [b.const(1.0, "float64"), b.op("Div", [zeroed, safe_total])])
    dens = b.op("Where", [b.op("Greater", [total, b.const(0.0, "float64")]), dens, b.const(1.0, "float64")])
    b.op("Cast", [dens], to=f32, outputs=["density"])
    return _function(
        b, names.POST_VISION_STATS, ["queries", "keys", "query_start"], ["scores", "density"], ["threshold", "scale"]
    )


def compact_kv_function(opset: int) -> onnx.FunctionProto:
    """The :class:`~onnx.FunctionProto` defining ``vlcache.CompactKV`` with standard ops."""
    b = GraphBuilder(check_opset(opset), prefix="ckv_")
    idx = b.unsqueeze("indices", [3])  # (B, H_kv, k, 1)
    target = b.op("Concat", [b.op("Shape", ["indices"]), b.shape_dim("kv", 3)], axis=0)
    b.op("GatherElements", ["kv", b.op("Expand", [idx, target])], axis=2, outputs=["kept"])
    return _function(b, names.COMPACT_KV, ["kv", "indices"], ["kept"], [])


def _function(
    b: GraphBuilder, name: str, inputs: list[str], outputs: list[str], attrs: list[str]
) -> onnx.FunctionProto:
    # Function bodies cannot hold initializers: turn the builder's constants into Constant nodes.
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in b.initializers]
    return helper.make_function(
        names.DOMAIN,
        name,
        inputs,
        outputs,
        consts + b.nodes,
        [helper.make_opsetid("", b.opset)],
        attributes=attrs,
    )


def op_functions(opset: int) -> list[onnx.FunctionProto]:
    """Both local functions, for a model that uses the ``vlcache`` ops."""
    return [post_vision_stats_function(opset), compact_kv_function(opset)]


def post_vision_stats_model(
    opset: int = 17,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float = names.DEFAULT_SCALE,
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A graph of one ``vlcache.PostVisionStats`` node: inputs ``queries`` (B, H_q, τ, D),
    ``keys`` (B, H_kv, m, D), ``query_start`` () int64; outputs ``scores`` (B, H_kv, m) and
    ``density`` (B,), all axes dynamic."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0 (0: 1/sqrt(D)), got {scale}")
    register_schemas()
    b = GraphBuilder(opset)
    b.op(
        names.POST_VISION_STATS,
        [names.SCORE_QUERIES, names.SCORE_KEYS, names.SCORE_QUERY_START],
        outputs=[names.SCORE_SCORES, names.SCORE_DENSITY],
        domain=names.DOMAIN,
        threshold=float(threshold),
        scale=float(scale),
    )
    return b.model(
        "vlcache_post_vision_stats",
        [
            tensor_info(names.SCORE_QUERIES, dtype, ["batch", "q_heads", "tau", "head_dim"]),
            tensor_info(names.SCORE_KEYS, dtype, ["batch", "kv_heads", "m", "head_dim"]),
            tensor_info(names.SCORE_QUERY_START, TensorProto.INT64, []),
        ],
        [
            tensor_info(names.SCORE_SCORES, TensorProto.FLOAT, ["batch", "kv_heads", "m"]),
            tensor_info(names.SCORE_DENSITY, TensorProto.FLOAT, ["batch"]),
        ],
        functions=[post_vision_stats_function(opset)],
        extra_opsets=[(names.DOMAIN, names.OPSET_VERSION)],
        doc=__doc__ or "",
    )


def compact_kv_model(opset: int = 17, *, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph of one ``vlcache.CompactKV`` node: ``kv`` (B, H_kv, m, D), ``indices`` (B, H_kv, k)
    int64 -> ``kept`` (B, H_kv, k, D)."""
    register_schemas()
    b = GraphBuilder(opset)
    b.op(
        names.COMPACT_KV,
        [names.COMPACT_KV_INPUT, names.COMPACT_INDICES],
        outputs=[names.COMPACT_KEPT],
        domain=names.DOMAIN,
    )
    return b.model(
        "vlcache_compact_kv",
        [
            tensor_info(names.COMPACT_KV_INPUT, dtype, ["batch", "kv_heads", "m", "head_dim"]),
            tensor_info(names.COMPACT_INDICES, TensorProto.INT64, ["batch", "kv_heads", "k"]),
        ],
        [tensor_info(names.COMPACT_KEPT, dtype, ["batch", "kv_heads", "k", "head_dim"])],
        functions=[compact_kv_function(opset)],
        extra_opsets=[(names.DOMAIN, names.OPSET_VERSION)],
    )
