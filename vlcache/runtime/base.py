"""`Runner`: what a backend provides to the shared generation loop (:mod:`vlcache.runtime.loop`).

A runner executes the exported graphs (ONNX Runtime, TensorRT engines). The loop owns everything
else: image-token merge, positions, scoring with :mod:`vlcache.methods`, budgets from
:mod:`vlcache.core`, compaction, greedy decode and the stats. Batch size 1.

Tensors handed back by :meth:`Runner.forward` (KV entries, queries) are the runner's own type
(``Handle``: a numpy array, an ``OrtValue``, a CUDA torch tensor); the loop only moves them
between calls and converts to torch with :meth:`Runner.to_torch` where scoring needs them. The
default scoring and compaction run :mod:`vlcache.core` on those torch tensors; a runner overrides
:meth:`Runner.post_vision_stats` / :meth:`Runner.compact` to run the ``vlcache`` ops instead.
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
#: per layer (keys, values), each (1, H_kv, len_l, D)
Cache = list[tuple[Handle, Handle]]


@dataclass
class StepOutput:
    """One decoder call: ``logits`` (V,) float32 numpy of the last row; ``cache`` the present KV
    (past + new, per layer); ``queries`` per layer (1, H_q, n, D) after RoPE."""

    logits: np.ndarray
    cache: Cache
    queries: list[Handle]


class Runner(ABC):
    """A backend executing one export directory (see :class:`~vlcache.export.spec.ExportSpec`)."""

    backend: ClassVar[str]

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
    def empty_cache(self) -> Cache:
        """Every layer's (keys, values) with length 0, for prefill."""

    @abstractmethod
    def forward(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, cache: Cache) -> StepOutput:
        """Run the decoder on (1, n, hidden) embeddings at (1, n) positions after ``cache``."""

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
