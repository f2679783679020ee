"""`vlcache-serve`: serve an artifact directory with Triton Inference Server on 127.0.0.1.

    vlcache-serve artifacts/llava-tiny --grpc-port 8001 --instances 1

``--host 0.0.0.0`` binds every interface instead (what the container image does: docker/Dockerfile).

Runs :func:`vlcache.serving.server.serve` on :meth:`TritonServer.for_artifact
<vlcache.serving.server.TritonServer.for_artifact>` (the artifact is verified first) until SIGTERM
(exit status 0) or Ctrl-C (130). User mistakes (no artifact, a bad setting, no tritonserver, a model
that does not load) end with a one-line error and exit status 2 (a server that failed to start adds
its log's tail); tritonserver exiting by itself exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vlcache.cli import Parser, positive_int, run_main

PROG = "vlcache-serve"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Serve a vlcache artifact directory with Triton Inference Server (bound to 127.0.0.1 unless --host).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("artifact_dir", help="artifact directory written by vlcache-build")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the HTTP, gRPC and metrics endpoints bind to (0.0.0.0: every interface, e.g. in a container)",
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument(
        "--instances", type=positive_int, default=None, help="model instances (default: the rendered repository's)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch / ONNX Runtime threads per instance (default: the repository's)",
    )
    p.add_argument("--max-tokens-cap", type=positive_int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to be ready")
    return p


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
