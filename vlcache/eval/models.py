"""The model an evaluation runs: a VLM through :mod:`vlcache.hf.loading` (the bundled `llava-tiny` or
a local LLaVA folder) or a text-only causal LM through :mod:`vlcache.hf.causal_lm` (`smollm2` or a
local causal-LM folder), with their errors as :class:`EvalError`."""

from __future__ import annotations

from pathlib import Path

from vlcache.eval import EvalError
from vlcache.hf import causal_lm, loading
from vlcache.hf.causal_lm import TEXT_MODELS
from vlcache.hf.loading import BUNDLED, DTYPES, SUPPORTED_TYPES, LoadedModel, bundled_path

__all__ = [
    "BUNDLED",
    "DTYPES",
    "SUPPORTED_TYPES",
    "TEXT_MODELS",
    "LoadedModel",
    "bundled_path",
    "is_text_model",
    "load_model",
    "resolve_model",
]


def is_text_model(spec: str) -> bool:
    """True when ``spec`` names a text-only causal LM (``smollm2`` or such a local folder), without
    loading it; False for a VLM or anything :func:`load_model` will reject."""
    if spec in TEXT_MODELS:
        return True
    if spec in BUNDLED:
        return False
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        return False
    try:
        return causal_lm.is_text_checkpoint(path)
    except loading.CheckpointError as e:
        raise EvalError(str(e)) from None


def resolve_model(spec: str) -> Path:
    """See :func:`vlcache.hf.loading.resolve_model`; raises EvalError."""
    try:
        return loading.resolve_model(spec)
    except loading.CheckpointError as e:
        raise EvalError(str(e)) from None


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """See :func:`vlcache.hf.loading.load_model` (VLMs) and :func:`vlcache.hf.causal_lm.load_causal_lm`
    (text-only LMs); raises EvalError."""
    try:
        if is_text_model(spec):
            return causal_lm.load_causal_lm(spec, device=device, dtype=dtype)
        return loading.load_model(spec, device=device, dtype=dtype)
    except loading.CheckpointError as e:
        raise EvalError(str(e)) from None
