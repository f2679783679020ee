"""`vlcache.generate`: one call that generates with compression and returns the stats.

:func:`generate_from_prefill` gives the same greedy tokens from a prefill captured once
(:mod:`vlcache.hf.prefill`), so many methods and budgets can share one prompt's prefill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlcache.config import CompressionConfig
from vlcache.hf.session import CompressionStats, VLCache

if TYPE_CHECKING:
    from vlcache.hf.prefill import CapturedPrefill


@dataclass
class GenerationResult:
    """sequences: (1, m + n) prompt and new tokens; new_tokens: (n,); logits: n tensors (1, V) when
    asked for; stats: what compression did."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    stats: CompressionStats
    logits: tuple[torch.Tensor, ...] | None = None


def generate(
    model: nn.Module,
    inputs: Mapping[str, Any],
    config: CompressionConfig | None = None,
    *,
    max_new_tokens: int = 32,
    return_logits: bool = False,
    spans: Sequence[tuple[int, int]] | None = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Greedy (unless told otherwise) generation with KV compression.

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
        **generate_kwargs: passed to ``model.generate``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    session = VLCache(config)
    kwargs: dict[str, Any] = {"do_sample": False, **generate_kwargs}
    with session.apply(model, spans=spans), torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            **inputs,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=return_logits,
            **kwargs,
        )
    if session.stats is None:
        raise RuntimeError("the model ran no prefill through its text decoder; is it a supported model?")
    prompt_len = inputs["input_ids"].shape[-1]
    return GenerationResult(
        sequences=out.sequences,
        new_tokens=out.sequences[0, prompt_len:],
        stats=session.stats,
        logits=tuple(out.logits) if return_logits else None,
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
    :meth:`VLCache.compress_prefill` and decoded with explicit positions, stopping after
    ``eos_token_id``. Gives the tokens of ``generate(model, inputs, config, spans=...)`` greedy on
    the prompt the prefill captured (``logits`` is None).
    """
    from vlcache.hf.continuation import continue_greedy

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    session = VLCache(config)
    first = int(prefill.logits[0].argmax())
    tokens = [first]
    with session.apply(model), torch.no_grad():
        cache = session.compress_prefill(prefill)
        if max_new_tokens > 1 and first != eos_token_id:
            ids = torch.tensor([[first]], device=prefill.input_ids.device)
            rest = continue_greedy(model, cache, ids, prefill.prompt_len, max_new_tokens - 1, eos_token_id)
            tokens += rest.tolist()
    assert session.stats is not None
    new_tokens = torch.tensor(tokens, dtype=prefill.input_ids.dtype, device=prefill.input_ids.device)
    return GenerationResult(
        sequences=torch.cat([prefill.input_ids, new_tokens[None]], dim=1),
        new_tokens=new_tokens,
        stats=session.stats,
    )
