"""One generation loop for every backend: encode image → prefill → score → allocate → compact → decode.

Semantics are those of the torch path (:func:`vlcache.generate`), step for step:

1. The prompt's token embeddings get the image features scattered into the ``image_token_id``
   positions (in order); the decoder runs once on the whole prompt at positions ``0 .. m-1``.
2. Each layer is scored from its post-RoPE queries (rows ``method.query_start(layout) .. m-1``) and
   its cached keys: the ``vlcache`` methods through the runner's ``PostVisionStats`` op, every other
   method through :meth:`vlcache.methods.Method.score` on torch tensors.
3. ``method.allocate`` gives the per-layer budgets (``vlcache.core``), ``method.select`` the kept
   indices, and the runner's ``CompactKV`` op gathers each layer's K/V to its own length.
4. Greedy decode: the first token comes from the prefill logits; each new token is fed at the next
   *position* (which keeps counting from m: after eviction position ≠ cache length), appended to
   every layer, never evicted — except by a method's decode policy (TGV-KV), applied from the
   step's own queries. ``on_token`` is called with every token as soon as it is chosen.

KV memory (runners that preallocate, i.e. ONNX Runtime on the ``fused`` decoder): prefill writes into
per-layer buffers of capacity ``m + max_new_tokens``; a layer that keeps k_l < m entries moves them
into a new buffer of capacity ``k_l + max_new_tokens`` (so compression frees memory) and the
prefill buffer is dropped; decode then writes every token into these buffers in place, and a
decode policy's eviction shifts the entries inside them. ``full`` (and any layer that keeps all m)
decodes in the prefill buffer. Runners that append by concatenation size each tensor exactly.

:func:`prefill` does steps 1–3 and returns a :class:`GenerationState` whose ``step(token)`` feeds one
token (serving and benchmarks drive it token by token); :func:`generate` is the greedy loop on top.
Batch size 1: one prompt, unpadded (each prompt gets its own budgets, so rows could not share a
cache tensor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from vlcache.config import CompressionConfig
from vlcache.core import iter_attention_chunks
from vlcache.methods import DecodePolicy, LayerInput, LayerScore, PromptLayout, get_method
from vlcache.methods.vlcache import VLCacheMethod
from vlcache.runtime.base import Cache, Runner


@dataclass
class RuntimeStats:
    """What one generation did.

    Attributes:
        backend, method, budget: what ran.
        prompt_tokens: m; image_tokens: how many of them are image tokens.
        kept_per_layer: tokens each layer kept after prefill (m everywhere for ``full``).
        kv_bytes_before / kv_bytes_after: the prompt's KV cache (valid entries) before and after compaction.
        kv_bytes_reserved: what the cache's buffers hold after compaction, room for the decode
            included (the valid bytes for runners that size tensors exactly).
        prefill_seconds: image encoding, embedding and the prompt's decoder pass.
        scoring_seconds: scoring, budget allocation and compaction.
        decode_seconds: the decode steps after the first token (token callbacks excluded).
        new_tokens: tokens generated; decode_evictions: tokens a decode policy evicted (TGV-KV).
        layer_weights: what each layer gave the allocator (VL-Cache: its density).
    """

    backend: str
    method: str
    budget: float
    prompt_tokens: int
    image_tokens: int
    kept_per_layer: list[int]
    kv_bytes_before: int
    kv_bytes_after: int
    prefill_seconds: float
    scoring_seconds: float
    decode_seconds: float = 0.0
    new_tokens: int = 0
    decode_evictions: int = 0
    layer_weights: list[float | None] = field(default_factory=list)
    kv_bytes_reserved: int = 0

    @property
    def kept_fraction(self) -> float:
        """Σ k_l / (L · m)."""
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


@dataclass
class RuntimeResult:
    """tokens: the generated ids; kept_indices: per layer the (1, H_kv, k) prompt positions kept
    (None: all kept); budgets: (L,) tokens kept per layer (None for ``full``); logits: the (V,)
    logits of every generated token when asked for."""

    tokens: list[int]
    stats: RuntimeStats
    kept_indices: list[torch.Tensor | None]
    budgets: torch.Tensor | None = None
    logits: list[np.ndarray] | None = None


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


def _eos(eos_token_id: int | Sequence[int] | None, default: Sequence[int]) -> set[int]:
    if eos_token_id is None:
        return set(default)
    if isinstance(eos_token_id, (int, np.integer)):
        return {int(eos_token_id)}
    return {int(e) for e in eos_token_id}


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


def _score(
    runner: Runner, out_queries: list[Any], cache: Cache, config: CompressionConfig, method: Any, layout: PromptLayout
) -> list[LayerScore]:
    spec = runner.spec
    start = method.query_start(layout)
    scores = []
    for layer in range(spec.num_layers):
        keys, _ = runner.valid_kv(cache[layer])
        queries = runner.to_torch(out_queries[layer])[:, :, start:]
        if isinstance(method, VLCacheMethod):
            s, density = runner.post_vision_stats(queries, keys, start, method.settings.threshold, spec.attention_scale)
            scores.append(LayerScore(s, float(density.mean())))
        else:
            inp = LayerInput(queries, keys, start, spec.attention_scale, layer, spec.num_layers)
            scores.append(method.score(inp, layout))
    return scores


def _evict_step(runner: Runner, policy: DecodePolicy, queries: list[Any], cache: Cache) -> int:
    """Apply a decode policy after one single-token step; returns the number of evictions."""
    evicted = 0
    for layer in range(runner.spec.num_layers):
        keys, _ = runner.valid_kv(cache[layer])
        q = runner.to_torch(queries[layer])
        length = keys.shape[2]
        _, probs = next(iter_attention_chunks(q, keys, length - 1, scale=runner.spec.attention_scale))
        drop = policy.step(layer, probs, length)
        if drop is None:
            continue
        cache[layer] = runner.evict(cache[layer], int(drop))
        evicted += 1
    return evicted


def _cache_bytes(runner: Runner, cache: Cache) -> int:
    return sum(runner.kv_bytes(kv) for kv in cache)


class GenerationState:
    """One prompt after :func:`prefill`: its (compacted) cache, the next position, the current logits.

    Built by :func:`prefill`; :meth:`step` feeds one token and updates :attr:`logits`. Lets a
    caller (serving, benchmarks) drive decoding token by token; :func:`generate` is the greedy loop
    on top of it.
    """

    def __init__(
        self,
        runner: Runner,
        cache: Cache,
        logits: np.ndarray,
        stats: RuntimeStats,
        kept_indices: list[torch.Tensor | None],
        budgets: torch.Tensor | None,
        policy: DecodePolicy | None,
    ) -> None:
        self.runner = runner
        self.cache = cache
        #: (V,) logits of the last fed token (after prefill: of the prompt's last token)
        self.logits = logits
        self.stats = stats
        self.kept_indices = kept_indices
        self.budgets = budgets
        self.policy = policy
        #: the next token's position: counts every token seen, never the cache length
        self.position = stats.prompt_tokens
        #: seconds of each :meth:`step`
        self.step_seconds: list[float] = []

    def greedy(self) -> int:
        """argmax of the current logits."""
        return int(np.argmax(self.logits))

    def step(self, token: int) -> np.ndarray:
        """Append ``token`` at :attr:`position` in every layer, apply the decode policy; returns the new logits."""
        t0 = time.perf_counter()
        runner = self.runner
        embeds = runner.embed(np.array([[token]], dtype=np.int64))
        out = runner.forward(embeds, np.array([[self.position]], dtype=np.int64), self.cache)
        self.cache, self.logits = out.cache, out.logits[0]
        self.position += 1
        if self.policy is not None:
            self.stats.decode_evictions += _evict_step(runner, self.policy, out.queries, self.cache)
        elapsed = time.perf_counter() - t0
        self.step_seconds.append(elapsed)
        self.stats.decode_seconds += elapsed
        return self.logits


def prefill(
    runner: Runner,
    input_ids: Any,
    pixel_values: Any = None,
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 1,
) -> GenerationState:
    """Encode the images, run the prompt, score, allocate budgets and compact (steps 1–3 above).

    Args: as :func:`generate` (``max_new_tokens`` checks the export's ``max_input_len`` and sizes the
    KV buffers of runners that preallocate; stepping further still works, those buffers then grow).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    spec = runner.spec
    config = config or CompressionConfig()
    method = get_method(config)
    ids = _as_ids(input_ids, spec.vocab_size)
    m = ids.shape[1]
    if m + max_new_tokens > spec.max_input_len:
        raise ValueError(
            f"prompt ({m} tokens) + max_new_tokens ({max_new_tokens}) exceeds the export's max_input_len "
            f"({spec.max_input_len}); re-export with a larger max_input_len or shorten the prompt"
        )

    t0 = time.perf_counter()
    embeds = runner.embed(ids)
    n_image = _merge_images(runner, ids, embeds, pixel_values)
    layout = _layout(ids, spec.image_token_id)
    # room for the whole generation: `full` decodes in these buffers, compaction moves the kept entries out
    out = runner.forward(embeds, np.arange(m, dtype=np.int64)[None], runner.empty_cache(m + max_new_tokens))
    t1 = time.perf_counter()

    cache = out.cache
    before = _cache_bytes(runner, cache)
    kept_indices: list[torch.Tensor | None] = [None] * spec.num_layers
    budgets: torch.Tensor | None = None
    weights: list[float | None] = []
    policy: DecodePolicy | None = None
    if method.compresses:
        scores = _score(runner, out.queries, cache, config, method, layout)
        weights = [s.weight for s in scores]
        budgets = method.allocate(weights, layout)
        policy = method.decode_policy(budgets, layout)
        for layer in range(spec.num_layers):
            k = int(budgets[layer])
            if k >= m:
                continue
            kept = method.select(scores[layer].scores, k, layout)
            cache[layer] = runner.compact_layer(cache[layer], kept, k + max_new_tokens)
            kept_indices[layer] = kept
            if policy is not None:
                policy.set_protected(layer, kept)
    t2 = time.perf_counter()

    stats = RuntimeStats(
        backend=runner.backend,
        method=config.method,
        budget=config.budget,
        prompt_tokens=m,
        image_tokens=n_image,
        kept_per_layer=[kv.length for kv in cache],
        kv_bytes_before=before,
        kv_bytes_after=_cache_bytes(runner, cache),
        kv_bytes_reserved=sum(runner.kv_reserved_bytes(kv) for kv in cache),
        prefill_seconds=t1 - t0,
        scoring_seconds=t2 - t1,
        layer_weights=weights,
    )
    return GenerationState(runner, cache, out.logits[0], stats, kept_indices, budgets, policy)


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
    """Greedy generation with KV compression on any runner.

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
    seq = prefill(runner, input_ids, pixel_values, config, max_new_tokens=max_new_tokens)
    stops = _eos(eos_token_id, runner.spec.eos_token_id)
    tokens: list[int] = []
    logits_out: list[np.ndarray] | None = [] if return_logits else None
    while True:
        token = seq.greedy()
        tokens.append(token)
        if logits_out is not None:
            logits_out.append(np.array(seq.logits, copy=True))
        if on_token is not None:
            on_token(token)
        if len(tokens) >= max_new_tokens or token in stops:
            break
        seq.step(token)
    seq.stats.new_tokens = len(tokens)
    return RuntimeResult(tokens, seq.stats, seq.kept_indices, seq.budgets, logits_out)
