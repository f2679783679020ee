"""`CompressionConfig` (what to evict and how much) and `BuildConfig` (what `vlcache-build` compiles).
Both validate themselves and hash what changes results.

One source of truth for the defaults: the CLI flags, the build manifest and the methods all read
them from here. The algorithms' own constants (p, the chunk size, PyramidKV's β) come from
:mod:`vlcache.core`, the lowest layer, which the export and the plugins read too. The names of
backends and dtypes (:data:`BACKENDS` and the lists made from it, :data:`DTYPES`) are defined here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from vlcache.core.attention import DEFAULT_CHUNK
from vlcache.core.budgets import DEFAULT_PYRAMID_BETA, check_budget
from vlcache.core.sparsity import DEFAULT_THRESHOLD

#: VL-Cache's recent window, as a fraction of each layer's budget: the paper's experiments keep 10%
#: (read so by the public reimplementations MosaicKV and EffiVLM-Bench; DESIGN.md, step 5).
DEFAULT_RECENT_FRACTION = 0.1

# Bump when the meaning of a field changes, so old hashes stop matching.
CONFIG_SCHEMA = 2  # 2: recent_fraction (VL-Cache's recent window)


@dataclass(frozen=True)
class CompressionConfig:
    """KV-cache compression settings for one prompt.

    Attributes:
        method: a registered method name (see ``vlcache.methods.available()``).
        budget: α, the fraction of the prompt's KV entries kept after prefill, in (0, 1].
        threshold: p of VL-Cache's sparsity filter: attention below ``p · rowmax`` counts as zero.
        min_layer_budget: β_min, the smallest fraction of the prompt any layer keeps (≥ 1 token).
        per_head: each KV head keeps its own top-k (True) or one set per layer shared by heads.
        window: SnapKV / PyramidKV observation window, in tokens (the window itself is kept).
        pool_kernel: SnapKV's max-pooling kernel over key scores (odd).
        sinks: leading tokens always kept by StreamingLLM and TGV-KV.
        query_window: VL-Cache scores with the whole post-vision span when None; with the last
            ``query_window`` prompt tokens otherwise (the paper's speed setup used 50).
        recent_fraction: f, VL-Cache's recent window: a layer that keeps k tokens keeps its last
            ``max(1, floor(f · k))`` prompt tokens inside k and fills the rest by score; 0 is the
            paper's Algorithm 1 alone (an ablation, also registered as ``vlcache-nowindow``).
        pyramid_beta: PyramidKV's ratio between the mean and the smallest layer budget.
        chunk_size: query rows per chunk when computing attention statistics (memory, not results).
        seed: seed of the `random` baseline.
    """

    method: str = "vlcache"
    budget: float = 0.1
    threshold: float = DEFAULT_THRESHOLD
    min_layer_budget: float = 0.01
    per_head: bool = True
    window: int = 32
    pool_kernel: int = 5
    sinks: int = 4
    query_window: int | None = None
    recent_fraction: float = DEFAULT_RECENT_FRACTION
    pyramid_beta: float = DEFAULT_PYRAMID_BETA
    chunk_size: int = DEFAULT_CHUNK
    seed: int = 0

    def __post_init__(self) -> None:
        from vlcache.methods import available  # lazy: methods import this module's neighbours

        if self.method not in available():
            raise ValueError(f"unknown method {self.method!r}; known methods: {', '.join(available())}")
        check_budget(self.budget)
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {self.threshold}")
        if not 0.0 <= self.min_layer_budget <= 1.0:
            raise ValueError(f"min_layer_budget must lie in [0, 1], got {self.min_layer_budget}")
        for name in ("window", "pool_kernel", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.query_window is not None and self.query_window < 1:
            raise ValueError(f"query_window must be >= 1 or None, got {self.query_window}")
        if not 0.0 <= self.recent_fraction < 1.0:
            raise ValueError(f"recent_fraction must lie in [0, 1), got {self.recent_fraction}")
        if self.pyramid_beta < 1:
            raise ValueError(f"pyramid_beta must be >= 1, got {self.pyramid_beta}")

    def min_keep(self, prompt_len: int) -> int:
        """k_min in tokens for a prompt of ``prompt_len`` tokens: ``max(1, ceil(β_min · m))``."""
        return max(1, math.ceil(self.min_layer_budget * prompt_len - 1e-9))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CompressionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields: {', '.join(unknown)}")
        return cls(**data)  # type: ignore[arg-type]

    def compute_hash(self) -> str:
        """Stable 16-hex-digit hash of every field that changes results (chunk_size does not)."""
        payload = {k: v for k, v in self.to_dict().items() if k != "chunk_size"}
        payload["schema"] = CONFIG_SCHEMA
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- build -----------------------------------------------------------------------------------
# The compression settings are a build's defaults: a served request may still ask for another
# budget or method (one deployment, several quality tiers), so they do not change the compiled
# graphs, but they are part of the artifact's identity and of its hash.

#: What runs a model (DESIGN.md's "backend"): ONNX Runtime graphs, TensorRT engines, or the HF
#: checkpoint in PyTorch. The names every other list of backends is made from.
BACKENDS = ("onnx", "tensorrt", "torch")
#: What ``vlcache-build`` and :class:`BuildConfig` accept: a backend, or ``auto`` (resolved before
#: the build, never stored).
BUILD_BACKENDS = ("auto", *BACKENDS)
#: What an artifact's manifest may name (``auto`` is resolved before anything is written).
ARTIFACT_BACKENDS = BACKENDS
#: What :func:`vlcache.runtime.load_runtime` opens from an export directory: the backends that run
#: exported graphs (``torch`` runs the checkpoint itself, not an export), or ``auto``.
RUNTIME_BACKENDS = ("auto", *(b for b in BACKENDS if b != "torch"))
#: Weight and activation dtypes, by their torch names (``getattr(torch, name)``).
DTYPES = ("float32", "float16", "bfloat16")
#: Bump when the artifact layout or the meaning of a field changes.
ARTIFACT_FORMAT = 2  # 2: the build config is the one source (no top-level copies in manifest.json)


@dataclass(frozen=True)
class BuildConfig:
    """Attributes:
    backend: ``onnx`` (ONNX Runtime graphs, CPU default), ``tensorrt`` (engines + plugin, GPU),
        ``torch`` (the HF checkpoint run by PyTorch), ``auto`` (tensorrt where a GPU and TensorRT
        exist, else onnx; resolved before the build, never stored).
    dtype: weights and activations of the compiled graphs.
    max_batch_size: sequences per request batch (compressing methods run one at a time).
    max_input_len: the longest prompt, in tokens (image tokens included), the artifact accepts.
    opset: ONNX opset of exported graphs.
    compression: the default compression of served requests.
    """

    backend: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = 1
    max_input_len: int = 2048
    opset: int = 17
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def __post_init__(self) -> None:
        if self.backend not in BUILD_BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BUILD_BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_input_len < 2:
            raise ValueError(f"max_input_len must be >= 2, got {self.max_input_len}")
        if not 17 <= self.opset <= 23:
            raise ValueError(f"opset must lie in [17, 23], got {self.opset}")
        if self.backend == "onnx" and self.dtype != "float32":
            raise ValueError(
                f"the onnx backend exports float32 graphs (ONNX Runtime on CPU), not {self.dtype}; "
                "lower precision is the tensorrt backend's (TensorRT lowers it when it builds engines)"
            )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["compression"] = self.compression.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BuildConfig:
        data = dict(data)
        comp = data.pop("compression", None)
        compression = CompressionConfig.from_dict(dict(comp)) if isinstance(comp, dict) else CompressionConfig()
        return cls(compression=compression, **data)  # type: ignore[arg-type]

    def compute_hash(self) -> str:
        """Stable 16-hex-digit hash of everything that defines the artifact."""
        payload = {k: v for k, v in self.to_dict().items() if k != "compression"}
        payload["compression"] = self.compression.compute_hash()
        payload["format"] = ARTIFACT_FORMAT
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
