"""HuggingFace transformers adapter: hooks, ragged per-layer cache, generation with stats."""

from vlcache.hf.adapter import decoder_stack, find_image_spans, image_token_id, project_queries
from vlcache.hf.generation import GenerationResult, TorchDecoder, generate, generate_from_prefill, stream
from vlcache.hf.prefill import CapturedPrefill, capture_prefill
from vlcache.hf.session import VLCache
from vlcache.pipeline import CompressionStats

__all__ = [
    "CapturedPrefill",
    "CompressionStats",
    "GenerationResult",
    "TorchDecoder",
    "VLCache",
    "capture_prefill",
    "decoder_stack",
    "find_image_spans",
    "generate",
    "generate_from_prefill",
    "image_token_id",
    "project_queries",
    "stream",
]
