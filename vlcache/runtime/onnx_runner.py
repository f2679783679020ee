"""`OnnxRunner`: the exported graphs on ONNX Runtime (CPU by default).

* The decoder runs through an ``IOBinding``: each step's ``present_*`` outputs stay ORT-owned
  ``OrtValue``s and are bound as the next step's ``past_*`` inputs, so the cache is not copied
  between numpy and ONNX Runtime on every token (the graph's ``Concat`` appends, as transformers'
  ``DynamicCache`` does with ``torch.cat``).
* Scoring runs the ``vlcache.PostVisionStats`` op (local function, native ORT kernels) in a small
  session built for the config's threshold and the model's attention scale; compaction runs the
  ``vlcache.CompactKV`` graph of the export directory.
* Handles are numpy arrays or ``OrtValue``s; :meth:`OnnxRunner.to_torch` converts on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlcache.core.sparsity import DEFAULT_THRESHOLD
from vlcache.export import names
from vlcache.export.spec import ExportSpec
from vlcache.runtime.base import Cache, Handle, Runner, StepOutput

_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(int64)": 8, "tensor(int32)": 4}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - the onnx extra is installed by scripts/setup.sh
        raise ImportError(
            "the ONNX runtime backend needs onnxruntime: pip install 'vlcache[onnx]' (or onnxruntime>=1.20)"
        ) from e
    return onnxruntime


class OnnxRunner(Runner):
    """Runs an export directory with ONNX Runtime.

    Args:
        directory: what :func:`vlcache.export.export_llava` wrote.
        spec: its parsed ``export.json`` (read from ``directory`` when None).
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        providers: execution providers, default ``["CPUExecutionProvider"]``.
    """

    backend = "onnx"

    def __init__(
        self,
        directory: str | Path,
        spec: ExportSpec | None = None,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__(directory, spec or ExportSpec.load(directory))
        ort = _import_ort()
        self._ort = ort
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._options = opts
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.decoder = self._session("decoder")
        self.embedder = self._session("embed")
        self.vision = self._session("vision") if "vision" in self.spec.graphs else None
        self.compactor = self._session("compact_kv")
        self._scorers: dict[tuple[float, float], Any] = {}
        self._scorer(DEFAULT_THRESHOLD, self.spec.attention_scale)  # built now, not inside the first prefill
        self._check_decoder()
        self._outputs = [o.name for o in self.decoder.get_outputs()]
        self._present = {name: i for i, name in enumerate(self._outputs)}

    def _session(self, role: str) -> Any:
        path = self.spec.graph_path(self.directory, role)
        if not path.is_file():
            raise ValueError(f"{path} is missing from the export directory {self.directory}")
        return self._ort.InferenceSession(str(path), self._options, providers=self.providers)

    def _check_decoder(self) -> None:
        spec = self.spec
        inputs = {i.name for i in self.decoder.get_inputs()}
        outputs = {o.name for o in self.decoder.get_outputs()}
        want_in = {names.INPUTS_EMBEDS, names.POSITION_IDS}
        want_out = {names.LOGITS}
        for layer in range(spec.num_layers):
            want_in |= {names.past_key(layer), names.past_value(layer)}
            want_out |= {names.present_key(layer), names.present_value(layer), names.query(layer)}
        if not want_in <= inputs or not want_out <= outputs:
            missing = sorted((want_in - inputs) | (want_out - outputs))
            raise ValueError(f"{self.directory}: decoder graph does not match export.json (missing {missing[:4]} ...)")

    # --- graphs ----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise ValueError("this export has no vision graph")
        out = self.vision.run(
            [names.IMAGE_FEATURES], {names.PIXEL_VALUES: np.ascontiguousarray(pixel_values, np.float32)}
        )
        return np.asarray(out[0])

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        out = self.embedder.run([names.INPUTS_EMBEDS], {names.INPUT_IDS: np.ascontiguousarray(input_ids, np.int64)})
        return np.asarray(out[0])

    def empty_cache(self) -> Cache:
        spec = self.spec
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
        return [(empty, empty) for _ in range(spec.num_layers)]

    def _bind(self, io: Any, name: str, value: Handle, keep: list[np.ndarray]) -> None:
        if isinstance(value, self._ort.OrtValue):
            io.bind_ortvalue_input(name, value)
        else:
            array = np.ascontiguousarray(value)
            keep.append(array)  # the binding may point at this memory until the run is over
            io.bind_cpu_input(name, array)

    def forward(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, cache: Cache) -> StepOutput:
        if len(cache) != self.spec.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {self.spec.num_layers}")
        io = self.decoder.io_binding()
        embeds = np.ascontiguousarray(inputs_embeds, np.float32)
        positions = np.ascontiguousarray(position_ids, np.int64)
        io.bind_cpu_input(names.INPUTS_EMBEDS, embeds)
        io.bind_cpu_input(names.POSITION_IDS, positions)
        keep: list[np.ndarray] = [embeds, positions]
        for layer, (k, v) in enumerate(cache):
            self._bind(io, names.past_key(layer), k, keep)
            self._bind(io, names.past_value(layer), v, keep)
        for name in self._outputs:
            io.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(io)
        del keep
        values = io.get_outputs()
        get = self._present
        new_cache = [
            (values[get[names.present_key(i)]], values[get[names.present_value(i)]])
            for i in range(self.spec.num_layers)
        ]
        queries = [values[get[names.query(i)]] for i in range(self.spec.num_layers)]
        logits = values[get[names.LOGITS]].numpy()[0, -1]
        return StepOutput(logits=logits, cache=new_cache, queries=queries)

    # --- tensors ---------------------------------------------------------------------------------
    def _numpy(self, value: Handle) -> np.ndarray:
        return value.numpy() if isinstance(value, self._ort.OrtValue) else np.asarray(value)

    def to_torch(self, value: Handle) -> torch.Tensor:
        return torch.from_numpy(self._numpy(value))

    def from_torch(self, tensor: torch.Tensor) -> Handle:
        return np.ascontiguousarray(tensor.detach().cpu().numpy())

    def nbytes(self, value: Handle) -> int:
        if isinstance(value, self._ort.OrtValue):
            return int(np.prod(value.shape())) * _ITEMSIZE.get(value.data_type(), 4)
        return int(np.asarray(value).nbytes)

    def shape(self, value: Handle) -> tuple[int, ...]:
        if isinstance(value, self._ort.OrtValue):
            return tuple(int(s) for s in value.shape())
        return tuple(np.asarray(value).shape)

    # --- the vlcache ops ---------------------------------------------------------------------------
    def _scorer(self, threshold: float, scale: float) -> Any:
        key = (float(threshold), float(scale))
        if key not in self._scorers:
            from vlcache.export.ops import post_vision_stats_model

            model = post_vision_stats_model(self.spec.opset, threshold=threshold, scale=scale)
            self._scorers[key] = self._ort.InferenceSession(
                model.SerializeToString(), self._options, providers=self.providers
            )
        return self._scorers[key]

    def post_vision_stats(
        self, queries: torch.Tensor, keys: torch.Tensor, query_start: int, threshold: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs ``vlcache.PostVisionStats`` (see :mod:`vlcache.export.ops`)."""
        scores, density = self._scorer(threshold, scale).run(
            [names.SCORE_SCORES, names.SCORE_DENSITY],
            {
                names.SCORE_QUERIES: np.ascontiguousarray(queries.detach().cpu().numpy(), np.float32),
                names.SCORE_KEYS: np.ascontiguousarray(keys.detach().cpu().numpy(), np.float32),
                names.SCORE_QUERY_START: np.array(query_start, dtype=np.int64),
            },
        )
        return torch.from_numpy(np.asarray(scores)), torch.from_numpy(np.asarray(density))

    def compact(self, value: Handle, indices: torch.Tensor) -> Handle:
        """Runs ``vlcache.CompactKV`` from the export's ``compact_kv.onnx``."""
        out = self.compactor.run(
            [names.COMPACT_KEPT],
            {
                names.COMPACT_KV_INPUT: np.ascontiguousarray(self._numpy(value)),
                names.COMPACT_INDICES: np.ascontiguousarray(indices.detach().cpu().numpy(), np.int64),
            },
        )
        return np.asarray(out[0])

    def close(self) -> None:
        self._scorers.clear()
