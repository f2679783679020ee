"""The TensorRT-LLM shim: a ``KVCacheCompressionManager`` subclass over :mod:`vlcache.trtllm.plan`.

THIS CODE HAS NEVER RUN. No machine of this project has a GPU or can install TensorRT-LLM; it was
written against the TensorRT-LLM sources pinned in :mod:`vlcache.trtllm.pin` and is checked here
only for importing without TensorRT-LLM and for its clear error when TensorRT-LLM is missing. The
decisions it carries out (scores, budgets, the one count per request, the kept sets, the moves) are
:mod:`vlcache.trtllm.plan` and :mod:`vlcache.trtllm.stash`, which the CPU tests check against
:mod:`vlcache.core`. What only this file does, unverified:

* :func:`install` patches ``create_kv_cache_compression_manager`` (``_torch/pyexecutor/_util.py``)
  to build :class:`VLCacheCompressionManager` for ``algorithm == "vlcache"``, and wraps
  ``TrtllmAttention.forward`` (``_torch/attention_backend/trtllm.py``) to stash the query rows of
  the context phase (rotated by RoPE when the kernel fuses it). Both must happen in the process
  that runs TensorRT-LLM's executor (``LLM()`` may start worker processes).
* At ``on_context_step_end`` the manager reads each layer's keys from the V2 pools
  (``get_buffers(layer, kv_layout="HND")``) through the request's K block offsets, plans, launches
  ``torch.ops.trtllm.sparse_kv_cache_compact_layers`` once for the cohort (per-layer source rows),
  adds the evicted count to ``LlmRequest.py_num_compressed_tokens`` and resizes the request's cache.

TensorRT-LLM is imported lazily, by :func:`require_tensorrt_llm`, which raises
:class:`TensorRTLLMUnavailable` (a one-line :class:`~vlcache.errors.UserError`) when it is missing.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import weakref
from types import ModuleType
from typing import Any

from vlcache.errors import UserError
from vlcache.trtllm.pin import TRTLLM_LINE

#: the ``algorithm`` of vlcache's ``kv_cache_compression_config`` (model.yaml, LLM())
ALGORITHM = "vlcache"

log = logging.getLogger(__name__)


class TensorRTLLMUnavailable(RuntimeError, UserError):
    """TensorRT-LLM is not installed (or lacks the compression framework): a one-line message."""


def require_tensorrt_llm() -> ModuleType:
    """``import tensorrt_llm``, or :class:`TensorRTLLMUnavailable` saying what to do."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as e:
        raise TensorRTLLMUnavailable(
            f"the trtllm backend's VL-Cache compression manager needs TensorRT-LLM ({TRTLLM_LINE}, with its "
            f"KV-cache compression framework) on an NVIDIA GPU host, and it is not importable here ({e}); "
            "vlcache-build --backend trtllm writes the model repository without it"
        ) from None


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise TensorRTLLMUnavailable(
            f"this TensorRT-LLM has no {name} ({e}); the trtllm backend follows {TRTLLM_LINE} (vlcache.trtllm.pin)"
        ) from None


@functools.cache
def classes() -> tuple[type, type]:
    """``(VLCacheKvCacheCompressionConfig, VLCacheCompressionManager)``, defined on first use over
    TensorRT-LLM's base classes (TensorRTLLMUnavailable without TensorRT-LLM)."""
    require_tensorrt_llm()
    import torch

    from vlcache.config import CompressionConfig
    from vlcache.trtllm.plan import ContextCompressor, compaction_moves, gather_layer, prompt_layout
    from vlcache.trtllm.stash import QueryStash

    base_manager = _import("tensorrt_llm._torch.pyexecutor.resource_manager").KVCacheCompressionManager
    base_config = _import("tensorrt_llm.llmapi.llm_args").KvCacheCompressionConfig

    class VLCacheKvCacheCompressionConfig(base_config):  # type: ignore[misc, valid-type]
        """``kv_cache_compression_config`` of LLM(): ``compression`` is a
        :class:`~vlcache.config.CompressionConfig` as a mapping; ``count_cap`` the physical count's
        cap (a fraction of the prompt; None: max padding); ``image_token_id`` (None: the model config's)."""

        algorithm: str = ALGORITHM
        compression: dict[str, Any] = {}
        count_cap: float | None = None
        image_token_id: int | None = None
        changes_physical_kv_length = True  # a ClassVar in TensorRT-LLM's base

        def supports_block_reuse(self) -> bool:
            return False

        def supports_speculative_decoding(self) -> bool:
            return False

    class VLCacheCompressionManager(base_manager):  # type: ignore[misc, valid-type]
        """VL-Cache under TensorRT-LLM's compression framework: one compaction per request, at the
        end of its context phase (see :mod:`vlcache.trtllm`). Never run: module docstring."""

        def __init__(
            self,
            config: Any,
            kv_cache_manager: Any,
            draft_kv_cache_manager: Any = None,
            *,
            pretrained_config: Any = None,
        ) -> None:
            super().__init__(config, kv_cache_manager, draft_kv_cache_manager)
            if draft_kv_cache_manager is not None:
                raise ValueError("the vlcache KV-cache compression does not support a draft model's KV cache")
            self.core = ContextCompressor(CompressionConfig.from_dict(config.compression), cap=config.count_cap)
            self.stash = QueryStash()
            self.layouts: dict[int, Any] = {}
            text = pretrained_config.get_text_config() if hasattr(pretrained_config, "get_text_config") else None
            text = text or pretrained_config
            image_token = config.image_token_id
            if image_token is None:
                image_token = getattr(pretrained_config, "image_token_index", None)
            if image_token is None:
                image_token = getattr(pretrained_config, "image_token_id", None)
            if image_token is None:
                raise ValueError("set image_token_id: the model config names no image token")
            self.image_token_id = int(image_token)
            self.vocab_size = int(text.vocab_size)
            head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
            self.scale = 1.0 / math.sqrt(head_dim)
            theta = float(getattr(text, "rope_theta", None) or 10000.0)
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            manager = kv_cache_manager
            self.global_layers = [int(layer) for layer in manager.pp_layers]
            self.local_layer = {g: i for i, g in enumerate(self.global_layers)}
            self.pools = [manager.get_buffers(g, kv_layout="HND") for g in self.global_layers]
            pool_ids = {int(manager.layer_to_pool_mapping_dict[manager.layer_offsets[g]]) for g in self.global_layers}
            if len(pool_ids) != 1 or len({(p.shape[1:], p.dtype) for p in self.pools}) != 1:
                raise ValueError("the vlcache compression needs one uniform KV pool for every layer")
            self.pool_id = pool_ids.pop()
            device = self.pools[0].device
            self.pool_pointers = torch.tensor([p.data_ptr() for p in self.pools], dtype=torch.int64, device=device)
            _ACTIVE.add(self)

        # --- hooks ---------------------------------------------------------------------------
        def on_request_init(self, request: Any, **kwargs: Any) -> None:
            m = int(request.py_prompt_len)
            layout = prompt_layout(list(request.get_tokens(0))[:m], self.image_token_id, self.vocab_size)
            self.layouts[request.py_request_id] = layout
            self.stash.begin(request.py_request_id, self.core.query_start(layout), m, len(self.global_layers))

        def capture(self, layer: int, request_ids: list[int], starts: list[int], rows: list[Any], fused: bool) -> None:
            """Called by the attention hook: this layer's query rows of the context requests."""
            from vlcache.trtllm.stash import rope_neox

            local = self.local_layer.get(int(layer))
            if local is None:
                return
            for rid, start, q in zip(request_ids, starts, rows):
                if rid not in self.stash:
                    continue
                if fused:
                    positions = torch.arange(start, start + q.shape[0], device=q.device)
                    q = rope_neox(q, positions, self.inv_freq.to(q.device))
                self.stash.add(rid, local, q, start)

        def on_context_step_end(self, requests: Any, **kwargs: Any) -> None:
            cohort, plans, tails = [], [], []
            manager = self.kv_cache_manager
            for request in requests:
                rid = request.py_request_id
                layout = self.layouts.pop(rid, None)
                if getattr(request, "is_dummy", False) or layout is None:
                    continue
                if not self.stash.ready(rid):
                    log.warning("vlcache: request %s has no complete query rows; its cache is not compressed", rid)
                    self.stash.pop(rid)
                    continue
                cache = manager.kv_cache_map[rid]
                pages = self._k_block_offsets([rid])[0].long() // 2
                m = layout.prompt_len
                queries = functools.partial(self.stash.queries, rid)
                keys = functools.partial(self._keys, pages, m)
                plan = self.core.plan(layout, len(self.global_layers), queries, keys, self.scale)
                self.stash.pop(rid)
                if plan.evicted == 0:
                    continue
                cohort.append((request, cache))
                plans.append(plan)
                tails.append(int(cache.capacity) - m)
            if not plans:
                return
            moves = compaction_moves(plans, tails)
            device = self.pools[0].device
            page_table = self._k_block_offsets([request.py_request_id for request, _ in cohort])
            torch.ops.trtllm.sparse_kv_cache_compact_layers(
                self.pools,
                self.pool_pointers,
                page_table,
                moves.source_indices.to(device),
                moves.source_offsets.to(device),
                moves.destination_bases.to(device),
                moves.source_layer_indices.to(device),
            )
            for (request, cache), plan, length in zip(cohort, plans, moves.new_lengths):
                request.py_num_compressed_tokens += plan.evicted  # one count per request: every layer
                if not cache.resize(length, None):
                    raise RuntimeError(f"cannot resize request {request.py_request_id}'s KV cache to {length}")

        def on_request_finish(self, request: Any, **kwargs: Any) -> None:
            self.layouts.pop(request.py_request_id, None)
            self.stash.pop(request.py_request_id)

        def _keys(self, pages: Any, length: int, layer: int) -> Any:
            return gather_layer(self.pools[layer], pages, length)

        # --- V2 page tables (as TriAttention stages them at the pinned commit) -------------------
        def _k_block_offsets(self, request_ids: list[int]) -> Any:
            """(R, max_pages) int32 K block offsets on the pools' device (2 · page: the op decodes // 2)."""
            manager = self.kv_cache_manager
            device = self.pools[0].device
            blocks = int(manager.max_blocks_per_seq)
            shape = (int(manager.num_pools), len(request_ids), 2, blocks)
            host = torch.empty(shape, dtype=torch.int32, pin_memory=True)
            dev = torch.empty(shape, dtype=torch.int32, device=device)
            stream = torch.cuda.current_stream(device)
            if getattr(manager, "uses_device_page_table", False):
                manager.materialize_block_offsets_snapshot(dev, request_ids, host_staging=host, stream=stream)
            else:
                utils = _import("tensorrt_llm.bindings.internal.batch_manager.kv_cache_manager_v2_utils")
                manager.index_mapper.gather_k_block_offsets(
                    manager.host_kv_cache_block_offsets, host, request_ids, blocks
                )
                copy_idx = torch.arange(len(request_ids), dtype=torch.int32, pin_memory=True)
                utils.copy_batch_block_offsets_to_device(
                    host, dev, copy_idx, manager.index_scales, manager.kv_offset, stream.cuda_stream
                )
            return dev[self.pool_id, :, 0].contiguous()

    return VLCacheKvCacheCompressionConfig, VLCacheCompressionManager


#: live managers the attention hook hands query rows to
_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def _capture(backend: Any, q: Any, k: Any, metadata: Any) -> None:
    """The attention hook's work: the context requests' query rows of this layer to every manager."""
    if not _ACTIVE or metadata is None:
        return
    contexts = int(getattr(metadata, "num_contexts", 0) or 0)
    if contexts == 0:
        return
    from vlcache.trtllm.stash import split_context_rows

    seq_lens = [int(n) for n in metadata.seq_lens[:contexts].tolist()]
    starts = [int(n) for n in list(metadata.kv_cache_params.num_cached_tokens_per_seq)[:contexts]]
    request_ids = [int(r) for r in list(metadata.request_ids)[:contexts]]
    rows = split_context_rows(q, seq_lens, int(backend.num_heads), int(backend.head_dim))
    fused = getattr(backend, "pos_embd_params", None) is not None  # RoPE in the kernel: q is pre-RoPE
    for manager in list(_ACTIVE):
        manager.capture(int(backend.layer_idx), request_ids, starts, rows, fused)


def install() -> None:
    """Register the ``vlcache`` algorithm with TensorRT-LLM in this process: the manager factory and
    the query hook (idempotent; TensorRTLLMUnavailable without TensorRT-LLM)."""
    _, manager_cls = classes()
    util = _import("tensorrt_llm._torch.pyexecutor._util")
    factory = util.create_kv_cache_compression_manager
    if not getattr(factory, "_vlcache", False):

        @functools.wraps(factory)
        def create(config: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(config, "algorithm", None) == ALGORITHM:
                return manager_cls(config, *args, **kwargs)
            return factory(config, *args, **kwargs)

        create._vlcache = True  # type: ignore[attr-defined]
        util.__dict__["create_kv_cache_compression_manager"] = create
    attention = _import("tensorrt_llm._torch.attention_backend.trtllm").TrtllmAttention
    forward = attention.forward
    if not getattr(forward, "_vlcache", False):

        @functools.wraps(forward)
        def hooked(
            self: Any, q: Any, k: Any = None, v: Any = None, metadata: Any = None, *args: Any, **kwargs: Any
        ) -> Any:
            try:
                _capture(self, q, k, metadata)
            except Exception:  # the model must still run: the request is then served uncompressed
                log.exception("vlcache: capturing query rows failed")
            return forward(self, q, k, v, metadata, *args, **kwargs)

        hooked._vlcache = True  # type: ignore[attr-defined]
        attention.forward = hooked


def compression_config(section: dict[str, Any]) -> Any:
    """model.yaml's ``kv_cache_compression_config`` mapping (algorithm ``vlcache``) as TensorRT-LLM's
    config object (TensorRTLLMUnavailable without TensorRT-LLM)."""
    config_cls, _ = classes()
    return config_cls(**{k: v for k, v in section.items() if k != "algorithm"})


def create_manager(config: Any, kv_cache_manager: Any, draft_kv_cache_manager: Any = None, **kwargs: Any) -> Any:
    """The entry point: a :class:`VLCacheCompressionManager` (TensorRTLLMUnavailable without TensorRT-LLM)."""
    _, manager_cls = classes()
    return manager_cls(config, kv_cache_manager, draft_kv_cache_manager, **kwargs)
