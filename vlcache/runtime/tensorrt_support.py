"""Whether TensorRT can run here, and its one lazy import (for the runner, the builder and the plugins).

TensorRT cannot be installed on this project's development and CI machines: nothing imports it at
module level. :func:`tensorrt_available` asks without importing it; :func:`import_tensorrt` imports
it when a TensorRT path is taken and turns its absence (or a version too old) into
:class:`TensorRTUnavailableError`, a ``RuntimeError`` with a one-line message that says what to do.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from vlcache.errors import UserError


class TensorRTUnavailableError(RuntimeError, UserError):
    """TensorRT (or a part of it a caller needs) is missing or too old (a one-line message)."""


def tensorrt_available() -> bool:
    """True when ``tensorrt`` is installed and torch sees a CUDA device (nothing is imported but torch)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def import_tensorrt(*, needed_by: str = "the tensorrt backend", min_version: tuple[int, ...] = ()) -> ModuleType:
    """The ``tensorrt`` module, imported now.

    Args:
        needed_by: what needs it, for the message (``"the tensorrt backend"``, ``"the vlcache TensorRT plugins"``).
        min_version: the oldest (major, minor) that will do; () takes any.

    Raises:
        TensorRTUnavailableError: ``tensorrt`` does not import, or is older than ``min_version``.
    """
    at_least = f" >= {_version_text(min_version)}" if min_version else ""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed: {needed_by} needs NVIDIA TensorRT{at_least} on a machine with a CUDA GPU "
            "(pip install tensorrt, or an NGC TensorRT container); on CPU use the onnx backend (ONNX Runtime)"
        ) from exc
    version = tuple(int(p) for p in str(tensorrt.__version__).split(".")[:2] if p.isdigit())
    if min_version and version < min_version:
        raise TensorRTUnavailableError(f"TensorRT {tensorrt.__version__} is too old: {needed_by} needs{at_least}")
    return tensorrt
