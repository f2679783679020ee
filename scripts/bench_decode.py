"""CPU decode benchmark: how much faster a compressed KV cache decodes, and what scoring costs.

What it measures, on a Llama-shaped language model with random weights (``transformers.LlamaConfig``,
sdpa attention, one sequence, a prompt of random token ids):

* **Decode latency** (median ms per generated token, greedy) with the full cache (method ``full``:
  no scoring, no eviction) and after compressing the prompt's KV cache to each budget α, every
  configuration through the token stream ``vlcache.hf.stream`` (the one greedy loop of
  ``vlcache.generate`` and the served engines). All configurations of one context are decoded side
  by side: step by step in round-robin order, so CPU noise from other processes hits them alike (a
  decode-time policy, TGV-KV, lives in its own stream and acts on its own cache only).
* **Speedup** = full ms/token ÷ compressed ms/token, next to the **bytes-model ideal**
  ``(W + KV) / (W + α·KV)``: W = parameter bytes of the model, KV = full prompt-cache bytes
  (decode on a CPU streams the weights and the cache once per token). ``%ideal`` = measured / ideal.
  transformers' ``DynamicCache`` appends with ``torch.cat`` (it allocates and copies the whole cache
  every step), so the cache is moved about three times per token and the measured speedup can exceed
  this ideal; the JSON also carries ``ideal_3kv`` = ``(W + 3·KV) / (W + 3·α·KV)``.
* **KV bytes** before / after compaction and the kept fraction Σk_l / (L·m) vs α.
* **Prefill time** without scoring (method ``full``) and with scoring (α < 1): opening the stream
  and taking its first token, median of ``--prefill-repeats`` runs, and the scoring overhead
  ``(with − without) / without``; plus the stats' own ``scoring_seconds``.

Default model: hidden 1024, 8 layers, 16 heads with 16 KV heads (MHA, like LLaVA-1.5's Vicuna-7B),
MLP 2816, vocab 32000 (tied), fp32: W ≈ 517 MiB and KV = 64 KiB per token, so the cache equals the
weights near m = 8192, the longest default context (prefill at m = 16384 costs ~4× as much on a
2-core CPU; pass ``--contexts`` / ``--kv-heads`` to go there).

The text-only layout makes VL-Cache score with every prompt query (O(m²)), so the benchmark uses
``CompressionConfig(query_window=...)``: the last ``--query-window`` prompt tokens score the cache
(the paper's speed setup used 50).

Ends stdout with one JSON line ``{"model": {...}, "results": [...]}``.

    .venv/bin/python scripts/bench_decode.py --quick     # smoke test, ~35 s on 2 busy cores
    .venv/bin/python scripts/bench_decode.py             # default: 24 prefills, most at m = 8192; ~6 min
                                                         # on 2 idle cores (estimate), 14 min on busy ones
    .venv/bin/python scripts/bench_decode.py --prefill-repeats 1   # half the prefills
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from _timing import median_ms, round_robin
from transformers import LlamaConfig, LlamaForCausalLM

from vlcache.cli import parse_budgets
from vlcache.config import DTYPES, CompressionConfig, settings_read_by
from vlcache.hf.generation import TorchDecoder, stream
from vlcache.pipeline import CompressionStats
from vlcache.stream import TokenStream

# Settings that --quick changes; an explicit flag always wins.
# One thread for --quick: on a shared 2-core machine two OpenMP threads competing with another busy
# process slowed decode ~8x (640 vs 80 ms/token), one thread ~1.5x.
FULL_RUN = {"contexts": "2048,4096,8192", "decode_steps": 32, "warmup": 4, "prefill_repeats": 2, "threads": 0}
QUICK_RUN = {"contexts": "256,512", "decode_steps": 6, "warmup": 1, "prefill_repeats": 1, "threads": 1}
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags whose help already states them (the --quick-dependent ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if "default:" in help_text else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    g = p.add_argument_group("model (random weights)")
    g.add_argument("--hidden", type=int, default=1024, help="hidden size")
    g.add_argument("--layers", type=int, default=8, help="decoder layers")
    g.add_argument("--heads", type=int, default=16, help="query heads")
    g.add_argument(
        "--kv-heads",
        type=int,
        help="key/value heads; GQA when < --heads (default: --heads, i.e. MHA like LLaVA-1.5's Vicuna-7B)",
    )
    g.add_argument("--intermediate", type=int, default=2816, help="MLP intermediate size")
    g.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    g.add_argument(
        "--untied", action="store_true", help="separate input embedding and LM head (default: tied, so W = bytes read)"
    )
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and cache dtype")
    g = p.add_argument_group("workload")
    g.add_argument(
        "--contexts",
        help=f"prompt lengths m, comma-separated (default: {FULL_RUN['contexts']}; --quick: {QUICK_RUN['contexts']})",
    )
    g.add_argument("--budgets", default="0.2,0.1,0.05", help="budgets α to compare with the full cache")
    g.add_argument("--method", default="vlcache", help="compression method (see vlcache.methods.available())")
    g.add_argument("--query-window", type=int, default=64, help="prompt tokens that score the cache (0: all)")
    g.add_argument(
        "--decode-steps",
        type=int,
        help=f"timed decode steps per configuration "
        f"(default: {FULL_RUN['decode_steps']}; --quick: {QUICK_RUN['decode_steps']})",
    )
    g.add_argument(
        "--warmup",
        type=int,
        help=f"untimed decode steps before the timed ones "
        f"(default: {FULL_RUN['warmup']}; --quick: {QUICK_RUN['warmup']})",
    )
    g.add_argument(
        "--prefill-repeats",
        type=int,
        help=f"timed prefills per configuration, median reported "
        f"(default: {FULL_RUN['prefill_repeats']}; --quick: {QUICK_RUN['prefill_repeats']})",
    )
    g.add_argument("--quick", action="store_true", help="small contexts and few steps: a smoke test")
    g.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads, 0: torch's default (default: 0; --quick: 1; use 1 when other processes "
        "load the CPU: oversubscribed OpenMP threads make timings erratic)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    args = p.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    for key, value in (QUICK_RUN if args.quick else FULL_RUN).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.contexts = [int(c) for c in str(args.contexts).split(",") if c.strip()]
    try:
        args.budgets = parse_budgets(str(args.budgets))
    except ValueError as e:
        p.error(str(e))
    if not args.contexts or min(args.contexts) < 2:
        p.error("--contexts needs lengths >= 2")
    if args.decode_steps < 1 or args.warmup < 0 or args.prefill_repeats < 1:
        p.error("--decode-steps and --prefill-repeats must be >= 1, --warmup >= 0")
    for b in args.budgets:
        CompressionConfig(method=args.method, budget=b)  # validates method and budget early
    return args


# --- model ------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.contexts) + args.warmup + args.decode_steps + 16,
        tie_word_embeddings=not args.untied,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(TORCH_DTYPES[args.dtype]).eval()
    return model


def param_bytes(model: torch.nn.Module) -> int:
    """W: bytes of the parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def model_info(model: LlamaForCausalLM, args: argparse.Namespace) -> dict[str, Any]:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = torch.finfo(TORCH_DTYPES[args.dtype]).bits // 8
    return {
        "arch": "LlamaForCausalLM (random weights)",
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "tied_embeddings": bool(cfg.tie_word_embeddings),
        "dtype": args.dtype,
        "attn_implementation": "sdpa",
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": param_bytes(model),
        "kv_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem,
        "method": args.method,
        "query_window": args.query_window or None,
        "decode_steps": args.decode_steps,
        "warmup": args.warmup,
        "prefill_repeats": args.prefill_repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


# --- one configuration -----------------------------------------------------------------------
@dataclass
class Run:
    """One (context, budget) configuration: its compression config (method ``full`` for the full
    cache), its token stream once prefilled, and measurements."""

    budget: float
    config: CompressionConfig
    prefill_s: list[float] = field(default_factory=list)
    scoring_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    tokens: TokenStream | None = None
    stats: CompressionStats | None = None

    @property
    def scored(self) -> bool:
        return self.config.method != "full"


def timed_prefill(model: LlamaForCausalLM, run: Run, ids: torch.Tensor, keep: bool, steps: int) -> None:
    """Open the configuration's token stream (prefill, scoring and compaction) and take its first
    token (timed); keep the stream for decoding if asked, else close it (its cache is freed)."""
    t0 = time.perf_counter()
    tokens = stream(model, {"input_ids": ids}, run.config, max_new_tokens=steps + 1, eos_token_id=())
    next(tokens)
    run.prefill_s.append(time.perf_counter() - t0)
    assert tokens.stats is not None, "the session recorded no prefill"
    run.stats = tokens.stats
    run.scoring_s.append(tokens.stats.scoring_seconds)
    if keep:
        run.tokens = tokens
    else:
        tokens.close()


def decode_step(run: Run) -> float:
    """One greedy step of the token stream (explicit RoPE positions: they keep counting from m after
    eviction); returns the seconds the stream measured for feeding the token."""
    assert run.tokens is not None
    next(run.tokens)
    return run.tokens.step_seconds[-1]


# --- one context -----------------------------------------------------------------------------
def bench_context(model: LlamaForCausalLM, args: argparse.Namespace, m: int, weight_bytes: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(args.seed + m)
    ids = torch.randint(0, model.config.vocab_size, (1, m), generator=gen)
    qw = args.query_window or None
    runs = [Run(1.0, CompressionConfig(method="full", budget=1.0))] + [
        Run(b, CompressionConfig.create(args.method, b, **settings_read_by(args.method, {"query_window": qw})))
        for b in args.budgets
    ]
    steps = args.warmup + args.decode_steps
    # Prefill: interleaved rounds (full, then each budget); the last round's streams are decoded.
    last = args.prefill_repeats - 1
    for r in range(args.prefill_repeats):
        for run in runs:
            timed_prefill(model, run, ids, keep=r == last, steps=steps)
            gc.collect()
    # Decode: every configuration side by side, one step each per round (a decode policy, TGV-KV,
    # lives in its stream's session and acts on its own cache only).
    decoders = {i: (lambda t, run=run: decode_step(run)) for i, run in enumerate(runs)}
    for i, seconds in round_robin(decoders, args.decode_steps, args.warmup).items():
        runs[i].decode_s += seconds
    for run in runs:  # generated tokens are appended; only a decode policy evicts
        assert run.tokens is not None and run.stats is not None
        decoder = run.tokens.decoder
        assert isinstance(decoder, TorchDecoder)
        lengths = [layer.keys.shape[2] for layer in decoder.cache.layers]
        expected = run.stats.kept_per_layer
        evicted = run.stats.decode_evictions
        if evicted:
            assert sum(lengths) == sum(expected) + steps * len(lengths) - evicted, "decode evictions miscounted"
        else:
            assert lengths == [k + steps for k in expected], f"cache lengths {lengths} != kept + {steps}"

    full = runs[0]
    assert full.stats is not None
    kv_full = full.stats.kv_bytes_before
    full_ms, plain_ms = median_ms(full.decode_s), median_ms(full.prefill_s)
    rows = []
    for run in runs:
        stats = run.stats
        assert stats is not None
        assert stats.kv_bytes_before == kv_full, "full-cache bytes differ between configurations"
        kv_after = stats.kv_bytes_after
        decode_ms = median_ms(run.decode_s)
        speedup = full_ms / decode_ms
        ideal = (weight_bytes + kv_full) / (weight_bytes + run.budget * kv_full)
        scored = run.scored
        prefill_scoring_ms = median_ms(run.prefill_s) if scored else None
        rows.append(
            {
                "context": m,
                "method": run.config.method,
                "budget": run.budget,
                "kv_bytes_full": kv_full,
                "kv_bytes": kv_after,
                "kv_mb": kv_after / 2**20,
                "kv_ratio": kv_after / kv_full,
                "kept_fraction": stats.kept_fraction,
                "kept_rel_err": stats.kept_fraction / run.budget - 1.0,
                "kept_per_layer": stats.kept_per_layer,
                "decode_ms": decode_ms,
                "decode_ms_min": 1e3 * min(run.decode_s),
                "decode_ms_all": [round(1e3 * s, 3) for s in run.decode_s],
                "speedup": speedup,
                "ideal": ideal,
                "pct_ideal": 100.0 * speedup / ideal,
                # DynamicCache appends with torch.cat: the cache is read, written and read again per step.
                "ideal_3kv": (weight_bytes + 3 * kv_full) / (weight_bytes + 3 * run.budget * kv_full),
                "prefill_ms": plain_ms,
                "prefill_ms_all": [round(1e3 * s, 1) for s in full.prefill_s],
                "prefill_scoring_ms": prefill_scoring_ms,
                "prefill_scoring_ms_all": [round(1e3 * s, 1) for s in run.prefill_s] if scored else None,
                "overhead_pct": 100.0 * (prefill_scoring_ms - plain_ms) / plain_ms if scored else None,
                "scoring_ms": median_ms(run.scoring_s) if scored else None,
                "decode_evictions": stats.decode_evictions,
                "scoring_pct_of_prefill": 100.0 * median_ms(run.scoring_s) / plain_ms if scored else None,
            }
        )
    for run in runs:  # free this context's caches before the next one
        if run.tokens is not None:
            run.tokens.close()
        run.tokens = None
    gc.collect()
    return rows


def warm_up(model: LlamaForCausalLM, args: argparse.Namespace) -> None:
    """Untimed: a short prompt through the full cache and the first budget, a few decode steps each."""
    m = min(256, min(args.contexts))
    ids = torch.randint(0, model.config.vocab_size, (1, m), generator=torch.Generator().manual_seed(args.seed))
    qw = args.query_window or None
    config = CompressionConfig.create(
        args.method, args.budgets[0], **settings_read_by(args.method, {"query_window": qw})
    )
    runs = [Run(1.0, CompressionConfig(method="full", budget=1.0)), Run(args.budgets[0], config)]
    for _ in range(1 if args.quick else 2):
        for run in runs:
            timed_prefill(model, run, ids, keep=True, steps=3)
            for _step in range(3):
                decode_step(run)
            assert run.tokens is not None
            run.tokens.close()
    del runs
    gc.collect()


# --- output ----------------------------------------------------------------------------------
COLUMNS = [
    ("context", "{:>7d}"),
    ("budget", "{:>6.2f}"),
    ("kv_MB", "{:>8.1f}"),
    ("kv_ratio", "{:>8.4f}"),
    ("decode_ms", "{:>9.2f}"),
    ("speedup", "{:>7.2f}"),
    ("ideal", "{:>6.2f}"),
    ("%ideal", "{:>6.1f}"),
    ("prefill_ms", "{:>10.1f}"),
    ("prefill_scoring_ms", "{:>18.1f}"),
    ("overhead%", "{:>9.1f}"),
    ("scoring%", "{:>8.1f}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    widths = [len(fmt.format(0 if "d}" in fmt else 0.0)) for _, fmt in COLUMNS]
    header = "  ".join(name.rjust(max(w, len(name))) for (name, _), w in zip(COLUMNS, widths))
    lines = [header, "-" * len(header)]
    for r in rows:
        values = [
            r["context"],
            r["budget"],
            r["kv_mb"],
            r["kv_ratio"],
            r["decode_ms"],
            r["speedup"],
            r["ideal"],
            r["pct_ideal"],
            r["prefill_ms"],
            r["prefill_scoring_ms"],
            r["overhead_pct"],
            r["scoring_pct_of_prefill"],
        ]
        cells = []
        for (name, fmt), w, v in zip(COLUMNS, widths, values):
            text = "-" if v is None else fmt.format(v)
            cells.append(text.rjust(max(w, len(name))))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = build_model(args)
    info = model_info(model, args)
    w = info["weight_bytes"]
    kv_longest = info["kv_bytes_per_token"] * max(args.contexts)
    print(
        f"model: {info['params'] / 1e6:.1f}M params, W = {w / 2**20:.0f} MiB ({args.dtype}); "
        f"{info['layers']} layers, {info['heads']} heads / {info['kv_heads']} KV heads of {info['head_dim']}; "
        f"KV = {info['kv_bytes_per_token'] / 1024:.0f} KiB/token, {kv_longest / 2**20:.0f} MiB at m = {max(args.contexts)} "
        f"({kv_longest / w:.2f} W); {torch.get_num_threads()} threads",
        flush=True,
    )
    print(
        f"method {args.method}, query_window {args.query_window or 'all'}, budgets {args.budgets}, "
        f"decode {args.warmup} warm-up + {args.decode_steps} timed steps, {args.prefill_repeats} prefill repeat(s)",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        warm_up(model, args)
        for m in args.contexts:
            t0 = time.perf_counter()
            rows = bench_context(model, args, m, w)
            results.extend(rows)
            print(f"m = {m}: done in {time.perf_counter() - t0:.1f} s", flush=True)
            for r in rows[1:]:
                print(
                    f"  α = {r['budget']:g}: kept {r['kept_fraction']:.5f} ({100 * r['kept_rel_err']:+.3f}% of α), "
                    f"scoring {r['scoring_ms']:.1f} ms in the stats",
                    flush=True,
                )
    print()
    print(format_table(results))
    print(
        f"\nideal = (W + KV) / (W + α·KV); speedup = full decode ms ÷ compressed decode ms (medians); "
        f"overhead% = (prefill_scoring − prefill) / prefill; "
        f"scoring% = the stats' scoring_seconds / prefill (less sensitive to CPU noise). Total wall time {time.perf_counter() - t_start:.1f} s.",
        flush=True,
    )
    sys.stdout.write(json.dumps({"model": info, "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
