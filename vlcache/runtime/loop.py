"""Runners' generation: encode image → prefill → compress (:mod:`vlcache.pipeline`) → greedy decode
(:mod:`vlcache.stream`).

Semantics are those of the torch backend (:func:`vlcache.generate`), step for step:

1. The prompt's token embeddings get the image features scattered into the ``image_token_id``
   positions (in order); the decoder runs on the prompt at positions ``0 .. m-1``, in chunks of
   ``runner.prefill_chunk`` tokens (:class:`PromptPrefill`; each chunk attends to the ones before it
   in the same cache, so the result is the whole-prompt pass's), or all at once when that is None.
2. :class:`vlcache.pipeline.Compression` — the pipeline every backend runs — scores each layer from
   its post-RoPE queries (rows ``method.query_start(layout) .. m-1``) and its cached keys (a method
   declaring post-vision scores through the runner's ``post_vision_stats`` op, others through
   :meth:`vlcache.methods.Method.score`), allocates the budgets, selects the kept indices and
   compacts each layer through the runner's ``compact_layer`` (the ``CompactKV`` op).
3. Greedy decode (:class:`vlcache.stream.TokenStream`): the first token comes from the prefill
   logits; each new token is fed at the next *position* (which keeps counting from m: after
   eviction position ≠ cache length), appended to every layer, never evicted — except by a
   method's decode policy (TGV-KV), which the pipeline applies from the step's own queries.

:class:`RunnerCache` is the runners' side of the pipeline: their per-layer cache and ops.

KV memory (runners that preallocate, i.e. ONNX Runtime on the ``fused`` decoder): prefill writes into
per-layer buffers of capacity ``m + max_new_tokens``; a layer that keeps k_l < m entries moves them
into a new buffer of capacity ``k_l + max_new_tokens`` (so compression frees memory) and the
prefill buffer is dropped; decode then writes every token into these buffers in place, and a
decode policy's eviction shifts the entries inside them. ``full`` (and any layer that keeps all m)
decodes in the prefill buffer. Runners that append by concatenation size each tensor exactly.

:func:`prefill` does steps 1–2 and returns a :class:`GenerationState` (the runners'
:class:`~vlcache.stream.Decoder`); :func:`stream` wraps it in the token stream (what serving and
the benchmarks iterate; closing it frees the buffers); :func:`generate` collects a stream.
Batch size 1: one prompt, unpadded (each prompt gets its own budgets, so rows could not share a
cache tensor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlcache.config import CompressionConfig
from vlcache.methods import PromptLayout, get_method
from vlcache.pipeline import CacheOps, Compression, CompressionStats
from vlcache.runtime.base import Cache, Runner
from vlcache.stream import TokenStream, stop_ids


@dataclass
class RuntimeResult:
    """tokens: the generated ids; kept_indices: per layer the (1, H_kv, k) prompt positions kept
    (None: all kept); budgets: (L,) tokens kept per layer (None for ``full``); logits: the (V,)
    logits of every generated token when asked for; finish_reason: ``stop`` or ``length``."""

    tokens: list[int]
    stats: CompressionStats
    kept_indices: list[torch.Tensor | None]
    budgets: torch.Tensor | None = None
    logits: list[np.ndarray] | None = None
    finish_reason: str | None = None


class RunnerCache(CacheOps):
    """A runner's per-layer cache of one prompt, with the runner's ops, as the pipeline drives it.

    ``room``: entries each compacted layer's buffers keep free for the decode (runners that
    preallocate; the others ignore it). Every runner has the post-vision statistics op
    (:meth:`Runner.post_vision_stats`; :mod:`vlcache.core` unless the runner fuses it).
    """

    has_post_vision_op = True

    def __init__(self, runner: Runner, layers: Cache, room: int) -> None:
        self.runner = runner
        self.layers = layers
        self.room = room

    def post_vision_stats(
        self, queries: torch.Tensor, keys: torch.Tensor, query_start: int, threshold: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner.post_vision_stats(queries, keys, query_start, threshold, scale)

    def keys(self, layer: int) -> torch.Tensor:
        return self.runner.valid_kv(self.layers[layer])[0]

    def keep(self, layer: int, indices: torch.Tensor) -> None:
        k = int(indices.shape[-1])
        self.layers[layer] = self.runner.compact_layer(self.layers[layer], indices, k + self.room)

    def evict(self, layer: int, index: int) -> None:
        self.layers[layer] = self.runner.evict(self.layers[layer], index)

    def lengths(self) -> list[int]:
        return [kv.length for kv in self.layers]

    def kv_bytes(self) -> int:
        return sum(self.runner.kv_bytes(kv) for kv in self.layers)

    def kv_reserved_bytes(self) -> int:
        return sum(self.runner.kv_reserved_bytes(kv) for kv in self.layers)


def _as_ids(input_ids: Any, vocab: int) -> np.ndarray:
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (n,) or (1, n) with n >= 1, got shape {ids.shape}")
    if ids.shape[0] != 1:
        raise ValueError(
            f"the runtime generates one prompt at a time (batch size 1), got batch size {ids.shape[0]}; "
            "run prompts one by one"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)


def _merge_images(runner: Runner, ids: np.ndarray, embeds: np.ndarray, pixel_values: Any) -> int:
    """Scatter the image features into the image-token rows of ``embeds`` in place; returns their count."""
    spec = runner.spec
    is_image = ids[0] == spec.image_token_id if spec.image_token_id is not None else np.zeros(ids.shape[1], bool)
    n_image = int(is_image.sum())
    if pixel_values is None:
        if n_image:
            raise ValueError(f"the prompt holds {n_image} image tokens but no pixel_values were given")
        return 0
    pv = np.asarray(
        pixel_values.detach().cpu() if isinstance(pixel_values, torch.Tensor) else pixel_values, dtype=np.float32
    )
    if spec.image_size is None or "vision" not in spec.graphs:
        raise ValueError("this export has no vision graph; pass no pixel_values")
    if pv.ndim != 4 or pv.shape[1] != 3 or tuple(pv.shape[2:]) != tuple(spec.image_size):
        raise ValueError(f"pixel_values must be (N, 3, {spec.image_size[0]}, {spec.image_size[1]}), got {pv.shape}")
    expected = pv.shape[0] * int(spec.image_seq_length or 0)
    if n_image != expected:
        raise ValueError(
            f"the prompt holds {n_image} image tokens but {pv.shape[0]} image(s) give {expected} features; "
            "expand each image placeholder to image_seq_length tokens (the processor does this)"
        )
    if n_image:
        feats = runner.encode_images(pv)
        embeds[0, is_image] = feats.reshape(-1, feats.shape[-1])
    return n_image


def _layout(ids: np.ndarray, image_token: int | None) -> PromptLayout:
    from vlcache.hf.adapter import find_image_spans  # the one definition of image spans

    return PromptLayout(ids.shape[1], find_image_spans(torch.from_numpy(ids[0]), image_token))


class GenerationState:
    """One prompt after :func:`prefill`: its (compacted) cache, the next position, the current logits.

    The runners' :class:`~vlcache.stream.Decoder`: :meth:`step` feeds one token (and applies the
    decode policy), :meth:`close` drops the cache. Iterate it through :func:`stream`.
    """

    def __init__(
        self, runner: Runner, kv: RunnerCache, logits: np.ndarray, compression: Compression, position: int
    ) -> None:
        self.runner = runner
        self.kv = kv
        #: (V,) logits of the last fed token (after prefill: of the prompt's last token)
        self.logits: np.ndarray = logits
        self.compression = compression
        self.stats: CompressionStats | None = compression.stats
        #: the next token's position: counts every token seen, never the cache length
        self.position = position

    @property
    def cache(self) -> Cache:
        """The per-layer cache (empty once closed)."""
        return self.kv.layers

    @property
    def kept_indices(self) -> list[torch.Tensor | None]:
        return self.compression.kept_indices

    @property
    def budgets(self) -> torch.Tensor | None:
        return self.compression.budgets

    def greedy(self) -> int:
        """argmax of the current logits."""
        return int(np.argmax(self.logits))

    def step(self, token: int) -> None:
        """Append ``token`` at :attr:`position` in every layer and apply the decode policy; updates :attr:`logits`."""
        if not self.kv.layers:
            raise RuntimeError("this generation state was closed")
        runner = self.runner
        embeds = runner.embed(np.array([[token]], dtype=np.int64))
        out = runner.forward(embeds, np.array([[self.position]], dtype=np.int64), self.kv.layers)
        self.kv.layers, self.logits = out.cache, out.logits[0]
        self.position += 1
        if self.compression.policy is not None:
            scale = runner.spec.attention_scale
            for layer in range(runner.spec.num_layers):
                self.compression.decode_step(self.kv, layer, runner.to_torch(out.queries[layer]), scale)

    def close(self) -> None:
        """Drop the cache's buffers."""
        self.kv.layers = []


class PromptPrefill:
    """Steps 1–2 for one prompt, one decoder call at a time (what :func:`prefill` runs to the end, and
    what the batching scheduler interleaves with its decode steps).

    The constructor checks the request, embeds the prompt and runs the vision tower; each
    :meth:`advance` feeds the next ``runner.prefill_chunk`` prompt tokens (all of them when the runner
    has no chunk size) into the cache buffers, at their positions, after the chunks before — a chunk's
    queries see the keys before them and their own causal part, so the result is the whole-prompt
    pass's; the query rows scoring needs (``query_start ..``) are collected as they come. When
    :attr:`done`, :meth:`finish` scores, compresses and returns the :class:`GenerationState`.
    ``prefill_seconds`` counts the vision tower and the chunks, not the time between them.
    """

    def __init__(
        self,
        runner: Runner,
        input_ids: Any,
        pixel_values: Any = None,
        config: CompressionConfig | None = None,
        *,
        max_new_tokens: int = 1,
    ) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        spec = runner.spec
        method = get_method(config or CompressionConfig())
        ids = _as_ids(input_ids, spec.vocab_size)
        m = ids.shape[1]
        if m + max_new_tokens > spec.max_input_len:
            raise ValueError(
                f"prompt ({m} tokens) + max_new_tokens ({max_new_tokens}) exceeds the export's max_input_len "
                f"({spec.max_input_len}); re-export with a larger max_input_len or shorten the prompt"
            )
        t0 = time.perf_counter()
        self.runner, self.prompt_len, self.max_new_tokens = runner, m, max_new_tokens
        self.embeds = runner.embed(ids)
        _merge_images(runner, ids, self.embeds, pixel_values)
        self.compression = Compression(
            method, _layout(ids, spec.image_token_id), spec.num_layers, backend=runner.backend
        )
        chunk = runner.prefill_chunk
        self.chunk = m if chunk is None else min(chunk, m)
        # room for the whole generation: `full` decodes in these buffers, compaction moves the kept entries out
        self.cache = runner.empty_cache(m + max_new_tokens)
        self.fed = 0
        self._queries: list[list[torch.Tensor]] = [[] for _ in range(spec.num_layers)]
        self._logits: np.ndarray | None = None
        self.prefill_seconds = time.perf_counter() - t0

    @property
    def done(self) -> bool:
        """Every prompt token has been fed."""
        return self.fed >= self.prompt_len

    def advance(self) -> bool:
        """Feed the next chunk; returns :attr:`done`."""
        if self.done:
            return True
        t0 = time.perf_counter()
        runner, start, end = self.runner, self.fed, min(self.fed + self.chunk, self.prompt_len)
        positions = np.arange(start, end, dtype=np.int64)[None]
        out = runner.forward(self.embeds[:, start:end], positions, self.cache)
        self.cache, self._logits, self.fed = out.cache, out.logits[0], end
        first = self.compression.query_start
        if self.compression.method.compresses and (end > first or self.done):  # the last chunk: τ may be 0 rows
            for layer, rows in enumerate(self._queries):
                rows_q = runner.to_torch(out.queries[layer])[:, :, max(first - start, 0) :]
                rows.append(rows_q if self.done else rows_q.clone())  # a runner may reuse its outputs
        self.prefill_seconds += time.perf_counter() - t0
        return self.done

    def finish(self) -> GenerationState:
        """Score and compress (step 2); the prefill must be :attr:`done`."""
        if not self.done or self._logits is None:
            raise RuntimeError("finish() before every prompt chunk was fed")
        t1 = time.perf_counter()
        runner, compression = self.runner, self.compression
        kv = RunnerCache(runner, self.cache, room=self.max_new_tokens)
        if compression.method.compresses:
            for layer, rows in enumerate(self._queries):
                queries = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
                compression.score_layer(kv, layer, queries, kv.keys(layer), runner.spec.attention_scale)
        self._queries = []
        compression.scoring_seconds = time.perf_counter() - t1  # conversions included
        compression.compress(kv, prefill_seconds=self.prefill_seconds)
        return GenerationState(runner, kv, self._logits, compression, position=self.prompt_len)


def prefill(
    runner: Runner,
    input_ids: Any,
    pixel_values: Any = None,
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 1,
) -> GenerationState:
    """Encode the images, run the prompt (in the runner's chunks) and compress it (steps 1–2 above).

    Args: as :func:`generate` (``max_new_tokens`` checks the export's ``max_input_len`` and sizes the
    KV buffers of runners that preallocate; stepping further still works, those buffers then grow).
    """
    job = PromptPrefill(runner, input_ids, pixel_values, config, max_new_tokens=max_new_tokens)
    while not job.advance():
        pass
    return job.finish()


def stream(
    runner: Runner,
    input_ids: Any,
    pixel_values: Any = None,
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    keep_logits: bool = False,
) -> TokenStream:
    """Prefill and compress now (errors raise here), then yield the greedy tokens one by one.

    Args: as :func:`generate`; ``keep_logits`` records each token's (V,) logits in ``stream.logits``.
    Closing the stream (or leaving ``with stream(...) as tokens:``) frees the KV buffers.
    """
    state = prefill(runner, input_ids, pixel_values, config, max_new_tokens=max_new_tokens)
    stops = stop_ids(runner.spec.eos_token_id if eos_token_id is None else eos_token_id)
    return TokenStream(state, max_new_tokens=max_new_tokens, stop=stops, keep_logits=keep_logits)


def generate(
    runner: Runner,
    input_ids: Any,
    pixel_values: Any = None,
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    return_logits: bool = False,
) -> RuntimeResult:
    """Greedy generation with KV compression on any runner (the tokens of :func:`stream`, collected).

    Args:
        runner: a loaded backend (:func:`vlcache.runtime.load_runtime`).
        input_ids: (n,) or (1, n) prompt ids with each image placeholder expanded to
            ``image_seq_length`` image tokens (what the processor returns).
        pixel_values: (N, 3, H, W) for the N images of the prompt, or None for a text-only prompt.
        config: compression settings, default ``CompressionConfig()`` (VL-Cache at α = 0.1).
        max_new_tokens: tokens to generate (≥ 1); generation stops earlier after an EOS token.
        eos_token_id: ids that stop generation; None: the export's; ``()``: never stop early.
        on_token: called with each generated id as soon as it is chosen (streaming).
        return_logits: also return every generated step's logits.
    """
    with stream(
        runner,
        input_ids,
        pixel_values,
        config,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        keep_logits=return_logits,
    ) as tokens:
        for token in tokens:
            if on_token is not None:
                on_token(token)
        state = tokens.decoder
        assert isinstance(state, GenerationState) and state.stats is not None
        kept, budgets, stats = state.kept_indices, state.budgets, state.stats
    return RuntimeResult(tokens.tokens, stats, kept, budgets, tokens.logits, tokens.finish_reason)
