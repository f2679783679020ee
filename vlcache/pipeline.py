"""The one compression pipeline: scores → layer budgets → kept indices → compaction → decode policy.

Every backend runs this code; a backend only supplies its cache and its ops (:class:`CacheOps`):
where a layer's keys are, how to gather kept entries (compaction) and remove one (a decode policy's
eviction), optionally a fused op for the post-vision statistics, and the attention of a new query
(default: :mod:`vlcache.core`). The backends' adapters: the runners' per-layer buffers
(:class:`vlcache.runtime.loop.RunnerCache`: ONNX Runtime, TensorRT) and transformers'
``DynamicCache`` (:mod:`vlcache.hf.session`, filled by hooks on the model).

One prompt, batch size 1, one :class:`Compression`:

1. :meth:`Compression.score_layer` once per layer, with the layer's post-RoPE query rows from
   :attr:`Compression.query_start` and its cached keys — layer by layer while the torch model runs,
   all layers after a runner's decoder pass. A method that declares post-vision scoring
   (:meth:`vlcache.methods.Method.post_vision_scores`, the ``vlcache`` family) is scored by the
   backend's fused op when the backend has one (``CacheOps.has_post_vision_op``: every runner, its
   default op being :func:`vlcache.core.post_vision_statistics`); otherwise, and for every other
   method, by :meth:`Method.score <vlcache.methods.Method.score>`.
2. :meth:`Compression.compress`: ``method.allocate`` gives per-layer budgets k_l, ``method.select``
   the kept indices of each layer with k_l < m, ``CacheOps.keep`` compacts the layer; the decode
   policy (TGV-KV) is armed with each layer's kept set; the stats are recorded.
3. :meth:`Compression.decode_step` after every single-token decode step, per layer: the decode
   policy sees the new query's attention over the layer's cache and may evict one entry.

:mod:`vlcache.core` stays framework-free; this module imports torch, :mod:`vlcache.core` and
:mod:`vlcache.methods` only.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from vlcache.core import iter_attention_chunks
from vlcache.methods import DecodePolicy, LayerInput, LayerScore, Method, PromptLayout


@dataclass
class CompressionStats:
    """What one prompt's compression (and its decoding, when a token stream ran it) did, on any backend.

    Attributes:
        method, budget: what was asked.
        prompt_tokens: m; image_tokens: how many of them are image tokens (or span tokens of a text prompt).
        kept_per_layer: tokens each layer kept after prefill (m everywhere for ``full``).
        kv_bytes_before / kv_bytes_after: the prompt's KV cache (valid entries) before and after compaction.
        backend: what ran it (``torch``, ``onnx``, ``tensorrt``).
        kv_bytes_reserved: what the cache's buffers hold after compaction, room for the decode included
            (the valid bytes where the backend sizes tensors exactly: torch, the standard decoder).
        prefill_seconds: the prompt's pass (image encoding and embedding included), scoring excluded.
        scoring_seconds: scoring, budget allocation and compaction.
        decode_seconds: the decode steps after the first token (set by :class:`vlcache.stream.TokenStream`).
        new_tokens: tokens generated (set by the token stream); decode_evictions: tokens a decode
            policy evicted (TGV-KV).
        layer_weights: what each layer gave the allocator (VL-Cache: its density).
    """

    method: str
    budget: float
    prompt_tokens: int
    image_tokens: int
    kept_per_layer: list[int]
    kv_bytes_before: int
    kv_bytes_after: int
    backend: str = ""
    kv_bytes_reserved: int = 0
    prefill_seconds: float = 0.0
    scoring_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    decode_evictions: int = 0
    layer_weights: list[float | None] = field(default_factory=list)

    #: the fields that measure time (they differ from run to run and between backends)
    TIMINGS: ClassVar[tuple[str, ...]] = ("prefill_seconds", "scoring_seconds", "decode_seconds", "decode_ms_per_token")

    @property
    def kept_fraction(self) -> float:
        """Kept KV entries over the prompt's: Σ k_l / (L · m)."""
        return sum(self.kept_per_layer) / (len(self.kept_per_layer) * self.prompt_tokens)

    @property
    def decode_ms_per_token(self) -> float | None:
        """Mean decode time per step after the first token (None with fewer than two tokens)."""
        steps = self.new_tokens - 1
        return 1000.0 * self.decode_seconds / steps if steps > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_fraction"] = self.kept_fraction
        d["decode_ms_per_token"] = self.decode_ms_per_token
        return d


class CacheOps(ABC):
    """One prompt's KV cache on a backend, and the ops the pipeline runs on it (batch size 1).

    Layers are indexed 0 .. L−1; a layer's entries are its valid cache positions in order (the
    prompt's at prefill, then the generated tokens appended). Tensors the pipeline sees are torch.
    """

    #: True when the backend computes post-vision statistics itself (:meth:`post_vision_stats`)
    has_post_vision_op: ClassVar[bool] = False

    def post_vision_stats(
        self, queries: torch.Tensor, keys: torch.Tensor, query_start: int, threshold: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, m) scores and (1,) density of one layer, as
        :func:`vlcache.core.post_vision_statistics` defines them (only when :attr:`has_post_vision_op`)."""
        raise NotImplementedError(f"{type(self).__name__} has no post-vision statistics op")

    @abstractmethod
    def keys(self, layer: int) -> torch.Tensor:
        """The layer's valid keys (1, H_kv, n, D), after RoPE."""

    @abstractmethod
    def keep(self, layer: int, indices: torch.Tensor) -> None:
        """Compaction: keep only entries ``indices`` (1, H_kv, k) of the layer, in that order."""

    @abstractmethod
    def evict(self, layer: int, index: int) -> None:
        """Remove entry ``index`` from the layer (every head)."""

    @abstractmethod
    def lengths(self) -> list[int]:
        """Valid entries per layer."""

    @abstractmethod
    def kv_bytes(self) -> int:
        """Bytes of the valid keys and values, all layers."""

    def kv_reserved_bytes(self) -> int:
        """Bytes the cache's buffers hold (capacity, not length); default: :meth:`kv_bytes`."""
        return self.kv_bytes()

    def query_attention(self, query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        """(1, H_q, 1, n) float32 probabilities of one new query (1, H_q, 1, D) over the layer's n keys,
        the new token's own included (what a decode policy reads)."""
        return next(iter_attention_chunks(query, keys, keys.shape[2] - 1, scale=scale))[1]


class Compression:
    """One prompt's compression under one method: the pipeline every backend runs (module docstring).

    Args:
        method: the method (:func:`vlcache.methods.get_method`).
        layout: the prompt's layout (image spans).
        num_layers: L.
        backend: recorded in the stats.

    Attributes:
        query_start: the first prompt position whose query rows :meth:`score_layer` takes (m for a
            method that does not compress).
        scores: per layer, its :class:`~vlcache.methods.LayerScore` once scored.
        budgets: (L,) tokens kept per layer after :meth:`compress` (None for ``full``).
        kept_indices: per layer, the (1, H_kv, k) kept prompt positions (None: all kept).
        policy: the method's decode policy, armed by :meth:`compress` (None: generated tokens stay).
        stats: recorded by :meth:`compress`.
        scoring_seconds: time spent scoring so far (a backend may add what it spends preparing queries).
    """

    def __init__(self, method: Method, layout: PromptLayout, num_layers: int, *, backend: str) -> None:
        self.method = method
        self.layout = layout
        self.num_layers = num_layers
        self.backend = backend
        self.query_start = method.query_start(layout) if method.compresses else layout.prompt_len
        self.scores: list[LayerScore | None] = [None] * num_layers
        self.budgets: torch.Tensor | None = None
        self.kept_indices: list[torch.Tensor | None] = [None] * num_layers
        self.policy: DecodePolicy | None = None
        self.stats: CompressionStats | None = None
        self.scoring_seconds = 0.0

    @property
    def compacted(self) -> bool:
        """True once some layer lost entries: cache length ≠ position from here on."""
        return any(k is not None for k in self.kept_indices)

    # --- 1. scores --------------------------------------------------------------------------------
    def score_layer(
        self, ops: CacheOps, layer: int, queries: torch.Tensor, keys: torch.Tensor, scale: float
    ) -> LayerScore:
        """Score one layer from its query rows ``query_start .. m−1`` (1, H_q, τ, D) and keys (1, H_kv, m, D)."""
        t0 = time.perf_counter()
        post_vision = self.method.post_vision_scores()
        with torch.no_grad():
            if post_vision is not None and ops.has_post_vision_op:
                scores, density = ops.post_vision_stats(queries, keys, self.query_start, post_vision.threshold, scale)
                score = post_vision.layer_score(scores, density)
            else:
                inp = LayerInput(queries, keys, self.query_start, scale, layer, self.num_layers)
                score = self.method.score(inp, self.layout)
        self.scores[layer] = score
        self.scoring_seconds += time.perf_counter() - t0
        return score

    def use_scores(self, scores: Sequence[LayerScore]) -> None:
        """Take every layer's scores computed earlier (a method's scores never depend on the budget)."""
        if len(scores) != self.num_layers:
            raise ValueError(f"{len(scores)} layer scores for {self.num_layers} layers")
        self.scores = list(scores)

    # --- 2. budgets, selection, compaction ----------------------------------------------------------
    def compress(self, ops: CacheOps, *, prefill_seconds: float = 0.0) -> CompressionStats:
        """Allocate, select and compact every layer of ``ops``, arm the decode policy, record the stats."""
        t0 = time.perf_counter()
        method, layout = self.method, self.layout
        m = layout.prompt_len
        before = ops.kv_bytes()
        weights: list[float | None] = []
        if method.compresses:
            missing = [i for i, s in enumerate(self.scores) if s is None]
            if missing:
                raise RuntimeError(f"layers {missing} were not scored before compression")
            scores = [s for s in self.scores if s is not None]
            weights = [s.weight for s in scores]
            self.budgets = method.allocate(weights, layout)
            self.policy = method.decode_policy(self.budgets, layout)
            with torch.no_grad():
                for layer in range(self.num_layers):
                    k = int(self.budgets[layer])
                    if k >= m:
                        continue
                    kept = method.select(scores[layer].scores, k, layout)
                    ops.keep(layer, kept)
                    self.kept_indices[layer] = kept
                    if self.policy is not None:
                        self.policy.set_protected(layer, kept)
            self.scores = [None] * self.num_layers  # the scores are not needed any more
        self.scoring_seconds += time.perf_counter() - t0
        config = method.config
        self.stats = CompressionStats(
            method=config.method,
            budget=config.budget,
            prompt_tokens=m,
            image_tokens=layout.num_image_tokens,
            kept_per_layer=ops.lengths(),
            kv_bytes_before=before,
            kv_bytes_after=ops.kv_bytes(),
            backend=self.backend,
            kv_bytes_reserved=ops.kv_reserved_bytes(),
            prefill_seconds=prefill_seconds,
            scoring_seconds=self.scoring_seconds,
            layer_weights=weights,
        )
        return self.stats

    # --- 3. decode policy ---------------------------------------------------------------------------
    def decode_step(self, ops: CacheOps, layer: int, query: torch.Tensor, scale: float) -> bool:
        """After a single-token step, layer ``layer`` (its new token appended, ``query`` (1, H_q, 1, D)
        after RoPE): let the decode policy evict one entry. Returns True when it did."""
        if self.policy is None:
            return False
        with torch.no_grad():
            keys = ops.keys(layer)
            probs = ops.query_attention(query, keys, scale)
            drop = self.policy.step(layer, probs, int(keys.shape[2]))
            if drop is None:
                return False
            ops.evict(layer, int(drop))
        if self.stats is not None:
            self.stats.decode_evictions += 1
        return True
