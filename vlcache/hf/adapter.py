"""What vlcache needs to know about a transformers model, in one place.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout), ``LlavaNextForConditionalGeneration``
and, for text-only work and benchmarks, decoder-only causal LMs whose attention modules look like
Llama's (``q_proj``, ``head_dim``, ``scaling``, ``layer_idx``; RoPE from ``position_embeddings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def decoder_stack(model: nn.Module) -> nn.Module:
    """The text decoder (the module holding ``layers``): ``model.model.language_model`` for LLaVA."""
    for path in ("model.language_model", "language_model", "model"):
        obj: object = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        layers = getattr(obj, "layers", None)
        if isinstance(obj, nn.Module) and isinstance(layers, nn.ModuleList):
            return obj
    raise ValueError(
        f"{type(model).__name__} is not a supported model: no text decoder with `layers` found "
        "(supported: LLaVA-1.5, LLaVA-NeXT and Llama-like causal LMs)"
    )


def attention_modules(stack: nn.Module) -> list[nn.Module]:
    """The ``self_attn`` module of every decoder layer, checked for the attributes vlcache uses."""
    mods = [layer.self_attn for layer in stack.layers]  # type: ignore[union-attr]
    for mod in mods:
        missing = [a for a in ("q_proj", "head_dim", "scaling", "layer_idx") if not hasattr(mod, a)]
        if missing:
            raise ValueError(f"attention module {type(mod).__name__} lacks {missing}; not a supported architecture")
    return mods


def image_token_id(model: nn.Module) -> int | None:
    """The placeholder id the processor expands into one token per visual feature (None: text-only model)."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    return None


def find_image_spans(input_ids: torch.Tensor | Sequence[int], image_token: int | None) -> tuple[tuple[int, int], ...]:
    """Half-open ``(start, end)`` runs of ``image_token`` in a 1-D prompt (several images allowed)."""
    ids = torch.as_tensor(input_ids).flatten()
    if image_token is None or ids.numel() == 0:
        return ()
    is_img = (ids == image_token).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return tuple(zip(starts, ends))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_queries(
    attn: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Recompute the attention's queries (after RoPE) for some rows, as the module computed them.

    Args:
        attn: a Llama-like attention module.
        hidden_states: (B, n, hidden) the rows' inputs to the attention.
        position_embeddings: (cos, sin), each (B, n, head_dim), for the same rows.

    Returns:
        (B, H_q, n, head_dim).
    """
    b, n, _ = hidden_states.shape
    heads = attn.q_proj.out_features // attn.head_dim  # type: ignore[union-attr,operator]
    q = attn.q_proj(hidden_states).view(b, n, heads, attn.head_dim).transpose(1, 2)  # type: ignore[operator]
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:  # Qwen3-style per-head norm before RoPE
        q = q_norm(q.transpose(1, 2)).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin


def cache_nbytes(cache: object) -> int:
    """Bytes held by a transformers cache's keys and values, all layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a decoder stack or attention module: transformers < 5.24 name the
    keyword ``past_key_values``, 5.24 and later ``cache``."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache
