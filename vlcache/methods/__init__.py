"""KV-compression methods, one file each, registered by name.

``available()`` lists them; ``get_method(config)`` builds the one a
:class:`~vlcache.config.CompressionConfig` names. To add a method: subclass
:class:`~vlcache.methods.base.Method` in a new file, set ``name`` and ``paper``, implement
``score()`` (and ``allocate()``/``forced()`` if it differs), declare its own knobs as a frozen
:class:`~vlcache.methods.base.MethodSettings` dataclass in the same file (``settings_type``; read
them from ``self.settings``), decorate with ``@register``, import it below, and add a test on a
hand-built attention pattern.
"""

from vlcache.methods import full, h2o, pyramidkv, random, snapkv, streaming, tgvkv, vlcache  # noqa: F401
from vlcache.methods.base import (
    DecodePolicy,
    LayerInput,
    LayerScore,
    Method,
    MethodSettings,
    PromptLayout,
    available,
    get_method,
    method_class,
    register,
)

__all__ = [
    "DecodePolicy",
    "LayerInput",
    "LayerScore",
    "Method",
    "MethodSettings",
    "PromptLayout",
    "available",
    "get_method",
    "method_class",
    "register",
]
