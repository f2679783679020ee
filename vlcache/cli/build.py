"""`vlcache-build`: turn a HF VLM checkpoint into a deployable, verified artifact directory.

    vlcache-build --model llava-tiny --budget 0.1 --out artifacts/llava-tiny

The compression flags (--method, --budget, --threshold, ...) are derived from
:class:`~vlcache.config.CompressionConfig` (:mod:`vlcache.cli.compression_flags`); the build flags
from :class:`~vlcache.config.BuildConfig`. User mistakes end with a one-line error and exit status
2; nothing is written unless the whole build succeeds (:mod:`vlcache.builder.build`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlcache.cli import Parser, add_output_flags, run_main
from vlcache.cli.compression_flags import add_compression_flags, config_from_args
from vlcache.config import BUILD_BACKENDS, DTYPES, BuildConfig

PROG = "vlcache-build"


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
    add_output_flags(p, "artifact folder (default: artifacts/<model>)")
    p.add_argument("--dry-run", action="store_true", help="resolve the model and print the plan; build nothing")
    b = p.add_argument_group("build (defaults come from the model's profile when it has one)")
    d = BuildConfig()
    b.add_argument(
        "--backend",
        default=d.backend,
        choices=BUILD_BACKENDS,
        help="auto: tensorrt where a GPU and TensorRT exist, else onnx (ONNX Runtime); torch: the HF checkpoint; "
        "trtllm: the HF checkpoint and a TensorRT-LLM llmapi Triton repository (never chosen by auto; docs/trtllm.md)",
    )
    b.add_argument("--dtype", default=None, choices=DTYPES, help=f"graph dtype (profile's, else {d.dtype})")
    b.add_argument("--max-batch-size", type=int, default=None, help=f"(profile's, else {d.max_batch_size})")
    b.add_argument(
        "--max-input-len", type=int, default=None, help=f"longest prompt in tokens (profile's, else {d.max_input_len})"
    )
    b.add_argument("--opset", type=int, default=d.opset, help="ONNX opset")
    add_compression_flags(
        p.add_argument_group("compression (the served default)"),
        p.add_argument_group("method settings (each read by the methods named; default: the chosen method's)"),
    )
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vlcache.builder.build import build, make_plan

    cfg, explicit = config_from_args(args)
    output = args.out or Path("artifacts") / Path(args.model).name
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
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
