"""The torch backend's generation: :func:`stream` (greedy tokens one by one) and :func:`generate`.

:class:`TorchDecoder` is the torch backend's :class:`~vlcache.stream.Decoder`: a transformers model,
its (compressed, ragged) ``DynamicCache``, the next position and the current logits. Each forward
it runs — the prefill and every decode step — runs inside its :class:`~vlcache.hf.session.VLCache`
session's ``apply`` (hooks and ragged attention installed for that call only, so several decoders
may take turns on one model), with explicit positions that keep counting from the prompt length.
The greedy loop is :class:`vlcache.stream.TokenStream`, the same for every backend.

:func:`generate_from_prefill` gives the same greedy tokens from a prefill captured once
(:mod:`vlcache.hf.prefill`), so many methods and budgets can share one prompt's prefill.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlcache.config import CompressionConfig
from vlcache.hf.session import VLCache
from vlcache.pipeline import CompressionStats
from vlcache.stream import TokenStream, stop_ids

if TYPE_CHECKING:
    from vlcache.hf.prefill import CapturedPrefill


@dataclass
class GenerationResult:
    """sequences: (1, m + n) prompt and new tokens; new_tokens: (n,); logits: n tensors (1, V) when
    asked for; stats: what compression did; finish_reason: ``stop`` or ``length``; kept_indices: per
    layer the (1, H_kv, k) prompt positions kept (None: all kept); budgets: (L,) tokens kept per
    layer (None for ``full``)."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    stats: CompressionStats
    logits: tuple[torch.Tensor, ...] | None = None
    finish_reason: str | None = None
    kept_indices: list[torch.Tensor | None] | None = None
    budgets: torch.Tensor | None = None


def cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by (``cache`` from transformers 5.24 on)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def default_eos(model: nn.Module) -> frozenset[int]:
    """The ids ``model.generate`` stops after: ``model.generation_config.eos_token_id``."""
    config = getattr(model, "generation_config", None)
    return stop_ids(getattr(config, "eos_token_id", None))


class TorchDecoder:
    """One prompt on a transformers model after its prefill (see the module docstring).

    Args:
        model: the model.
        cache: its KV cache for this prompt (a ``DynamicCache``).
        position: the next token's position (the number of tokens the sequence has seen).
        logits: (1, V) logits of the last fed token.
        session: the compression session whose prefill made ``cache``; each forward runs inside its
            ``apply``. None: the caller's own ``apply`` block (or none) is in force.
    """

    def __init__(
        self, model: nn.Module, cache: Any, position: int, logits: torch.Tensor, session: VLCache | None = None
    ) -> None:
        self.model = model
        self.cache: Any = cache
        self.position = position
        self._logits: torch.Tensor | None = logits
        self.session = session
        self.stats: CompressionStats | None = session.stats if session is not None else None
        self._cache_kw = cache_keyword(model)

    @classmethod
    def prefill(
        cls,
        model: nn.Module,
        inputs: Mapping[str, Any],
        config: CompressionConfig | None = None,
        *,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> TorchDecoder:
        """Run the prompt (batch size 1) in a new session for ``config``: scored, compressed, stats recorded."""
        from transformers import DynamicCache

        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError("inputs must hold input_ids of shape (1, m), m >= 1")
        if ids.shape[0] != 1:
            raise ValueError(
                f"vlcache generates one prompt at a time: got batch size {ids.shape[0]}. Run prompts one by "
                "one (method='full' on a batch: VLCache(...).apply(model) around model.generate)"
            )
        session = VLCache(config)
        cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
        with session.apply(model, spans=spans), torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})  # type: ignore[operator]
        if session.stats is None:
            raise RuntimeError("the model ran no prefill through its text decoder; is it a supported model?")
        return cls(model, cache, int(ids.shape[1]), out.logits[:, -1], session)

    @property
    def logits(self) -> torch.Tensor:
        """(1, V) logits of the last fed token."""
        if self._logits is None:
            raise RuntimeError("this decoder was closed")
        return self._logits

    def greedy(self) -> int:
        return int(self.logits[0].argmax())

    def _context(self) -> AbstractContextManager[Any]:
        return self.session.apply(self.model) if self.session is not None else nullcontext()

    def extend(self, ids: torch.Tensor, *, last_only: bool = False) -> None:
        """Feed ``ids`` (1, n) at the next n positions; :attr:`logits` become the last one's.
        ``last_only``: compute the logits of the last position only (what ``model.generate`` does)."""
        if self.cache is None:
            raise RuntimeError("this decoder was closed")
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError("new ids must be (1, n) with n >= 1")
        n = int(ids.shape[1])
        positions = torch.arange(self.position, self.position + n, device=ids.device)[None]
        extra = {"logits_to_keep": 1} if last_only else {}
        with self._context(), torch.no_grad():
            out = self.model(  # type: ignore[operator]
                input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_kw: self.cache}, **extra
            )
        self.position += n
        self._logits = out.logits[:, -1]

    def step(self, token: int) -> None:
        self.extend(torch.tensor([[token]], device=self.logits.device), last_only=True)

    def close(self) -> None:
        """Drop the cache and the session (the cache's memory is freed unless someone else holds it)."""
        self.cache = None
        self._logits = None
        self.session = None


def stream(
    model: nn.Module,
    inputs: Mapping[str, Any],
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    keep_logits: bool = False,
) -> TokenStream:
    """Prefill and compress now (errors raise here), then yield the greedy tokens one by one.

    Args: as :func:`generate`; ``keep_logits`` records each token's (1, V) logits in ``stream.logits``.
    Closing the stream (or leaving ``with stream(...) as tokens:``) frees the cache.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    decoder = TorchDecoder.prefill(model, inputs, config, spans=spans)
    stops = default_eos(model) if eos_token_id is None else stop_ids(eos_token_id)
    return TokenStream(decoder, max_new_tokens=max_new_tokens, stop=stops, keep_logits=keep_logits)


def generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 32,
    return_logits: bool = False,
    spans: Sequence[tuple[int, int]] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> GenerationResult:
    """Greedy generation with KV compression (the tokens of :func:`stream`, collected).

    Args:
        model: a LLaVA / LLaVA-NeXT (or Llama-like) transformers model.
        inputs: what the processor returns (``input_ids``, ``attention_mask``, ``pixel_values``,
            ``image_sizes`` ...), batch size 1.
        config: compression settings; default ``CompressionConfig()`` (VL-Cache at 10%).
        max_new_tokens: tokens to generate.
        return_logits: also return the logits of every generated step.
        spans: the prompt spans that play the image's role, when not found through the model's image
            token: for a text-only LM, the context a trailing question asks about (see
            :meth:`VLCache.apply`).
        eos_token_id: ids that stop generation; None: ``model.generation_config``'s (what
            ``model.generate`` stops at); ``()``: never stop early.
    """
    with stream(
        model,
        inputs,
        config,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        spans=spans,
        keep_logits=return_logits,
    ) as tokens:
        return _collect(inputs["input_ids"], tokens)


def _collect(input_ids: torch.Tensor, tokens: TokenStream) -> GenerationResult:
    """Run a stream of a :class:`TorchDecoder` to its end; its tokens, stats and kept indices."""
    list(tokens)
    decoder = tokens.decoder
    assert isinstance(decoder, TorchDecoder) and decoder.session is not None and tokens.stats is not None
    compression = decoder.session.compression
    assert compression is not None
    new = torch.tensor(tokens.tokens, dtype=input_ids.dtype, device=input_ids.device)
    return GenerationResult(
        sequences=torch.cat([input_ids, new[None]], dim=1),
        new_tokens=new,
        stats=tokens.stats,
        logits=tuple(tokens.logits) if tokens.logits is not None else None,
        finish_reason=tokens.finish_reason,
        kept_indices=list(compression.kept_indices),
        budgets=compression.budgets,
    )


def generate_from_prefill(
    model: nn.Module,
    prefill: CapturedPrefill,
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
) -> GenerationResult:
    """Greedy generation with KV compression on a captured prefill (no new prefill).

    The first token is the argmax of the prefill's last logits; the cache is compressed by
    :meth:`VLCache.compress_prefill` and decoded by the token stream with explicit positions,
    stopping after ``eos_token_id``. Gives the tokens of ``generate(model, inputs, config, spans=...)``
    greedy on the prompt the prefill captured (``logits`` is None).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    session = VLCache(config)
    with torch.no_grad():
        cache = session.compress_prefill(prefill)
    decoder = TorchDecoder(model, cache, prefill.prompt_len, prefill.logits, session)
    with TokenStream(decoder, max_new_tokens=max_new_tokens, stop=stop_ids(eos_token_id)) as tokens:
        return _collect(prefill.input_ids, tokens)
