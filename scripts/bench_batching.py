"""In-flight batching targets in one command: batched vs one-at-a-time, budget 0.1 vs 1.0, pool capacity.

Profile **long2k** (prompts of 2,153 tokens): the LLaVA of ``scripts/make_long_context_llava.py``
with a 322² image at patch 7 (2,116 visual tokens) in front of a random-weight Llama with
SmolLM2's vocabulary (49,153) and a small body (8 layers, hidden 256, 4 query heads / 1 KV head,
MLP 1024): W = 82 MB, KV 4,096 bytes per token (8.8 MB per request at α = 1). ``--no-eos``: every
request decodes exactly ``--max-tokens``, whatever the budget (equal work). Random weights: the
answers mean nothing; this profile measures speed and memory only. Why this shape: on a CPU a
2k-token prefill costs about as much as a hundred decode steps, so only long answers show what
decoding does; and batching pays where weights dominate a step while compression pays where the KV
cache does — this body puts one request's KV at ~10% of the weights, eight requests' at ~85%.

Runs (each server is ``vlcache-serve`` on 127.0.0.1 with ``--threads 1`` unless ``--threads``, stopped
after its runs):

1. **batched** (``--max-batch-size 8``): ``vlcache-bench --budgets 1.0,0.1 --concurrency 8``.
2. **one at a time** (``--max-batch-size 1``, the same scheduler with one row): the same load.
3. **capacity** (``--kv-cache-mb`` = ``--pool-full-requests`` × one full request's prefill, batch
   cap 64, ``--max-prefill-tokens 0``: admission first, so a probe's requests all join before the
   first one ends): ``vlcache-bench --capacity --budgets 1.0,0.1``: the largest concurrency the pool
   admits.
4. **bundled** ``llava-tiny`` at concurrency 8, budgets 1.0 / 0.1, batched.

Prints a Markdown table, the target ratios, and one JSON line; writes ``OUT/summary.json``.

    .venv/bin/python scripts/bench_batching.py                 # the docs' run (~10 minutes on 2 idle cores)
    .venv/bin/python scripts/bench_batching.py --quick         # smoke run (short answers, few requests)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_serving import BIN, Serve, log, machine, prepare_tiny, run

PROMPT = "Describe the image in detail."
#: the long2k profile's checkpoint (scripts/make_long_context_llava.py flags)
PROFILE = [
    "--language", "random", "--lm-layers", "8", "--lm-hidden", "256", "--lm-heads", "4", "--lm-kv-heads", "1",
    "--lm-intermediate", "1024", "--image-size", "322", "--patch-size", "7", "--no-eos",
]  # fmt: skip


def prepare_long2k(out: Path, commands: list[str], max_input_len: int) -> Path:
    hf, artifact = out / "hf", out / "artifact"
    if not (hf / "config.json").is_file():
        run([sys.executable, "scripts/make_long_context_llava.py", "--out", str(hf), *PROFILE,
             "--images", str(out / "images"), "--num-images", "8"], commands)  # fmt: skip
    run([str(BIN / "vlcache-build"), "--model", str(hf), "--backend", "onnx", "--max-input-len", str(max_input_len),
         "--budget", "0.1", "--out", str(artifact), "--force"], commands)  # fmt: skip
    return artifact


def full_request_mb(artifact: Path, prompt_tokens: int, max_tokens: int) -> float:
    """MiB of one request's prefill buffers: L · (m + max_tokens) entries of keys and values."""
    spec = json.loads((artifact / "onnx" / "export.json").read_text(encoding="utf-8"))
    entry = 2 * spec["num_kv_heads"] * spec["head_dim"] * 4
    return spec["num_layers"] * (prompt_tokens + max_tokens) * entry / 2**20


def bench(
    server: Serve, name: str, out: Path, budgets: str, concurrency: int, requests: int, max_tokens: int,
    extra: list[str], commands: list[str], capacity: bool = False,
) -> dict[str, Any]:  # fmt: skip
    target = out / name
    cmd = [str(BIN / "vlcache-bench"), "--url", server.url, "--budgets", budgets, "--max-tokens", str(max_tokens),
           "--timeout", "3600", "--out", str(target), "--force", *extra]  # fmt: skip
    if capacity:
        cmd += ["--capacity"]
    else:
        cmd += ["--concurrency", str(concurrency), "--requests", str(requests), "--warmup", "0"]
    target.parent.mkdir(parents=True, exist_ok=True)
    logfile = target.with_name(f"{name}.log")
    with open(logfile, "w", encoding="utf-8") as f:
        run(cmd, commands, stdout=f, stderr=subprocess.STDOUT)
    text = logfile.read_text(encoding="utf-8")
    log(f"{name}:\n" + "\n".join(text.splitlines()[-14:-1]))
    return {"name": name, **json.loads(text.strip().splitlines()[-1])}


def warm(server: Serve, out: Path, extra: list[str], commands: list[str]) -> None:
    run([str(BIN / "vlcache-bench"), "--url", server.url, "--budgets", "1.0", "--requests", "1", "--warmup", "0",
         "--max-tokens", "4", "--out", str(out / "warmup"), "--force", *extra],
        commands, stdout=subprocess.DEVNULL)  # fmt: skip


def by_budget(result: dict[str, Any]) -> dict[float, dict[str, Any]]:
    return {float(r["budget"]): r for r in result["results"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("out/batching-bench"), help="where everything is written")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens each long2k request decodes")
    p.add_argument("--requests", type=int, default=8, help="measured long2k requests per budget and run")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--capacity-max-tokens", type=int, default=32, help="max_tokens of the capacity probe's requests")
    p.add_argument("--pool-full-requests", type=float, default=8.0, help="capacity run's pool, in full requests")
    p.add_argument("--tiny-requests", type=int, default=64, help="requests per budget on llava-tiny")
    p.add_argument("--tiny-max-tokens", type=int, default=16, help="max_tokens on llava-tiny")
    p.add_argument("--runs", default="batched,serial,capacity,tiny", help="which runs, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="vlcache-serve --threads (ONNX Runtime intra-op threads)")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="vlcache-serve --max-prefill-tokens of the batched and one-at-a-time servers (default: the server's)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 32 tokens, 4 requests, 16 tiny requests")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.requests, args.tiny_requests = 32, 4, 16
    runs = args.runs.split(",")
    commands: list[str] = []
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    long_dir = out / "long2k"
    artifact = prepare_long2k(long_dir, commands, max_input_len=4096)
    extra = ["--images", str(long_dir / "images"), "--prompt", PROMPT]
    serve = {"threads": args.threads, "instances": 1, "commands": commands, "timeout": 600.0}
    results: dict[str, Any] = {}
    for name, batch in (("batched", 8), ("serial", 1)):
        if name not in runs:
            continue
        prefill = [] if args.max_prefill_tokens is None else ["--max-prefill-tokens", str(args.max_prefill_tokens)]
        server = Serve(artifact, extra=["--max-batch-size", str(batch), *prefill], **serve)
        try:
            warm(server, long_dir / name, extra, commands)
            results[name] = bench(server, name, long_dir, "1.0,0.1", args.concurrency, args.requests,
                                  args.max_tokens, extra, commands)  # fmt: skip
        finally:
            server.stop()
    if "capacity" in runs:
        prompt_tokens = 2153
        pool_mb = args.pool_full_requests * full_request_mb(artifact, prompt_tokens, args.capacity_max_tokens)
        # admission first (no prefill budget): a probe's requests all join before the first one ends
        limits = ["--max-batch-size", "64", "--kv-cache-mb", f"{pool_mb:.3f}", "--max-prefill-tokens", "0"]
        server = Serve(artifact, extra=limits, **serve)
        try:
            warm(server, long_dir / "capacity", extra, commands)
            results["capacity"] = bench(server, "capacity", long_dir, "1.0,0.1", 0, 0, args.capacity_max_tokens,
                                        extra, commands, capacity=True)  # fmt: skip
            results["capacity"]["pool_mb"] = pool_mb
        finally:
            server.stop()
    if "tiny" in runs:
        tiny_artifact, tiny_extra, what = prepare_tiny(out / "tiny", commands)
        summary["tiny_model"] = what
        server = Serve(tiny_artifact, extra=["--max-batch-size", "8"], **serve)
        try:
            warm(server, out / "tiny", tiny_extra, commands)
            results["tiny"] = bench(server, "tiny", out / "tiny", "1.0,0.1", args.concurrency, args.tiny_requests,
                                    args.tiny_max_tokens, tiny_extra, commands)  # fmt: skip
        finally:
            server.stop()

    checks = targets(results)
    summary.update(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.perf_counter() - t0,
        commands=commands,
        results=results,
        targets=checks,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(table(results))
    print()
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISSED'} {c['what']}: {c['value']:.2f} (target {c['target']})")
    print(json.dumps({"targets": checks, "wall_seconds": round(summary["wall_seconds"], 1)}))
    return 0


def table(results: dict[str, Any]) -> str:
    lines = [
        "| run | budget | ok | out tok/s | TTFT p50 ms | ITL p50 ms | latency p50 ms | batch mean / max | pool peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if name == "capacity":
            continue
        for r in result["results"]:
            lines.append(
                f"| {name} | {r['budget']:g} | {r['succeeded']}/{r['requests']} | {r['output_tokens_per_s']:.1f} | "
                f"{r['ttft_ms']['p50']:.0f} | {r['itl_ms']['p50']:.1f} | {r['latency_ms']['p50']:.0f} | "
                f"{_f(r.get('batch_size_mean'))} / {_f(r.get('batch_size_max'), 0)} | {_f(r.get('pool_occupancy_peak'), 3)} |"
            )
    return "\n".join(lines)


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(what: str, value: float, target: str, met: bool) -> None:
        checks.append({"what": what, "value": value, "target": target, "met": bool(met)})

    if "batched" in results:
        b = by_budget(results["batched"])
        ratio = b[0.1]["output_tokens_per_s"] / b[1.0]["output_tokens_per_s"]
        add("long2k c=8 batched: tokens/s at 0.1 / at 1.0", ratio, ">= 1.5", ratio >= 1.5)
        ttft = b[0.1]["ttft_ms"]["p50"] / b[1.0]["ttft_ms"]["p50"]
        add("long2k c=8 batched: TTFT p50 at 0.1 / at 1.0", ttft, "<= 1.1", ttft <= 1.1)
        if "serial" in results:
            s = by_budget(results["serial"])
            gain = b[1.0]["output_tokens_per_s"] / s[1.0]["output_tokens_per_s"]
            add("long2k c=8 at 1.0: batched tokens/s / one at a time", gain, ">= 2.5", gain >= 2.5)
            old = s[0.1]["output_tokens_per_s"] / s[1.0]["output_tokens_per_s"]
            add("long2k c=8 one at a time: tokens/s at 0.1 / at 1.0 (before batching)", old, "(reference)", True)
    if "capacity" in results:
        cap = {float(r["budget"]): r for r in results["capacity"]["results"]}
        ratio = cap[0.1]["capacity"] / cap[1.0]["capacity"]
        add("long2k fixed pool: largest admitted concurrency at 0.1 / at 1.0", ratio, ">= 5", ratio >= 5)
    if "tiny" in results:
        t = by_budget(results["tiny"])
        ratio = t[0.1]["output_tokens_per_s"] / t[1.0]["output_tokens_per_s"]
        add("llava-tiny c=8 batched: tokens/s at 0.1 / at 1.0", ratio, ">= 1.0", ratio >= 1.0)
    return checks


if __name__ == "__main__":
    sys.exit(main())
