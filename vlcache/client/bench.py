"""Latency and throughput of a running vlcache server, several budgets side by side: what `vlcache-bench`
(:mod:`vlcache.cli.bench`) runs.

Contract:
* Workload: images from ``--images DIR`` (every PNG / JPEG in it, sorted; prompt ``--prompt``), or
  by default the bundled `digits` task's test scenes with their questions. Request i uses item
  ``i mod len(items)``, so every budget sees the same requests.
* Per budget (sent as the per-request ``budget`` input, in the order given): ``--warmup`` requests
  one at a time (not measured), then ``--requests`` requests (or as many as fit in ``--duration``
  seconds) with ``--concurrency`` in flight, over the asyncio client.
* Reports per budget: TTFT, inter-token latency and request latency (mean, p50, p90, p99), output
  tokens/s and requests/s over the measured wall time, mean KV bytes after compression, failures;
  and the server's batching (:func:`vlcache.client.stats.batching`): mean and max decode-batch size,
  the KV pool's peak occupancy and capacity, queue time (mean, p50, p90, p99). A server whose stats
  lack these keys (before in-flight batching) gets None, shown as ``-``.
  Prints a table (latency) and a second one (batching); :func:`write_results` writes ``results.json`` (summaries + every request),
  ``summary.csv`` and ``latency.png`` / ``throughput.png`` into ``--out`` all at once
  (:func:`vlcache.atomic.atomic_dir`: a non-empty ``--out`` is replaced only with ``--force``; plots
  need matplotlib); the last stdout line is one JSON object ``{"results": [...]}``.
* ``--capacity`` runs :mod:`vlcache.client.capacity` instead (largest concurrency the pool admits).
* Exit status 0 when every request succeeded, 1 when some failed, 2 on a usage error or an
  unreachable server (one-line message, no traceback: :class:`~vlcache.errors.UserError`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlcache.atomic import atomic_dir
from vlcache.client.client import AsyncClient, ClientError, Generation, encode_image
from vlcache.client.stats import summarize
from vlcache.errors import UserError

DEFAULT_PROMPT = "describe the image"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_workload(images: Path | None, prompt: str | None, count: int) -> list[tuple[bytes, str]]:
    """(encoded image, prompt) pairs: a folder's images, or the digits task's test scenes."""
    if images is not None:
        if not images.is_dir():
            raise UserError(f"--images: no such directory: {images}")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"--images: no PNG / JPEG files in {images}")
        return [(p.read_bytes(), prompt or DEFAULT_PROMPT) for p in files]
    from vlcache.digits import DigitScenes

    try:
        scenes = DigitScenes("test", seed=0)
        samples = [scenes[i] for i in range(max(1, min(count, 64)))]
    except ImportError as e:
        raise UserError(f"{e}; or pass --images DIR") from None
    return [(encode_image(s.image), prompt or s.question) for s in samples]


async def run_budget(
    client: AsyncClient,
    workload: list[tuple[bytes, str]],
    budget: float,
    args: argparse.Namespace,
    progress: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Warm up, then measure one budget; (summary, per-request records)."""
    for i in range(args.warmup):
        image, prompt = workload[i % len(workload)]
        await client.generate(image, prompt, args.max_tokens, budget, args.method, timeout=args.timeout)
    done: list[Generation] = []
    records: list[dict[str, Any]] = []
    failures = 0
    next_index = 0
    stop_at = time.perf_counter() + args.duration if args.duration else None

    def take() -> int | None:
        nonlocal next_index
        if args.requests is not None and next_index >= args.requests:
            return None
        if stop_at is not None and time.perf_counter() >= stop_at:
            return None
        next_index += 1
        return next_index - 1

    async def worker() -> None:
        nonlocal failures
        while (i := take()) is not None:
            image, prompt = workload[i % len(workload)]
            try:
                g = await client.generate(image, prompt, args.max_tokens, budget, args.method, timeout=args.timeout)
            except ClientError as e:
                failures += 1
                records.append({"index": i, "budget": budget, "error": f"{type(e).__name__}: {e}"})
            else:
                done.append(g)
                records.append({"index": i, "budget": budget, **g.to_dict()})
            progress.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    summary = {
        "budget": budget,
        "method": args.method,
        "concurrency": args.concurrency,
        **summarize(done, wall, failed=failures),
    }
    records.sort(key=lambda r: r["index"])
    return summary, records


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _int(x: float | None) -> str:
    return "-" if x is None else f"{int(x)}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.0f}%"


def _mib(x: float | None) -> str:
    """Bytes in MiB; ``-`` when unknown, ``none`` for 0 (a server without a pool)."""
    if x is None:
        return "-"
    return "none" if x == 0 else f"{x / 2**20:.1f}"


def _dist(s: dict[str, Any], name: str, key: str) -> float | None:
    d = s.get(name)
    return d.get(key) if isinstance(d, dict) else None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The latency table, then the server's batching table (``-`` for what a summary lacks)."""
    head = ["budget", "ok/req", "ttft p50", "ttft p90", "ttft p99", "itl p50", "itl p90", "itl p99",
            "lat p50", "lat p90", "lat p99", "tok/s", "req/s", "kv bytes", "kv kept"]  # fmt: skip
    rows = [head]
    for s in summaries:
        rows.append(
            [
                f"{s['budget']:g}",
                f"{s.get('succeeded', '-')}/{s.get('requests', '-')}",
                *(_f(_dist(s, d, k)) for d in ("ttft_ms", "itl_ms", "latency_ms") for k in ("p50", "p90", "p99")),
                _f(s.get("output_tokens_per_s")),
                _f(s.get("requests_per_s"), 2),
                _f(s.get("kv_bytes_after_mean"), 0),
                _f(s.get("kv_kept_fraction_mean"), 3),
            ]
        )
    batch = [["budget", "batch mean", "batch max", "pool peak", "pool MiB", "queue p50", "queue p90"]]
    for s in summaries:
        batch.append(
            [
                f"{s['budget']:g}",
                _f(s.get("batch_size_mean"), 2),
                _int(s.get("batch_size_max")),
                _pct(s.get("pool_occupancy_peak")),
                _mib(s.get("pool_capacity_bytes")),
                _f(_dist(s, "queue_ms", "p50")),
                _f(_dist(s, "queue_ms", "p90")),
            ]
        )
    return (
        "(latencies in ms)\n"
        + _table(rows)
        + "\n\n(server batching: decode-batch size per token, KV pool peak occupancy and size, queue in ms)\n"
        + _table(batch)
    )


CSV_FIELDS = ["budget", "method", "concurrency", "requests", "succeeded", "failed", "wall_seconds",
              "output_tokens", "output_tokens_per_s", "requests_per_s", "kv_bytes_before_mean",
              "kv_bytes_after_mean", "kv_kept_fraction_mean", "server_prefill_ms_mean",
              "server_decode_ms_mean", "batch_size_mean", "batch_size_max", "pool_occupancy_peak",
              "pool_capacity_bytes", "pool_bytes_mean"]  # fmt: skip
CSV_DISTRIBUTIONS = ("ttft_ms", "itl_ms", "latency_ms", "queue_ms")


def write_csv(path: Path, summaries: list[dict[str, Any]]) -> None:
    """One row per budget: :data:`CSV_FIELDS`, then mean / p50 / p90 / p99 of each distribution
    (an empty cell for what a summary lacks)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        names = CSV_FIELDS + [f"{m}_{k}" for m in CSV_DISTRIBUTIONS for k in ("mean", "p50", "p90", "p99")]
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for s in summaries:
            row = {k: s.get(k) for k in CSV_FIELDS}
            for m in CSV_DISTRIBUTIONS:
                for k in ("mean", "p50", "p90", "p99"):
                    row[f"{m}_{k}"] = _dist(s, m, k)
            writer.writerow(row)


def write_plots(out: Path, summaries: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[Path]:
    """latency.png (TTFT / ITL / request latency distributions by budget), throughput.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("vlcache-bench: matplotlib not installed; no plots", file=sys.stderr)
        return []
    budgets = [s["budget"] for s in summaries]
    ok = [r for r in records if "error" not in r]
    series = {
        "TTFT (ms)": [[1000 * r["ttft"] for r in ok if r["budget"] == b and r["ttft"] is not None] for b in budgets],
        "inter-token latency (ms)": [
            [1000 * x for r in ok if r["budget"] == b for x in r["inter_token_latencies"]] for b in budgets
        ],
        "request latency (ms)": [[1000 * r["latency"] for r in ok if r["budget"] == b] for b in budgets],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, data) in zip(axes, series.items()):
        kept = [(f"{b:g}", d) for b, d in zip(budgets, data) if d]
        if kept:
            ax.boxplot([d for _, d in kept], tick_labels=[k for k, _ in kept], showfliers=True)
        ax.set_title(title)
        ax.set_xlabel("budget α")
    fig.tight_layout()
    latency = out / "latency.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    fig, ax1 = plt.subplots(figsize=(6, 4))
    labels = [f"{b:g}" for b in budgets]
    ax1.bar(labels, [s["output_tokens_per_s"] for s in summaries], color="tab:blue")
    ax1.set_xlabel("budget α")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(f"throughput at concurrency {summaries[0]['concurrency'] if summaries else '-'}")
    fig.tight_layout()
    throughput = out / "throughput.png"
    fig.savefig(throughput, dpi=110)
    plt.close(fig)
    return [latency, throughput]


async def run(args: argparse.Namespace, budgets: Sequence[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Measure ``budgets`` one after another on the server at ``args.url`` (the other settings are
    vlcache-bench's flags); (a summary per budget, every request's record)."""
    from tqdm import tqdm

    count = args.requests if args.requests is not None else 64
    workload = load_workload(args.images, args.prompt, count)
    client = AsyncClient(args.url, timeout=args.timeout)
    try:
        if not await client.ready():
            raise UserError(f"no ready vlcache model at {args.url} (start one with vlcache-serve)")
        summaries, records = [], []
        for budget in budgets:
            total = args.requests if args.requests is not None else None
            with tqdm(total=total, desc=f"budget {budget:g}", unit="req", file=sys.stderr) as bar:
                summary, recs = await run_budget(client, workload, budget, args, bar)
            summaries.append(summary)
            records.extend(recs)
        return summaries, records
    finally:
        await client.close()


def write_results(
    out: Path,
    config: dict[str, Any],
    summaries: list[dict[str, Any]],
    records: list[dict[str, Any]],
    *,
    force: bool = False,
) -> list[Path]:
    """results.json, summary.csv and the plots, written into ``out`` all at once (a non-empty ``out``
    is replaced only with ``force``); the paths written."""
    with atomic_dir(out, force=force) as tmp:
        (tmp / "results.json").write_text(
            json.dumps({"config": config, "results": summaries, "requests": records}, indent=1) + "\n",
            encoding="utf-8",
        )
        write_csv(tmp / "summary.csv", summaries)
        names = ["results.json", "summary.csv", *(p.name for p in write_plots(tmp, summaries, records))]
    return [out / name for name in names]
