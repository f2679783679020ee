"""Attention that tolerates a different cache length in every layer.

After eviction, layer l holds ``k_l + t`` keys while transformers builds one mask for all layers
(from layer 0's length), indexed by cache slot rather than by position. For a single unpadded
sequence the correct mask only depends on shapes: query row i of n sees the first
``kv_len − n + i + 1`` keys (bottom-right-aligned causal). The wrappers below rebuild it whenever
the query block is not the whole sequence, then call the model's own sdpa or eager attention.
Registered once under ``vlcache_sdpa`` / ``vlcache_eager`` (attention and mask interfaces).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

PREFIX = "vlcache_"
SUPPORTED = ("sdpa", "eager")
_INNER: dict[str, Callable[..., Any]] = {"sdpa": sdpa_attention_forward, "eager": eager_attention_forward}
_MASKS = {"sdpa": sdpa_mask, "eager": eager_mask}


def bottom_right_causal(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, q_len, kv_len) additive mask: row i sees keys ``< kv_len − q_len + i + 1``."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    hidden = cols > rows + (kv_len - q_len)
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(hidden, torch.finfo(dtype).min)[
        None, None
    ]


def _make(inner_name: str) -> Callable[..., Any]:
    inner = _INNER[inner_name]

    def ragged_attention(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        q_len, kv_len = query.shape[2], key.shape[2]
        if query.shape[0] == 1 and q_len != kv_len:
            attention_mask = None if q_len == 1 else bottom_right_causal(q_len, kv_len, query.dtype, query.device)
            kwargs["is_causal"] = False
        return inner(module, query, key, value, attention_mask, **kwargs)

    ragged_attention.__name__ = f"{PREFIX}{inner_name}_attention"
    return ragged_attention


def ragged_name(implementation: str | None) -> str:
    """The registered wrapper for a model's attention implementation; registers it on first use."""
    impl = implementation or "eager"
    if impl.startswith(PREFIX):
        return impl
    if impl not in SUPPORTED:
        raise ValueError(
            f"KV eviction needs attn_implementation 'sdpa' or 'eager' for the language model, got {impl!r}; "
            "load the model with attn_implementation='sdpa'"
        )
    name = PREFIX + impl
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make(impl))  # type: ignore[arg-type]
        AttentionMaskInterface.register(name, _MASKS[impl])  # type: ignore[arg-type]
    return name
