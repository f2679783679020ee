"""The ``trtllm`` backend: VL-Cache as a TensorRT-LLM KV-cache compression manager.

TensorRT-LLM's engine builder is gone after 1.2; its PyTorch backend runs HF checkpoints (LLaVA-NeXT
among them) and has a KV-cache compression framework (``KVCacheCompressionManager`` with lifecycle
hooks, KV cache manager V2 only). This package plugs VL-Cache into it. The TensorRT-LLM version and
files it follows are pinned in :mod:`vlcache.trtllm.pin`.

What happens to one request (``vlcache-build --backend trtllm`` writes the Triton ``llmapi`` model
repository that selects it: docs/trtllm.md):

1. During the context phase an attention hook stashes, per layer, the query rows of the positions
   the method scores with — VL-Cache: the post-vision window, after the last image token
   (:mod:`vlcache.trtllm.stash`), rotated by RoPE when the kernel fuses it, chunk by chunk.
2. ``on_context_step_end`` (after the final prefill chunk) scores every layer from those rows and
   the cached keys (the method's own ``score``: :func:`vlcache.core.post_vision_statistics` for
   VL-Cache), allocates the layer budgets (:func:`vlcache.core.allocate_budgets`), decides the one
   physical count, selects per layer and per KV head (:func:`vlcache.core.select_kept` with the recent
   window), and compacts the cohort with ``trtllm::sparse_kv_cache_compact_layers``; the evicted count
   goes to ``LlmRequest.py_num_compressed_tokens``, and RoPE positions keep counting from m.

**One count per request, and why max padding.** TensorRT-LLM keeps one cache length per request
(``py_num_compressed_tokens`` is one integer; the op moves the same number of entries in every layer
and head), while VL-Cache gives layer l its own budget ``k_l``. Of the three ways to map them:

* *layer groups* (V2 pools of different capacities per layer group) are not exposed for
  selection-based eviction: the count is per request, not per group — not available;
* *logical masking* (keep ``max k_l`` physically and hide the surplus from attention) needs a
  per-layer attention mask at decode, which the framework at the pinned commit does not offer;
* **max padding** (chosen): every layer keeps ``C = max_l k_l`` entries: its VL-Cache set of k_l
  (recent window + top scores), padded with its next-best ``C − k_l`` tokens by the same scores. It
  runs with the framework as it is, never evicts a token VL-Cache keeps (attention sees a superset
  of VL-Cache's cache, so quality is at least VL-Cache's at the same α), and keeps the per-layer,
  per-head selection. Its price is memory: ``L · C`` entries instead of ``α · L · m``, and C can be
  large when a few layers are dense. ``count_cap`` (a fraction of the prompt, in model.yaml) bounds
  it: the same total is re-allocated with every layer at most the cap, so C ≤ cap · m (cap = α: the
  memory of a uniform budget, and the layer budgets then only decide how much of each layer's C
  entries is VL-Cache's own choice and how much padding). :attr:`~vlcache.trtllm.plan.RequestPlan.logical`
  records which entries VL-Cache itself keeps, ready for a backend that can mask.

Modules: :mod:`~vlcache.trtllm.plan` and :mod:`~vlcache.trtllm.stash` hold every decision, in torch
only (tested on CPU against :mod:`vlcache.core`); :mod:`~vlcache.trtllm.manager` is the thin shim that
subclasses TensorRT-LLM's manager and :mod:`~vlcache.trtllm.triton_model` the Triton model over
TensorRT-LLM's llmapi model — both written against the pinned sources and **never run**.
TensorRT-LLM is imported lazily; without it the shim raises
:class:`~vlcache.trtllm.manager.TensorRTLLMUnavailable`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "COUNT_MAPPING",
    "ContextCompressor",
    "QueryStash",
    "RequestPlan",
    "TensorRTLLMUnavailable",
    "compaction_moves",
    "plan_request",
]

_EXPORTS = {
    "COUNT_MAPPING": "vlcache.trtllm.plan",
    "ContextCompressor": "vlcache.trtllm.plan",
    "RequestPlan": "vlcache.trtllm.plan",
    "compaction_moves": "vlcache.trtllm.plan",
    "plan_request": "vlcache.trtllm.plan",
    "QueryStash": "vlcache.trtllm.stash",
    "TensorRTLLMUnavailable": "vlcache.trtllm.manager",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlcache.trtllm' has no attribute {name!r}")
