"""`TensorRTRunner`: TensorRT engines built from the exported graphs. **Never run on a GPU yet.**

TensorRT cannot be installed on this project's development and CI machines, so this runner is
written against TensorRT 10's Python API (``deserialize_cuda_engine``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and kept thin: it only executes engines. Everything
else — image merge, scoring, budgets, compaction, decode — is the shared loop of
:mod:`vlcache.runtime.loop`, tested on CPU through :class:`~vlcache.runtime.onnx_runner.OnnxRunner`.
Scoring and compaction default to :mod:`vlcache.core` on the CUDA tensors (the fused plugin kernels
are the TensorRT build's business).

Engines are listed in ``export.json`` under ``engines`` (role -> file: ``vision``, ``embed``,
``decoder``), with the ONNX graphs' tensor names. ``tensorrt`` is imported when a runner is built
(:func:`vlcache.runtime.tensorrt_support.import_tensorrt`); without it (or without a CUDA device)
construction raises a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlcache.export import names
from vlcache.export.spec import ExportSpec
from vlcache.runtime.base import Cache, Handle, LayerKV, Runner, StepOutput
from vlcache.runtime.tensorrt_support import import_tensorrt


class TensorRTRunner(Runner):
    """Runs TensorRT engines listed in an export directory's ``export.json`` (CUDA, batch size 1)."""

    backend = "tensorrt"

    def __init__(self, directory: str | Path, spec: ExportSpec | None = None, *, device: str = "cuda") -> None:
        super().__init__(directory, spec or ExportSpec.load(directory))
        trt = import_tensorrt(needed_by="the tensorrt backend")
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA GPU; none is visible. Use backend='onnx'.")
        missing = [r for r in ("embed", "decoder") if r not in self.spec.engines]
        if missing:
            raise ValueError(
                f"{directory}: export.json lists no TensorRT engine for {missing}; build engines first "
                "(vlcache-build --backend tensorrt)"
            )
        self._trt = trt
        self.device = torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        for role, file in self.spec.engines.items():
            path = Path(directory) / file
            if not path.is_file():
                raise ValueError(f"engine {path} listed in export.json is missing")
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version?)")
            self._engines[role] = engine
            self._contexts[role] = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self.device)

    def _dtype(self, trt_dtype: Any) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[trt_dtype]

    def _run(self, role: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine, ctx = self._engines[role], self._contexts[role]
        keep = []
        for name, tensor in feeds.items():
            t = tensor.to(self.device).contiguous()
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != self._trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtype(engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of the {role} engine failed")
        self._stream.synchronize()
        return outputs

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

    def close(self) -> None:
        self._contexts.clear()
        self._engines.clear()
