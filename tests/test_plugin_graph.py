"""The ONNX graph pass that turns vlcache nodes into TensorRT plugin nodes (pure onnx, CPU).

The input graphs are built here with onnx.helper (not with vlcache.export), with stand-in local
functions for the ops, the way an export declares them.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import FunctionProto, ModelProto, NodeProto, TensorProto, helper  # noqa: E402

from vlcache.core import DEFAULT_THRESHOLD  # noqa: E402
from vlcache.export.names import COMPACT_KV, DOMAIN, PLUGIN_NAMESPACE, POST_VISION_STATS  # noqa: E402
from vlcache_plugins.graph import PLUGIN_ATTRIBUTES, PLUGIN_DOMAIN, plugin_nodes, to_tensorrt_plugins  # noqa: E402

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _functions(opset: int) -> list[FunctionProto]:
    imports = [helper.make_opsetid("", opset)]
    # CompactKV: a real gather; PostVisionStats: a shape-correct stand-in (the pass only removes it).
    compact_body = [
        helper.make_node("Unsqueeze", ["indices", "minus_one"], ["idx4"]),
        helper.make_node("Shape", ["indices"], ["idx_shape"]),
        helper.make_node("Shape", ["kv"], ["kv_shape"], start=-1),
        helper.make_node("Concat", ["idx_shape", "kv_shape"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["idx4", "out_shape"], ["idx_full"]),
        helper.make_node("GatherElements", ["kv", "idx_full"], ["kept"], axis=2),
    ]
    compact_body.insert(0, helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]))
    stats_body = [
        helper.make_node("Constant", [], ["axes_d"], value_ints=[3]),
        helper.make_node("ReduceSum", ["k", "axes_d"], ["scores"], keepdims=0),
        helper.make_node("Constant", [], ["axes_rest"], value_ints=[1, 2, 3]),
        helper.make_node("ReduceMean", ["q", "axes_rest"], ["density"], keepdims=0),
    ]
    if opset < 18:
        stats_body[3] = helper.make_node("ReduceMean", ["q"], ["density"], axes=[1, 2, 3], keepdims=0)
    return [
        helper.make_function(
            DOMAIN,
            POST_VISION_STATS,
            ["q", "k", "query_start"],
            ["scores", "density"],
            stats_body,
            imports,
            attributes=["threshold", "scale"],
        ),
        helper.make_function(DOMAIN, COMPACT_KV, ["kv", "indices"], ["kept"], compact_body, imports),
    ]


def _model(opset: int = 18, *, stats_outputs: tuple[str, ...] = ("scores", "density")) -> ModelProto:
    nodes = [
        helper.make_node("Relu", ["q_in"], ["q"], name="relu"),
        helper.make_node(
            POST_VISION_STATS,
            ["q", "k", "query_start"],
            list(stats_outputs),
            name="stats0",
            domain=DOMAIN,
            threshold=0.02,
        ),
        helper.make_node(COMPACT_KV, ["kv", "indices"], ["kept"], name="compact0", domain=DOMAIN),
        helper.make_node("Identity", ["kept"], ["kept_out"], name="identity"),
    ]
    inputs = [
        helper.make_tensor_value_info("q_in", F, [1, 4, 3, 16]),
        helper.make_tensor_value_info("k", F, [1, 2, 10, 16]),
        helper.make_tensor_value_info("query_start", I64, []),
        helper.make_tensor_value_info("kv", F, [1, 2, 10, 16]),
        helper.make_tensor_value_info("indices", I64, [1, 2, 4]),
    ]
    outputs = [helper.make_tensor_value_info("kept_out", F, [1, 2, 4, 16])]
    shapes = {"scores": [1, 2, 10], "density": [1]}
    outputs += [helper.make_tensor_value_info(n, F, shapes[n]) for n in stats_outputs if n]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    graph.initializer.append(helper.make_tensor("unused_weight", F, [2], [1.0, 2.0]))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        functions=_functions(opset),
        ir_version=8 if opset < 18 else 9,
    )


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("opset", [17, 18])
def test_rewrites_vlcache_nodes_into_plugin_nodes(opset: int) -> None:
    model = _model(opset)
    onnx.checker.check_model(model)
    before = model.SerializeToString()
    out = to_tensorrt_plugins(model)
    assert model.SerializeToString() == before, "the input model must not change"

    stats, compact = plugin_nodes(out)
    assert (stats.op_type, stats.domain, stats.name) == (POST_VISION_STATS, PLUGIN_DOMAIN, "stats0")
    assert list(stats.input) == ["q", "k", "query_start"] and stats.output[0] == "scores" and len(stats.output) == 4
    attrs = _attrs(stats)
    assert attrs["threshold"] == pytest.approx(0.02) and attrs["scale"] == 0.0  # carried over / filled in
    assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == b"1"
    assert attrs["aot"] == 1
    assert (compact.op_type, compact.domain) == (COMPACT_KV, PLUGIN_DOMAIN)
    assert list(compact.input) == ["kv", "indices"] and list(compact.output) == ["kept"]
    assert set(_attrs(compact)) == {"plugin_namespace", "plugin_version", "aot"}

    # Nothing else changed: the other nodes, inputs, outputs and initializers are the same protos.
    others = [n for n in out.graph.node if n.op_type in ("Relu", "Identity")]
    assert others == [n for n in model.graph.node if n.op_type in ("Relu", "Identity")]
    assert list(out.graph.input) == list(model.graph.input) and list(out.graph.output) == list(model.graph.output)
    assert list(out.graph.initializer) == list(model.graph.initializer)
    assert all(n.domain != DOMAIN for n in out.graph.node)

    # The ops' local functions are gone; the opset imports follow the domains in use.
    assert not [f for f in out.functions if f.domain == DOMAIN]
    domains = {op.domain: op.version for op in out.opset_import}
    assert DOMAIN not in domains and domains[PLUGIN_DOMAIN] == 1 and domains[""] == opset

    onnx.checker.check_model(out, full_check=True)
    # The density tensor is still produced (from the plugin's group sparsity), before it is consumed.
    producers = {o: i for i, n in enumerate(out.graph.node) for o in n.output}
    assert "density" in producers and producers["density"] > producers["scores"]


@pytest.mark.parametrize("opset", [17, 18])
def test_density_nodes_compute_one_minus_mean_sparsity(opset: int) -> None:
    """Run the standard-op tail the pass adds (ONNX Runtime): density = 1 − mean over KV heads."""
    ort = pytest.importorskip("onnxruntime")
    out = to_tensorrt_plugins(_model(opset))
    stats = plugin_nodes(out)[0]
    sparsity = stats.output[1]
    tail = [n for n in out.graph.node if n.domain == "" and n.op_type in ("Constant", "ReduceMean", "Sub")]
    graph = helper.make_graph(
        tail,
        "tail",
        [helper.make_tensor_value_info(sparsity, F, [3, 5])],
        [helper.make_tensor_value_info("density", F, [3])],
    )
    tail_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(tail_model, full_check=True)
    session = ort.InferenceSession(tail_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 5), dtype=np.float32)
    (density,) = session.run(None, {sparsity: x})
    np.testing.assert_allclose(density, 1.0 - x.mean(axis=1), rtol=1e-6)


def test_optional_outputs_and_aot_choice() -> None:
    out = to_tensorrt_plugins(_model(stats_outputs=("scores",)), aot=None)
    stats = plugin_nodes(out)[0]
    assert "aot" not in _attrs(stats)
    assert not [n for n in out.graph.node if n.op_type in ("ReduceMean", "Sub")]  # no density requested

    out = to_tensorrt_plugins(_model(stats_outputs=("", "density")), aot=False)
    stats = plugin_nodes(out)[0]
    assert stats.output[0] and stats.output[0] != "scores" and _attrs(stats)["aot"] == 0
    onnx.checker.check_model(out)


def test_fresh_names_do_not_collide() -> None:
    model = _model()
    model.graph.node.append(helper.make_node("Identity", ["k"], ["stats0/group_sparsity"], name="stats0/mean"))
    out = to_tensorrt_plugins(model)
    names = [o for n in out.graph.node for o in n.output]
    assert len(names) == len(set(names))
    node_names = [n.name for n in out.graph.node]
    assert len(node_names) == len(set(node_names))
    onnx.checker.check_model(out, full_check=True)


def test_attributes_are_coerced_or_rejected() -> None:
    model = _model()
    stats = model.graph.node[1]
    stats.attribute.append(helper.make_attribute("scale", 0))  # an int where the contract says float
    out = to_tensorrt_plugins(model)
    scale = next(a for a in plugin_nodes(out)[0].attribute if a.name == "scale")
    assert scale.type == onnx.AttributeProto.FLOAT and scale.f == 0.0

    bad = _model()
    bad.graph.node[1].attribute[0].CopyFrom(helper.make_attribute("threshold", "0.01"))
    with pytest.raises(ValueError, match="threshold"):
        to_tensorrt_plugins(bad)


def test_unknown_op_and_wrong_arity_are_rejected() -> None:
    model = _model()
    model.graph.node.append(helper.make_node("Evict", ["k"], ["k2"], domain=DOMAIN))
    with pytest.raises(ValueError, match="no TensorRT plugin"):
        to_tensorrt_plugins(model)
    model = _model()
    del model.graph.node[2].input[1]
    with pytest.raises(ValueError, match="CompactKV takes 2 inputs"):
        to_tensorrt_plugins(model)


def test_nodes_in_subgraphs_are_rewritten() -> None:
    inner = helper.make_graph(
        [helper.make_node(COMPACT_KV, ["kv", "indices"], ["kept_inner"], domain=DOMAIN)],
        "then",
        [],
        [helper.make_tensor_value_info("kept_inner", F, [1, 2, 4, 16])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["kv"], ["kv_inner"])],
        "else",
        [],
        [helper.make_tensor_value_info("kv_inner", F, [1, 2, 10, 16])],
    )
    model = _model()
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["cond"], ["branch"], then_branch=inner, else_branch=other))
    model.graph.output.append(helper.make_tensor_value_info("branch", F, [1, 2, None, 16]))
    out = to_tensorrt_plugins(model)
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert then.node[0].domain == PLUGIN_DOMAIN and _attrs(then.node[0])["plugin_namespace"] == b"vlcache"
    onnx.checker.check_model(out)


def test_defaults_match_the_reference() -> None:
    """A node that leaves its attributes out means the exported op schema's defaults (what ONNX Runtime
    runs): the plugin node must get the same values, and the threshold must be the reference p."""
    from vlcache.export.ops import register_schemas

    register_schemas()
    schema = onnx.defs.get_schema(POST_VISION_STATS, 1, DOMAIN)
    declared = {name: helper.get_attribute_value(a.default_value) for name, a in schema.attributes.items()}
    assert set(declared) == set(PLUGIN_ATTRIBUTES[POST_VISION_STATS])
    assert declared["threshold"] == pytest.approx(DEFAULT_THRESHOLD)  # float32 in ONNX

    model = _model()
    stats = model.graph.node[1]
    del stats.attribute[:]  # the exporter's defaults, not the 0.02 the other tests carry over
    filled = _attrs(plugin_nodes(to_tensorrt_plugins(model))[0])
    assert {name: filled[name] for name in declared} == pytest.approx(declared)
