"""Latency and throughput statistics of a set of generations (numpy percentiles).

:func:`summarize` returns, for the successful generations of one run: TTFT, inter-token latency
(all gaps of all requests pooled) and request latency as mean / p50 / p90 / p99 in milliseconds;
output tokens/s and requests/s over the run's wall time; mean server-side KV bytes and prefill /
decode times; and the counts of requests, failures and streams that ended without a final response.

The server's batching (:data:`vlcache.serving.protocol.STATS_KEYS`, in-flight batching servers):
``batch_size_mean`` is the mean over decoded tokens of the size of the decode batch each was decoded
in (each request's ``batch_size_mean`` weighted by its decode steps, ``output_tokens - 1``: the first
token comes from the prefill); ``batch_size_max`` and ``pool_occupancy_peak`` are the largest over
the requests, ``pool_capacity_bytes`` the largest reported, ``pool_bytes_mean`` the mean of what each
request's row held, ``queue_ms`` the distribution of ``queue_seconds`` (arrival → start of prefill).
Only the requests whose stats carry a key count for it, so an older server's stats (without these
keys) give None.

A statistic with no samples is None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlcache.client.client import Generation

PERCENTILES = (50, 90, 99)


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 of seconds, in milliseconds (None when empty)."""
    if not len(values_s):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out: dict[str, float | None] = {"mean": float(ms.mean())}
    for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES)):
        out[f"p{p}"] = float(v)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _values(stats: Sequence[dict[str, Any]], key: str) -> list[float]:
    """The numeric values of ``key`` in the stats that carry it (None and non-numbers skipped)."""
    out = []
    for s in stats:
        v = s.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def _max(values: Sequence[float]) -> float | None:
    return max(values) if len(values) else None


def batch_size_mean(generations: Sequence[Generation]) -> float | None:
    """Mean decode-batch size over decoded tokens (module docstring); None without the key."""
    total = weight = 0.0
    plain: list[float] = []  # the requests' means, for a fallback when no request counts a decode step
    for g in generations:
        v = g.stats.get("batch_size_mean")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        plain.append(float(v))
        steps = max(int(g.output_tokens) - 1, 0) if v > 0 else 0
        total += float(v) * steps
        weight += steps
    if weight > 0:
        return total / weight
    decoded = [v for v in plain if v > 0]
    return _mean(decoded) if decoded else (0.0 if plain else None)


def batching(generations: Sequence[Generation]) -> dict[str, Any]:
    """The batching part of :func:`summarize` (module docstring)."""
    stats = [g.stats for g in generations]
    peak_batch = _max(_values(stats, "batch_size_max"))
    capacity = _max(_values(stats, "pool_capacity_bytes"))
    return {
        "batch_size_mean": batch_size_mean(generations),
        "batch_size_max": None if peak_batch is None else int(peak_batch),
        "pool_occupancy_peak": _max(_values(stats, "pool_occupancy_peak")),
        "pool_capacity_bytes": None if capacity is None else int(capacity),
        "pool_bytes_mean": _mean(_values(stats, "pool_bytes")),
        "queue_ms": distribution(_values(stats, "queue_seconds")),
    }


def summarize(generations: Sequence[Generation], wall_seconds: float, *, failed: int = 0) -> dict[str, Any]:
    """Statistics of one run (see the module docstring)."""
    ok = list(generations)
    out_tokens = sum(g.output_tokens for g in ok)
    wall = max(wall_seconds, 1e-9)
    stats = [g.stats for g in ok]
    return {
        "requests": len(ok) + failed,
        "succeeded": len(ok),
        "failed": failed,
        "wall_seconds": wall_seconds,
        "ttft_ms": distribution([g.ttft for g in ok if g.ttft is not None]),
        "itl_ms": distribution([x for g in ok for x in g.inter_token_latencies]),
        "latency_ms": distribution([g.latency for g in ok]),
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall,
        "requests_per_s": len(ok) / wall,
        "prompt_tokens_mean": _mean([g.prompt_tokens for g in ok]),
        "kv_bytes_before_mean": _mean([s.get("kv_bytes_before", 0) for s in stats]),
        "kv_bytes_after_mean": _mean([s.get("kv_bytes_after", 0) for s in stats]),
        "kv_kept_fraction_mean": _mean(
            [s["kv_tokens_kept"] / s["kv_tokens_total"] for s in stats if s.get("kv_tokens_total")]
        ),
        "server_prefill_ms_mean": _mean([1000.0 * s.get("prefill_seconds", 0.0) for s in stats]),
        "server_decode_ms_mean": _mean([1000.0 * s.get("decode_seconds", 0.0) for s in stats]),
        **batching(ok),
    }
