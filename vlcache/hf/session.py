"""`VLCache(config).apply(model)`: KV compression on an unmodified transformers model.

Contract:
* Hooks are installed by :meth:`VLCache.apply` and removed in its ``finally``; the language model's
  attention implementation is swapped for a ragged-tolerant wrapper of the same kind and restored.
* Prefill (a forward on an empty cache): forward hooks on every attention module recompute the
  rows of queries the method asks for (after RoPE, from the module's own projections) and score
  the layer's keys as cached. Nothing needs ``output_attentions`` or an m × m matrix, so it works
  with sdpa and eager alike. After the last layer the budgets are allocated, every layer's K/V is
  compacted to its own length (new storage; the old is freed) and the stats are recorded.
* Decode: generated tokens are appended and never evicted, except by a method's decode policy
  (TGV-KV, active only inside the ``apply`` block of its prefill). Positions keep counting from the
  prompt length: ``generate`` passes them; for a hand-written loop on the session's cache without
  ``position_ids`` the session supplies them (transformers would otherwise use the cache length).
* One sequence at a time: a compressing method refuses batch size > 1 and padded prompts with a
  ValueError (each prompt's budgets differ, so rows could not share a cache tensor).
* Layout: the spans are the runs of the model's image token, unless :meth:`VLCache.apply` is given
  ``spans`` (a text-only LM: the context a trailing question asks about plays the image's role).
* One prefill, many methods: inside ``apply``, :meth:`VLCache.compress_prefill` takes a prefill
  captured once (:mod:`vlcache.hf.prefill`) and does what the hooks would have done after running it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
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
from vlcache.methods import DecodePolicy, LayerInput, LayerScore, PromptLayout, get_method

if TYPE_CHECKING:
    from vlcache.hf.prefill import CapturedPrefill


@dataclass
class CompressionStats:
    """What one prefill's compression did.

    Attributes:
        method, budget: what was asked.
        prompt_tokens: m; image_tokens: how many of them are image tokens.
        kept_per_layer: tokens kept in each layer after prefill (``m`` everywhere for `full`).
        kv_bytes_before / kv_bytes_after: bytes of the prompt's K/V cache before and after compaction.
        scoring_seconds: time spent scoring, allocating and compacting (inside prefill).
        decode_evictions: tokens evicted during decode (TGV-KV only).
    """

    method: str
    budget: float
    prompt_tokens: int
    image_tokens: int
    kept_per_layer: list[int]
    kv_bytes_before: int
    kv_bytes_after: int
    scoring_seconds: float = 0.0
    decode_evictions: int = 0
    layer_weights: list[float | None] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        """Kept KV entries over the prompt's: Σ k_l / (L · m)."""
        return sum(self.kept_per_layer) / (len(self.kept_per_layer) * self.prompt_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_fraction"] = self.kept_fraction
        return d


class _State:
    """Per-forward bookkeeping shared by the hooks of one :meth:`VLCache.apply`."""

    def __init__(self) -> None:
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.prefill = False
        self.layout: PromptLayout | None = None
        self.scores: dict[int, LayerScore] = {}
        self.cache: Any = None
        self.policy: DecodePolicy | None = None
        self.scoring_seconds = 0.0
        self.seen = 0  # tokens the sequence has seen: the next position
        self.compacted = False
        self.spans: tuple[tuple[int, int], ...] | None = None  # given by the caller (text-only LMs)
        self.num_layers = 0


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
        self._state: _State | None = None  # while apply() is active

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
        state = _State()
        state.spans = None if spans is None else tuple((int(s), int(e)) for s, e in spans)
        state.num_layers = len(attns)
        image_token = image_token_id(model)
        handles = [
            model.register_forward_pre_hook(self._capture_inputs(state), with_kwargs=True),
            stack.register_forward_pre_hook(self._start(state, image_token), with_kwargs=True),
            stack.register_forward_hook(self._finish(state, len(attns)), with_kwargs=True),
        ]
        text_cfg: Any = stack.config
        original_impl = text_cfg._attn_implementation
        try:
            if self.method.compresses:
                text_cfg._attn_implementation = ragged_name(original_impl)
                handles += [
                    a.register_forward_hook(self._layer_hook(state, len(attns)), with_kwargs=True) for a in attns
                ]
            self._state = state
            yield self
        finally:
            self._state = None
            for h in handles:
                h.remove()
            text_cfg._attn_implementation = original_impl

    def compress_prefill(self, prefill: CapturedPrefill) -> Any:
        """Inside :meth:`apply`: compress a captured prefill as if the model had just run it here.

        Returns a new ``DynamicCache`` holding the prompt's keys and values, scored from the captured
        query rows, allocated, compacted and with :attr:`stats` recorded as after a prefill, and the
        decode policy (TGV-KV) armed. Decode on it with explicit positions from ``prefill.prompt_len``
        (:func:`vlcache.hf.continuation.continue_greedy`). Scores are memoised in ``prefill`` per
        method setting, so every budget of a method scores once.
        """
        from transformers import DynamicCache

        state = self._state
        if state is None:
            raise RuntimeError("compress_prefill runs inside `with session.apply(model):`")
        if prefill.num_layers != state.num_layers:
            raise ValueError(f"the prefill has {prefill.num_layers} layers, the model {state.num_layers}")
        cache = DynamicCache()
        for i in range(prefill.num_layers):
            cache.update(prefill.keys[i], prefill.values[i], i)
        state.layout = prefill.layout
        state.seen = prefill.prompt_len
        state.compacted = False
        state.cache = cache
        state.policy = None
        state.scoring_seconds = 0.0
        state.scores = {}
        if self.method.compresses:
            t0 = time.perf_counter()
            key = replace(self.config, budget=1.0)
            scores = prefill.scores.get(key)
            if scores is None:
                start = self.method.query_start(prefill.layout)
                with torch.no_grad():
                    scores = [
                        self.method.score(prefill.layer_input(i, start), prefill.layout)
                        for i in range(prefill.num_layers)
                    ]
                prefill.scores[key] = scores
            state.scores = dict(enumerate(scores))
            state.scoring_seconds = time.perf_counter() - t0
        self._compress(state, state.num_layers)
        return cache

    # --- hooks -------------------------------------------------------------------------------
    def _capture_inputs(self, state: _State):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
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
                n = x.shape[1]
                if cache is not None and cache is state.cache:
                    state.seen += n
                    # After eviction the cache length is no position: without explicit position_ids
                    # transformers would take them from layer 0's (compacted) length.
                    if kwargs.get("position_ids") is None and state.compacted:
                        kwargs["position_ids"] = torch.arange(state.seen - n, state.seen, device=x.device)[None]
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
            state.layout = PromptLayout(m, spans)
            state.seen = m
            state.compacted = False
            state.scores = {}
            state.cache = cache
            state.policy = None
            state.scoring_seconds = 0.0
            return None

        return hook

    def _layer_hook(self, state: _State, num_layers: int):  # type: ignore[no-untyped-def]
        method = self.method

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            idx = int(module.layer_idx)
            cache = cache_argument(kwargs)
            cache = state.cache if cache is None else cache
            if cache is None or state.layout is None:
                return
            hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            pos = kwargs["position_embeddings"]
            layer = cache.layers[idx]
            t0 = time.perf_counter()
            if state.prefill:
                start = method.query_start(state.layout)
                with torch.no_grad():
                    queries = project_queries(module, hidden[:, start:], (pos[0][:, start:], pos[1][:, start:]))
                    inp = LayerInput(queries, layer.keys, start, float(module.scaling), idx, num_layers)
                    state.scores[idx] = method.score(inp, state.layout)
            elif state.policy is not None and hidden.shape[1] == 1:
                with torch.no_grad():
                    q = project_queries(module, hidden, pos)
                    cache_len = layer.keys.shape[2]
                    probs = _single_query_attention(q, layer.keys, float(module.scaling))
                    evict = state.policy.step(idx, probs, cache_len)
                    if evict is not None:
                        keep = torch.cat([torch.arange(evict), torch.arange(evict + 1, cache_len)]).to(
                            layer.keys.device
                        )
                        layer.keys = layer.keys.index_select(2, keep)
                        layer.values = layer.values.index_select(2, keep)
                        if self.stats is not None:
                            self.stats.decode_evictions += 1
            state.scoring_seconds += time.perf_counter() - t0

        return hook

    def _finish(self, state: _State, num_layers: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not state.prefill or state.layout is None:
                return
            state.prefill = False
            self._compress(state, num_layers)

        return hook

    def _compress(self, state: _State, num_layers: int) -> None:
        """After a prefill: allocate, select, compact every layer of ``state.cache``, record the stats."""
        method = self.method
        cache = state.cache
        layout = state.layout
        assert layout is not None
        before = cache_nbytes(cache)
        t0 = time.perf_counter()
        m = layout.prompt_len
        weights: list[float | None] = []
        self.kept_indices = [None] * len(cache.layers)
        if method.compresses:
            weights = [state.scores[i].weight for i in range(num_layers)]
            budgets = method.allocate(weights, layout)
            policy = method.decode_policy(budgets, layout)
            with torch.no_grad():
                for i, layer in enumerate(cache.layers):
                    k = int(budgets[i])
                    if k >= m:
                        continue
                    kept = method.select(state.scores[i].scores, k, layout)
                    layer.keys = compact(layer.keys, kept)
                    layer.values = compact(layer.values, kept)
                    self.kept_indices[i] = kept
                    state.compacted = True
                    if policy is not None:
                        policy.set_protected(i, kept)
            state.policy = policy
            state.scores = {}
        kept_per_layer = [int(layer.keys.shape[2]) for layer in cache.layers]
        self.stats = CompressionStats(
            method=self.config.method,
            budget=self.config.budget,
            prompt_tokens=m,
            image_tokens=layout.num_image_tokens,
            kept_per_layer=kept_per_layer,
            kv_bytes_before=before,
            kv_bytes_after=cache_nbytes(cache),
            scoring_seconds=state.scoring_seconds + time.perf_counter() - t0,
            layer_weights=weights,
        )
        self.history.append(self.stats)


def _single_query_attention(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H_q, 1, d) query vs (B, H_kv, n, d) keys -> (B, H_q, 1, n) float32 probabilities."""
    b, h_q, _, d = q.shape
    h_kv = keys.shape[1]
    logits = torch.matmul(q.float().reshape(b, h_kv, h_q // h_kv, 1, d), keys.float().unsqueeze(2).transpose(-1, -2))
    return torch.softmax(logits * scale, dim=-1).reshape(b, h_q, 1, -1)
