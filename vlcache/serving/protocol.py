"""The request / response protocol of the served `vlcache` model: one source of truth.

The Triton model repository's ``config.pbtxt`` (rendered by :func:`vlcache.serving.render_repository`),
the Python model behind it (:mod:`vlcache.serving.model`) and the client (:mod:`vlcache.client`) all
read the names, datatypes and stats keys from here. This module imports nothing heavy (no torch,
no tritonclient) so that every side can import it.

Protocol (model ``vlcache``, decoupled: one request, a stream of responses):

inputs
    ``image``       BYTES [1]  encoded PNG / JPEG (any format PIL opens), converted to RGB
    ``prompt``      BYTES [1]  UTF-8 text; the server inserts the image placeholder (or uses the
                               chat template) unless the prompt already contains it
    ``max_tokens``  INT32 [1]  new tokens to generate, 1 ≤ max_tokens ≤ the deployment's cap
    ``budget``      FP32  [1]  optional: α in (0, 1] for this request (default: the build's)
    ``method``      BYTES [1]  optional: a registered method name (default: the build's)

outputs
    ``text``        BYTES [1]  the new text since the previous response (may be empty)
    ``stats``       BYTES [1]  only on the final response: JSON object with :data:`STATS_KEYS`

Every stream ends with a response flagged final (Triton's ``triton_final_response``). A bad request
is answered with one error response whose message starts with :data:`INVALID_ARGUMENT` (the Python
backend's ``TritonError.INVALID_ARG`` code; a bad datatype or a missing input is refused by Triton
itself, before the model, with its own INVALID_ARGUMENT message).
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "vlcache"
MODEL_VERSION = "1"

#: Triton datatypes (wire names, as in tritonclient) and their config.pbtxt spellings.
BYTES, INT32, FP32 = "BYTES", "INT32", "FP32"
CONFIG_TYPES = {BYTES: "TYPE_STRING", INT32: "TYPE_INT32", FP32: "TYPE_FP32"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model: its name, wire datatype, shape and whether it may be left out."""

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)
    optional: bool = False


IMAGE = TensorSpec("image", BYTES)
PROMPT = TensorSpec("prompt", BYTES)
MAX_TOKENS = TensorSpec("max_tokens", INT32)
BUDGET = TensorSpec("budget", FP32, optional=True)
METHOD = TensorSpec("method", BYTES, optional=True)
INPUTS: tuple[TensorSpec, ...] = (IMAGE, PROMPT, MAX_TOKENS, BUDGET, METHOD)

TEXT = TensorSpec("text", BYTES)
STATS = TensorSpec("stats", BYTES)
OUTPUTS: tuple[TensorSpec, ...] = (TEXT, STATS)

#: Keys of the final response's ``stats`` JSON object (every key is always present).
STATS_KEYS: tuple[str, ...] = (
    "backend",  # what ran the model: torch / onnx / tensorrt
    "method",  # the compression method used
    "budget",  # α used
    "prompt_tokens",  # m, image tokens included
    "image_tokens",  # image tokens in the prompt
    "output_tokens",  # new tokens generated (the eos token included when one ended the answer)
    "kv_tokens_total",  # Σ over layers of m: the prompt's KV entries before compression
    "kv_tokens_kept",  # Σ over layers of the kept entries after compression
    "kept_per_layer",  # list: the kept entries of each layer after compression
    "kv_bytes_before",  # bytes of the prompt's K/V before compression
    "kv_bytes_after",  # ... and after
    "prefill_seconds",  # server side: vision tower + prefill + scoring + compaction (processor excluded)
    "decode_seconds",  # server side: from the first new token to the last
    "finish_reason",  # "stop" (end of sequence), "length" (max_tokens) or "cancelled"
    "queue_seconds",  # server side: from arrival (after the image processor) to the start of its prefill
    "batch_size_mean",  # mean size of the decode batches this request decoded in (1: alone; 0: no decode step)
    "batch_size_max",  # the largest of them
    "pool_bytes",  # KV-pool bytes its row held at most (its share of the padded batch buffers)
    "pool_occupancy_peak",  # the pool's largest occupancy (used / capacity) while it was in the batch
    "pool_capacity_bytes",  # the KV pool's size (0: the engine serves one request at a time, without a pool)
)

#: Triton custom metrics the model exports on the metrics port (gauges, label ``model``).
METRIC_POOL_OCCUPANCY = "vlcache_kv_pool_occupancy"  # used / capacity of the KV pool, 0..1
METRIC_POOL_USED = "vlcache_kv_pool_used_bytes"  # bytes the pool holds (batch buffers + prefill in flight)
METRIC_POOL_CAPACITY = "vlcache_kv_pool_capacity_bytes"  # the pool's size
METRIC_QUEUE_LENGTH = "vlcache_queue_length"  # requests waiting to join the decode batch
METRIC_BATCH_SIZE = "vlcache_batch_size"  # requests in the running decode batch
METRICS: dict[str, str] = {
    METRIC_POOL_OCCUPANCY: "Occupancy of the KV-cache pool (used / capacity)",
    METRIC_POOL_USED: "Bytes held in the KV-cache pool",
    METRIC_POOL_CAPACITY: "Size of the KV-cache pool in bytes",
    METRIC_QUEUE_LENGTH: "Requests waiting to join the decode batch",
    METRIC_BATCH_SIZE: "Requests in the running decode batch",
}

FINISH_REASONS = ("stop", "length", "cancelled")

#: Prefix of every model-side validation error message.
INVALID_ARGUMENT = "INVALID_ARGUMENT"

#: Default cap on ``max_tokens`` when the deployment sets none.
DEFAULT_MAX_TOKENS_CAP = 1024
