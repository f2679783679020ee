"""`vlcache.generate`: one call that generates with compression and returns the stats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlcache.config import CompressionConfig
from vlcache.hf.session import CompressionStats, VLCache


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
        **generate_kwargs: passed to ``model.generate``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    session = VLCache(config)
    kwargs: dict[str, Any] = {"do_sample": False, **generate_kwargs}
    with session.apply(model), torch.no_grad():
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
