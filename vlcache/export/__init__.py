"""ONNX export of LLaVA (vision tower + projector, decoder with per-layer KV) and the VL-Cache ops.

``export_llava(model, out_dir)`` writes the graphs and ``export.json``; see
:mod:`vlcache.export.llava` for the graphs' contracts, :mod:`vlcache.export.ops` for the
``vlcache``-domain ops and :mod:`vlcache.export.names` for every shared name. onnx is imported on
first use of an exporter, not by ``import vlcache.export``.
"""

from __future__ import annotations

from typing import Any

from vlcache.export.spec import ExportSpec

__all__ = ["ExportSpec", "export_llava", "register_schemas"]


def __getattr__(name: str) -> Any:
    if name == "export_llava":
        from vlcache.export.llava import export_llava

        return export_llava
    if name == "register_schemas":
        from vlcache.export.ops import register_schemas

        return register_schemas
    raise AttributeError(f"module 'vlcache.export' has no attribute {name!r}")
