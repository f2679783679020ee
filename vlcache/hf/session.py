"""`VLCache(config).apply(model)`: KV compression on an unmodified transformers model.

Contract:
* Hooks are installed by :meth:`VLCache.apply` and removed in its ``finally``; the language model's
  attention implementation is swapped for a ragged-tolerant wrapper of the same kind and restored.
* Prefill (a forward on an empty cache): forward hooks on every attention module recompute the
  rows of queries the method asks for (after RoPE, from the module's own projections) and hand them
  with the layer's cached keys to the one compression pipeline (:class:`vlcache.pipeline.Compression`).
  Nothing needs ``output_attentions`` or an m × m matrix, so it works with sdpa and eager alike.
  After the last layer the pipeline allocates the budgets and compacts every layer's K/V to its own
  length (new storage; the old is freed) through :class:`DynamicCacheOps`, and records the stats.
* Decode: generated tokens are appended and never evicted, except by a method's decode policy
  (TGV-KV), applied by the pipeline from the step's query in any ``apply`` block of the session that
  decodes on the cache of its last prefill (so a decoder may enter ``apply`` once per step).
  Positions keep counting from the prompt length: ``generate`` passes them; for a hand-written loop
  on the session's cache without ``position_ids`` the session supplies them (transformers would
  otherwise use the cache length).
* One sequence at a time: a compressing method refuses batch size > 1 and padded prompts with a
  ValueError (each prompt's budgets differ, so rows could not share a cache tensor).
* Layout: the spans are the runs of the model's image token, unless :meth:`VLCache.apply` is given
  ``spans`` (a text-only LM: the context a trailing question asks about plays the image's role).
* One prefill, many methods: :meth:`VLCache.compress_prefill` takes a prefill captured once
  (:mod:`vlcache.hf.prefill`) and does what the hooks would have done after running it.
* The session holds its last prefill's cache weakly: dropping the cache frees it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlcache.config import CompressionConfig
from vlcache.core import compact
from vlcache.hf.adapter import (
    attention_modules,
    cache_argument,
    cache_nbytes,
    decoder_stack,
    find_image_spans,
    image_token_id,
    project_queries,
)
from vlcache.hf.attention import ragged_name
from vlcache.methods import PromptLayout, get_method
from vlcache.pipeline import CacheOps, Compression, CompressionStats

if TYPE_CHECKING:
    from vlcache.hf.prefill import CapturedPrefill


class DynamicCacheOps(CacheOps):
    """A transformers cache (``cache.layers[i].keys / .values``, (1, H_kv, n, D)) as the pipeline
    drives it: compaction and eviction make new tensors (the old storage is freed)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def keys(self, layer: int) -> torch.Tensor:
        return self.cache.layers[layer].keys

    def keep(self, layer: int, indices: torch.Tensor) -> None:
        entry = self.cache.layers[layer]
        entry.keys = compact(entry.keys, indices)
        entry.values = compact(entry.values, indices)

    def evict(self, layer: int, index: int) -> None:
        entry = self.cache.layers[layer]
        n = entry.keys.shape[2]
        keep = torch.cat([torch.arange(index), torch.arange(index + 1, n)]).to(entry.keys.device)
        entry.keys = entry.keys.index_select(2, keep)
        entry.values = entry.values.index_select(2, keep)

    def lengths(self) -> list[int]:
        return [int(entry.keys.shape[2]) for entry in self.cache.layers]

    def kv_bytes(self) -> int:
        return cache_nbytes(self.cache)


class _State:
    """Per-:meth:`VLCache.apply` bookkeeping of the hooks (one forward at a time)."""

    def __init__(self, spans: tuple[tuple[int, int], ...] | None, num_layers: int) -> None:
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.prefill = False  # the running forward is a prefill
        self.forward_start = 0.0
        self.spans = spans  # given by the caller (text-only LMs)
        self.num_layers = num_layers


class VLCache:
    """KV-cache compression for a transformers VLM (or Llama-like LM).

    Example::

        with VLCache(CompressionConfig(method="vlcache", budget=0.1)).apply(model) as session:
            out = model.generate(**inputs, max_new_tokens=32)
        print(session.stats)
    """

    def __init__(self, config: CompressionConfig | None = None, **overrides: Any) -> None:
        base = config or CompressionConfig()
        self.config = base.with_changes(**overrides) if overrides else base
        self.method = get_method(self.config)
        self.stats: CompressionStats | None = None
        self.history: list[CompressionStats] = []
        #: per layer, the (B, H_kv, k) prompt positions kept by the last prefill (None: all kept)
        self.kept_indices: list[torch.Tensor | None] = []
        #: the last prefill's compression (the pipeline; its decode policy acts on that prefill's cache)
        self.compression: Compression | None = None
        self._cache: weakref.ref[Any] | None = None  # the last prefill's cache
        self._seen = 0  # tokens that cache's sequence has seen: the next position
        self._state: _State | None = None  # while apply() is active

    def _owns(self, cache: Any) -> bool:
        return cache is not None and self._cache is not None and self._cache() is cache

    @contextmanager
    def apply(self, model: nn.Module, spans: Sequence[tuple[int, int]] | None = None) -> Iterator[VLCache]:
        """Compress every prefill ``model`` runs inside the block.

        Args:
            spans: half-open ``(start, end)`` prompt spans that play the image's role; None finds
                them through the model's image token (none for a text-only model). For a text-only
                LM, the context a trailing question asks about: the question is then the
                post-vision window.
        """
        stack = decoder_stack(model)
        attns = attention_modules(stack)
        state = _State(None if spans is None else tuple((int(s), int(e)) for s, e in spans), len(attns))
        image_token = image_token_id(model)
        handles = [
            model.register_forward_pre_hook(self._capture_inputs(state), with_kwargs=True),
            stack.register_forward_pre_hook(self._start(state, image_token), with_kwargs=True),
            stack.register_forward_hook(self._finish(state), with_kwargs=True),
        ]
        text_cfg: Any = stack.config
        original_impl = text_cfg._attn_implementation
        try:
            if self.method.compresses:
                text_cfg._attn_implementation = ragged_name(original_impl)
                handles += [a.register_forward_hook(self._layer_hook(state), with_kwargs=True) for a in attns]
            self._state = state
            yield self
        finally:
            self._state = None
            for h in handles:
                h.remove()
            text_cfg._attn_implementation = original_impl

    def compress_prefill(self, prefill: CapturedPrefill) -> Any:
        """Compress a captured prefill as if the model had just run it in :meth:`apply`.

        Returns a new ``DynamicCache`` holding the prompt's keys and values, scored from the captured
        query rows, allocated, compacted and with :attr:`stats` recorded as after a prefill, and the
        decode policy (TGV-KV) armed. Decode on it inside :meth:`apply` with explicit positions from
        ``prefill.prompt_len`` (:func:`vlcache.hf.generation.generate_from_prefill`). Scores are
        memoised in ``prefill`` per method setting, so every budget of a method scores once.
        """
        from transformers import DynamicCache

        state = self._state
        if state is not None and prefill.num_layers != state.num_layers:
            raise ValueError(f"the prefill has {prefill.num_layers} layers, the model {state.num_layers}")
        cache = DynamicCache()
        for i in range(prefill.num_layers):
            cache.update(prefill.keys[i], prefill.values[i], i)
        compression = self._begin(prefill.layout, cache, prefill.num_layers)
        ops = DynamicCacheOps(cache)
        if self.method.compresses:
            key = replace(self.config, budget=1.0)
            scores = prefill.scores.get(key)
            if scores is None:
                start = compression.query_start
                for i in range(prefill.num_layers):
                    inp = prefill.layer_input(i, start)
                    compression.score_layer(ops, i, inp.queries, inp.keys, inp.scale)
                prefill.scores[key] = [s for s in compression.scores if s is not None]
            else:
                compression.use_scores(scores)
        self._end(ops, prefill_seconds=0.0)
        return cache

    # --- the pipeline's life ----------------------------------------------------------------------
    def _begin(self, layout: PromptLayout, cache: Any, num_layers: int) -> Compression:
        """A new prefill: its compression, on ``cache``."""
        self.compression = Compression(self.method, layout, num_layers, backend="torch")
        self._cache = weakref.ref(cache)
        self._seen = layout.prompt_len
        return self.compression

    def _end(self, ops: DynamicCacheOps, prefill_seconds: float) -> None:
        """After the prefill: compress (allocate, select, compact), record the stats."""
        assert self.compression is not None
        self.stats = self.compression.compress(ops, prefill_seconds=prefill_seconds)
        self.kept_indices = list(self.compression.kept_indices)
        self.history.append(self.stats)

    # --- hooks -------------------------------------------------------------------------------
    def _capture_inputs(self, state: _State):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state.forward_start = time.perf_counter()
            ids = kwargs.get("input_ids", args[0] if args else None)
            state.input_ids = ids if isinstance(ids, torch.Tensor) else None
            mask = kwargs.get("attention_mask")
            state.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        return hook

    def _start(self, state: _State, image_token: int | None):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            cache = cache_argument(kwargs)
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids", args[0] if args else None)
            x = embeds if isinstance(embeds, torch.Tensor) else ids
            state.prefill = cache is not None and cache.get_seq_length() == 0 and isinstance(x, torch.Tensor)
            if not isinstance(x, torch.Tensor):
                return None
            if not state.prefill:
                if self._owns(cache):
                    n = x.shape[1]
                    self._seen += n
                    # After eviction the cache length is no position: without explicit position_ids
                    # transformers would take them from layer 0's (compacted) length.
                    compacted = self.compression is not None and self.compression.compacted
                    if kwargs.get("position_ids") is None and compacted:
                        kwargs["position_ids"] = torch.arange(self._seen - n, self._seen, device=x.device)[None]
                        return args, kwargs
                return None
            batch, m = x.shape[0], x.shape[1]
            if self.method.compresses:
                if batch != 1:
                    raise ValueError(
                        f"vlcache compresses one prompt at a time: got batch size {batch}. "
                        "Run prompts one by one, or use method='full'."
                    )
                if state.attention_mask is not None and not bool(state.attention_mask.all()):
                    raise ValueError("vlcache does not support padded prompts; pass the prompt without padding")
            ids_full = state.input_ids
            if state.spans is not None:
                spans = state.spans
            elif ids_full is not None and ids_full.shape[-1] == m:
                spans = find_image_spans(ids_full[0], image_token)
            else:
                spans = ()
            if not state.forward_start:  # the stack was called without the model's forward
                state.forward_start = time.perf_counter()
            self._begin(PromptLayout(m, spans), cache, state.num_layers)
            return None

        return hook

    def _layer_hook(self, state: _State):  # type: ignore[no-untyped-def]
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            compression = self.compression
            cache = cache_argument(kwargs)
            if cache is None and self._cache is not None:
                cache = self._cache()
            if compression is None or not self._owns(cache):
                return
            idx = int(module.layer_idx)
            hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            scale = float(module.scaling)
            ops = DynamicCacheOps(cache)
            if state.prefill:
                t0 = time.perf_counter()
                start = compression.query_start
                with torch.no_grad():
                    queries = project_queries(module, hidden[:, start:], (cos[:, start:], sin[:, start:]))
                compression.scoring_seconds += time.perf_counter() - t0
                compression.score_layer(ops, idx, queries, ops.keys(idx), scale)
            elif compression.policy is not None and hidden.shape[1] == 1:
                with torch.no_grad():
                    query = project_queries(module, hidden, (cos, sin))
                compression.decode_step(ops, idx, query, scale)

        return hook

    def _finish(self, state: _State):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not state.prefill or self.compression is None or self._cache is None:
                return
            state.prefill = False
            cache = self._cache()
            if cache is None:
                return
            seconds = time.perf_counter() - state.forward_start - self.compression.scoring_seconds
            state.forward_start = 0.0
            self._end(DynamicCacheOps(cache), prefill_seconds=max(seconds, 0.0))

        return hook
