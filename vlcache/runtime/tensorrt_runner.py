"""`TensorRTRunner`: TensorRT engines built from the exported graphs. **Never run on a GPU yet.**

TensorRT cannot be installed on this project's development and CI machines, so this runner is
written against TensorRT 10's Python API (``deserialize_cuda_engine``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and kept thin: it only executes engines. Everything
else — image merge, budgets, selection, decode — is the shared loop of :mod:`vlcache.runtime.loop`.

Engines are listed in ``export.json`` under ``engines`` (role -> file), with the ONNX graphs' tensor
names: ``vision`` (optional), ``embed``, ``decoder``, and the two plugin engines a TensorRT build
(:func:`vlcache_plugins.build.build_engines`) makes from the export's op graphs:

* ``post_vision_stats`` — the ``vlcache::PostVisionStats`` plugin (the fused OpenAI-Triton kernel of
  :mod:`vlcache_plugins.kernels`, compiled ahead of time into the engine) and the two standard nodes
  that reduce its ``group_sparsity`` to ``density``. :meth:`TensorRTRunner.post_vision_stats` runs it,
  so VL-Cache scores and densities come from the plugin, not from torch. The kernel's threshold and
  scale are compile-time constants recorded in ``plugins.json``
  (:class:`~vlcache.runtime.tensorrt_support.PluginSettings`); a request for another threshold (or a
  model whose scale differs) is refused with a clear error rather than scored with the wrong one.
* ``compact_kv`` — the ``vlcache::CompactKV`` plugin: :meth:`TensorRTRunner.compact` and
  :meth:`TensorRTRunner.compact_layer` (and so the decode policies' :meth:`~Runner.evict`) run it.

Both are required: an export without them is refused at construction, naming the missing roles.

Every op goes through one seam, :meth:`TensorRTRunner._run` ``(role, feeds) -> outputs``, which calls
``run(feeds)`` on the role's :class:`Engine`. By default each engine file is deserialized into a
:class:`TensorRTEngine` (needs ``tensorrt`` and a CUDA device:
:func:`vlcache.runtime.tensorrt_support.import_tensorrt`, otherwise construction raises a clear
error); ``engine_loader=`` opens them some other way instead. The CPU tests use that seam: the
plugin roles are backed by :class:`vlcache_plugins.standin.InterpretedEngine` (the rewritten plugin
graph whose plugin nodes launch the same Triton kernels under ``TRITON_INTERPRET=1``) and the graph
roles by ONNX Runtime sessions, and the runner's ops must equal :mod:`vlcache.core`
(``tests/test_tensorrt_runner.py``). What that does not cover — TensorRT itself, the engines' AOT
kernels on a GPU — has never run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vlcache.export import names
from vlcache.export.spec import ExportSpec
from vlcache.runtime.base import Cache, Handle, LayerKV, Runner, StepOutput
from vlcache.runtime.tensorrt_support import (
    COMPACT_ROLE,
    PLUGIN_ROLES,
    SCORE_ROLE,
    PluginSettings,
    import_tensorrt,
)

#: engine roles every TensorRT export must have (``vision`` is optional)
REQUIRED_ROLES = ("embed", "decoder", *PLUGIN_ROLES)


class Engine(Protocol):
    """What the runner needs of an engine: run it once on named inputs, get every output by name."""

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


#: opens the engine of one role from its file: ``(role, path) -> Engine``
EngineLoader = Callable[[str, Path], Engine]


class TensorRTEngine:
    """A deserialized TensorRT engine with its execution context, run on one CUDA stream.

    Inputs are moved to the device and cast to the engine's input types; outputs are allocated with
    the shapes TensorRT infers from the input shapes (no data-dependent shapes in these engines).
    """

    def __init__(self, trt: Any, runtime: Any, path: Path, device: torch.device, stream: Any) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version?)")
        self._trt, self.path, self.device, self._stream = trt, path, device, stream
        self.engine = engine
        self.context = engine.create_execution_context()
        names_ = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names_ if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names_ if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _dtype(self, trt_dtype: Any) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[trt_dtype]

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine, ctx = self.engine, self.context
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: inputs {missing} not fed")
        keep = []
        for name in self.input_names:
            t = feeds[name].to(device=self.device, dtype=self._dtype(engine.get_tensor_dtype(name))).contiguous()
            keep.append(t)  # the engine reads this memory until the stream is synchronised
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtype(engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")
        self._stream.synchronize()
        return outputs


class TensorRTRunner(Runner):
    """Runs TensorRT engines listed in an export directory's ``export.json`` (CUDA, batch size 1).

    Args:
        directory: a TensorRT build's folder (``export.json`` with ``engines``, ``plugins.json``).
        spec: its parsed ``export.json`` (read from ``directory`` when None).
        device: the CUDA device the engines run on (``cpu`` only with an ``engine_loader`` whose
            engines run there).
        engine_loader: opens each engine file some other way than TensorRT (None: deserialize it
            with TensorRT, which needs ``tensorrt`` and a CUDA device).

    Raises:
        TensorRTUnavailableError: no ``tensorrt`` (without ``engine_loader``).
        RuntimeError: no CUDA device (without ``engine_loader``), or an engine does not deserialize.
        ValueError: ``export.json`` lists no engine for a required role (``embed``, ``decoder``, and
            the plugin engines ``post_vision_stats``, ``compact_kv``), an engine file is missing, or
            ``plugins.json`` is missing.
    """

    backend = "tensorrt"

    def __init__(
        self,
        directory: str | Path,
        spec: ExportSpec | None = None,
        *,
        device: str = "cuda",
        engine_loader: EngineLoader | None = None,
    ) -> None:
        super().__init__(directory, spec or ExportSpec.load(directory))
        self.device = torch.device(device)
        if engine_loader is None:
            engine_loader = self._tensorrt_loader()
        self._check_roles()
        #: compile-time constants of the PostVisionStats engine
        self.plugin_settings = PluginSettings.load(directory)
        self._engines: dict[str, Engine] = {}
        for role, file in self.spec.engines.items():
            path = Path(directory) / file
            if not path.is_file():
                raise ValueError(f"engine {path} listed in export.json is missing")
            self._engines[role] = engine_loader(role, path)

    def _tensorrt_loader(self) -> EngineLoader:
        trt = import_tensorrt(needed_by="the tensorrt backend")
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA GPU; none is visible. Use backend='onnx'.")
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        stream = torch.cuda.Stream(device=self.device)
        return lambda role, path: TensorRTEngine(trt, runtime, path, self.device, stream)

    def _check_roles(self) -> None:
        missing = [r for r in REQUIRED_ROLES if r not in self.spec.engines]
        if not missing:
            return
        plugins = [r for r in missing if r in PLUGIN_ROLES]
        why = (
            f"; {' and '.join(plugins)} are the VL-Cache plugin engines (PostVisionStats, CompactKV) this backend "
            "scores and compacts with"
            if plugins
            else ""
        )
        raise ValueError(
            f"{self.directory}: export.json lists no TensorRT engine for {missing}{why}; build the engines with "
            "vlcache-build --backend tensorrt (vlcache_plugins.build.build_engines)"
        )

    def _run(self, role: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the engine of ``role`` (the seam every graph and op call of this runner goes through)."""
        engine = self._engines.get(role)
        if engine is None:
            raise ValueError(f"this export has no {role} engine (it has: {', '.join(sorted(self._engines))})")
        return engine.run(feeds)

    # --- graphs ----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if "vision" not in self._engines:
            raise ValueError("this export has no vision engine")
        out = self._run("vision", {names.PIXEL_VALUES: torch.from_numpy(np.asarray(pixel_values, np.float32))})
        return out[names.IMAGE_FEATURES].float().cpu().numpy()

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        out = self._run("embed", {names.INPUT_IDS: torch.from_numpy(np.asarray(input_ids, np.int64))})
        return out[names.INPUTS_EMBEDS].float().cpu().numpy()

    def empty_cache(self, capacity: int = 0, batch: int = 1) -> Cache:
        """Zero-length tensors: the engines are built from the standard decoder, which appends by
        concatenation (``capacity`` is not used)."""
        spec = self.spec
        empty = torch.zeros(batch, spec.num_kv_heads, 0, spec.head_dim, device=self.device)
        return [LayerKV(empty, empty, np.zeros(batch, dtype=np.int64)) for _ in range(spec.num_layers)]

    def forward(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, cache: Cache) -> StepOutput:
        feeds = {
            names.INPUTS_EMBEDS: torch.from_numpy(np.asarray(inputs_embeds, np.float32)),
            names.POSITION_IDS: torch.from_numpy(np.asarray(position_ids, np.int64)),
        }
        for layer, kv in enumerate(cache):
            feeds[names.past_key(layer)] = kv.keys
            feeds[names.past_value(layer)] = kv.values
        out = self._run("decoder", feeds)
        n = self.spec.num_layers
        new = int(inputs_embeds.shape[1])
        return StepOutput(
            logits=out[names.LOGITS][:, -1].float().cpu().numpy(),
            cache=[
                LayerKV(out[names.present_key(i)], out[names.present_value(i)], kv.lengths + new)
                for i, kv in enumerate(cache)
            ],
            queries=[out[names.query(i)] for i in range(n)],
        )

    # --- tensors ---------------------------------------------------------------------------------
    def to_torch(self, value: Handle) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)

    def from_torch(self, tensor: torch.Tensor) -> Handle:
        return tensor.to(self.device).contiguous()

    def nbytes(self, value: Handle) -> int:
        return int(value.numel() * value.element_size())

    def shape(self, value: Handle) -> tuple[int, ...]:
        return tuple(value.shape)

    # --- the VL-Cache ops: the plugin engines ------------------------------------------------------
    def post_vision_stats(
        self, queries: torch.Tensor, keys: torch.Tensor, query_start: int, threshold: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vlcache.PostVisionStats`` on the ``post_vision_stats`` engine (the PostVisionStats plugin).

        Raises:
            ValueError: the engine was compiled for another threshold or scale (``plugins.json``).
        """
        resolved = float(scale) if scale else float(queries.shape[-1]) ** -0.5  # 0 means 1/√D (op contract)
        built = self.plugin_settings
        if not built.serves(float(threshold), resolved):
            raise ValueError(
                f"the {SCORE_ROLE} engine of {self.directory} was compiled for threshold p={built.threshold:g} and "
                f"scale {built.scale:g} (compile-time constants of the PostVisionStats plugin); this call asks for "
                f"p={float(threshold):g}, scale {resolved:g}. Rebuild the engines for that threshold "
                "(vlcache_plugins.build.build_engines(..., threshold=p)) or serve it with the onnx backend"
            )
        out = self._run(
            SCORE_ROLE,
            {
                names.SCORE_QUERIES: queries,
                names.SCORE_KEYS: keys,
                names.SCORE_QUERY_START: torch.tensor(int(query_start), dtype=torch.int64),
            },
        )
        return out[names.SCORE_SCORES], out[names.SCORE_DENSITY]

    def compact(self, value: Handle, indices: torch.Tensor) -> Handle:
        """``vlcache.CompactKV`` on the ``compact_kv`` engine (the CompactKV plugin)."""
        out = self._run(
            COMPACT_ROLE,
            {names.COMPACT_KV_INPUT: self.to_torch(value), names.COMPACT_INDICES: indices.to(torch.int64)},
        )
        return out[names.COMPACT_KEPT]

    def compact_layer(self, kv: LayerKV, indices: torch.Tensor, capacity: int) -> LayerKV:
        """Keys and values through the CompactKV engine; the result holds exactly k entries per row
        (the engines' decoder appends by concatenation, so ``capacity`` is not used)."""
        k = int(indices.shape[-1])
        lengths = np.full(len(kv.lengths), k, dtype=np.int64)
        return LayerKV(self.compact(kv.keys, indices), self.compact(kv.values, indices), lengths)

    def close(self) -> None:
        self._engines.clear()
