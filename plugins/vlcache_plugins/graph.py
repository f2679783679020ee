"""ONNX graph pass: ``vlcache``-domain nodes → the plugin nodes TensorRT's ONNX parser maps.

An exported graph holds the VL-Cache ops as nodes of domain :data:`vlcache.export.names.DOMAIN`,
each backed by an ONNX local function (so ONNX Runtime runs it). For a TensorRT build,
:func:`to_tensorrt_plugins` rewrites them so the parser creates the plugins registered by
:func:`vlcache_plugins.register_tensorrt_plugins` instead of inlining the functions:

* op_type stays the plugin name (``PostVisionStats``, ``CompactKV``), the domain becomes
  :data:`PLUGIN_DOMAIN`, and the node gets ``plugin_namespace="vlcache"``, ``plugin_version="1"`` and
  (by default) ``aot=1`` so the ahead-of-time kernel is chosen. The parser matches a plugin by
  op_type and ``plugin_namespace``; the node's domain only keeps the model valid ONNX (a domain of
  its own, listed in ``opset_import``, whose ops ONNX's checker does not know and so does not check).
* The op's attributes are carried over, missing ones filled with the contract's defaults
  (``threshold`` :data:`vlcache.core.DEFAULT_THRESHOLD` = 0.01, ``scale``
  :data:`vlcache.export.names.DEFAULT_SCALE` = 0.0, meaning 1/√D; the same the exported op's schema
  declares): the parser passes only fields the plugin registered and warns about missing ones.
  Integer values of float attributes become floats.
* ``PostVisionStats(q, k, query_start) -> (scores, density)`` becomes the plugin node
  ``-> (scores, group_sparsity, row_max, row_sum)`` followed by ``density = 1 − ReduceMean(
  group_sparsity, axes=[1])`` in standard ops (the kernel leaves the cross-head mean to the graph).
* ``CompactKV(kv, indices) -> kept`` maps one to one.
* The local functions of the rewritten ops are removed (from 10.15 the parser would otherwise be
  free to inline them), and ``opset_import`` gains :data:`PLUGIN_DOMAIN` and loses ``vlcache`` once
  nothing uses it. Every other node, initializer, input and output is left as it was; nodes in
  subgraphs (If/Loop/Scan bodies) and in other local functions are rewritten too.

``onnx`` and vlcache's constants only: no TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, NodeProto, helper

from vlcache.core import DEFAULT_THRESHOLD
from vlcache.export.names import COMPACT_KV, DEFAULT_SCALE, DOMAIN, PLUGIN_IDS, PLUGIN_NAMESPACE, POST_VISION_STATS

#: ONNX domain of the rewritten plugin nodes.
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"

#: Attributes each op carries to its plugin, with the op contract's defaults.
PLUGIN_ATTRIBUTES: dict[str, dict[str, float]] = {
    POST_VISION_STATS: {"threshold": DEFAULT_THRESHOLD, "scale": DEFAULT_SCALE},
    COMPACT_KV: {},
}
#: Number of (inputs, outputs) of each op (vlcache.export.names contracts).
_ARITY = {POST_VISION_STATS: (3, 2), COMPACT_KV: (2, 1)}


class _Names:
    """Fresh tensor / node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()
        for graph in _graphs_of(model.graph):
            self._take_graph(graph)
        for fn in model.functions:
            self.taken.update(fn.input)
            self.taken.update(fn.output)
            for node in fn.node:
                self._take_node(node)
                for attr in node.attribute:
                    for sub in _attr_graphs(attr):
                        for g in _graphs_of(sub):
                            self._take_graph(g)

    def _take_graph(self, graph: GraphProto) -> None:
        for vi in (*graph.input, *graph.output, *graph.value_info):
            self.taken.add(vi.name)
        self.taken.update(t.name for t in graph.initializer)
        for node in graph.node:
            self._take_node(node)

    def _take_node(self, node: NodeProto) -> None:
        self.taken.update(node.input)
        self.taken.update(node.output)
        self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken or not name:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def _attr_graphs(attr: AttributeProto) -> Iterator[GraphProto]:
    if attr.type == AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == AttributeProto.GRAPHS:
        yield from attr.graphs


def _graphs_of(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                yield from _graphs_of(sub)


def _onnx_opset(opset_import: Iterable[onnx.OperatorSetIdProto], default: int) -> int:
    for op in opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return default


def _plugin_attributes(node: NodeProto, aot: bool | None) -> list[AttributeProto]:
    defaults = PLUGIN_ATTRIBUTES[node.op_type]
    attrs: list[AttributeProto] = []
    seen = set()
    for attr in node.attribute:
        if attr.name in ("plugin_namespace", "plugin_version", "aot"):
            continue
        seen.add(attr.name)
        if attr.name in defaults and attr.type == AttributeProto.INT:
            attrs.append(helper.make_attribute(attr.name, float(attr.i)))
        elif attr.name in defaults and attr.type != AttributeProto.FLOAT:
            raise ValueError(
                f"node {node.name!r} ({node.op_type}): attribute {attr.name!r} must be a float, "
                f"got {AttributeProto.AttributeType.Name(attr.type)}"
            )
        else:
            copy = AttributeProto()
            copy.CopyFrom(attr)
            attrs.append(copy)
    attrs.extend(helper.make_attribute(name, value) for name, value in defaults.items() if name not in seen)
    attrs.append(helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
    attrs.append(helper.make_attribute("plugin_version", PLUGIN_VERSION))
    if aot is not None:
        attrs.append(helper.make_attribute("aot", int(aot)))
    return attrs


def _rewrite_node(node: NodeProto, names: _Names, onnx_opset: int, aot: bool | None) -> list[NodeProto]:
    if node.op_type not in PLUGIN_IDS:
        raise ValueError(
            f"node {node.name!r}: no TensorRT plugin for op {DOMAIN}::{node.op_type} (have {sorted(PLUGIN_IDS)})"
        )
    n_in, n_out = _ARITY[node.op_type]
    if len(node.input) != n_in or not 1 <= len(node.output) <= n_out:
        raise ValueError(
            f"node {node.name!r}: {node.op_type} takes {n_in} inputs and up to {n_out} outputs, "
            f"got {len(node.input)} and {len(node.output)}"
        )
    base = node.name or names.fresh(node.op_type)
    plugin = NodeProto()
    plugin.op_type = node.op_type
    plugin.domain = PLUGIN_DOMAIN
    plugin.name = node.name or base
    plugin.doc_string = node.doc_string
    plugin.input.extend(node.input)
    plugin.attribute.extend(_plugin_attributes(node, aot))
    if node.op_type == COMPACT_KV:
        plugin.output.extend(node.output)
        return [plugin]

    scores = node.output[0] or names.fresh(f"{base}/scores")
    density = node.output[1] if len(node.output) > 1 else ""
    sparsity = names.fresh(f"{base}/group_sparsity")
    plugin.output.extend([scores, sparsity, names.fresh(f"{base}/row_max"), names.fresh(f"{base}/row_sum")])
    if not density:
        return [plugin]
    mean = names.fresh(f"{base}/mean_sparsity")
    one = names.fresh(f"{base}/one")
    nodes = [plugin, helper.make_node("Constant", [], [one], name=names.fresh(f"{base}/one"), value_float=1.0)]
    if onnx_opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        axes = names.fresh(f"{base}/axes")
        nodes.append(helper.make_node("Constant", [], [axes], name=names.fresh(f"{base}/axes"), value_ints=[1]))
        nodes.append(
            helper.make_node("ReduceMean", [sparsity, axes], [mean], name=names.fresh(f"{base}/mean"), keepdims=0)
        )
    else:
        nodes.append(
            helper.make_node("ReduceMean", [sparsity], [mean], name=names.fresh(f"{base}/mean"), axes=[1], keepdims=0)
        )
    nodes.append(helper.make_node("Sub", [one, mean], [density], name=names.fresh(f"{base}/density")))
    return nodes


def _rewrite_nodes(
    nodes: Iterable[NodeProto], names: _Names, onnx_opset: int, aot: bool | None
) -> tuple[list[NodeProto], bool]:
    """New node list with every vlcache node rewritten (recursing into subgraphs); and whether any was."""
    out: list[NodeProto] = []
    changed = False
    for node in nodes:
        if node.domain == DOMAIN:
            out.extend(_rewrite_node(node, names, onnx_opset, aot))
            changed = True
            continue
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                new, sub_changed = _rewrite_nodes(sub.node, names, onnx_opset, aot)
                if sub_changed:
                    del sub.node[:]
                    sub.node.extend(new)
                    changed = True
        out.append(node)
    return out, changed


def _fix_opset_imports(imports: list[onnx.OperatorSetIdProto], used: set[str]) -> list[onnx.OperatorSetIdProto]:
    kept = [op for op in imports if op.domain != DOMAIN or DOMAIN in used]
    if PLUGIN_DOMAIN in used and all(op.domain != PLUGIN_DOMAIN for op in kept):
        kept.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    return kept


def _domains(nodes: Iterable[NodeProto]) -> Iterator[str]:
    for node in nodes:
        yield node.domain
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                yield from _domains(sub.node)


def to_tensorrt_plugins(model: onnx.ModelProto, *, aot: bool | None = True) -> onnx.ModelProto:
    """Rewrite a model's ``vlcache`` nodes into TensorRT plugin nodes (see the module docstring).

    Args:
        model: an ONNX model, left unchanged.
        aot: the ``aot`` attribute of the plugin nodes: True selects the ahead-of-time kernels
            (engines that run without Python), False the JIT ones, None leaves the choice to the
            network flags.

    Returns:
        A new model. Raises ``ValueError`` for a ``vlcache`` op without a plugin, or with the wrong
        number of inputs/outputs or attribute types.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = _Names(out)
    opset = _onnx_opset(out.opset_import, default=17)

    new_nodes, _ = _rewrite_nodes(out.graph.node, names, opset, aot)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)

    kept_functions: list[FunctionProto] = []
    for fn in out.functions:
        if fn.domain == DOMAIN and fn.name in PLUGIN_IDS:
            continue  # the plugin replaces the op's local function
        fn_nodes, changed = _rewrite_nodes(fn.node, names, _onnx_opset(fn.opset_import, opset), aot)
        if changed:
            del fn.node[:]
            fn.node.extend(fn_nodes)
            used_in_fn = set(_domains(fn.node))
            imports = _fix_opset_imports(list(fn.opset_import), used_in_fn)
            del fn.opset_import[:]
            fn.opset_import.extend(imports)
        kept_functions.append(fn)
    del out.functions[:]
    out.functions.extend(kept_functions)

    used = set(_domains(out.graph.node)) | {fn.domain for fn in out.functions}
    for fn in out.functions:
        used.update(_domains(fn.node))
    imports = _fix_opset_imports(list(out.opset_import), used)
    del out.opset_import[:]
    out.opset_import.extend(imports)
    return out


def plugin_nodes(model: onnx.ModelProto) -> list[NodeProto]:
    """The plugin nodes of a rewritten model's main graph (domain :data:`PLUGIN_DOMAIN`)."""
    return [node for node in model.graph.node if node.domain == PLUGIN_DOMAIN]
