"""`Runner`: what a backend provides to the shared generation of :mod:`vlcache.runtime.loop`.

A runner executes the exported graphs (ONNX Runtime, TensorRT engines) and supplies the ops the one
compression pipeline (:mod:`vlcache.pipeline`, through :class:`vlcache.runtime.loop.RunnerCache`)
runs on its cache: :meth:`Runner.post_vision_stats` (scoring of the methods that declare post-vision
scores), :meth:`Runner.compact_layer` / :meth:`Runner.compact` (compaction) and :meth:`Runner.evict`
(a decode policy's eviction). The loop owns everything else: image-token merge, positions, the
pipeline's scoring, budgets and selection, greedy decode (:mod:`vlcache.stream`) and the stats. It
runs one prompt at a time; :meth:`Runner.forward` takes a batch (rows with their own cache lengths
where the graph allows).

The cache is one :class:`LayerKV` per layer: key/value tensors (B, H_kv, C, D) of **capacity** C
whose first ``lengths[b]`` entries of row b are valid. A runner whose graph appends by
concatenation (the ``standard`` decoder, TensorRT) keeps C equal to the length and hands back new
tensors every step; the ONNX Runtime runner on the ``fused`` decoder allocates C once per request
(:meth:`Runner.empty_cache`, :meth:`Runner.compact_layer`) and writes every step into the same
buffers.

Tensors handed back by :meth:`Runner.forward` (KV buffers, queries) are the runner's own type
(``Handle``: a numpy array, an ``OrtValue``, a CUDA torch tensor); the loop only moves them
between calls and converts to torch with :meth:`Runner.to_torch` where scoring needs them. The
default scoring and compaction run :mod:`vlcache.core` on those torch tensors; a runner overrides
:meth:`Runner.post_vision_stats` / :meth:`Runner.compact` / :meth:`Runner.compact_layer` to run the
``vlcache`` ops instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vlcache.core import compact as core_compact
from vlcache.core import post_vision_statistics
from vlcache.export.spec import ExportSpec

Handle = Any


@dataclass
class LayerKV:
    """One layer's cache: ``keys`` / ``values`` (B, H_kv, C, D) handles of capacity C (keys after
    RoPE) whose first ``lengths[b]`` entries of row b are valid; ``lengths`` int64 (B,)."""

    keys: Handle
    values: Handle
    lengths: np.ndarray

    @property
    def length(self) -> int:
        """The valid length when every row holds the same number of entries (always at batch size 1)."""
        first = int(self.lengths[0])
        if (self.lengths != first).any():
            raise ValueError(f"the rows of this cache hold different lengths {self.lengths.tolist()}")
        return first


#: one LayerKV per layer
Cache = list[LayerKV]


@dataclass
class StepOutput:
    """One decoder call: ``logits`` (B, V) float32 numpy of each row's last position; ``cache`` the
    cache after the step (per layer, ``lengths`` advanced by n; the same buffers when the runner
    writes in place); ``queries`` per layer (B, H_q, n, D) after RoPE."""

    logits: np.ndarray
    cache: Cache
    queries: list[Handle]


class Runner(ABC):
    """A backend executing one export directory (see :class:`~vlcache.export.spec.ExportSpec`)."""

    backend: ClassVar[str]
    #: prompt tokens per decoder call of a prefill (:class:`vlcache.runtime.loop.PromptPrefill`); None:
    #: the whole prompt in one call
    prefill_chunk: int | None = None

    def __init__(self, directory: str | Path, spec: ExportSpec) -> None:
        self.directory = Path(directory)
        self.spec = spec

    # --- graphs ----------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, P, hidden) float32 image features."""

    @abstractmethod
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """(1, n) int64 -> (1, n, hidden) float32."""

    @abstractmethod
    def empty_cache(self, capacity: int = 0, batch: int = 1) -> Cache:
        """Every layer with length 0, for prefill: buffers with room for ``capacity`` entries per row
        where the runner preallocates (runners that append by concatenation ignore ``capacity``)."""

    @abstractmethod
    def forward(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, cache: Cache) -> StepOutput:
        """Run the decoder on (B, n, hidden) embeddings at (B, n) positions after ``cache``.

        ``cache`` is consumed: a runner that writes in place appends into its buffers (growing one
        whose capacity is short), so only the returned :attr:`StepOutput.cache` is current."""

    # --- tensors ---------------------------------------------------------------------------------
    @abstractmethod
    def to_torch(self, value: Handle) -> torch.Tensor:
        """A torch view (or copy) of a handle."""

    @abstractmethod
    def from_torch(self, tensor: torch.Tensor) -> Handle:
        """A handle the next :meth:`forward` accepts."""

    @abstractmethod
    def nbytes(self, value: Handle) -> int:
        """Bytes a handle holds."""

    @abstractmethod
    def shape(self, value: Handle) -> tuple[int, ...]:
        """A handle's shape, without copying it."""

    # --- the cache ------------------------------------------------------------------------------
    def valid_kv(self, kv: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid (keys, values) of a layer whose rows hold one length, (B, H_kv, length, D) torch
        (views where the runner's handles allow)."""
        n = kv.length
        return self.to_torch(kv.keys)[:, :, :n], self.to_torch(kv.values)[:, :, :n]

    def kv_bytes(self, kv: LayerKV) -> int:
        """Bytes of a layer's valid entries (keys and values), whatever the buffers' capacity."""
        shape = self.shape(kv.keys)
        if shape[2] == 0:
            return 0
        per_entry = self.nbytes(kv.keys) // (shape[0] * shape[2])
        return 2 * per_entry * int(np.asarray(kv.lengths).sum())

    def kv_reserved_bytes(self, kv: LayerKV) -> int:
        """Bytes a layer's buffers hold (capacity, not length)."""
        return self.nbytes(kv.keys) + self.nbytes(kv.values)

    def compact_layer(self, kv: LayerKV, indices: torch.Tensor, capacity: int) -> LayerKV:
        """Keep entries ``indices`` (B, H_kv, k) of a layer (positions among its valid entries): a
        layer with room for ``capacity`` entries per row (runners that append by concatenation
        ignore ``capacity``: the result holds exactly k)."""
        k = int(indices.shape[-1])
        lengths = np.full(len(kv.lengths), k, dtype=np.int64)
        return LayerKV(self.compact(kv.keys, indices), self.compact(kv.values, indices), lengths)

    def evict(self, kv: LayerKV, index: int) -> LayerKV:
        """Remove entry ``index`` from a layer (batch size 1; a decode policy's eviction)."""
        n = kv.length
        keep = torch.cat([torch.arange(index), torch.arange(index + 1, n)])
        idx = keep.expand(len(kv.lengths), self.spec.num_kv_heads, n - 1).contiguous()
        return self.compact_layer(kv, idx, int(self.shape(kv.keys)[2]))

    # --- the VL-Cache ops (defaults: vlcache.core) ------------------------------------------------
    def post_vision_stats(
        self, queries: torch.Tensor, keys: torch.Tensor, query_start: int, threshold: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vlcache.PostVisionStats``: (B, H_kv, m) scores and (B,) density of one layer."""
        stats = post_vision_statistics(queries, keys, query_start, threshold=threshold, scale=scale)
        return stats.scores, stats.density

    def compact(self, value: Handle, indices: torch.Tensor) -> Handle:
        """``vlcache.CompactKV``: keep ``indices`` (B, H_kv, k) of a (B, H_kv, m, D) KV handle."""
        return self.from_torch(core_compact(self.to_torch(value), indices))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources (sessions, engines)."""
