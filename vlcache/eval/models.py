"""The model an evaluation runs: :mod:`vlcache.hf.loading` with its errors as :class:`EvalError`."""

from __future__ import annotations

from pathlib import Path

from vlcache.eval import EvalError
from vlcache.hf import loading
from vlcache.hf.loading import BUNDLED, DTYPES, SUPPORTED_TYPES, LoadedModel, bundled_path

__all__ = ["BUNDLED", "DTYPES", "SUPPORTED_TYPES", "LoadedModel", "bundled_path", "load_model", "resolve_model"]


def resolve_model(spec: str) -> Path:
    """See :func:`vlcache.hf.loading.resolve_model`; raises EvalError."""
    try:
        return loading.resolve_model(spec)
    except loading.CheckpointError as e:
        raise EvalError(str(e)) from None


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """See :func:`vlcache.hf.loading.load_model`; raises EvalError."""
    try:
        return loading.load_model(spec, device=device, dtype=dtype)
    except loading.CheckpointError as e:
        raise EvalError(str(e)) from None
