"""Whether TensorRT can run here, and its one lazy import (for the runner, the builder and the plugins).

TensorRT cannot be installed on this project's development and CI machines: nothing imports it at
module level. :func:`tensorrt_available` asks without importing it; :func:`import_tensorrt` imports
it when a TensorRT path is taken and turns its absence (or a version too old) into
:class:`TensorRTUnavailableError`, a ``RuntimeError`` with a one-line message that says what to do.

Also here, shared by the build (``vlcache_plugins.build``) and the runner: the engine roles of the
two plugin engines and :class:`PluginSettings`, the PostVisionStats engine's compile-time constants.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
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


# --- the plugin engines -------------------------------------------------------------------------
# A TensorRT build (``vlcache_plugins.build.build_engines``) turns the export's scoring and
# compaction graphs into engines whose only layers are the VL-Cache plugins (plus the two standard
# nodes that reduce ``group_sparsity`` to ``density``); :class:`vlcache.runtime.TensorRTRunner` runs
# its ops through them. The PostVisionStats kernel bakes the sparsity threshold and the softmax scale
# in as compile-time constants (TensorRT's ahead-of-time plugins take integer scalars only), so the
# build records them beside the engines and the runner refuses a request the engine cannot serve.

#: ``ExportSpec.engines`` role of the ``vlcache::PostVisionStats`` plugin engine (the export's ``post_vision_stats`` graph)
SCORE_ROLE = "post_vision_stats"
#: ``ExportSpec.engines`` role of the ``vlcache::CompactKV`` plugin engine (the export's ``compact_kv`` graph)
COMPACT_ROLE = "compact_kv"
PLUGIN_ROLES = (SCORE_ROLE, COMPACT_ROLE)
#: the file beside the engines that records the PostVisionStats engine's compile-time constants
PLUGIN_SETTINGS_FILE = "plugins.json"


@dataclass(frozen=True)
class PluginSettings:
    """Compile-time constants of a build's PostVisionStats engine (``plugins.json`` beside the engines).

    Attributes:
        threshold: the sparsity threshold p the kernel was compiled with.
        scale: the softmax scale it was compiled with (the model's attention scale, resolved: > 0).
    """

    threshold: float
    scale: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0 or not (self.scale > 0.0 and math.isfinite(self.scale)):
            raise ValueError(f"need 0 <= threshold < 1 and a finite scale > 0, got {self.threshold}, {self.scale}")

    def serves(self, threshold: float, scale: float) -> bool:
        """Whether the engine computes PostVisionStats with this threshold and scale."""
        return math.isclose(threshold, self.threshold, rel_tol=1e-6, abs_tol=1e-12) and math.isclose(
            scale, self.scale, rel_tol=1e-6
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PLUGIN_SETTINGS_FILE
        path.write_text(json.dumps({"threshold": self.threshold, "scale": self.scale}, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PluginSettings:
        """Read ``DIR/plugins.json``; a ValueError that says to rebuild when it is missing or malformed."""
        path = Path(directory) / PLUGIN_SETTINGS_FILE
        if not path.is_file():
            raise ValueError(
                f"{directory}: {PLUGIN_SETTINGS_FILE} (the PostVisionStats engine's threshold and scale) is missing; "
                "rebuild the engines (vlcache-build --backend tensorrt)"
            )
        try:
            data = json.loads(path.read_text())
            return cls(threshold=float(data["threshold"]), scale=float(data["scale"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid plugin settings file ({e}); rebuild the engines") from None
