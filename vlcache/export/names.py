"""Names shared by the ONNX export, the TensorRT plugins and the runtimes: one source of truth.

The VL-Cache operations appear in exported graphs as nodes of domain :data:`DOMAIN`. Each op's
contract (shapes, attributes) is stated here; `vlcache.core` holds the reference semantics.

``PostVisionStats(q, k, query_start) -> (scores, density)``
    q: float (B, H_q, τ, D) post-vision queries after RoPE; k: float (B, H_kv, m, D) prompt keys after
    RoPE; query_start: int64 scalar, absolute position of q's first row (row i sees keys
    j ≤ query_start + i). Attributes: ``threshold`` (float, p, default 0.01), ``scale`` (float,
    0 means 1/√D). Outputs: scores float32 (B, H_kv, m) = Σ over rows of the causal softmax,
    averaged over each GQA group of query heads (:func:`vlcache.core.vlcache_scores`);
    density float32 (B,) (:func:`vlcache.core.layer_density`).

``CompactKV(kv, indices) -> kept``
    kv: (B, H_kv, m, D); indices: int64 (B, H_kv, k), ascending; kept: (B, H_kv, k, D)
    (:func:`vlcache.core.compact`).

Below the ops: the files an export directory holds and the tensor names of its graphs (the decoder's
per-layer ``past_key.l`` / ``past_length.l`` / ``present_key.l`` / ``query.l``; see
:mod:`vlcache.export.llava`).
"""

from __future__ import annotations

DOMAIN = "vlcache"
OPSET_VERSION = 1

POST_VISION_STATS = "PostVisionStats"
COMPACT_KV = "CompactKV"
#: PostVisionStats' ``scale`` when a node leaves it out: 0, which means 1/√D. (``threshold``'s default
#: is the reference p, :data:`vlcache.core.DEFAULT_THRESHOLD`.)
DEFAULT_SCALE = 0.0

#: TensorRT plugin ids ("namespace::name") the graph pass maps the ONNX nodes to.
PLUGIN_NAMESPACE = "vlcache"
PLUGIN_IDS = {
    POST_VISION_STATS: f"{PLUGIN_NAMESPACE}::{POST_VISION_STATS}",
    COMPACT_KV: f"{PLUGIN_NAMESPACE}::{COMPACT_KV}",
}

# --- graphs written by :func:`vlcache.export.export_llava` and their inputs / outputs ---------------
# (additive: the op names and contracts above are unchanged)

#: the JSON file describing an export directory (:class:`vlcache.export.spec.ExportSpec`)
SPEC_FILE = "export.json"
VISION_GRAPH = "vision.onnx"  # pixel_values (N, 3, H, W) -> image_features (N, P, hidden)
EMBED_GRAPH = "embed.onnx"  # input_ids (B, n) int64 -> inputs_embeds (B, n, hidden)
DECODER_GRAPH = "decoder.onnx"  # see vlcache.export.llava
SCORE_GRAPH = "post_vision_stats.onnx"  # one PostVisionStats node
COMPACT_GRAPH = "compact_kv.onnx"  # one CompactKV node

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
LOGITS = "logits"

#: ``ExportSpec.attention``: how the decoder graph attends. ``fused``: ONNX Runtime's
#: ``com.microsoft.GroupQueryAttention`` on preallocated per-layer KV buffers with per-row lengths
#: (``past_length.l``), the ONNX Runtime default; ``standard``: standard ONNX ops only
#: (Concat-appended KV, MatMul→Softmax→MatMul), what TensorRT builds from.
ATTENTION_FUSED = "fused"
ATTENTION_STANDARD = "standard"
ATTENTION_VARIANTS = (ATTENTION_FUSED, ATTENTION_STANDARD)
#: the fused decoder's attention op, its domain and the domain's opset version
GQA_OP = "GroupQueryAttention"
GQA_DOMAIN = "com.microsoft"
GQA_OPSET_VERSION = 1

# Inputs / outputs of the score and compact graphs (the op's own inputs and outputs).
SCORE_QUERIES = "queries"
SCORE_KEYS = "keys"
SCORE_QUERY_START = "query_start"
SCORE_SCORES = "scores"
SCORE_DENSITY = "density"
COMPACT_KV_INPUT = "kv"
COMPACT_INDICES = "indices"
COMPACT_KEPT = "kept"


def past_key(layer: int) -> str:
    """Decoder input: layer ``layer``'s cached keys (B, H_kv, past_len_layer, D), after RoPE (fused
    graph: a buffer (B, H_kv, capacity, D) whose first ``past_length.l[b]`` rows are valid)."""
    return f"past_key.{layer}"


def past_length(layer: int) -> str:
    """Fused decoder input: int64 (B,), how many entries of row b of ``past_key.l`` / ``past_value.l``
    are valid (the rest of the buffer is free room that the step writes into)."""
    return f"past_length.{layer}"


def past_value(layer: int) -> str:
    """Decoder input: layer ``layer``'s cached values (B, H_kv, past_len_layer, D)."""
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    """Decoder output: past keys with the new ones appended (B, H_kv, past_len_layer + n, D); fused
    graph: the buffer with the new entries written at ``past_length.l[b] ..`` (the same memory as
    ``past_key.l`` when a runner binds both to one OrtValue), (B, H_kv, max(capacity, total), D)."""
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    """Decoder output: past values with the new ones appended (B, H_kv, past_len_layer + n, D)."""
    return f"present_value.{layer}"


def query(layer: int) -> str:
    """Decoder output: the new rows' queries of layer ``layer`` after RoPE (B, H_q, n, D)."""
    return f"query.{layer}"
