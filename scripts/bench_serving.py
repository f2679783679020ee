"""Reproduce docs/serving.md's serving results in one command: build → serve → bench → stop.

For each model asked for (``--models``):

* ``long``: the long-visual-context LLaVA of ``scripts/make_long_context_llava.py`` (one 448² image →
  4096 visual tokens, trained SmolLM2-135M language model, ``--no-eos`` so every request decodes
  exactly ``--long-max-tokens``), written to ``OUT/long/hf`` unless it is there already; built with
  ``vlcache-build --backend onnx``; its benchmark images are 448² PNG scenes (``OUT/long/images``).
* ``tiny``: the bundled ``llava-tiny`` (``vlcache/models/llava-tiny``) when it exists, else a random
  checkpoint of the same format and size built offline with :mod:`vlcache.hf.tiny`'s
  ``bundled_processor`` / ``bundled_llava`` (what ``scripts/train_tiny_llava.py`` trains; said so in
  the output); the digits task's scenes and questions are the workload.

Then, per model: ``vlcache-serve ARTIFACT --grpc-port P --instances N`` in the background (waited
for until it prints ``ready``), one small unmeasured warm-up request per budget, then
``vlcache-bench`` once per concurrency (``--concurrency-levels``) with all budgets side by side and
``--warmup 0``; then SIGTERM to ``vlcache-serve``, which stops tritonserver. Every command is
printed before it runs. Writes ``OUT/<model>/c<C>/`` (vlcache-bench's results.json, summary.csv,
plots), ``OUT/summary.json`` (machine, commands, every summary; ``summary-<models>.json`` when
``--models`` is not the default) and prints Markdown tables.

``decode`` (a third "model", in the default list): no server; the long artifact's decode ms/token per
budget, one prefill each and then the decode steps in round-robin so that load from other jobs on a
shared machine hits every budget alike (``vlcache-bench`` measures the budgets one after another).

``prefill`` (not in the default list; builds the long artifact first when missing): no server; the long
artifact's prefill time per decoder path side by side — the standard-op graph fed the whole prompt
(what was served before the fused graph), the fused graph fed the whole prompt, and the fused graph
in chunks (the default) — ``--prefill-repeats`` alternating rounds, median.

    .venv/bin/python scripts/bench_serving.py                  # the docs' run (about 30 minutes on 2 shared cores)
    .venv/bin/python scripts/bench_serving.py --quick          # smoke run: 4 tokens, 1 long request per level
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _timing import median_ms, round_robin

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LONG_PROMPT = "Describe the image in detail."


def log(msg: str) -> None:
    print(f"[bench_serving {datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], commands: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    text = shlex.join(cmd)
    commands.append(text)
    log(f"$ {text}")
    return subprocess.run(cmd, check=True, text=True, cwd=REPO, **kwargs)


class Serve:
    """``vlcache-serve`` in the background; ready once it prints ``ready``; stopped with SIGTERM."""

    def __init__(
        self,
        artifact: Path,
        instances: int,
        threads: int,
        commands: list[str],
        timeout: float,
        extra: list[str] | None = None,
    ) -> None:
        from vlcache.serving.server import free_port  # vlcache (and torch) load only when a server starts

        self.port = free_port()
        cmd = [str(BIN / "vlcache-serve"), str(artifact), "--grpc-port", str(self.port)]
        cmd += ["--http-port", "0", "--metrics-port", "0", "--instances", str(instances)]
        if threads:
            cmd += ["--threads", str(threads)]
        cmd += extra or []
        commands.append(shlex.join(cmd) + " &")
        log(f"$ {shlex.join(cmd)} &")
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def reader() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip())
                if "ready:" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if not ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise SystemExit("vlcache-serve did not become ready:\n" + "\n".join(self.lines[-40:]))
        log(self.lines[-1])

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        log(f"vlcache-serve exited with status {self.process.returncode}")


# --- models ------------------------------------------------------------------------------------
def prepare_long(out: Path, commands: list[str], force: bool) -> tuple[Path, list[str]]:
    """Checkpoint, images and artifact of the long-context model; (artifact, extra bench args)."""
    hf, images, artifact = out / "hf", out / "images", out / "artifact"
    if force or not (hf / "config.json").is_file():
        run([sys.executable, "scripts/make_long_context_llava.py", "--out", str(hf), "--no-eos",
             "--images", str(images), "--num-images", "8"], commands)  # fmt: skip
    run([str(BIN / "vlcache-build"), "--model", str(hf), "--backend", "onnx", "--max-input-len", "8192",
         "--out", str(artifact), "--force"], commands)  # fmt: skip
    return artifact, ["--images", str(images), "--prompt", LONG_PROMPT]


def prepare_tiny(out: Path, commands: list[str]) -> tuple[Path, list[str], str]:
    """Artifact of llava-tiny (or a random checkpoint in its format); (artifact, bench args, what it is)."""
    from vlcache.hf.loading import bundled_path

    artifact = out / "artifact"
    if (bundled_path("llava-tiny") / "config.json").is_file():
        model, what = "llava-tiny", f"the bundled trained llava-tiny ({bundled_path('llava-tiny')})"
    else:
        model = str(out / "hf-random")
        what = "a random-weight checkpoint in the llava-tiny format and size (vlcache/models/llava-tiny is missing)"
        write_random_tiny(Path(model))
        commands.append(f"# {what}: scripts/bench_serving.py write_random_tiny({model})")
    run([str(BIN / "vlcache-build"), "--model", model, "--backend", "onnx", "--out", str(artifact), "--force"],
        commands)  # fmt: skip
    return artifact, [], what


def write_random_tiny(out: Path) -> None:
    """llava-tiny's format and size (CLIP 4 × 128, Llama 4 × 128) with seeded random weights."""
    import torch

    from vlcache.digits import IMAGE_SIZE, vocabulary
    from vlcache.hf.tiny import bundled_llava, bundled_processor

    torch.manual_seed(0)
    processor = bundled_processor(vocabulary(), IMAGE_SIZE)
    model = bundled_llava(processor, vision_hidden=128, vision_layers=4, hidden=128, layers=4)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


# --- measuring -----------------------------------------------------------------------------------
def bench(
    name: str, artifact: Path, extra: list[str], max_tokens: int, requests: dict[int, int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    commands: list[str] = args.commands
    server = Serve(artifact, args.instances, args.threads, commands, args.serve_timeout)
    results = []
    try:
        # unmeasured warm-up: one short request (first-run allocations; a long prompt's prefill is the same
        # at every budget, so one request at the first budget warms it)
        run([str(BIN / "vlcache-bench"), "--url", server.url, "--budgets", args.budgets.split(",")[0], "--requests", "1",
             "--warmup", "0", "--max-tokens", "4", "--out", str(args.out / name / "warmup"), "--force", *extra],
            commands, stdout=subprocess.DEVNULL)  # fmt: skip
        for c in args.concurrency_levels:
            out = args.out / name / f"c{c}"
            bench_log = out.with_name(f"{out.name}.bench.log")  # beside: vlcache-bench replaces --out whole
            bench_log.parent.mkdir(parents=True, exist_ok=True)
            with open(bench_log, "w", encoding="utf-8") as logfile:
                run([str(BIN / "vlcache-bench"), "--url", server.url, "--budgets", args.budgets,
                     "--requests", str(requests[c]), "--concurrency", str(c), "--warmup", "0",
                     "--max-tokens", str(max_tokens), "--timeout", "3600", "--out", str(out), "--force", *extra],
                    commands, stdout=logfile, stderr=subprocess.STDOUT)  # fmt: skip
            bench_log.replace(out / "bench.log")
            table = (out / "bench.log").read_text(encoding="utf-8").split("(latencies in ms)")[-1]
            log(f"{name} at concurrency {c}:" + "\n".join(table.splitlines()[: 3 + len(args.budgets.split(","))]))
            data = json.loads((out / "results.json").read_text(encoding="utf-8"))
            for s in data["results"]:
                results.append({"model": name, "max_tokens": max_tokens, **s})
    finally:
        server.stop()
    return results


def decode_check(
    artifact: Path, images: Path, budgets: list[float], steps: int, warmup: int = 4
) -> list[dict[str, Any]]:
    """Decode ms/token per budget without the server, robust to CPU noise from other jobs: one prefill
    per budget (the served engine's processor and ONNX Runtime runner, one request's prompt), then
    the budgets' decode steps in round-robin, so a load spike hits them alike."""
    import statistics

    from PIL import Image

    from vlcache.runtime import stream
    from vlcache.serving import load_engine

    engine: Any = load_engine(artifact)
    image = Image.open(sorted(images.glob("*.png"))[0]).convert("RGB")
    batch = engine.tokenize(image, LONG_PROMPT)
    streams = {}
    for b in budgets:
        config = engine.default_config.with_changes(budget=b)
        tokens = stream(
            engine.runner,
            batch["input_ids"],
            batch.get("pixel_values"),
            config,
            max_new_tokens=steps + warmup + 1,
            eos_token_id=(),
        )
        next(tokens)  # the first token comes from the prefill
        streams[b] = tokens
        log(
            f"decode check: prefilled budget {b:g} ({tokens.stats.prefill_seconds:.1f} s + scoring {tokens.stats.scoring_seconds:.2f} s)"
        )

    def decode_step(b: float) -> float:
        next(streams[b])
        return streams[b].step_seconds[-1]  # what the token stream measured for feeding the token

    times = round_robin({b: (lambda _t, b=b: decode_step(b)) for b in budgets}, steps, warmup)
    out = []
    for b in budgets:
        stats = streams[b].stats
        streams[b].close()
        out.append(
            {
                "budget": b,
                "decode_ms_median": median_ms(times[b]),
                "decode_ms_p90": 1000 * statistics.quantiles(times[b], n=10)[-1],
                "steps": steps,
                "prefill_seconds": stats.prefill_seconds,
                "scoring_seconds": stats.scoring_seconds,
                "kv_bytes_before": stats.kv_bytes_before,
                "kv_bytes_after": stats.kv_bytes_after,
                "kept_per_layer": stats.kept_per_layer,
            }
        )
    return out


#: the long profile's prefill paths side by side: (name, decoder graph, prompt tokens per decoder call)
PREFILL_PATHS = (
    ("standard, whole prompt (served until 2026-11-28)", "standard", None),
    ("fused, whole prompt", "fused", None),
    ("fused, chunked (default)", "fused", "default"),
)


def prefill_check(out: Path, repeats: int, threads: int) -> list[dict[str, Any]]:
    """The long profile's prefill (vision tower + prompt pass, scoring excluded) per decoder path of
    :data:`PREFILL_PATHS`, on one request's prompt, ``repeats`` times in alternation (median): the
    standard-op graph (what serving ran before the fused one) is exported from the same checkpoint
    into ``OUT/long/standard``; every path runs on the same ONNX Runtime threads."""
    import statistics

    from PIL import Image

    from vlcache.config import DEFAULT_PREFILL_CHUNK, CompressionConfig
    from vlcache.export import export_llava
    from vlcache.hf.loading import load_model
    from vlcache.runtime import OnnxRunner, prefill
    from vlcache.serving import load_engine

    artifact, standard = out / "artifact", out / "standard"
    engine: Any = load_engine(artifact)
    image = Image.open(sorted((out / "images").glob("*.png"))[0]).convert("RGB")
    batch = engine.tokenize(image, LONG_PROMPT)
    if not (standard / "export.json").is_file():
        log(f"exporting the standard-op decoder into {standard}")
        model = load_model(str(out / "hf")).model
        export_llava(model, standard, max_input_len=engine.runner.spec.max_input_len, attention="standard")
        del model
    options = {"threads": threads or None}
    folders = {"standard": standard, "fused": engine.runner.directory}
    runners = {
        name: OnnxRunner(
            folders[graph], **options, prefill_chunk=DEFAULT_PREFILL_CHUNK if chunk == "default" else chunk
        )
        for name, graph, chunk in PREFILL_PATHS
    }
    config = CompressionConfig(budget=0.1)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats):
        for name, runner in runners.items():
            state = prefill(runner, batch["input_ids"], batch.get("pixel_values"), config, max_new_tokens=4)
            assert state.stats is not None
            seconds[name].append(state.stats.prefill_seconds)
            state.close()
            log(f"prefill check {repeat + 1}/{repeats}: {name}: {seconds[name][-1]:.1f} s")
    base = statistics.median(seconds[PREFILL_PATHS[0][0]])
    return [
        {
            "path": name,
            "prefill_chunk": runners[name].prefill_chunk,
            "prompt_tokens": int(batch["input_ids"].shape[1]),
            "prefill_seconds": statistics.median(seconds[name]),
            "prefill_seconds_all": seconds[name],
            "speed_vs_standard": base / statistics.median(seconds[name]),
            "threads": threads or "onnxruntime default",
        }
        for name in runners
    ]


def _ms(d: dict[str, Any], k: str, digits: int = 0) -> str:
    v = d.get(k)
    return "–" if v is None else f"{v:,.{digits}f}"


def markdown(results: list[dict[str, Any]]) -> str:
    head = ("| model | conc. | budget | ok | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | "
            "latency p50 / p90 / p99 ms | out tok/s | req/s | KV MB after / before | server prefill s | "
            "server decode ms/token |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in results:
        t, i, lat = r["ttft_ms"], r["itl_ms"], r["latency_ms"]
        per_token = None
        if r.get("server_decode_ms_mean") is not None and r["succeeded"]:
            steps = r["output_tokens"] / r["succeeded"] - 1
            per_token = r["server_decode_ms_mean"] / steps if steps > 0 else None
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {r['budget']:g} | {r['succeeded']}/{r['requests']} | "
            f"{_ms(t, 'p50')} / {_ms(t, 'p90')} / {_ms(t, 'p99')} | "
            f"{_ms(i, 'p50', 1)} / {_ms(i, 'p90', 1)} / {_ms(i, 'p99', 1)} | "
            f"{_ms(lat, 'p50')} / {_ms(lat, 'p90')} / {_ms(lat, 'p99')} | "
            f"{r['output_tokens_per_s']:.2f} | {r['requests_per_s']:.3f} | "
            f"{r['kv_bytes_after_mean'] / 1e6:.3g} / {r['kv_bytes_before_mean'] / 1e6:.3g} | "
            f"{r['server_prefill_ms_mean'] / 1000:.2f} | {'–' if per_token is None else f'{per_token:.1f}'} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and concurrency: tokens/s and TTFT p50 of each budget relative to budget 1.0."""
    out = []
    for r in results:
        base = next(
            (
                b
                for b in results
                if b["model"] == r["model"] and b["concurrency"] == r["concurrency"] and b["budget"] == 1.0
            ),
            None,
        )
        if base is None or r["budget"] == 1.0 or not base["output_tokens_per_s"]:
            continue
        out.append(
            {
                "model": r["model"],
                "concurrency": r["concurrency"],
                "budget": r["budget"],
                "tokens_per_s_vs_full": r["output_tokens_per_s"] / base["output_tokens_per_s"],
                "ttft_p50_vs_full": (r["ttft_ms"]["p50"] or 0) / (base["ttft_ms"]["p50"] or 1),
                "ttft_mean_vs_full": (r["ttft_ms"]["mean"] or 0) / (base["ttft_ms"]["mean"] or 1),
            }
        )
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    others = subprocess.run(["pgrep", "-af", "train_tiny_llava"], capture_output=True, text=True).stdout.strip()
    info["train_tiny_llava_running_at_start"] = bool(others)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("out/serving-bench"), help="where everything is written")
    p.add_argument(
        "--models",
        default="long,tiny,decode",
        help="comma-separated: long, tiny, decode (round-robin decode ms/token of the long artifact, no server), "
        "prefill (the long artifact's prefill per decoder path, no server; after long)",
    )
    p.add_argument("--prefill-repeats", type=int, default=2, help="prefills per path of the prefill check (median)")
    p.add_argument("--decode-steps", type=int, default=48, help="measured steps per budget of the decode check")
    p.add_argument("--budgets", default="1.0,0.1,0.05", help="budgets α, side by side in each vlcache-bench run")
    p.add_argument("--concurrency-levels", default="1,8", help="one vlcache-bench run per level")
    p.add_argument("--long-max-tokens", type=int, default=128, help="tokens each long-context request decodes")
    p.add_argument("--long-requests", default="1:1,8:8", help="measured requests per budget, per level (C:N,...)")
    p.add_argument("--tiny-max-tokens", type=int, default=16, help="max_tokens of llava-tiny requests")
    p.add_argument("--tiny-requests", default="1:32,8:64", help="measured requests per budget for llava-tiny")
    p.add_argument("--instances", type=int, default=1, help="vlcache-serve --instances")
    p.add_argument("--threads", type=int, default=0, help="vlcache-serve --threads (0: the repository's)")
    p.add_argument("--serve-timeout", type=float, default=600.0, help="seconds to wait for the server")
    p.add_argument("--rebuild-checkpoint", action="store_true", help="rewrite the long-context checkpoint")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 long tokens and few requests")
    args = p.parse_args(argv)
    from vlcache.cli import parse_budgets  # after parse_args: --help stays light

    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as e:
        p.error(str(e))
    args.concurrency_levels = [int(c) for c in args.concurrency_levels.split(",")]
    if args.quick:
        args.long_max_tokens, args.tiny_max_tokens = 4, 4
        args.long_requests = ",".join(f"{c}:1" for c in args.concurrency_levels)
        args.tiny_requests = ",".join(f"{c}:{2 * c}" for c in args.concurrency_levels)

    def per_level(text: str) -> dict[int, int]:
        table = {int(c): int(n) for c, n in (item.split(":") for item in text.split(","))}
        missing = [c for c in args.concurrency_levels if c not in table]
        if missing:
            p.error(f"no request count for concurrency {missing} in {text!r}")
        return table

    long_requests, tiny_requests = per_level(args.long_requests), per_level(args.tiny_requests)
    args.out.mkdir(parents=True, exist_ok=True)
    args.commands = []
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    results: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name == "long":
            artifact, extra = prepare_long(args.out / "long", args.commands, args.rebuild_checkpoint)
            results += bench("long", artifact, extra, args.long_max_tokens, long_requests, args)
        elif name == "tiny":
            artifact, extra, what = prepare_tiny(args.out / "tiny", args.commands)
            summary["tiny_model"] = what
            results += bench("tiny", artifact, extra, args.tiny_max_tokens, tiny_requests, args)
        elif name == "decode":
            summary["decode_check"] = decode_check(
                args.out / "long" / "artifact", args.out / "long" / "images", budgets, args.decode_steps
            )
            args.commands.append(
                f"# decode check in-process: scripts/bench_serving.py decode_check({args.decode_steps} steps)"
            )
        elif name == "prefill":
            if not (args.out / "long" / "artifact" / "manifest.json").is_file():
                prepare_long(args.out / "long", args.commands, args.rebuild_checkpoint)
            summary["prefill_check"] = prefill_check(args.out / "long", args.prefill_repeats, args.threads)
            args.commands.append(
                f"# prefill check in-process: scripts/bench_serving.py prefill_check({args.prefill_repeats} repeats)"
            )
        else:
            p.error(f"unknown model {name!r} (long, tiny, decode, prefill)")
    summary.update(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.perf_counter() - t0,
        commands=args.commands,
        train_tiny_llava_running_at_end=bool(
            subprocess.run(["pgrep", "-af", "train_tiny_llava"], capture_output=True, text=True).stdout.strip()
        ),
        results=results,
        ratios=ratios(results),
    )
    default = p.get_default("models")
    path = args.out / ("summary.json" if args.models == default else f"summary-{args.models.replace(',', '-')}.json")
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(markdown(results))
    print()
    for r in summary["ratios"]:
        print(
            f"{r['model']} c={r['concurrency']} α={r['budget']:g}: tokens/s ×{r['tokens_per_s_vs_full']:.2f}, "
            f"TTFT p50 ×{r['ttft_p50_vs_full']:.2f} (mean ×{r['ttft_mean_vs_full']:.2f}) vs α=1"
        )
    for d in summary.get("decode_check", []):
        print(
            f"decode check α={d['budget']:g}: {d['decode_ms_median']:.1f} ms/token median (p90 {d['decode_ms_p90']:.1f}), "
            f"KV {d['kv_bytes_after'] / 1e6:.1f} MB, prefill {d['prefill_seconds']:.1f} s + scoring {d['scoring_seconds']:.2f} s"
        )
    for d in summary.get("prefill_check", []):
        print(
            f"prefill check, {d['path']}: {d['prefill_seconds']:.1f} s for {d['prompt_tokens']} tokens "
            f"(×{d['speed_vs_standard']:.2f} vs the standard graph; runs {', '.join(f'{x:.1f}' for x in d['prefill_seconds_all'])})"
        )
    print(f"wall {summary['wall_seconds']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
