"""Greedy continuation on an existing (possibly compressed, ragged) cache: follow-up questions.

After ``generate`` returns, its cache holds the prompt (compressed) plus every generated token but
the last. :func:`continue_greedy` feeds new tokens at explicit positions — positions count every
token the sequence has seen, never the cache length — and decodes them with the one token stream
(:class:`vlcache.stream.TokenStream` over a :class:`~vlcache.hf.generation.TorchDecoder`). Run it
inside the same ``VLCache(...).apply(model)`` block so the ragged-cache attention stays installed;
the new tokens are appended and never evicted (TGV-KV's decode policy still applies to
single-token steps). With a stream of :func:`vlcache.hf.stream` that ran to its end, its
``stream.decoder`` continues the same way: ``decoder.extend(ids)``, then a new ``TokenStream``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlcache.hf.generation import TorchDecoder
from vlcache.stream import TokenStream, stop_ids


@torch.no_grad()
def continue_greedy(
    model: nn.Module,
    cache: Any,
    new_ids: torch.Tensor,
    start_position: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Append ``new_ids`` (1, n) at positions ``start_position ..`` and decode greedily.

    Returns:
        (k,) the generated token ids (k ≤ max_new_tokens; stops after ``eos_token_id``).
    """
    if new_ids.dim() != 2 or new_ids.shape[0] != 1 or new_ids.shape[1] < 1:
        raise ValueError("new_ids must be (1, n) with n >= 1")
    decoder = TorchDecoder(model, cache, start_position, logits=torch.empty(0), session=None)
    decoder.extend(new_ids)
    with TokenStream(decoder, max_new_tokens=max_new_tokens, stop=stop_ids(eos_token_id)) as tokens:
        out = list(tokens)
    return torch.tensor(out, dtype=torch.long)
