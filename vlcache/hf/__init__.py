"""HuggingFace transformers adapter: hooks, ragged per-layer cache, generation with stats."""

from vlcache.hf.adapter import decoder_stack, find_image_spans, image_token_id, project_queries
from vlcache.hf.generation import GenerationResult, generate
from vlcache.hf.session import CompressionStats, VLCache

__all__ = [
    "CompressionStats",
    "GenerationResult",
    "VLCache",
    "decoder_stack",
    "find_image_spans",
    "generate",
    "image_token_id",
    "project_queries",
]
