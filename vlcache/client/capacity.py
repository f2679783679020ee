"""Capacity of a running vlcache server: the largest concurrency its KV pool admits without queueing,
per budget; what ``vlcache-bench --capacity`` (:mod:`vlcache.cli.bench`) runs.

Contract:
* A **probe** at concurrency c sends c requests at once (workload items 0 … c-1, the same for every
  budget: :func:`vlcache.client.bench.load_workload`), each asking for ``--max-tokens`` tokens, and
  waits for all of them. It is **admitted** when every request succeeded and the largest
  ``batch_size_max`` in their stats is at least c: all c decoded in one batch, so none waited for
  room in the pool. A probe with a failed request counts as refused.
* The **search** (:func:`search`), per budget after ``--warmup`` requests one at a time: c = 1, 2, 4,
  … doubling up to ``--max-concurrency`` (the last step clipped to it) until a probe is refused, then
  bisection between the last admitted and the first refused c. It assumes admission is monotonic in
  c and probes each c at most once. The answer is the largest admitted c (0 when even c = 1 was
  refused); when ``--max-concurrency`` itself was admitted it is a lower bound (``≥ c``).
* The requests must overlap: the server's scheduler prefills every waiting request that fits before
  its next decode step, so a probe's requests, sent together, all join before the first one decodes
  its second token unless the pool or the batch cap refuses them; requests that end early (end of
  sequence, counted as ``stopped_early``) weaken a probe. The pool reserves room for ``max_tokens``
  per request, so the capacity is that of this ``--max-tokens``.
* The server's ``--max-batch-size`` caps the answer too, and the stats do not tell it apart from the
  pool: when several budgets stop at the same c, :func:`notes` says the cap is the likely limit.
* A server whose stats lack ``batch_size_max`` (before in-flight batching) is a
  :class:`~vlcache.errors.UserError`; one without a pool (``pool_capacity_bytes`` 0) serves one
  request at a time, so its answer is 1.
* Reports per budget (:func:`run`): ``capacity``, ``capacity_is_lower_bound``, ``ratio`` (vs the first
  budget's capacity; None when that is 0), ``refused_at`` and ``refused_reached`` (the smallest refused
  c and the largest batch it reached), ``pool_occupancy_peak`` (of the largest admitted probe),
  ``pool_capacity_bytes``, request counts and every probe. :func:`format_table` prints them,
  :func:`write_results` writes ``results.json`` and ``capacity.csv`` into ``--out`` at once
  (:func:`vlcache.atomic.atomic_dir`, ``--force`` as in the normal mode).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlcache.atomic import atomic_dir
from vlcache.client.bench import _mib, _pct, _table, load_workload
from vlcache.client.client import AsyncClient, ClientError, Generation, ServerUnavailable
from vlcache.client.stats import distribution
from vlcache.errors import UserError

DEFAULT_MAX_CONCURRENCY = 64


@dataclass
class Probe:
    """One probe at ``concurrency``: whether it was ``admitted``, the largest ``batch_size_max`` its
    requests ``reached`` (None: no successful request), failed requests, requests that ended before
    ``max_tokens`` (``stopped_early``), the pool's peak occupancy and capacity from the stats, queue
    times (ms) and the probe's wall time."""

    concurrency: int
    admitted: bool
    reached: int | None
    failed: int = 0
    stopped_early: int = 0
    pool_occupancy_peak: float | None = None
    pool_capacity_bytes: int | None = None
    queue_ms: dict[str, float | None] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def judge(concurrency: int, generations: Sequence[Generation], failed: int, max_tokens: int, wall: float) -> Probe:
    """The :class:`Probe` of ``concurrency`` requests that gave ``generations`` (and ``failed`` errors).

    Raises:
        UserError: a successful request's stats lack ``batch_size_max`` (a server without in-flight batching).
    """
    stats = [g.stats for g in generations]
    if any(not _number(s.get("batch_size_max")) for s in stats):
        raise UserError(
            "the server's stats have no batch_size_max: it predates in-flight batching, and --capacity needs it"
        )
    reached = max((int(s["batch_size_max"]) for s in stats), default=None)
    peaks = [float(s["pool_occupancy_peak"]) for s in stats if _number(s.get("pool_occupancy_peak"))]
    capacities = [int(s["pool_capacity_bytes"]) for s in stats if _number(s.get("pool_capacity_bytes"))]
    queues = [float(s["queue_seconds"]) for s in stats if _number(s.get("queue_seconds"))]
    return Probe(
        concurrency=concurrency,
        admitted=failed == 0 and reached is not None and reached >= concurrency,
        reached=reached,
        failed=failed,
        stopped_early=sum(1 for g in generations if g.output_tokens < max_tokens),
        pool_occupancy_peak=max(peaks, default=None),
        pool_capacity_bytes=max(capacities, default=None),
        queue_ms=distribution(queues),
        wall_seconds=wall,
    )


async def search(probe: Callable[[int], Awaitable[bool]], max_concurrency: int) -> tuple[int, int | None]:
    """(largest admitted c, smallest refused c or None): doubling from 1, then bisection (module
    docstring); ``probe(c)`` is awaited at most once per c."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    admitted, refused = 0, None
    c = 1
    while True:
        if await probe(c):
            admitted = c
            if c >= max_concurrency:
                break
            c = min(2 * c, max_concurrency)
        else:
            refused = c
            break
    while refused is not None and refused - admitted > 1:
        mid = (admitted + refused) // 2
        if await probe(mid):
            admitted = mid
        else:
            refused = mid
    return admitted, refused


async def run_budget(
    client: AsyncClient,
    workload: list[tuple[bytes, str]],
    budget: float,
    args: argparse.Namespace,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Warm up, then search one budget's capacity; (summary without ``ratio``, per-request records)."""
    for i in range(args.warmup):
        image, prompt = workload[i % len(workload)]
        await client.generate(image, prompt, args.max_tokens, budget, args.method, timeout=args.timeout)
    probes: dict[int, Probe] = {}
    records: list[dict[str, Any]] = []

    async def probe(c: int) -> bool:
        async def one(i: int) -> Generation | None:
            image, prompt = workload[i % len(workload)]
            try:
                g = await client.generate(image, prompt, args.max_tokens, budget, args.method, timeout=args.timeout)
            except ServerUnavailable:  # the server went away: no probe can be judged any more
                raise
            except ClientError as e:
                records.append({"budget": budget, "concurrency": c, "index": i, "error": f"{type(e).__name__}: {e}"})
                return None
            records.append({"budget": budget, "concurrency": c, "index": i, **g.to_dict()})
            return g

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(c)))
        done = [g for g in results if g is not None]
        p = judge(c, done, len(results) - len(done), args.max_tokens, time.perf_counter() - t0)
        probes[c] = p
        verdict = "admitted" if p.admitted else "refused"
        failed = f", {p.failed} failed" if p.failed else ""
        log(f"budget {budget:g}: {c} concurrent: largest batch {p.reached} ({verdict}{failed}), {p.wall_seconds:.1f} s")
        return p.admitted

    capacity, refused = await search(probe, args.max_concurrency)
    best = probes.get(capacity)
    refusal = probes.get(refused) if refused is not None else None
    capacities = [p.pool_capacity_bytes for p in probes.values() if p.pool_capacity_bytes is not None]
    summary = {
        "budget": budget,
        "method": args.method,
        "max_tokens": args.max_tokens,
        "max_concurrency": args.max_concurrency,
        "capacity": capacity,
        "capacity_is_lower_bound": refused is None,
        "refused_at": refused,
        "refused_reached": refusal.reached if refusal is not None else None,
        "refused_stopped_early": refusal.stopped_early if refusal is not None else None,
        "pool_occupancy_peak": best.pool_occupancy_peak if best is not None else None,
        "pool_capacity_bytes": max(capacities, default=None),
        "requests": sum(p.concurrency for p in probes.values()),
        "failed": sum(p.failed for p in probes.values()),
        "probes": [probes[c].to_dict() for c in sorted(probes)],
    }
    records.sort(key=lambda r: (r["concurrency"], r["index"]))
    return summary, records


def add_ratios(summaries: list[dict[str, Any]]) -> None:
    """Each summary's ``ratio``: its capacity over the first summary's (None when that is 0)."""
    first = summaries[0]["capacity"] if summaries else 0
    for s in summaries:
        s["ratio"] = s["capacity"] / first if first else None


def notes(summaries: list[dict[str, Any]]) -> list[str]:
    """What the table cannot say: lower bounds, no pool, a likely --max-batch-size cap, early ends."""
    out = []
    for s in summaries:
        b = f"budget {s['budget']:g}"
        if s.get("pool_capacity_bytes") == 0:
            out.append(f"{b}: the server has no KV pool (it serves one request at a time)")
        if s["capacity_is_lower_bound"]:
            out.append(
                f"{b}: all {s['capacity']} requests decoded together at --max-concurrency {s['max_concurrency']}: "
                "the capacity is at least that (cap reached? raise --max-concurrency; the server's "
                "--max-batch-size caps it too)"
            )
        elif s.get("refused_stopped_early"):
            out.append(
                f"{b}: at {s['refused_at']} concurrent, {s['refused_stopped_early']} requests ended before "
                "--max-tokens (end of sequence): they may have left before the last ones joined "
                "(a prompt with longer answers makes the probe sharper)"
            )
    same: dict[int, list[float]] = {}  # budgets that stopped at the same c, with a pool
    for s in summaries:
        if not s["capacity_is_lower_bound"] and s.get("pool_capacity_bytes") and s["capacity"] > 1:
            same.setdefault(s["capacity"], []).append(s["budget"])
    for c, budgets in same.items():
        if len(budgets) > 1:
            which = (
                "every budget" if len(budgets) == len(summaries) else "budgets " + ", ".join(f"{b:g}" for b in budgets)
            )
            out.append(
                f"{which} stopped at {c}: the server's --max-batch-size is the likely limit, not the pool (a smaller "
                "budget leaves room for more rows; or --max-tokens dominates what a request reserves)"
            )
    return out


def _ratio(s: dict[str, Any], first: dict[str, Any]) -> str:
    if s.get("ratio") is None:
        return "-"
    lower, first_lower = s["capacity_is_lower_bound"], first["capacity_is_lower_bound"]
    prefix = "~" if lower and first_lower else "≥" if lower else "≤" if first_lower else ""
    return f"{prefix}{s['ratio']:.2f}x"


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The capacity table (``-`` for what is unknown), then :func:`notes`."""
    rows = [["budget", "capacity", "ratio", "refused at", "reached", "pool peak", "pool MiB", "probes"]]
    for s in summaries:
        rows.append(
            [
                f"{s['budget']:g}",
                f"≥{s['capacity']}" if s["capacity_is_lower_bound"] else str(s["capacity"]),
                _ratio(s, summaries[0]),
                "-" if s["refused_at"] is None else str(s["refused_at"]),
                "-" if s["refused_reached"] is None else str(s["refused_reached"]),
                _pct(s.get("pool_occupancy_peak")),
                _mib(s.get("pool_capacity_bytes")),
                str(len(s["probes"])),
            ]
        )
    text = (
        f"(capacity: the most concurrent requests that decoded together, at max_tokens "
        f"{summaries[0]['max_tokens'] if summaries else '-'}; pool peak: of that probe)\n" + _table(rows)
    )
    return "\n".join([text, *notes(summaries)])


async def run(args: argparse.Namespace, budgets: Sequence[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Search each budget's capacity on the server at ``args.url`` (the other settings are
    vlcache-bench's flags: ``max_concurrency``, ``max_tokens``, ``warmup``, ``method``, ``timeout``,
    ``images`` / ``prompt``); (a summary per budget with ``ratio``, every request's record)."""
    workload = load_workload(args.images, args.prompt, args.max_concurrency)
    client = AsyncClient(args.url, timeout=args.timeout)
    try:
        if not await client.ready():
            raise UserError(f"no ready vlcache model at {args.url} (start one with vlcache-serve)")
        summaries, records = [], []
        for budget in budgets:
            summary, recs = await run_budget(
                client, workload, budget, args, lambda line: print(line, file=sys.stderr, flush=True)
            )
            summaries.append(summary)
            records.extend(recs)
        add_ratios(summaries)
        return summaries, records
    finally:
        await client.close()


CSV_FIELDS = ["budget", "method", "max_tokens", "max_concurrency", "capacity", "capacity_is_lower_bound", "ratio",
              "refused_at", "refused_reached", "refused_stopped_early", "pool_occupancy_peak",
              "pool_capacity_bytes", "requests", "failed"]  # fmt: skip


def write_results(
    out: Path,
    config: dict[str, Any],
    summaries: list[dict[str, Any]],
    records: list[dict[str, Any]],
    *,
    force: bool = False,
) -> list[Path]:
    """results.json (``mode`` ``capacity``, the summaries with their probes, every request) and
    capacity.csv, written into ``out`` all at once (a non-empty ``out`` is replaced only with
    ``force``); the paths written."""
    with atomic_dir(out, force=force) as tmp:
        (tmp / "results.json").write_text(
            json.dumps({"config": config, "mode": "capacity", "results": summaries, "requests": records}, indent=1)
            + "\n",
            encoding="utf-8",
        )
        with (tmp / "capacity.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(summaries)
    return [out / "results.json", out / "capacity.csv"]
