"""``model.yaml`` of the trtllm backend's Triton repository: TensorRT-LLM ``LLM()`` arguments.

TensorRT-LLM's llmapi Triton model passes every key of ``model.yaml`` but ``triton_config`` to
``LLM()`` (pinned in :mod:`vlcache.trtllm.pin`). vlcache writes:

* ``model``: the artifact's ``hf/`` checkpoint, relative to the model's version folder
  (``triton/tensorrt_llm/1``) when the repository sits inside the artifact, else absolute;
* ``backend: pytorch``, ``dtype``, ``max_batch_size``, ``max_input_len``, ``max_seq_len`` (prompt
  plus ``max_tokens_cap``) from the build;
* ``kv_cache_config``: KV cache manager V2 (the compression framework's requirement), block reuse
  off (the framework refuses it for methods that change the cache's length);
* ``kv_cache_compression_config``: ``algorithm: vlcache``, ``compression`` (the build's
  :class:`~vlcache.config.CompressionConfig`: method, budget, per-method settings), ``count_cap``
  (None: max padding, :mod:`vlcache.trtllm`) and ``image_token_id``;
* ``triton_config``: ``max_batch_size: 0`` (the llmapi model does not batch), ``decoupled: true``
  (streaming), ``multimodal: true`` (its ``image_url`` input).
"""

from __future__ import annotations

from typing import Any

import yaml

from vlcache.config import BuildConfig
from vlcache.trtllm.manager import ALGORITHM
from vlcache.trtllm.pin import TRTLLM_FILES, TRTLLM_LINE


def llm_args(
    build: BuildConfig, *, model: str, image_token_id: int | None, max_tokens_cap: int, count_cap: float | None = None
) -> dict[str, Any]:
    """The mapping written as model.yaml (module docstring)."""
    return {
        "model": model,
        "backend": "pytorch",
        "dtype": build.dtype,
        "max_batch_size": build.max_batch_size,
        "max_input_len": build.max_input_len,
        "max_seq_len": build.max_input_len + max_tokens_cap,
        "kv_cache_config": {"use_kv_cache_manager_v2": True, "enable_block_reuse": False},
        "kv_cache_compression_config": {
            "algorithm": ALGORITHM,
            "compression": build.compression.to_dict(),
            "count_cap": count_cap,
            "image_token_id": image_token_id,
        },
        "triton_config": {"max_batch_size": 0, "decoupled": True, "multimodal": True},
    }


def model_yaml(args: dict[str, Any], *, config_hash: str) -> str:
    """model.yaml's text: a comment header (what reads it, the build's hash, the TensorRT-LLM pin) and ``args``."""
    header = [
        "# TensorRT-LLM LLM() arguments (+ triton_config) for its llmapi Triton model, written by",
        f"# vlcache-build --backend trtllm (config hash {config_hash}); docs/trtllm.md. The vlcache model.py",
        "# takes kv_cache_compression_config (algorithm vlcache) out, installs vlcache.trtllm, puts it back.",
        "# Written against TensorRT-LLM " + TRTLLM_LINE + " and never run by vlcache; files read:",
        *(f"#   {path} @ {commit[:12]}" for path, (commit, _) in TRTLLM_FILES.items()),
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(args, sort_keys=False)
