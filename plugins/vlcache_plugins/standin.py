"""A CPU stand-in for a TensorRT plugin engine: the rewritten ONNX graph, its plugin nodes run by the kernels.

TensorRT needs a GPU, so the path "TensorRTRunner → plugin engine → Triton kernel" cannot run on
the machines this project is developed on. :class:`InterpretedEngine` takes the graph that
:func:`vlcache_plugins.build.build_engines` hands to TensorRT's ONNX parser (the export's scoring or
compaction graph after :func:`vlcache_plugins.graph.to_tensorrt_plugins`) and executes it the way
the engine is meant to:

* each plugin node (domain :data:`~vlcache_plugins.graph.PLUGIN_DOMAIN`) launches the plugin's
  OpenAI Triton kernel with the node's attributes as compile-time constants and the tiles the AOT
  plugin compiles (:func:`vlcache_plugins.aot.post_vision_blocks`, :data:`~vlcache_plugins.aot.COMPACT_BLOCK_K`),
  producing the outputs the plugin registers (``scores, group_sparsity, row_max, row_sum``;
  ``kept``);
* the standard nodes around them (the ``density = 1 − ReduceMean(group_sparsity)`` the graph pass
  adds) run in ONNX's reference evaluator.

On CPU tensors the kernels need ``TRITON_INTERPRET=1`` (Triton's interpreter); on CUDA tensors they
are compiled by Triton's JIT. It has the one method :class:`vlcache.runtime.TensorRTRunner` calls on
an engine, ``run(feeds) -> outputs`` (torch tensors by name), and counts the plugin launches, so a
test can check that a runner's op really went through the plugin. It stands in for TensorRT; it does
not check TensorRT (its parser, the AOT launch, precision, the engine's I/O).

Needs ``onnx`` and ``triton``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from vlcache.core.sparsity import DEFAULT_THRESHOLD
from vlcache.export.names import COMPACT_KV, DEFAULT_SCALE, POST_VISION_STATS
from vlcache_plugins.graph import PLUGIN_DOMAIN

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def run_post_vision_stats_plugin(
    q: torch.Tensor, k: torch.Tensor, query_start: torch.Tensor, *, threshold: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``vlcache::PostVisionStats`` plugin's outputs ``(scores, group_sparsity, row_max, row_sum)``:
    its kernel launched with the plugin's tiles, ``scale`` 0 meaning 1/√D as in the plugin."""
    from vlcache_plugins.aot import post_vision_blocks
    from vlcache_plugins.ops import post_vision_stats

    if query_start.numel() != 1:
        raise ValueError(f"query_start must be a scalar, got shape {tuple(query_start.shape)}")
    block_q, block_n = post_vision_blocks(_TRITON_DTYPE.get(q.dtype, "fp32"))
    resolved = float(scale) if scale > 0 else 1.0 / math.sqrt(q.shape[-1])
    out = post_vision_stats(
        q, k, int(query_start.reshape(())), threshold=float(threshold), scale=resolved, block_q=block_q, block_n=block_n
    )
    return out.scores, out.group_sparsity, out.row_max, out.row_sum


def run_compact_kv_plugin(kv: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The ``vlcache::CompactKV`` plugin's output ``kept``: its kernel launched with the plugin's tile.

    Like the plugin (which has no host synchronisation), an index outside ``[0, m)`` gives a zero row."""
    from vlcache_plugins.aot import COMPACT_BLOCK_K
    from vlcache_plugins.ops import compact_kv

    return compact_kv(kv, indices, validate=False, block_k=COMPACT_BLOCK_K)


class InterpretedEngine:
    """Runs a graph rewritten by :func:`~vlcache_plugins.graph.to_tensorrt_plugins` in place of the
    TensorRT engine built from it (see the module docstring).

    Args:
        model: the rewritten ONNX model, or its file (``build_engines`` writes ``<role>.trt.onnx``).
        device: where the kernels run: ``cpu`` (needs ``TRITON_INTERPRET=1``) or a CUDA device.

    Attributes:
        input_names, output_names: the graph's (= the engine's) I/O tensor names.
        launches: plugin launches so far, by plugin name (``PostVisionStats``, ``CompactKV``).
    """

    def __init__(self, model: onnx.ModelProto | str | Path, *, device: str | torch.device = "cpu") -> None:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        graph = proto.graph
        initializers = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        self.device = torch.device(device)
        self.launches: Counter[str] = Counter()
        plugins = {n.op_type for n in graph.node if n.domain == PLUGIN_DOMAIN}
        unknown = plugins - {POST_VISION_STATS, COMPACT_KV}
        if unknown:
            raise ValueError(f"no stand-in for the plugin(s) {sorted(unknown)}")
        self._evaluator = ReferenceEvaluator(proto, new_ops=self._plugin_ops())

    def _plugin_ops(self) -> list[type[OpRun]]:
        engine = self

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(engine.device)

        def array(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy()

        class PostVisionStats(OpRun):
            op_domain = PLUGIN_DOMAIN

            def _run(self, q: Any, k: Any, query_start: Any, **attrs: Any) -> tuple[np.ndarray, ...]:
                engine.launches[POST_VISION_STATS] += 1
                outs = run_post_vision_stats_plugin(
                    tensor(q),
                    tensor(k),
                    tensor(np.asarray(query_start)),
                    threshold=float(attrs.get("threshold", DEFAULT_THRESHOLD)),
                    scale=float(attrs.get("scale", DEFAULT_SCALE)),
                )
                return tuple(array(o) for o in outs)

        class CompactKV(OpRun):
            op_domain = PLUGIN_DOMAIN

            def _run(self, kv: Any, indices: Any, **attrs: Any) -> tuple[np.ndarray]:
                engine.launches[COMPACT_KV] += 1
                return (array(run_compact_kv_plugin(tensor(kv), tensor(indices))),)

        return [PostVisionStats, CompactKV]

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every output of the graph for these inputs (torch tensors by name, on :attr:`device`)."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ValueError(f"engine inputs are {self.input_names}; missing {missing}, unexpected {extra}")
        arrays = {name: feeds[name].detach().cpu().contiguous().numpy() for name in self.input_names}
        results = self._evaluator.run(None, arrays)
        return {name: torch.from_numpy(np.asarray(r)).to(self.device) for name, r in zip(self.output_names, results)}
