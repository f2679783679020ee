"""`vlcache-build`: turn a HF VLM checkpoint into a deployable, verified artifact directory.

    vlcache-build --model llava-tiny --budget 0.1 --output artifacts/llava-tiny

The compression flags (--method, --budget, --threshold, ...) are derived from
:class:`~vlcache.config.CompressionConfig`; the build flags from
:class:`~vlcache.config.BuildConfig`. User mistakes end with a one-line error and exit
status 2; nothing is written unless the whole build succeeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from vlcache.builder import BuildError
from vlcache.cli import Parser, run_main
from vlcache.config import BUILD_BACKENDS, DTYPES, BuildConfig, CompressionConfig

PROG = "vlcache-build"

_HELP = {
    "method": "compression method served by default (a request may ask for another)",
    "budget": "default KV budget α in (0, 1]: the fraction of the prompt's KV entries kept after prefill",
    "threshold": "VL-Cache sparsity threshold p: attention below p · rowmax counts as zero",
    "min_layer_budget": "smallest fraction of the prompt any layer keeps",
    "per_head": "each KV head keeps its own top-k (else one set per layer)",
    "window": "SnapKV / PyramidKV observation window (tokens)",
    "pool_kernel": "SnapKV max-pooling kernel (odd)",
    "sinks": "leading tokens always kept by StreamingLLM and TGV-KV",
    "query_window": "VL-Cache queries: the last N prompt tokens (default: the post-vision span)",
    "pyramid_beta": "PyramidKV: mean / smallest layer budget",
    "chunk_size": "query rows per chunk when scoring (memory only)",
    "seed": "seed of the 'random' method",
}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _add_compression_flags(group: argparse._ArgumentGroup) -> None:
    hints = typing.get_type_hints(CompressionConfig)
    for f in fields(CompressionConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        hint = hints[f.name]
        helptext = _HELP.get(f.name, f.name)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif isinstance(hint, types.UnionType):  # int | None
            group.add_argument(flag, type=_optional_int, default=default, metavar="N", help=helptext)
        elif f.name == "method":
            from vlcache.methods import available

            group.add_argument(flag, default=default, choices=available(), help=helptext)
        else:
            group.add_argument(flag, type=hint, default=default, help=helptext)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Build a vision-language model with VL-Cache KV compression into a deployable artifact "
        "directory (graphs or engines, processor files, manifest.json, Triton model repository).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="llava-tiny",
        help="a profile alias from builder/ (llava, llava-next, llava-tiny, llava-tiny-late), a HF id in the local cache "
        "(org/name), or a local HF checkpoint folder; nothing is downloaded",
    )
    p.add_argument("--output", "-o", type=Path, default=None, help="artifact folder (default: artifacts/<model>)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output once the build succeeds")
    p.add_argument("--dry-run", action="store_true", help="resolve the model and print the plan; build nothing")
    b = p.add_argument_group("build (defaults come from the model's profile when it has one)")
    d = BuildConfig()
    b.add_argument(
        "--backend",
        default=d.backend,
        choices=BUILD_BACKENDS,
        help="auto: tensorrt where a GPU and TensorRT exist, else onnx (ONNX Runtime); torch: the HF checkpoint",
    )
    b.add_argument("--dtype", default=None, choices=DTYPES, help=f"graph dtype (profile's, else {d.dtype})")
    b.add_argument("--max-batch-size", type=int, default=None, help=f"(profile's, else {d.max_batch_size})")
    b.add_argument(
        "--max-input-len", type=int, default=None, help=f"longest prompt in tokens (profile's, else {d.max_input_len})"
    )
    b.add_argument("--opset", type=int, default=d.opset, help="ONNX opset")
    _add_compression_flags(p.add_argument_group("compression (the served default)"))
    return p


def config_from_args(args: argparse.Namespace) -> tuple[BuildConfig, frozenset[str]]:
    """The BuildConfig the flags ask for, and which build fields were set explicitly."""
    comp = {f.name: getattr(args, f.name) for f in fields(CompressionConfig)}
    explicit = frozenset(k for k in ("dtype", "max_batch_size", "max_input_len") if getattr(args, k) is not None)
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in explicit}
    try:
        cfg = BuildConfig(backend=args.backend, opset=args.opset, compression=CompressionConfig(**comp), **kwargs)
    except ValueError as e:
        raise BuildError(str(e)) from None
    return cfg, explicit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vlcache.builder.build import build, make_plan

    cfg, explicit = config_from_args(args)
    output = args.output or Path("artifacts") / Path(args.model).name
    plan = make_plan(args.model, cfg, output, explicit=explicit)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.dry_run:
        print(json.dumps(plan.describe(), indent=1))
        return plan.describe()
    progress(
        f"{PROG}: {plan.source.spec} -> {plan.output} (backend {plan.config.backend}, hash {plan.config.compute_hash()})"
    )
    manifest = build(plan, force=args.force, progress=progress)
    summary = {
        "output": str(plan.output),
        "backend": manifest["build"]["backend"],
        "config_hash": manifest["config_hash"],
        "files": len(manifest["files"]),
        "bytes": sum(e["bytes"] for e in manifest["files"].values()),
    }
    print(json.dumps(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0 or exits with a one-line error."""
    return run_main(build_parser(), run, argv, (BuildError,))


if __name__ == "__main__":
    sys.exit(main())
