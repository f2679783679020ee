"""One prefill, many methods: capture what every method scores from, once per prompt.

Every method scores a layer from the same two things: the layer's prompt keys as cached and the
query rows (after RoPE) from its :meth:`~vlcache.methods.Method.query_start` on. A single forward
with hooks on the attention modules records, per layer, the keys, values and the query rows from the
smallest ``query_start`` of the methods to run, plus the last position's logits (the first generated
token, which no method changes). :meth:`vlcache.hf.session.VLCache.compress_prefill` then compresses
a cache built from it under any method, and :func:`vlcache.hf.generation.generate_from_prefill`
decodes on it: the same tokens as :func:`vlcache.generate` running that method's own prefill, at the
cost of one prefill per prompt instead of one per method × budget.

Nothing captured is modified later: compaction and decoding make new tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlcache.hf.adapter import (
    attention_modules,
    decoder_stack,
    find_image_spans,
    image_token_id,
    project_queries,
)
from vlcache.methods import LayerInput, LayerScore, PromptLayout


@dataclass
class CapturedPrefill:
    """One prompt's prefill, enough to score, compact and decode under any method.

    Attributes:
        input_ids: (1, m) the prompt.
        layout: where its spans are (image tokens, or the context of a text prompt).
        query_start: position of the first captured query row.
        queries: per layer, (1, H_q, m − query_start, d) query rows after RoPE.
        keys, values: per layer, (1, H_kv, m, d) as cached (keys after RoPE).
        scales: per layer, the attention's softmax scale.
        logits: (1, V) logits of the last prompt position.
        scores: memo of per-layer scores, keyed by the method's config with the budget set to 1.0
            (a method's scores never depend on the budget: only allocation and selection do).
    """

    input_ids: torch.Tensor
    layout: PromptLayout
    query_start: int
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scales: list[float]
    logits: torch.Tensor
    scores: dict[Any, list[LayerScore]] = field(default_factory=dict, repr=False)

    @property
    def prompt_len(self) -> int:
        return self.layout.prompt_len

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def layer_input(self, layer_idx: int, start: int) -> LayerInput:
        """What a method's ``score`` sees for layer ``layer_idx`` when it asks for queries from ``start``."""
        if start < self.query_start:
            raise ValueError(f"queries from position {start} were not captured (captured from {self.query_start})")
        queries = self.queries[layer_idx][:, :, start - self.query_start :]
        return LayerInput(queries, self.keys[layer_idx], start, self.scales[layer_idx], layer_idx, self.num_layers)


def capture_prefill(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    spans: Sequence[tuple[int, int]] | None = None,
    query_start: int = 0,
) -> CapturedPrefill:
    """Run the prompt once and capture every layer's keys, values and query rows from ``query_start``.

    Args:
        model: a LLaVA / LLaVA-NeXT or Llama-like causal LM (see :mod:`vlcache.hf.adapter`).
        inputs: the model's inputs for one prompt (``input_ids`` (1, m), and ``pixel_values`` etc.).
        spans: the layout's spans; None finds image spans through the model's image token.
        query_start: first prompt position whose queries are kept (clipped to [0, m − 1]); the
            smallest :meth:`~vlcache.methods.Method.query_start` of the methods that will use it.
    """
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture_prefill takes one prompt: input_ids of shape (1, m), got {tuple(input_ids.shape)}")
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        raise ValueError("vlcache does not support padded prompts; pass the prompt without padding")
    m = int(input_ids.shape[1])
    found = find_image_spans(input_ids[0], image_token_id(model)) if spans is None else tuple(spans)
    layout = PromptLayout(m, tuple((int(s), int(e)) for s, e in found))
    start = min(max(int(query_start), 0), m - 1)
    attns = attention_modules(decoder_stack(model))
    queries: dict[int, torch.Tensor] = {}
    scales: dict[int, float] = {}

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        idx = int(module.layer_idx)
        hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.shape[1] != m:
            return
        cos, sin = kwargs["position_embeddings"]
        queries[idx] = project_queries(module, hidden[:, start:], (cos[:, start:], sin[:, start:]))
        scales[idx] = float(module.scaling)

    handles = [a.register_forward_hook(hook, with_kwargs=True) for a in attns]
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    cache = getattr(out, "past_key_values", None)
    if cache is None or len(queries) != len(attns):
        raise RuntimeError("the prefill ran no cached attention through every decoder layer; is it a supported model?")
    layers = cache.layers
    return CapturedPrefill(
        input_ids=input_ids,
        layout=layout,
        query_start=start,
        queries=[queries[i] for i in range(len(attns))],
        keys=[layers[i].keys for i in range(len(attns))],
        values=[layers[i].values for i in range(len(attns))],
        scales=[scales[i] for i in range(len(attns))],
        logits=out.logits[:, -1].float(),
    )
