"""The decisions of the TensorRT-LLM backend, framework-light (torch, :mod:`vlcache.core`,
:mod:`vlcache.methods`): layer budgets, the one physical count per request, per-layer per-head kept
sets under that count, and the compaction moves in the form of TensorRT-LLM's op.

TensorRT-LLM's rule (see :mod:`vlcache.trtllm`): a request's cache has ONE length for every layer and
head (``LlmRequest.py_num_compressed_tokens`` is one integer), and ``sparse_kv_cache_compact_layers``
moves the same number of entries per request in every layer and head, from per-layer per-head source
rows. VL-Cache gives each layer its own budget ``k_l``. This module maps them by **max padding**:

* budgets: the method's own ``allocate`` (VL-Cache: :func:`vlcache.core.allocate_budgets`, Σ k_l =
  round(α·L·m) exactly); with a ``cap`` (a fraction of the prompt) the same total is re-allocated
  with every layer at most the cap (the method's allocator run as if the prompt had ``cap`` tokens);
* the physical count ``C = max_l k_l``;
* layer l keeps its method selection of k_l tokens (VL-Cache: the recent window plus the top
  scores, :func:`vlcache.core.select_kept` through :meth:`vlcache.methods.Method.select`), padded
  to C with its next-best C − k_l tokens by the same scores (per KV head, or shared by the heads as
  the method selects). So every token VL-Cache keeps stays in the cache (a superset), and
  :attr:`RequestPlan.logical` marks which of the C entries VL-Cache itself keeps, for an attention
  that could mask the padding (TensorRT-LLM's framework has no such hook at the pinned commit).

Nothing here imports TensorRT-LLM; :mod:`vlcache.trtllm.manager` is the shim that calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vlcache.config import CompressionConfig
from vlcache.methods import LayerInput, LayerScore, Method, PromptLayout, get_method, method_class

#: How VL-Cache's per-layer budgets become TensorRT-LLM's one count per request (module docstring).
COUNT_MAPPING = "max_padding"


def check_method(name: str) -> None:
    """ValueError unless method ``name`` can run under TensorRT-LLM's framework here: it compresses
    once, at the end of the context phase (a decode-time policy such as TGV-KV's would need
    ``on_generation_step_end`` and per-layer lengths, which the one count per request rules out)."""
    cls = method_class(name)
    if cls.decode_policy is not Method.decode_policy:
        raise ValueError(
            f"method {name!r} evicts during decoding, which the trtllm backend does not support "
            "(TensorRT-LLM keeps one cache length per request); choose a method that compresses once after prefill"
        )


def check_cap(cap: float | None) -> None:
    if cap is not None and not 0.0 < cap <= 1.0:
        raise ValueError(f"count cap must be a fraction in (0, 1] of the prompt or None, got {cap!r}")


def count_cap(cap: float | None, total: int, num_layers: int, prompt_len: int) -> int:
    """The largest physical count ``cap`` allows, in tokens: ``ceil(cap · m)``, never below the
    uniform share ``ceil(total / L)`` (so the total still fits) nor above m; m when ``cap`` is None."""
    check_cap(cap)
    if cap is None:
        return prompt_len
    return min(prompt_len, max(math.ceil(cap * prompt_len - 1e-9), math.ceil(total / num_layers), 1))


def layer_budgets(
    method: Method, weights: Sequence[float | None], layout: PromptLayout, cap: float | None = None
) -> torch.Tensor:
    """(L,) logical tokens kept per layer: ``method.allocate`` (VL-Cache's budgets), or with a
    ``cap`` the same total re-allocated by the same allocator with each layer at most
    :func:`count_cap` tokens (allocated as if the prompt had that many tokens, with the same floor)."""
    budgets = method.allocate(weights, layout)
    m, num_layers = layout.prompt_len, len(weights)
    total = int(budgets.sum())
    limit = count_cap(cap, total, num_layers, m)
    if int(budgets.max()) <= limit:
        return budgets
    floor = method.min_keep(layout)
    capped = method.config.with_changes(budget=total / (num_layers * limit), min_layer_budget=min(1.0, floor / limit))
    again = get_method(capped).allocate(weights, PromptLayout(limit))
    if int(again.sum()) != total or int(again.max()) > limit:  # pragma: no cover - guards the allocator contract
        raise RuntimeError(f"re-allocation under a cap of {limit} gave {again.tolist()} for a total of {total}")
    return again


def pad_selection(
    scores: torch.Tensor, kept: torch.Tensor, count: int, *, per_head: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad one layer's kept set to ``count`` entries with its next-best tokens.

    Args:
        scores: (B, H_kv, m) the layer's scores (higher = keep).
        kept: (B, H_kv, k) the method's kept indices, ascending (identical rows when not ``per_head``).
        count: C ≥ k, entries kept physically.
        per_head: pad each KV head by its own scores (True) or every head by the head-mean (False).

    Returns:
        (B, H_kv, C) int64 indices, ascending, and (B, H_kv, C) bool, True on the entries of ``kept``.
    """
    b, h, k = kept.shape
    m = scores.shape[-1]
    if not k <= count <= m:
        raise ValueError(f"count must lie in [{k}, {m}], got {count}")
    own = torch.ones(b, h, k, dtype=torch.bool, device=kept.device)
    if count == k:
        return kept, own
    s = scores.float() if per_head else scores.float().mean(dim=1, keepdim=True)
    rows = kept if per_head else kept[:, :1]
    s = s.scatter(-1, rows, float("-inf"))
    extra = torch.topk(s, count - k, dim=-1, sorted=False).indices.expand(b, h, count - k)
    idx = torch.cat([kept, extra], dim=-1)
    flags = torch.cat([own, torch.zeros(b, h, count - k, dtype=torch.bool, device=kept.device)], dim=-1)
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), flags.gather(-1, order)


@dataclass(frozen=True)
class RequestPlan:
    """One request's compression under TensorRT-LLM's rule.

    Attributes:
        prompt_len: m.
        budgets: (L,) the logical budgets k_l (what VL-Cache keeps per layer).
        count: C, the entries every layer and head keeps physically (C = m: nothing is evicted).
        kept: (L, H_kv, C) int64 kept prompt positions per layer and head, ascending.
        logical: (L, H_kv, C) bool, True where the method itself keeps the entry (False: padding).
        weights: what each layer gave the allocator (VL-Cache: its density).
    """

    prompt_len: int
    budgets: torch.Tensor
    count: int
    kept: torch.Tensor
    logical: torch.Tensor
    weights: list[float | None] = field(default_factory=list)

    @property
    def evicted(self) -> int:
        """Tokens removed from every layer: what ``py_num_compressed_tokens`` grows by."""
        return self.prompt_len - self.count


def keep_all(prompt_len: int, num_layers: int, num_kv_heads: int) -> RequestPlan:
    """The plan of a method that does not compress (``full``)."""
    idx = torch.arange(prompt_len).expand(num_layers, num_kv_heads, prompt_len)
    budgets = torch.full((num_layers,), prompt_len, dtype=torch.long)
    return RequestPlan(prompt_len, budgets, prompt_len, idx, torch.ones_like(idx, dtype=torch.bool))


def plan_request(
    method: Method, scores: Sequence[LayerScore], layout: PromptLayout, cap: float | None = None
) -> RequestPlan:
    """Budgets, the physical count and the padded per-layer per-head kept sets of one request
    (batch 1: every ``scores[l].scores`` is (1, H_kv, m))."""
    if not scores:
        raise ValueError("need the scores of at least one layer")
    m = layout.prompt_len
    weights = [s.weight for s in scores]
    budgets = layer_budgets(method, weights, layout, cap)
    count = int(budgets.max())
    kept, logical = [], []
    for score, k in zip(scores, budgets.tolist()):
        if score.scores.shape[0] != 1 or score.scores.shape[-1] != m:
            raise ValueError(f"layer scores must be (1, H_kv, {m}), got {tuple(score.scores.shape)}")
        base = method.select(score.scores, int(k), layout)
        idx, own = pad_selection(score.scores, base, count, per_head=method.per_head)
        kept.append(idx[0])
        logical.append(own[0])
    return RequestPlan(m, budgets, count, torch.stack(kept), torch.stack(logical), weights)


# --- the compaction op's arguments ------------------------------------------------------------------


@dataclass(frozen=True)
class CompactionMoves:
    """The index arguments of ``torch.ops.trtllm.sparse_kv_cache_compact_layers`` for a cohort of R
    requests in one launch over L layers (the shim adds the pools, their pointers and the page table).

    Attributes:
        source_indices: (L, H_kv, total) int32; request r's moves are columns
            ``source_offsets[r] : source_offsets[r+1]`` (its kept prompt positions, then its tail).
        source_offsets: (R + 1,) int32 CSR offsets: request r moves ``count_r + tail_r`` entries.
        destination_bases: (R,) int32 zeros: the kept entries land at positions 0, 1, ...
        source_layer_indices: (L,) int32 ``arange(L)``: the launch's layer i reads source row i.
        new_lengths: per request, the cache length after the moves (``count_r + tail_r``).
    """

    source_indices: torch.Tensor
    source_offsets: torch.Tensor
    destination_bases: torch.Tensor
    source_layer_indices: torch.Tensor
    new_lengths: list[int]


def compaction_moves(plans: Sequence[RequestPlan], tails: Sequence[int] | None = None) -> CompactionMoves:
    """The moves that compact every request of ``plans`` in one launch.

    ``tails[r]``: entries already written after request r's prompt (positions m .. m + t − 1, e.g. a
    token reserved by the overlap scheduler); they are moved, unchanged, behind the kept prompt
    entries. Per request and head the sources ascend and ``source[i] ≥ i``: the op's in-place
    contract (``destination_bases[r] + i ≤ source[i]``)."""
    if not plans:
        raise ValueError("need at least one request")
    tails = [0] * len(plans) if tails is None else [int(t) for t in tails]
    if len(tails) != len(plans) or min(tails) < 0:
        raise ValueError("one non-negative tail per request")
    shape = plans[0].kept.shape[:2]
    rows = []
    for plan, tail in zip(plans, tails):
        if plan.kept.shape[:2] != shape:
            raise ValueError(f"every request needs the same (layers, KV heads) {tuple(shape)}")
        tail_idx = torch.arange(plan.prompt_len, plan.prompt_len + tail).expand(*shape, tail)
        rows.append(torch.cat([plan.kept.to(torch.int64), tail_idx], dim=-1))
    lengths = [p.count + t for p, t in zip(plans, tails)]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return CompactionMoves(
        source_indices=torch.cat(rows, dim=-1).to(torch.int32).contiguous(),
        source_offsets=offsets,
        destination_bases=torch.zeros(len(plans), dtype=torch.int32),
        source_layer_indices=torch.arange(shape[0], dtype=torch.int32),
        new_lengths=lengths,
    )


def check_move_contract(moves: CompactionMoves) -> None:
    """ValueError unless every request's sources ascend strictly with ``base + i ≤ source[i]`` in
    every layer and head (what makes the op's tiled in-place forward copy safe)."""
    offsets = moves.source_offsets.tolist()
    for r in range(len(offsets) - 1):
        src = moves.source_indices[..., offsets[r] : offsets[r + 1]].long()
        if src.shape[-1] == 0:
            continue
        base = int(moves.destination_bases[r])
        dest = base + torch.arange(src.shape[-1])
        if bool((src < dest).any()) or (src.shape[-1] > 1 and bool((src.diff(dim=-1) <= 0).any())):
            raise ValueError(f"request {r}: sources must ascend strictly with destination_base + i <= source[i]")


def reference_compact_layers(
    pools: Sequence[torch.Tensor],
    page_table: torch.Tensor,
    source_indices: torch.Tensor,
    source_offsets: torch.Tensor,
    destination_bases: torch.Tensor,
    source_layer_indices: torch.Tensor | None = None,
) -> None:
    """CPU oracle of ``sparse_kv_cache_compact_layers`` as its source documents it, in place.

    Args:
        pools: per layer (pages, 2, H_kv, tokens_per_block, D): K (plane 0) and V (plane 1) pages.
        page_table: (R, max_pages) page ids of each request's blocks, in order (the op itself takes
            V2's K block offsets, 2 · page, and decodes them as ``offset // 2``).
        source_indices: (H_kv, total), or (rows, H_kv, total) with ``source_layer_indices``.
        source_offsets: (R + 1,) CSR offsets of each request's moves.
        destination_bases: (R,) where each request's first move lands.
        source_layer_indices: (len(pools),) the source row of each pool.

    Move i of request r copies token ``source[i]`` to token ``destination_bases[r] + i`` (K and V,
    every head), one after another, reading the pools as they are being written: a move list that
    breaks the contract (:func:`check_move_contract`) corrupts the result, as on the GPU.
    """
    tokens_per_block = pools[0].shape[3]
    for layer, pool in enumerate(pools):
        if source_indices.dim() == 3:
            if source_layer_indices is None:
                raise ValueError("3-D source_indices need source_layer_indices")
            src_rows = source_indices[int(source_layer_indices[layer])]
        else:
            src_rows = source_indices
        for r in range(page_table.shape[0]):
            lo, hi = int(source_offsets[r]), int(source_offsets[r + 1])
            base = int(destination_bases[r])
            for head in range(src_rows.shape[0]):
                for i, col in enumerate(range(lo, hi)):
                    src, dst = int(src_rows[head, col]), base + i
                    if src == dst:
                        continue
                    sp, so = int(page_table[r, src // tokens_per_block]), src % tokens_per_block
                    dp, do = int(page_table[r, dst // tokens_per_block]), dst % tokens_per_block
                    pool[dp, :, head, do] = pool[sp, :, head, so]


def gather_layer(pool: torch.Tensor, pages: torch.Tensor, length: int, plane: int = 0) -> torch.Tensor:
    """One request's keys (plane 0) or values (plane 1) of one layer from a paged pool.

    Args:
        pool: (pages, 2, H_kv, tokens_per_block, D), TensorRT-LLM's HND pool layout.
        pages: (n,) page ids of the request's blocks, in order.
        length: tokens to read (≤ n · tokens_per_block).

    Returns:
        (1, H_kv, length, D), the layout :mod:`vlcache.core` takes.
    """
    n, tpb = pages.shape[0], pool.shape[3]
    if length > n * tpb:
        raise ValueError(f"{length} tokens do not fit in {n} pages of {tpb}")
    blocks = pool.index_select(0, pages.to(device=pool.device, dtype=torch.long))[:, plane]  # (n, H, tpb, D)
    h, d = blocks.shape[1], blocks.shape[3]
    return blocks.permute(1, 0, 2, 3).reshape(h, n * tpb, d)[:, :length].unsqueeze(0)


def prompt_layout(
    token_ids: Sequence[int] | torch.Tensor, image_token_id: int, vocab_size: int | None = None
) -> PromptLayout:
    """The image spans of a prompt from its token ids: runs of ``image_token_id`` (and, when
    ``vocab_size`` is given, of ids ≥ vocab_size: multimodal placeholders outside the vocabulary)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    mask = ids == image_token_id
    if vocab_size is not None:
        mask |= ids >= vocab_size
    spans: list[tuple[int, int]] = []
    start = None
    for i, is_image in enumerate(mask.tolist()):
        if is_image and start is None:
            start = i
        elif not is_image and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(mask)))
    return PromptLayout(int(ids.numel()), tuple(spans))


# --- the context-end compressor ---------------------------------------------------------------------


class ContextCompressor:
    """What the TensorRT-LLM manager does at the end of a request's context phase, without TensorRT-LLM:
    score every layer from its stashed post-vision queries and its cached keys, allocate, plan.

    Args:
        config: the compression (method, budget, per-method settings).
        cap: the physical count's cap as a fraction of the prompt (None: pure max padding).
    """

    def __init__(self, config: CompressionConfig, *, cap: float | None = None) -> None:
        check_method(config.method)
        check_cap(cap)
        self.config = config
        self.method = get_method(config)
        self.cap = cap

    def query_start(self, layout: PromptLayout) -> int:
        """First prompt position whose query rows the method needs (m: none)."""
        return self.method.query_start(layout) if self.method.compresses else layout.prompt_len

    def plan(
        self,
        layout: PromptLayout,
        num_layers: int,
        queries: Callable[[int], torch.Tensor],
        keys: Callable[[int], torch.Tensor],
        scale: float,
    ) -> RequestPlan:
        """The request's plan. ``queries(l)``: (1, H_q, τ, D) rows ``query_start .. m−1`` of layer l
        after RoPE; ``keys(l)``: (1, H_kv, m, D) its cached prompt keys (after RoPE)."""
        if not self.method.compresses:
            return keep_all(layout.prompt_len, num_layers, int(keys(0).shape[1]))
        start = self.query_start(layout)
        scores = []
        with torch.no_grad():
            for layer in range(num_layers):
                inp = LayerInput(queries(layer), keys(layer), start, scale, layer, num_layers)
                scores.append(self.method.score(inp, layout))
        return plan_request(self.method, scores, layout, self.cap)
