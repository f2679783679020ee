"""gRPC client of the served `vlcache` model, latency statistics and `vlcache-bench`.

* :mod:`vlcache.client.client` — :class:`Client` (sync) and :class:`AsyncClient` (asyncio) over
  ``tritonclient.grpc``: ``generate(...)`` -> :class:`Generation` (text, TTFT, inter-token
  latencies, latency, token counts, server stats); ``stream(...)`` yields :class:`Chunk` s.
* :mod:`vlcache.client.stats` — percentiles and throughput of a set of generations.
* :mod:`vlcache.client.bench` — the benchmark the ``vlcache-bench`` command (:mod:`vlcache.cli.bench`) runs.

Light at import: tritonclient loads when a client is created.
"""

from __future__ import annotations

from vlcache.client.client import (
    AsyncClient,
    Chunk,
    Client,
    ClientError,
    Generation,
    InvalidArgument,
    RequestTimeout,
    ServerError,
    ServerGone,
    ServerUnavailable,
)

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientError",
    "Generation",
    "InvalidArgument",
    "RequestTimeout",
    "ServerError",
    "ServerGone",
    "ServerUnavailable",
]
