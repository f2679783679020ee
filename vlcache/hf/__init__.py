"""HuggingFace transformers adapter: hooks, ragged per-layer cache, generation with stats."""

from vlcache.hf.adapter import decoder_stack, find_image_spans, image_token_id, project_queries
from vlcache.hf.generation import GenerationResult, generate, generate_from_prefill
from vlcache.hf.prefill import CapturedPrefill, capture_prefill
from vlcache.hf.session import CompressionStats, VLCache

__all__ = [
    "CapturedPrefill",
    "CompressionStats",
    "GenerationResult",
    "VLCache",
    "capture_prefill",
    "decoder_stack",
    "find_image_spans",
    "generate",
    "generate_from_prefill",
    "image_token_id",
    "project_queries",
]
