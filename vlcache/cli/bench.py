"""`vlcache-bench`: latency and throughput of a running vlcache server, several budgets side by side.

    vlcache-bench --url 127.0.0.1:8001 --budgets 1.0,0.1 --requests 64 --concurrency 8 --out out/bench
    vlcache-bench --url 127.0.0.1:8001 --budgets 1.0,0.1 --capacity --max-tokens 128 --out out/capacity

The measurement is :mod:`vlcache.client.bench` (its docstring is the contract); with ``--capacity``,
the search of :mod:`vlcache.client.capacity` (the largest concurrency the server's KV pool admits
without queueing, per budget; ``--requests``, ``--duration`` and ``--concurrency`` do not apply).
Exit status 0 when every request succeeded, 1 when some failed; user mistakes (a bad flag, an
occupied ``--out`` without ``--force``, no server at ``--url``, ``--capacity`` with ``--requests`` /
``--duration`` or ``--max-tokens 1``, a server without in-flight batching stats under
``--capacity``) end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vlcache.atomic import check_output_dir
from vlcache.cli import (
    Parser,
    UserError,
    add_max_tokens_flag,
    add_output_flags,
    method_name,
    parse_budgets,
    positive_int,
    run_main,
)
from vlcache.client import bench, capacity
from vlcache.client.client import DEFAULT_URL, ClientError

PROG = "vlcache-bench"
DEFAULT_REQUESTS = 32


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Benchmark a running vlcache server over gRPC: TTFT, inter-token latency, request "
        "latency, throughput and KV bytes, for several per-request budgets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default=DEFAULT_URL, help="host:port of the server's gRPC endpoint")
    p.add_argument("--budgets", default="1.0,0.1", help="comma-separated budgets α, measured in this order")
    p.add_argument(
        "--requests",
        type=positive_int,
        default=None,
        help=f"measured requests per budget (default {DEFAULT_REQUESTS} unless --duration)",
    )
    p.add_argument("--duration", type=float, default=None, help="measure each budget for this many seconds instead")
    p.add_argument("--concurrency", type=positive_int, default=1, help="requests in flight")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per budget before measuring")
    add_max_tokens_flag(
        p,
        help="max_tokens of each request; with --capacity, the pool reserves room for max_tokens per request, so "
        "the capacity found is that of this length (use answers that do not end early)",
    )
    p.add_argument("--method", type=method_name, default=None, help="compression method (default: the deployment's)")
    p.add_argument("--images", type=Path, default=None, help="folder of PNG / JPEG images (default: digits scenes)")
    p.add_argument(
        "--prompt",
        default=None,
        help=f"prompt for every request (default: the digits questions, or {bench.DEFAULT_PROMPT!r} with --images)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument(
        "--capacity",
        action="store_true",
        help="instead of latency: per budget, the largest concurrency whose requests all decode in one batch "
        "(1, 2, 4, ... doubling, then bisection); writes results.json and capacity.csv",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=capacity.DEFAULT_MAX_CONCURRENCY,
        help="with --capacity: the largest concurrency tried",
    )
    add_output_flags(p, "folder for results.json, summary.csv and plots", default=Path("out/bench"))
    return p


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write ``--out``; 0 when every request succeeded, else 1."""
    if args.capacity:
        return run_capacity(args)
    if args.requests is None and args.duration is None:
        args.requests = DEFAULT_REQUESTS
    if args.duration is not None and args.duration <= 0:
        raise UserError(f"--duration must be > 0, got {args.duration:g}")
    budgets = _checked(args)

    try:
        summaries, records = asyncio.run(bench.run(args, budgets))
    except ClientError as e:  # the server went away or refused every request
        raise UserError(f"{type(e).__name__}: {e}") from None
    print(bench.format_table(summaries))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    written = bench.write_results(args.out, config, summaries, records, force=args.force)
    print("wrote " + ", ".join(str(p) for p in written))
    print(json.dumps({"results": summaries}))
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


def _checked(args: argparse.Namespace) -> list[float]:
    """What both modes check before measuring: --warmup, the budgets, and --out (checked again when
    writing); the budgets."""
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_output_dir(args.out, args.force)
    return budgets


def run_capacity(args: argparse.Namespace) -> int:
    """``--capacity``: search, print the table, write ``--out``; 0 when every request succeeded, else 1."""
    for flag, value in (("--requests", args.requests), ("--duration", args.duration)):
        if value is not None:
            raise UserError(f"--capacity chooses the concurrency itself: drop {flag}")
    if args.max_tokens < 2:
        raise UserError("--capacity needs --max-tokens >= 2: a request decodes in a batch after its first token")
    budgets = _checked(args)
    try:
        summaries, records = asyncio.run(capacity.run(args, budgets))
    except ClientError as e:
        raise UserError(f"{type(e).__name__}: {e}") from None
    print(capacity.format_table(summaries))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    written = capacity.write_results(args.out, config, summaries, records, force=args.force)
    print("wrote " + ", ".join(str(p) for p in written))
    print(json.dumps({"mode": "capacity", "results": summaries}))
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0 or 1, or exits with a one-line error."""
    return run_main(build_parser(), run, argv, interrupted="interrupted; nothing written")


if __name__ == "__main__":
    sys.exit(main())
