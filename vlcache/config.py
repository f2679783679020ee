"""`CompressionConfig` (what to evict and how much) and `BuildConfig` (what `vlcache-build` compiles).
Both validate themselves and hash what changes results.

One source of truth for the defaults: the CLI flags, the build manifest and the methods all read
them from here or from the methods' settings. The algorithms' own constants (p, the chunk size,
PyramidKV's β, VL-Cache's recent fraction) come from :mod:`vlcache.core`, the lowest layer, which the
export and the plugins read too. The names of backends and dtypes (:data:`BACKENDS` and the lists
made from it, :data:`DTYPES`) are defined here.

A compression config has the fields every method reads (method, budget, β_min, per-head selection,
chunk size) and one :class:`~vlcache.methods.base.MethodSettings` of the chosen method (its own
knobs, declared next to it, as kvpress gives each press its own fields): changing SnapKV's
``pool_kernel`` cannot change the hash of a ``vlcache`` config, because a ``vlcache`` config has
no ``pool_kernel``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, cast

from vlcache.core.attention import DEFAULT_CHUNK
from vlcache.core.budgets import check_budget

if TYPE_CHECKING:
    from vlcache.methods.base import MethodSettings

# Bump when the meaning of a field changes, so old hashes stop matching.
CONFIG_SCHEMA = 3  # 2: recent_fraction (VL-Cache's recent window); 3: per-method settings
#: The fields of :class:`CompressionConfig` every method reads (the rest is ``settings``).
COMMON_FIELDS = ("method", "budget", "min_layer_budget", "per_head", "chunk_size")


def _method_class(name: str) -> Any:
    from vlcache.methods import method_class  # lazy: the methods import torch

    return method_class(name)


def settings_read_by(method: str, candidates: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``candidates`` that ``method`` has as settings: a sweep's shared knobs (one
    seed for every method that has a ``seed``) without handing a method a setting it lacks."""
    own = _method_class(method).settings_type.names()
    return {k: v for k, v in candidates.items() if k in own}


@dataclass(frozen=True)
class CompressionConfig:
    """KV-cache compression settings for one prompt.

    Attributes:
        method: a registered method name (see ``vlcache.methods.available()``).
        budget: α, the fraction of the prompt's KV entries kept after prefill, in (0, 1].
        min_layer_budget: β_min, the smallest fraction of the prompt any layer keeps (≥ 1 token).
        per_head: each KV head keeps its own top-k (True) or one set per layer shared by heads.
        chunk_size: query rows per chunk when computing attention statistics (memory, not results).
        settings: the method's own settings (``method_class(method).settings_type``); a mapping
            ``{name: value}`` or None (the method's defaults) is turned into one. An unknown name,
            or a settings object of another method, raises ValueError.

    ``CompressionConfig.create("snapkv", budget=0.2, window=16)`` sorts keyword arguments into the
    common fields and the method's settings. ``config.settings.threshold`` reads a setting.
    """

    method: str = "vlcache"
    budget: float = 0.1
    min_layer_budget: float = 0.01
    per_head: bool = True
    chunk_size: int = DEFAULT_CHUNK
    settings: MethodSettings | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        cls = _method_class(self.method)
        check_budget(self.budget)
        if not 0.0 <= self.min_layer_budget <= 1.0:
            raise ValueError(f"min_layer_budget must lie in [0, 1], got {self.min_layer_budget}")
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        given = self.settings
        if given is None or isinstance(given, Mapping):
            settings = cls.settings_type.from_mapping(self.method, dict(given or {}))
        elif type(given) is cls.settings_type:
            settings = given
        else:
            raise ValueError(f"method {self.method!r} takes {cls.settings_type.__name__}, not {type(given).__name__}")
        object.__setattr__(self, "settings", settings)

    @classmethod
    def create(cls, method: str = "vlcache", budget: float = 0.1, **kwargs: Any) -> CompressionConfig:
        """A config from flat keyword arguments: common fields by name, the rest as ``method``'s
        settings (ValueError for a name that is neither)."""
        common = {k: kwargs.pop(k) for k in list(kwargs) if k in COMMON_FIELDS}
        return cls(method=method, budget=budget, settings=kwargs, **common)

    def with_changes(self, **changes: Any) -> CompressionConfig:
        """A copy with ``changes`` (common fields or settings, flat). A new ``method`` keeps the
        settings it shares with the old one (``vlcache`` → ``vlcache-uniform`` keeps the threshold)
        and takes its own defaults for the rest."""
        method = changes.pop("method", self.method)
        own = _method_class(method).settings_type.names()
        kept = {k: v for k, v in self.settings_dict().items() if k in own}
        common = {k: getattr(self, k) for k in COMMON_FIELDS if k != "method"}
        common.update({k: changes.pop(k) for k in list(changes) if k in COMMON_FIELDS})
        return CompressionConfig(method=method, settings={**kept, **changes}, **common)

    def settings_dict(self) -> dict[str, Any]:
        """The method's settings as ``{name: value}`` (every field, defaults included)."""
        return asdict(cast("MethodSettings", self.settings))  # a MethodSettings after __post_init__

    def min_keep(self, prompt_len: int) -> int:
        """k_min in tokens for a prompt of ``prompt_len`` tokens: ``max(1, ceil(β_min · m))``."""
        return max(1, math.ceil(self.min_layer_budget * prompt_len - 1e-9))

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {k: getattr(self, k) for k in COMMON_FIELDS}
        d["settings"] = self.settings_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CompressionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields: {', '.join(unknown)}")
        return cls(**data)  # type: ignore[arg-type]

    def compute_hash(self) -> str:
        """Stable 16-hex-digit hash of what changes results: the common fields but chunk_size, and
        the chosen method's settings (no other method's)."""
        payload = {k: v for k, v in self.to_dict().items() if k != "chunk_size"}
        payload["schema"] = CONFIG_SCHEMA
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- build -----------------------------------------------------------------------------------
# The compression settings are a build's defaults: a served request may still ask for another
# budget or method (one deployment, several quality tiers), so they do not change the compiled
# graphs, but they are part of the artifact's identity and of its hash.

#: What runs a model (DESIGN.md's "backend"): ONNX Runtime graphs, TensorRT engines, the HF
#: checkpoint in PyTorch, or the HF checkpoint in TensorRT-LLM's PyTorch backend (served by
#: TensorRT-LLM's Triton model, :mod:`vlcache.trtllm`). The names every other list of backends is made from.
BACKENDS = ("onnx", "tensorrt", "torch", "trtllm")
#: What ``vlcache-build`` and :class:`BuildConfig` accept: a backend, or ``auto`` (resolved before
#: the build, never stored).
BUILD_BACKENDS = ("auto", *BACKENDS)
#: What an artifact's manifest may name (``auto`` is resolved before anything is written).
ARTIFACT_BACKENDS = BACKENDS
#: What :func:`vlcache.runtime.load_runtime` opens from an export directory: the backends that run
#: exported graphs (``torch`` and ``trtllm`` run the checkpoint itself, not an export), or ``auto``.
RUNTIME_BACKENDS = ("auto", *(b for b in BACKENDS if b not in ("torch", "trtllm")))
#: Weight and activation dtypes, by their torch names (``getattr(torch, name)``).
DTYPES = ("float32", "float16", "bfloat16")
#: requests decoded together by the served in-flight scheduler, unless the build or the server says otherwise
DEFAULT_MAX_BATCH_SIZE = 8
#: prompt tokens per decoder call of a chunked prefill (ONNX Runtime): each chunk attends only to the
#: keys before it, so causal attention skips the upper triangle a whole-prompt call computes
#: (measured 10-15% faster at 2k-8k tokens; docs/benchmarks.md), and a running batch waits at most one
#: chunk for a new request's prefill
DEFAULT_PREFILL_CHUNK = 512
#: prompt tokens the served scheduler prefills between two decode steps while a batch is decoding
#: (whole chunks; 0: no limit, every waiting request that fits is prefilled before the next step):
#: vLLM's ``max_num_batched_tokens`` idea — a burst of short prompts still fills the batch at once,
#: a long prompt delays the running rows' next token by about this many tokens' prefill, not its whole
DEFAULT_MAX_PREFILL_TOKENS = 2048

#: Bump when the artifact layout or the meaning of a field changes.
ARTIFACT_FORMAT = 3  # 2: the build config is the one source (no top-level copies in manifest.json);
# 3: the compression config holds its method's settings only


@dataclass(frozen=True)
class BuildConfig:
    """Attributes:
    backend: ``onnx`` (ONNX Runtime graphs, CPU default), ``tensorrt`` (engines + plugin, GPU),
        ``torch`` (the HF checkpoint run by PyTorch), ``trtllm`` (the HF checkpoint and a Triton
        ``llmapi`` repository for TensorRT-LLM, GPU; never chosen by ``auto``), ``auto`` (tensorrt
        where a GPU and TensorRT exist, else onnx; resolved before the build, never stored).
    dtype: weights and activations of the compiled graphs.
    max_batch_size: the served decode batch: requests decoded together by the in-flight scheduler
        (:mod:`vlcache.engine`; ``vlcache-serve --max-batch-size`` overrides it).
    max_input_len: the longest prompt, in tokens (image tokens included), the artifact accepts.
    opset: ONNX opset of exported graphs.
    compression: the default compression of served requests.
    """

    backend: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
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
