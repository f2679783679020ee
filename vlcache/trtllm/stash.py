"""Post-vision query rows kept during TensorRT-LLM's context phase, framework-light (torch only).

TensorRT-LLM's fused attention exposes no probabilities, and its cache holds keys, not queries: the
manager therefore keeps, per request and layer, the query rows of the prompt positions its method
scores with (VL-Cache: the post-vision window, from the first token after the last image token to
the prompt's end), as the attention layers see them chunk by chunk, and scores them against the
cached keys once the last chunk is done. Memory: τ · H_q · D per layer and request, never m × m.

The attention backend hands over a packed batch, context requests first, one row per token
(:func:`split_context_rows`); with RoPE fused into the attention kernel its queries are pre-RoPE,
so the hook rotates them (:func:`rope_neox`) before they are kept: the cached keys carry RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def split_context_rows(
    packed: torch.Tensor, seq_lens: Sequence[int], num_heads: int, head_dim: int
) -> list[torch.Tensor]:
    """The query rows of each context request in a packed attention input.

    Args:
        packed: (T, W) one row per token, the context requests' tokens first and in order; W ≥
            num_heads · head_dim (a fused QKV input: the query is its first num_heads · head_dim columns).
        seq_lens: tokens of each context request in this step (its chunk's length).

    Returns:
        per context request, a (n_r, num_heads, head_dim) view.
    """
    width = num_heads * head_dim
    if packed.dim() != 2 or packed.shape[1] < width:
        raise ValueError(f"packed rows must be (T, >= {width}), got {tuple(packed.shape)}")
    if sum(seq_lens) > packed.shape[0]:
        raise ValueError(f"{sum(seq_lens)} context tokens but only {packed.shape[0]} rows")
    out, start = [], 0
    for n in seq_lens:
        out.append(packed[start : start + n, :width].view(n, num_heads, head_dim))
        start += n
    return out


def rope_neox(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, GPT-NeoX / HF LLaMA style (halves rotated), of (n, H, D) rows at
    ``positions`` (n,), with ``inv_freq`` (D/2,); returns a new float32 tensor."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # (n, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None, :]
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * cos + rotated * sin


@dataclass
class _Rows:
    query_start: int
    prompt_len: int
    layers: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per layer: position -> (n, H, D)


class QueryStash:
    """Query rows of positions ``[query_start, prompt_len)`` per request and layer, added chunk by chunk."""

    def __init__(self) -> None:
        self._requests: dict[int, _Rows] = {}

    def begin(self, request_id: int, query_start: int, prompt_len: int, num_layers: int) -> None:
        """Start collecting a request's rows (again, if it was started before)."""
        if not 0 <= query_start <= prompt_len:
            raise ValueError(f"query_start {query_start} outside [0, {prompt_len}]")
        self._requests[request_id] = _Rows(query_start, prompt_len, [{} for _ in range(num_layers)])

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._requests

    def add(self, request_id: int, layer: int, rows: torch.Tensor, start: int) -> int:
        """Keep the rows of ``rows`` (n, H_q, D), at positions ``start .. start + n − 1``, that lie in
        the request's window (a copy, detached); returns how many. Unknown requests are ignored (0)."""
        entry = self._requests.get(request_id)
        if entry is None:
            return 0
        lo = max(entry.query_start, start)
        hi = min(entry.prompt_len, start + rows.shape[0])
        if hi <= lo:
            return 0
        entry.layers[layer][lo] = rows[lo - start : hi - start].detach().clone()
        return hi - lo

    def ready(self, request_id: int) -> bool:
        """True when every layer holds every row of the request's window."""
        entry = self._requests.get(request_id)
        if entry is None:
            return False
        want = entry.prompt_len - entry.query_start
        return all(sum(t.shape[0] for t in chunks.values()) == want for chunks in entry.layers)

    def queries(self, request_id: int, layer: int) -> torch.Tensor:
        """(1, H_q, τ, D) the layer's rows in position order (KeyError / ValueError when incomplete)."""
        entry = self._requests[request_id]
        chunks = entry.layers[layer]
        pos = entry.query_start
        parts = []
        for start in sorted(chunks):
            if start != pos:
                raise ValueError(f"request {request_id} layer {layer}: rows from {pos} missing")
            parts.append(chunks[start])
            pos += chunks[start].shape[0]
        if pos != entry.prompt_len:
            raise ValueError(f"request {request_id} layer {layer}: rows {pos}..{entry.prompt_len - 1} missing")
        if not parts:
            raise ValueError(f"request {request_id}: an empty query window")
        return torch.cat(parts, dim=0).permute(1, 0, 2).unsqueeze(0)

    def pop(self, request_id: int) -> None:
        self._requests.pop(request_id, None)
