"""The compression flags, derived from :class:`~vlcache.config.CompressionConfig` (the fields every
method reads: --method, --budget, ...) and from every registered method's settings (--threshold,
--window, ...), and the config they ask for.

A settings flag left out takes the chosen method's default; one the chosen method does not read is
a user error naming the method's own settings (``--pool-kernel`` with ``--method vlcache``), so a
flag never silently does nothing.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from vlcache.cli import method_name
from vlcache.config import COMMON_FIELDS, BuildConfig, CompressionConfig
from vlcache.errors import UserError

_HELP = {
    "method": "compression method served by default (a request may ask for another)",
    "budget": "default KV budget α in (0, 1]: the fraction of the prompt's KV entries kept after prefill",
    "min_layer_budget": "smallest fraction of the prompt any layer keeps",
    "per_head": "each KV head keeps its own top-k (else one set per layer)",
    "chunk_size": "query rows per chunk when scoring (memory only)",
    "threshold": "sparsity threshold p: attention below p · rowmax counts as zero",
    "query_window": "score with the last N prompt tokens' queries ('none': the post-vision span)",
    "recent_fraction": "recent window: the last max(1, floor(f · k)) prompt tokens of a layer keeping k",
    "window": "observation window (tokens), always kept",
    "pool_kernel": "max-pooling kernel over key scores (odd)",
    "pyramid_beta": "mean / smallest layer budget",
    "sinks": "leading tokens always kept",
    "seed": "seed of the random scores",
}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _value_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType):  # int | None
        return _optional_int
    return hint


def settings_owners() -> dict[str, list[tuple[str, Any, Any]]]:
    """Setting name -> ``[(method, default, type hint), ...]`` over every registered method."""
    from vlcache.methods import available, method_class

    owners: dict[str, list[tuple[str, Any, Any]]] = {}
    for name in available():
        cls = method_class(name).settings_type
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            owners.setdefault(f.name, []).append((name, f.default, hints[f.name]))
    return owners


def add_compression_flags(group: argparse._ArgumentGroup, settings_group: argparse._ArgumentGroup) -> None:
    """The common fields' flags into ``group`` (their defaults shown); every method setting's flag
    into ``settings_group`` (default: the chosen method's own)."""
    from vlcache.methods import MethodSettings

    # config.py names MethodSettings only for type checkers (the methods import torch)
    hints = typing.get_type_hints(CompressionConfig, localns={"MethodSettings": MethodSettings})
    defaults = CompressionConfig()
    for f in fields(CompressionConfig):
        if f.name not in COMMON_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        helptext = _HELP.get(f.name, f.name)
        if hints[f.name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif f.name == "method":
            group.add_argument(flag, default=default, type=method_name, metavar="NAME", help=helptext)
        else:
            group.add_argument(flag, type=_value_type(hints[f.name]), default=default, help=helptext)
    for name, owners in settings_owners().items():
        methods = ", ".join(m for m, _, _ in owners)
        shown = sorted({str(d) for _, d, _ in owners if d is not MISSING})
        helptext = f"{_HELP.get(name, name)} [{methods}; default {' / '.join(shown)}]"
        metavar = "N" if isinstance(owners[0][2], types.UnionType) else None
        settings_group.add_argument(
            "--" + name.replace("_", "-"),
            type=_value_type(owners[0][2]),
            default=argparse.SUPPRESS,  # absent from the namespace unless given
            metavar=metavar,
            help=helptext,
        )


def compression_from_args(args: argparse.Namespace) -> CompressionConfig:
    """The CompressionConfig the flags ask for (UserError for a setting the method does not read)."""
    common = {k: getattr(args, k) for k in COMMON_FIELDS}
    given = {k: getattr(args, k) for k in settings_owners() if hasattr(args, k)}
    try:
        from vlcache.methods import method_class

        own = method_class(common["method"]).settings_type.names()
    except ValueError as e:
        raise UserError(str(e)) from None
    foreign = [k for k in given if k not in own]
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        its = ", ".join("--" + k.replace("_", "-") for k in own) or "none"
        raise UserError(f"{flags} is not a setting of method {common['method']!r} (its settings: {its})")
    try:
        return CompressionConfig(settings=given, **common)
    except ValueError as e:
        raise UserError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> tuple[BuildConfig, frozenset[str]]:
    """The BuildConfig the flags ask for, and which build fields were set explicitly."""
    compression = compression_from_args(args)
    explicit = frozenset(k for k in ("dtype", "max_batch_size", "max_input_len") if getattr(args, k) is not None)
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in explicit}
    try:
        cfg = BuildConfig(backend=args.backend, opset=args.opset, compression=compression, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None
    return cfg, explicit
