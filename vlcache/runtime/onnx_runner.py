"""`OnnxRunner`: the exported graphs on ONNX Runtime (CPU by default).

The decoder runs through an ``IOBinding``, in the form ``export.json``'s ``attention`` names:

* ``fused`` (the default export): every layer's keys and values live in numpy buffers
  (B, H_kv, capacity, D) allocated once per request (:meth:`OnnxRunner.empty_cache`, and
  :meth:`OnnxRunner.compact_layer` after compaction) and wrapped without a copy as ``OrtValue``s.
  Each step binds the **same** ``OrtValue`` as ``past_key.l`` and ``present_key.l`` (values
  alike) with the per-row lengths ``past_length.l``; ``com.microsoft.GroupQueryAttention`` then
  sees one buffer for past and present and writes only the n new entries at each row's length —
  no copy of the cache per step (checked in the tests: the buffer's address is the same every
  step, and entries beyond the valid length keep their old contents, which a kernel working on a
  separate present buffer would zero). A buffer whose room runs out is grown (copied once into
  one twice as large). A decode policy's eviction shifts the entries inside the buffer.
* ``standard``: each step's ``present_*`` outputs stay ORT-owned ``OrtValue``s and are bound as
  the next step's ``past_*`` inputs (no numpy round trip), and the graph's ``Concat`` appends —
  a new, one-longer tensor per layer and step, as transformers' ``DynamicCache`` does with
  ``torch.cat``.

Scoring runs the ``vlcache.PostVisionStats`` op (local function, native ORT kernels) in a small
session built for the config's threshold and the model's attention scale; compaction runs the
``vlcache.CompactKV`` graph of the export directory (on the fused decoder, its result is copied
into the layer's new, smaller buffer). Handles are numpy arrays or ``OrtValue``s;
:meth:`OnnxRunner.to_torch` converts on demand (a view of a numpy buffer, no copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlcache.config import DEFAULT_PREFILL_CHUNK
from vlcache.core.sparsity import DEFAULT_THRESHOLD
from vlcache.export import names
from vlcache.export.spec import ExportSpec
from vlcache.runtime.base import Cache, Handle, LayerKV, Runner, StepOutput

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
        prefill_chunk: prompt tokens per decoder call of a prefill (None: the whole prompt at once).
            Chunks write into the same buffers (fused) or append (standard) and give the same result;
            causal attention then skips what a whole-prompt call computes above the diagonal.
    """

    backend = "onnx"

    def __init__(
        self,
        directory: str | Path,
        spec: ExportSpec | None = None,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        super().__init__(directory, spec or ExportSpec.load(directory))
        ort = _import_ort()
        self._ort = ort
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        if prefill_chunk is not None and (
            isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1
        ):
            raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
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
        #: the decoder's attention (``fused``: preallocated buffers written in place; ``standard``: Concat)
        self.attention = self.spec.attention
        self.fused = self.attention == names.ATTENTION_FUSED
        self._check_decoder()
        self._outputs = [o.name for o in self.decoder.get_outputs()]

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
            if self.fused:
                want_in.add(names.past_length(layer))
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

    def empty_cache(self, capacity: int = 0, batch: int = 1) -> Cache:
        spec = self.spec
        if not isinstance(batch, int) or batch < 1 or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"batch must be >= 1 and capacity >= 0, got {batch!r} and {capacity!r}")
        shape = (batch, spec.num_kv_heads, capacity if self.fused else 0, spec.head_dim)
        return [
            LayerKV(np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(batch, dtype=np.int64))
            for _ in range(spec.num_layers)
        ]

    def _buffer(self, batch: int, capacity: int) -> np.ndarray:
        return np.zeros((batch, self.spec.num_kv_heads, capacity, self.spec.head_dim), dtype=np.float32)

    def _room(self, kv: LayerKV, n: int) -> LayerKV:
        """``kv`` itself when its buffers hold n more entries per row, else a copy twice as large."""
        keys = np.asarray(kv.keys)
        need = int(kv.lengths.max()) + n
        capacity = keys.shape[2]
        if need <= capacity:
            return kv
        grown = max(need, 2 * capacity)
        new_k, new_v = self._buffer(keys.shape[0], grown), self._buffer(keys.shape[0], grown)
        new_k[:, :, :capacity] = keys
        new_v[:, :, :capacity] = np.asarray(kv.values)
        return LayerKV(new_k, new_v, kv.lengths)

    def _bind(self, io: Any, name: str, value: Handle, keep: list[np.ndarray]) -> None:
        if isinstance(value, self._ort.OrtValue):
            io.bind_ortvalue_input(name, value)
        else:
            array = np.ascontiguousarray(value)
            keep.append(array)  # the binding may point at this memory until the run is over
            io.bind_cpu_input(name, array)

    def forward(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, cache: Cache) -> StepOutput:
        spec = self.spec
        if len(cache) != spec.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {spec.num_layers}")
        embeds = np.ascontiguousarray(inputs_embeds, np.float32)
        positions = np.ascontiguousarray(position_ids, np.int64)
        batch, n = embeds.shape[0], embeds.shape[1]
        if positions.shape != (batch, n):
            raise ValueError(f"position_ids must be {(batch, n)}, got {positions.shape}")
        for kv in cache:
            if kv.lengths.shape != (batch,):
                raise ValueError(
                    f"the cache's lengths must be ({batch},) for a batch of {batch}, got {kv.lengths.shape}"
                )
        io = self.decoder.io_binding()
        io.bind_cpu_input(names.INPUTS_EMBEDS, embeds)
        io.bind_cpu_input(names.POSITION_IDS, positions)
        keep: list[Any] = [embeds, positions]
        bound: list[str] = []  # output names in binding order: the order of io.get_outputs()
        if self.fused:
            if n > 1 and batch > 1 and any(kv.lengths.any() for kv in cache):
                raise ValueError(
                    "ONNX Runtime's GroupQueryAttention takes several new tokens after a non-empty cache only at "
                    "batch size 1; feed the rows one by one (single-token steps take any per-row lengths)"
                )
            cache = [self._room(kv, n) for kv in cache]
            for layer, kv in enumerate(cache):
                lengths = np.ascontiguousarray(kv.lengths, np.int64)
                keep.append(lengths)
                io.bind_cpu_input(names.past_length(layer), lengths)
                for past, present, buffer in (
                    (names.past_key(layer), names.present_key(layer), kv.keys),
                    (names.past_value(layer), names.present_value(layer), kv.values),
                ):
                    # one OrtValue over the numpy buffer (no copy) as input and output: the kernel
                    # sees past is present and writes the new entries into it
                    value = self._ort.OrtValue.ortvalue_from_numpy(buffer)
                    keep.append(value)
                    io.bind_ortvalue_input(past, value)
                    io.bind_ortvalue_output(present, value)
                    bound.append(present)
            for name in (names.LOGITS, *(names.query(i) for i in range(spec.num_layers))):
                io.bind_output(name, "cpu")
                bound.append(name)
        else:
            for layer, kv in enumerate(cache):
                if self.shape(kv.keys)[2] != int(kv.lengths.max(initial=0)) or kv.lengths.min() != kv.lengths.max():
                    raise ValueError(
                        "the standard decoder takes caches whose rows all hold exactly their tensor's length"
                    )
                self._bind(io, names.past_key(layer), kv.keys, keep)
                self._bind(io, names.past_value(layer), kv.values, keep)
            for name in self._outputs:
                io.bind_output(name, "cpu")
                bound.append(name)
        self.decoder.run_with_iobinding(io)
        del keep
        out = dict(zip(bound, io.get_outputs()))
        if self.fused:
            for layer, kv in enumerate(cache):  # cheap guard: ONNX Runtime wrote into our buffers
                if out[names.present_key(layer)].data_ptr() != kv.keys.ctypes.data:
                    raise RuntimeError(f"ONNX Runtime did not write layer {layer}'s keys into the bound KV buffer")
            new_cache = [LayerKV(kv.keys, kv.values, kv.lengths + n) for kv in cache]
        else:
            new_cache = [
                LayerKV(out[names.present_key(i)], out[names.present_value(i)], kv.lengths + n)
                for i, kv in enumerate(cache)
            ]
        queries = [out[names.query(i)] for i in range(spec.num_layers)]
        logits = out[names.LOGITS].numpy()[:, -1]
        return StepOutput(logits=logits, cache=new_cache, queries=queries)

    # --- the cache -------------------------------------------------------------------------------
    def compact_layer(self, kv: LayerKV, indices: torch.Tensor, capacity: int) -> LayerKV:
        """Runs ``vlcache.CompactKV``; on the fused decoder the kept entries then go into new buffers
        of ``capacity`` (≥ k) entries per row, which the decode steps write into."""
        if not self.fused:
            return super().compact_layer(kv, indices, capacity)
        batch, _, k = indices.shape
        if capacity < k:
            raise ValueError(f"capacity {capacity} cannot hold the {k} kept entries")
        out = LayerKV(self._buffer(batch, capacity), self._buffer(batch, capacity), np.full(batch, k, np.int64))
        out.keys[:, :, :k] = self.compact(kv.keys, indices)
        out.values[:, :, :k] = self.compact(kv.values, indices)
        return out

    def evict(self, kv: LayerKV, index: int) -> LayerKV:
        """On the fused decoder: shifts the entries after ``index`` one place down inside the buffers."""
        if not self.fused:
            return super().evict(kv, index)
        n = kv.length
        if not 0 <= index < n:
            raise ValueError(f"cannot evict entry {index} of a layer holding {n}")
        for buffer in (kv.keys, kv.values):
            buffer[:, :, index : n - 1] = buffer[:, :, index + 1 : n]  # numpy copes with the overlap
        return LayerKV(kv.keys, kv.values, kv.lengths - 1)

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
