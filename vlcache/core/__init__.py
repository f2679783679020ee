"""Pure tensor functions behind every method: no transformers, onnx or tensorrt import here.

Runners (HF, ONNX Runtime, TensorRT) and the plugin kernels are all checked against these. The
algorithms' defaults (``DEFAULT_THRESHOLD`` p, ``DEFAULT_CHUNK``, ``DEFAULT_PYRAMID_BETA``,
``DEFAULT_RECENT_FRACTION``) are defined
here, the lowest layer, and read from here by :mod:`vlcache.config`, the export and the plugins.
"""

from vlcache.core.attention import (
    DEFAULT_CHUNK,
    attention_column_sums,
    group_mean,
    iter_attention_chunks,
    post_vision_attention,
    visible_counts,
)
from vlcache.core.budgets import (
    DEFAULT_PYRAMID_BETA,
    allocate_budgets,
    check_budget,
    proportional_budgets,
    pyramid_budgets,
    total_budget,
    uniform_budgets,
)
from vlcache.core.selection import DEFAULT_RECENT_FRACTION, compact, forced_positions, recent_window, select_kept
from vlcache.core.sparsity import (
    DEFAULT_THRESHOLD,
    PostVisionStats,
    layer_density,
    post_vision_statistics,
    vlcache_scores,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_PYRAMID_BETA",
    "DEFAULT_RECENT_FRACTION",
    "DEFAULT_THRESHOLD",
    "PostVisionStats",
    "allocate_budgets",
    "attention_column_sums",
    "check_budget",
    "compact",
    "forced_positions",
    "group_mean",
    "iter_attention_chunks",
    "layer_density",
    "post_vision_attention",
    "post_vision_statistics",
    "proportional_budgets",
    "pyramid_budgets",
    "recent_window",
    "select_kept",
    "total_budget",
    "uniform_budgets",
    "visible_counts",
    "vlcache_scores",
]
