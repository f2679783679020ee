"""The method interface: a method scores tokens; allocation, selection and compaction are shared.

A method sees one layer at a time during prefill (:class:`LayerInput`) and returns per-key scores
and, optionally, a layer weight (:class:`LayerScore`). After the last layer, :meth:`Method.allocate`
turns the weights into per-layer budgets, and :meth:`Method.select` picks the kept indices with
:func:`vlcache.core.select_kept`. A method with a decode-time policy returns it from
:meth:`Method.decode_policy`. Most methods only write :meth:`Method.score`; one whose scores are the
post-vision statistics says so in :meth:`Method.post_vision_scores`, so that a backend's fused op
can compute them. :mod:`vlcache.pipeline` runs these steps on every backend.

A method's own knobs (SnapKV's window, VL-Cache's threshold, ...) are a frozen
:class:`MethodSettings` dataclass declared next to it (``settings_type``), validated in its
``__post_init__`` (ValueError); :class:`~vlcache.config.CompressionConfig` holds the fields every
method shares and one settings instance of the chosen method, so a config hashes only what its
method reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vlcache.core import select_kept, uniform_budgets

if TYPE_CHECKING:
    from vlcache.config import CompressionConfig


@dataclass(frozen=True)
class PromptLayout:
    """Where the images are in a prompt of ``prompt_len`` tokens.

    Attributes:
        prompt_len: m.
        image_spans: half-open ``(start, end)`` positions of each image's tokens, ascending.
    """

    prompt_len: int
    image_spans: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError("a prompt needs at least one token")
        last = 0
        for s, e in self.image_spans:
            if not last <= s < e <= self.prompt_len:
                raise ValueError(f"bad image spans {self.image_spans} for a {self.prompt_len}-token prompt")
            last = e

    @property
    def post_vision_start(self) -> int:
        """v: first position after the last image token (0 without images); at most m − 1, so the
        post-vision window always holds at least the last prompt token."""
        end = self.image_spans[-1][1] if self.image_spans else 0
        return min(end, self.prompt_len - 1)

    @property
    def num_image_tokens(self) -> int:
        return sum(e - s for s, e in self.image_spans)

    def image_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """(m,) bool, True on image tokens."""
        mask = torch.zeros(self.prompt_len, dtype=torch.bool, device=device)
        for s, e in self.image_spans:
            mask[s:e] = True
        return mask


@dataclass
class LayerInput:
    """One layer's prefill tensors, handed to :meth:`Method.score`.

    Attributes:
        queries: (B, H_q, n, d) query rows at positions ``query_start .. m-1``, after RoPE.
        keys: (B, H_kv, m, d) the layer's prompt keys as cached (after RoPE).
        query_start: absolute position of the first query row (as asked by :meth:`Method.query_start`).
        scale: the attention's softmax scale.
        layer_idx: l; num_layers: L.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    query_start: int
    scale: float
    layer_idx: int
    num_layers: int


@dataclass
class LayerScore:
    """scores: (B, H_kv, m), higher = keep; weight: this layer's share for budget allocation."""

    scores: torch.Tensor
    weight: float | None = None


@dataclass(frozen=True)
class PostVisionScores:
    """A method's declaration that its layer scores are the post-vision statistics: ``scores`` and
    the mean ``density`` of :func:`vlcache.core.post_vision_statistics` over its query rows, with
    this ``threshold`` p. A backend with a fused op for those statistics (a runner's
    ``post_vision_stats``) then computes them instead of :meth:`Method.score`
    (:mod:`vlcache.pipeline`)."""

    threshold: float

    @staticmethod
    def layer_score(scores: torch.Tensor, density: torch.Tensor) -> LayerScore:
        """The layer's score from the statistics: (B, H_kv, m) scores, weight the mean (B,) density."""
        return LayerScore(scores, float(density.mean()))


class DecodePolicy:
    """Evicts during decode. The runner calls :meth:`set_protected` once per layer after prefill
    compaction, then :meth:`step` after layer ``layer_idx`` attended with one new query."""

    def set_protected(self, layer_idx: int, kept: torch.Tensor) -> None:
        """kept: (B, H_kv, k) prompt positions layer ``layer_idx`` kept at prefill. Default: unused."""

    def step(self, layer_idx: int, attention: torch.Tensor, cache_len: int) -> int | None:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class MethodSettings:
    """A method's own settings: none. Subclasses add typed fields with defaults (their names are
    also the CLI flags, so one name means one thing across methods) and validate them in
    ``__post_init__`` with ValueError."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, method: str, values: dict[str, Any]) -> MethodSettings:
        """Settings from ``{name: value}``; ValueError naming ``method``'s settings for an unknown name."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            own = ", ".join(cls.names()) or "none"
            raise ValueError(f"method {method!r} has no setting {', '.join(unknown)} (its settings: {own})")
        return cls(**values)


def check_positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class Method:
    """Base class. Subclasses set ``name`` and ``paper`` and implement :meth:`score`; a method with
    settings of its own sets ``settings_type`` and reads them from ``self.settings``."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    settings_type: ClassVar[type[MethodSettings]] = MethodSettings
    #: False for `full`: the runner skips scoring and compaction entirely.
    compresses: ClassVar[bool] = True
    #: Selection shared by all heads of a layer regardless of ``config.per_head``.
    shared_selection: ClassVar[bool] = False

    def __init__(self, config: CompressionConfig) -> None:
        if not isinstance(config.settings, self.settings_type):
            raise ValueError(f"method {self.name!r} needs {self.settings_type.__name__}, got {config.settings!r}")
        self.config = config
        self.settings: Any = config.settings  # this method's settings_type

    # --- what a method writes -------------------------------------------------------------
    def query_start(self, layout: PromptLayout) -> int:
        """First prompt position whose query :meth:`score` needs (m: no queries)."""
        return layout.prompt_len

    def score(self, inp: LayerInput, layout: PromptLayout) -> LayerScore:
        """Per-key scores of one layer (and its weight for the allocator). Required when ``compresses``."""
        why = "it does not compress, so nothing scores it" if not self.compresses else "a subclass must implement it"
        raise NotImplementedError(f"method {self.name!r} has no score(): {why}")

    def post_vision_scores(self) -> PostVisionScores | None:
        """Non-None when :meth:`score` is exactly the post-vision statistics (see
        :class:`PostVisionScores`): backends with a fused op for them run it instead. Default: None."""
        return None

    def allocate(self, weights: Sequence[float | None], layout: PromptLayout) -> torch.Tensor:
        """(L,) tokens kept per layer. Default: uniform."""
        return uniform_budgets(len(weights), self.config.budget, layout.prompt_len, self.min_keep(layout))

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        """``(sinks, recent)`` positions always kept in a layer that keeps k tokens."""
        return 0, 0

    def decode_policy(self, budgets: torch.Tensor, layout: PromptLayout) -> DecodePolicy | None:
        return None

    # --- shared ---------------------------------------------------------------------------
    def min_keep(self, layout: PromptLayout) -> int:
        return self.config.min_keep(layout.prompt_len)

    @property
    def per_head(self) -> bool:
        return self.config.per_head and not self.shared_selection

    def select(self, scores: torch.Tensor, k: int, layout: PromptLayout) -> torch.Tensor:
        """(B, H_kv, m) scores -> (B, H_kv, k) kept indices in original order."""
        sinks, recent = self.forced(layout, k)
        return select_kept(scores, k, per_head=self.per_head, sinks=sinks, recent=recent)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


_LISTING_ORDER = (
    "vlcache",
    "vlcache-uniform",
    "vlcache-nowindow",
    "tgvkv",
    "snapkv",
    "pyramidkv",
    "h2o",
    "streaming",
    "random",
    "full",
)


def available() -> list[str]:
    """Names of the registered methods: the built-in ones in a fixed order, then any others."""
    rank = {name: i for i, name in enumerate(_LISTING_ORDER)}
    return sorted(_REGISTRY, key=lambda n: (rank.get(n, len(rank)), n))


def method_class(name: str) -> type[Method]:
    """The registered method called ``name`` (ValueError listing the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(available())}") from None


def get_method(config: CompressionConfig) -> Method:
    """Instantiate the method named by ``config.method``."""
    return method_class(config.method)(config)
