"""Latency and throughput statistics of a set of generations (numpy percentiles).

:func:`summarize` returns, for the successful generations of one run: TTFT, inter-token latency
(all gaps of all requests pooled) and request latency as mean / p50 / p90 / p99 in milliseconds;
output tokens/s and requests/s over the run's wall time; mean server-side KV bytes and prefill /
decode times; and the counts of requests, failures and streams that ended without a final response.
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
    }
