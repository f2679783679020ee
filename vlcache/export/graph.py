"""A small ONNX graph builder: unique names, weights from torch, opset-aware reductions.

Every graph of :mod:`vlcache.export` is written node by node with it (no tracing exporter), so the
graphs have exactly the inputs, outputs and dynamic axes the runtimes expect. Only standard ONNX
ops of the chosen opset (>= 17) are emitted, plus the ``vlcache``-domain nodes of
:mod:`vlcache.export.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 17
#: newest default-domain opset the exported graphs are written for (ONNX Runtime >= 1.20 runs it)
MAX_OPSET = 21

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    return opset


def to_numpy(t: Any, dtype: Any = np.float32) -> np.ndarray:
    """A detached CPU copy of a weight in ``dtype``."""
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy().astype(dtype, copy=False))


class GraphBuilder:
    """Accumulates nodes and initializers of one graph.

    ``op(...)`` appends a node and returns its output name(s); ``weight`` / ``const`` add
    initializers. Reductions, Squeeze and Unsqueeze follow the opset's signature (axes as an
    attribute before opset 18 for ReduceMean/ReduceMax, as an input after).
    """

    def __init__(self, opset: int, prefix: str = "") -> None:
        self.opset = check_opset(opset)
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    # --- naming and constants ------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def weight(self, name: str, array: np.ndarray) -> str:
        # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d arrays into 1-d ones
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer, shared between uses of the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), arr)
        return self._consts[key]

    # --- nodes ---------------------------------------------------------------------------------
    def op(
        self, op_type: str, inputs: Sequence[str], *, outputs: int | Sequence[str] = 1, domain: str = "", **attrs: Any
    ) -> Any:
        """Append a node; returns its output name, or a list of names when ``outputs`` > 1."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        node = helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n_{op_type}"), domain=domain, **attrs)
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names

    def rename(self, value: str, name: str) -> str:
        """Expose ``value`` under a graph-output name."""
        return self.op("Identity", [value], outputs=[name])

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        """ReduceSum/ReduceMean/ReduceMax over ``axes`` in the opset's form."""
        axes_as_input = op_type == "ReduceSum" or self.opset >= 18
        if axes_as_input:
            return self.op(op_type, [x, self.const(list(axes))], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes))])

    def shape_dim(self, x: str, index: int) -> str:
        """(1,) int64: dimension ``index`` of ``x``."""
        return self.op("Shape", [x], start=index, end=index + 1)

    def scalar(self, one_d: str) -> str:
        """(1,) -> () int64."""
        return self.op("Squeeze", [one_d, self.const([0])])

    def linear(self, x: str, module: Any, name: str, dtype: Any = np.float32) -> str:
        """``x @ Wᵀ + b`` for an ``nn.Linear`` (the weight stored transposed, (in, out))."""
        w = self.weight(f"{name}.weight_t", to_numpy(module.weight, dtype).T.copy())
        y = self.op("MatMul", [x, w])
        bias = getattr(module, "bias", None)
        if bias is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", to_numpy(bias, dtype))])
        return y

    def layer_norm(self, x: str, module: Any, name: str) -> str:
        scale = self.weight(f"{name}.weight", to_numpy(module.weight))
        bias = self.weight(f"{name}.bias", to_numpy(module.bias))
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=float(module.eps))

    def rms_norm(self, x: str, weight: Any, eps: float, name: str) -> str:
        """Llama's RMSNorm: ``w · x / sqrt(mean(x²) + eps)`` over the last axis.

        Written as Pow → ReduceMean → Add → Sqrt → Div → Mul, the pattern ONNX Runtime fuses into one
        ``SimplifiedLayerNormalization`` kernel (a Mul(x, x) / Reciprocal form stays seven ops)."""
        var = self.reduce("ReduceMean", self.op("Pow", [x, self.const(2.0, np.float32)]), [-1])
        norm = self.op("Div", [x, self.op("Sqrt", [self.op("Add", [var, self.const(eps, np.float32)])])])
        return self.op("Mul", [norm, self.weight(f"{name}.weight", to_numpy(weight))])

    def activation(self, x: str, kind: str) -> str:
        """The transformers activations LLaVA towers, projectors and decoders use."""
        f = np.float32
        if kind in ("silu", "swish"):
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        if kind == "gelu":  # exact, erf form
            inner = self.op("Erf", [self.op("Mul", [x, self.const(1 / np.sqrt(2.0), f)])])
            return self.op(
                "Mul", [self.op("Mul", [x, self.const(0.5, f)]), self.op("Add", [inner, self.const(1.0, f)])]
            )
        if kind == "quick_gelu":
            return self.op("Mul", [x, self.op("Sigmoid", [self.op("Mul", [x, self.const(1.702, f)])])])
        if kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op("Add", [x, self.op("Mul", [cube, self.const(0.044715, f)])])
            t = self.op("Tanh", [self.op("Mul", [inner, self.const(np.sqrt(2.0 / np.pi), f)])])
            return self.op("Mul", [self.op("Mul", [x, self.const(0.5, f)]), self.op("Add", [t, self.const(1.0, f)])])
        if kind == "relu":
            return self.op("Relu", [x])
        raise ValueError(
            f"activation {kind!r} is not supported by the ONNX export (supported: silu, gelu, quick_gelu, gelu_new, gelu_pytorch_tanh, relu)"
        )

    # --- the model -----------------------------------------------------------------------------
    def model(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        *,
        functions: Sequence[onnx.FunctionProto] = (),
        extra_opsets: Sequence[tuple[str, int]] = (),
        doc: str = "",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs), initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions), producer_name="vlcache")
        # The lowest IR version that holds these opsets and local functions: what ONNX Runtime accepts.
        model.ir_version = max(8, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        model.doc_string = doc
        return model


def tensor_info(name: str, elem_type: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))
