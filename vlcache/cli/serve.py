"""`vlcache-serve`: serve an artifact directory with Triton Inference Server on 127.0.0.1.

    vlcache-serve artifacts/llava-tiny --grpc-port 8001 --instances 1

``--host 0.0.0.0`` binds every interface instead (what the container image does: docker/Dockerfile).
``--max-batch-size N``, ``--kv-cache-mb M`` and ``--max-prefill-tokens N`` set the in-flight batching
of each instance (default: the build's batch size, a pool of 25% of the memory available at load and
2048 prompt tokens prefilled between two decode steps); like ``--instances``, ``--threads`` and
``--max-tokens-cap`` they serve a rendered copy of the repository.

Runs :func:`vlcache.serving.server.serve` on :meth:`TritonServer.for_artifact
<vlcache.serving.server.TritonServer.for_artifact>` (the artifact is verified first) until SIGTERM
(exit status 0) or Ctrl-C (130). User mistakes (no artifact, a bad setting, no tritonserver, a model
that does not load) end with a one-line error and exit status 2 (a server that failed to start adds
its log's tail); tritonserver exiting by itself exits 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from vlcache.cli import Parser, non_negative_int, positive_int, run_main

PROG = "vlcache-serve"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (those flags say what they default to in words)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Serve a vlcache artifact directory with Triton Inference Server (bound to 127.0.0.1 unless --host).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("artifact_dir", help="artifact directory written by vlcache-build")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the HTTP, gRPC and metrics endpoints bind to (0.0.0.0: every interface, e.g. in a container)",
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: a free one)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Prometheus metrics port (0: a free one): Triton's metrics and the vlcache_* gauges (KV pool, queue, batch)",
    )
    p.add_argument(
        "--instances", type=positive_int, default=None, help="model instances (default: the rendered repository's)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch / ONNX Runtime threads per instance (default: the repository's)",
    )
    p.add_argument(
        "--max-tokens-cap",
        type=positive_int,
        default=None,
        help="largest max_tokens a request may ask for (default: the repository's, 1024 unless rendered otherwise)",
    )
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="requests decoded together per instance, by in-flight batching (ONNX Runtime artifacts; torch and "
        "tensorrt run one at a time) (default: the build's max_batch_size)",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=positive_float,
        default=None,
        metavar="M",
        help="KV-cache pool of each instance in MiB: requests wait in the queue until theirs fits "
        # vlcache.engine.pool.DEFAULT_POOL_FRACTION (not imported: it loads torch; a test checks the figure)
        "(default: 25%% of the memory available when the model loads)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="prompt tokens prefilled between two decode steps while a batch decodes: a long prompt is prefilled "
        "in chunks between the running requests' tokens; 0: no limit (every waiting request that fits is "
        "prefilled before the next decode step) "
        # vlcache.config.DEFAULT_MAX_PREFILL_TOKENS (not imported: it loads torch; a test checks the figure)
        "(default: 2048)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to be ready")
    return p


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from vlcache.serving.server import TritonServer, serve

    server = TritonServer.for_artifact(
        args.artifact_dir,
        instances=args.instances,
        num_threads=args.threads,
        max_tokens_cap=args.max_tokens_cap,
        max_batch_size=args.max_batch_size,
        kv_cache_mb=args.kv_cache_mb,
        max_prefill_tokens=args.max_prefill_tokens,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        startup_timeout=args.timeout,
    )
    return 0 if serve(server, say, warn) is None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0 or 1, or exits with a one-line error."""
    return run_main(build_parser(), run, argv, interrupted="interrupted; tritonserver stopped")


if __name__ == "__main__":
    sys.exit(main())
