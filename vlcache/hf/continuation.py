"""Greedy continuation on an existing (possibly compressed, ragged) cache: follow-up questions.

After ``generate`` returns, its cache holds the prompt (compressed) plus every generated token but
the last. :func:`continue_greedy` feeds new tokens at explicit positions — positions count every
token the sequence has seen, never the cache length — and decodes greedily. Run it inside the same
``VLCache(...).apply(model)`` block so the ragged-cache attention stays installed; the new tokens are
appended and never evicted (TGV-KV's decode policy still applies to single-token steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
    pos = start_position
    ids = new_ids
    out: list[int] = []
    for _ in range(max_new_tokens):
        n = ids.shape[1]
        position_ids = torch.arange(pos, pos + n, device=ids.device)[None]
        logits = model(input_ids=ids, past_key_values=cache, position_ids=position_ids, use_cache=True).logits
        pos += n
        token = int(logits[0, -1].argmax())
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        ids = torch.tensor([[token]], device=new_ids.device)
    return torch.tensor(out, dtype=torch.long)
