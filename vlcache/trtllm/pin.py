"""The TensorRT-LLM this backend was written against: one place for the version and the files read.

TensorRT-LLM's KV-cache compression framework is new (PRs #15106, #15697, #16836, #16957, #18587,
2026) and its API moves from commit to commit: the base class was called
``BaseKVCacheCompressionManager`` in earlier versions of the same files, ``on_context_step_end``
took one request and attention metadata before it took the final-prefill cohort, and the
compaction op took a scalar destination base before it took one per request. The code of
:mod:`vlcache.trtllm.manager` follows the versions below and nothing else; it has never run (no
GPU, and TensorRT-LLM cannot be installed on this project's machines).

The files were read from the public ``NVIDIA/TensorRT-LLM`` repository (main branch, the 1.3.0rc
line after the 1.2 release that removed the TensorRT engine backend) at the commits given per file:
the source index holds file versions, not one tree, so each file is pinned by its own commit.
"""

from __future__ import annotations

#: The TensorRT-LLM line the shim targets: main after 1.2 (the compression framework is not in 1.2.x).
TRTLLM_LINE = "main (1.3.0rc development line), 2026"

#: path in NVIDIA/TensorRT-LLM -> (commit read, what it defines for this backend)
TRTLLM_FILES: dict[str, tuple[str, str]] = {
    "tensorrt_llm/_torch/kv_cache_compression/triattention/triattention.py": (
        "ccfe61bbe11c61e7d57b75ad91d5ad9738b5ce2d",
        "the reference iteration-driven manager: KVCacheCompressionManager(config, kv_cache_manager, "
        "draft_kv_cache_manager) from _torch/pyexecutor/resource_manager.py; get_buffers(layer, kv_layout='HND') "
        "pools [pages, 2, kv_heads, tokens_per_block, head_dim]; LlmRequest.py_num_compressed_tokens (cumulative "
        "evicted count, the manager's only channel to the runtime); kv_cache.resize(capacity, None) after compaction",
    ),
    "cpp/tensorrt_llm/thop/sparseKvCacheCompactOp.cpp": (
        "0097566bd62be830bcbb29fb4782de9564020cda",
        "torch.ops.trtllm.sparse_kv_cache_compact_layers(pools, pool_pointers, page_table, source_indices, "
        "source_offsets, destination_bases, source_layer_indices=None): per request one move count (CSR "
        "source_offsets) for every layer and head, increasing sources with destination_bases[r] + i <= source[i]",
    ),
    "tests/unittest/_torch/kv_cache_compression/test_compaction.py": (
        "11965db4e425a54bdaa4e4767266336310d028d9",
        "the compaction contract checked against torch oracles (union / per_head / per_layer_perhead rows)",
    ),
    "docs/source/developer-guide/kv-cache-compression-development.md": (
        "ae91a87c86c38592de2bae4ded56e122cc515282",
        "lifecycle hooks (on_request_init, on_context_step_end(requests), on_generation_step_begin/end, "
        "on_request_finish), registration (KvCacheCompressionConfig subclass + create_kv_cache_compression_manager "
        "in _torch/pyexecutor/_util.py), KVCacheManagerV2 only",
    ),
    "docs/source/features/kv-cache-compression.md": (
        "771c998f6b9a26b865923651dd1474db63d42ead",
        "user-facing configuration: LLM(kv_cache_compression_config=..., kv_cache_config=KvCacheConfig("
        "use_kv_cache_manager_v2=True))",
    ),
    "triton_backend/all_models/llmapi/tensorrt_llm/1/model.yaml": (
        "c8c6df08bd0ead54cd47f7973e1e425c28a174cd",
        "the Triton llmapi model: model.yaml keys are LLM() arguments plus triton_config",
    ),
    "triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt": (
        "c8c6df08bd0ead54cd47f7973e1e425c28a174cd",
        "its inputs (text_input, streaming, sampling_param_*) and outputs (text_output, ...)",
    ),
    "triton_backend/all_models/llmapi/tensorrt_llm/1/model.py": (
        "b35ac1b64368513d215c57d2ed01d62d910df8da",
        "reads LLM_CONFIG_PATH (default model.yaml) from the model's version folder, drops triton_config, "
        "LLM(**update_llm_args_with_extra_dict({}, rest))",
    ),
}
