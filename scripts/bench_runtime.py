"""ONNX Runtime (fused and standard decoder graphs) vs torch: prefill time, decode ms/token and KV
bytes on the same LLaVA and context.

What it measures, in one process, on one ``LlavaForConditionalGeneration`` with random weights
(Llama-shaped language model, a small CLIP tower; fp32) and one prompt laid out as
``[bos] [text prefix] [image tokens] [question]`` of ``--context`` tokens:

* **torch**: the transformers model through ``vlcache.hf.stream`` (the torch backend of
  ``vlcache.generate``: a ``vlcache.VLCache`` session's hooks score and compact during prefill, then
  greedy decode with explicit positions on the session's compacted ``DynamicCache``).
* **onnx-fused**: the graphs of ``vlcache.export.export_llava(attention="fused")`` (the default:
  ONNX Runtime's ``com.microsoft.GroupQueryAttention``, KV buffers preallocated per request and
  written in place), run by ``vlcache.runtime.OnnxRunner`` (ONNX Runtime, CPU) through
  ``vlcache.runtime.stream`` — the loop ``vlcache.runtime.generate`` uses.
* **onnx-standard**: the same with ``attention="standard"`` (standard ops: Concat-appended KV,
  MatMul→Softmax→MatMul; what TensorRT builds from).
* **onnx-fused** feeds the prompt in chunks of ``--prefill-chunk`` tokens (the runner's default,
  each chunk after the ones before in the same buffers: causal attention skips the upper triangle);
  **onnx-fused-whole** (optional) is the same graph fed the whole prompt in one call, as
  **onnx-standard** is: the prefill as it ran before chunking.
* **onnx-baseline** (optional, ``--baseline DIR``): an export of this same model made elsewhere —
  typically by an older vlcache, to measure against the graph as it was — run whole-prompt by this
  runner. ``--save-model DIR`` writes the benchmark's model as a HuggingFace checkpoint for that::

      .venv/bin/python scripts/bench_runtime.py --context 8192 --save-model /tmp/m8k
      git worktree add /tmp/old <commit>      # then, with /tmp/old first on PYTHONPATH:
      python -c "from transformers import LlavaForConditionalGeneration as L; from vlcache.export import export_llava; export_llava(L.from_pretrained('/tmp/m8k').eval(), '/tmp/old-export', max_input_len=8300)"
      .venv/bin/python scripts/bench_runtime.py --context 8192 --backends onnx-fused,onnx-baseline --baseline /tmp/old-export

Every backend runs the same compression pipeline (``vlcache.pipeline``) and the same token stream
(``vlcache.stream.TokenStream``); a decode step is timed by the stream (feeding one token).

For each budget α (method ``vlcache``; α = 1.0 scores but keeps everything) every backend prefills
the same prompt (``--prefill-repeats`` times, alternating, median reported), then they decode **side
by side**: step by step in round-robin order after ``--warmup`` steps, so CPU noise from other
processes hits them alike. Reported per backend and budget: prefill seconds (image encoding + prompt
pass, scoring excluded), scoring seconds (scoring, allocation and compaction), median decode
ms/token, KV bytes before / after compaction (valid entries) and reserved (what the cache's buffers
hold for the decode: the fused runner's capacity k_l + new tokens; exact tensors otherwise), and
speed ratios against torch and fused against standard. Each ONNX backend's greedy tokens are
compared with torch's as a sanity check (they should agree).

All backends get the same number of intra-op threads (``--threads``; torch.set_num_threads and
ONNX Runtime's intra_op_num_threads). Ends stdout with one JSON line.

    .venv/bin/python scripts/bench_runtime.py --quick     # smoke test, under a minute
    .venv/bin/python scripts/bench_runtime.py             # hidden 1024 x 8 layers, 2048 tokens
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from _timing import median_ms, round_robin
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlcache.cli import parse_budgets
from vlcache.config import DEFAULT_PREFILL_CHUNK, CompressionConfig
from vlcache.hf.generation import stream as hf_stream
from vlcache.stream import TokenStream

FULL_RUN = {
    "context": 2048,
    "hidden": 1024,
    "layers": 8,
    "image_size": 96,
    "question": 64,
    "decode_steps": 32,
    "warmup": 4,
}
QUICK_RUN = {
    "context": 256,
    "hidden": 256,
    "layers": 4,
    "image_size": 32,
    "question": 32,
    "decode_steps": 8,
    "warmup": 2,
}
#: The image token id of the benchmark's random LLaVA: LLaVA-1.5's last vocabulary id, taken modulo
#: ``--vocab`` (not :data:`vlcache.hf.tiny.IMAGE_TOKEN`, the tiny test model's).
RANDOM_LLAVA_IMAGE_TOKEN_ID = 31999
#: what runs: torch, and the ONNX Runtime runner on each decoder graph (``onnx-<attention>``);
#: ``onnx-fused-whole`` is the fused graph fed the whole prompt in one call (no chunked prefill);
#: ``onnx-baseline`` is the export given by ``--baseline``
BACKENDS = ("torch", "onnx-standard", "onnx-fused", "onnx-fused-whole", "onnx-baseline")
DEFAULT_BACKENDS = ("torch", "onnx-standard", "onnx-fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"small smoke run: {QUICK_RUN}")
    p.add_argument("--context", type=int, default=None, help=f"prompt tokens (default {FULL_RUN['context']})")
    p.add_argument("--hidden", type=int, default=None, help=f"LM hidden size (default {FULL_RUN['hidden']})")
    p.add_argument("--layers", type=int, default=None, help=f"LM layers (default {FULL_RUN['layers']})")
    p.add_argument("--heads", type=int, default=16, help="LM attention heads")
    p.add_argument("--kv-heads", type=int, default=16, help="LM KV heads (16 = MHA, like LLaVA-1.5's Vicuna)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"image side; patch 4 -> (side/4)^2 image tokens (default {FULL_RUN['image_size']})",
    )
    p.add_argument(
        "--question", type=int, default=None, help=f"post-vision (question) tokens (default {FULL_RUN['question']})"
    )
    p.add_argument("--budgets", default="1.0,0.1", help="budgets α")
    p.add_argument(
        "--decode-steps", type=int, default=None, help=f"timed decode steps (default {FULL_RUN['decode_steps']})"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help=f"untimed decode steps first (default {FULL_RUN['warmup']})"
    )
    p.add_argument(
        "--prefill-repeats", type=int, default=2, help="prefills per backend and budget (alternating); median reported"
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every backend")
    p.add_argument(
        "--backends", default=",".join(DEFAULT_BACKENDS), help=f"comma-separated subset of {', '.join(BACKENDS)}"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        help="prompt tokens per decoder call of onnx-fused's prefill (onnx-standard and onnx-fused-whole feed the "
        "whole prompt at once: the graphs as they ran before chunked prefill)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="an export directory of this same model made elsewhere (e.g. by an older vlcache), run as backend "
        "onnx-baseline with the whole prompt per call",
    )
    p.add_argument(
        "--save-model",
        type=Path,
        default=None,
        help="write the benchmark's model as a HuggingFace checkpoint to this directory and exit",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    base = QUICK_RUN if args.quick else FULL_RUN
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.budget_list = parse_budgets(args.budgets)
    except ValueError as e:
        p.error(str(e))
    n_image = (args.image_size // 4) ** 2
    if args.context < n_image + args.question + 2:
        p.error(
            f"--context {args.context} is too short for {n_image} image tokens and a {args.question}-token question"
        )
    if args.threads < 1 or args.prefill_repeats < 1 or args.prefill_chunk < 1:
        p.error("--threads, --prefill-repeats and --prefill-chunk must be >= 1")
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backend_list) - set(BACKENDS))
    if unknown or not args.backend_list or len(set(args.backend_list)) != len(args.backend_list):
        p.error(f"--backends takes distinct names among {', '.join(BACKENDS)}, got {args.backends!r}")
    if ("onnx-baseline" in args.backend_list) != (args.baseline is not None):
        p.error("backend onnx-baseline and --baseline DIR go together")
    if args.baseline is not None and not (args.baseline / "export.json").is_file():
        p.error(f"--baseline {args.baseline}: no export.json there")
    return args


def build_model(args: argparse.Namespace) -> LlavaForConditionalGeneration:
    torch.manual_seed(args.seed)
    text = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(4096, args.context + 64),
        tie_word_embeddings=True,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=args.image_size,
        patch_size=4,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=RANDOM_LLAVA_IMAGE_TOKEN_ID % args.vocab,
        image_seq_length=(args.image_size // 4) ** 2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    model.generation_config.eos_token_id = None
    return model


def build_inputs(model: LlavaForConditionalGeneration, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    image_token = model.config.image_token_index
    n_image = model.config.image_seq_length
    prefix = args.context - n_image - args.question - 1

    def text(n: int) -> list[int]:
        ids = torch.randint(3, args.vocab, (n,), generator=g)
        ids[ids == image_token] = 5
        return ids.tolist()

    ids = [1] + text(prefix) + [image_token] * n_image + text(args.question)
    pixels = torch.randn(1, 3, args.image_size, args.image_size, generator=g)
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixels,
    }


class Run:
    """One backend for one budget: its token stream (prefilled and compressed on construction)."""

    def __init__(self, tokens: TokenStream) -> None:
        self.stream = tokens
        s = tokens.stats
        assert s is not None
        self.prefill, self.scoring = s.prefill_seconds, s.scoring_seconds
        self.kv_before, self.kv_after, self.kept = s.kv_bytes_before, s.kv_bytes_after, s.kept_per_layer
        self.kv_reserved = s.kv_bytes_reserved
        self.tokens = [next(tokens)]

    def step(self, _round: int = 0) -> float:
        """One greedy decode step; returns the seconds the token stream measured for it."""
        self.tokens.append(next(self.stream))
        return self.stream.step_seconds[-1]

    def close(self) -> None:
        self.stream.close()


def torch_run(
    model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor], cfg: CompressionConfig, total: int
) -> Run:
    """The torch backend: ``vlcache.hf.stream`` (a VLCache session's hooks on the model, DynamicCache)."""
    return Run(hf_stream(model, inputs, cfg, max_new_tokens=total, eos_token_id=()))


def onnx_run(runner: Any, inputs: dict[str, torch.Tensor], cfg: CompressionConfig, total: int) -> Run:
    """An ONNX Runtime backend: ``vlcache.runtime.stream``."""
    from vlcache.runtime import stream

    return Run(stream(runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=total, eos_token_id=()))


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from vlcache.export import export_llava
    from vlcache.runtime import OnnxRunner

    t0 = time.perf_counter()
    model = build_model(args)
    if args.save_model is not None:
        model.save_pretrained(args.save_model)
        print(f"wrote the benchmark's model to {args.save_model}")
        return 0
    inputs = build_inputs(model, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    m = inputs["input_ids"].shape[1]
    backends = args.backend_list
    print(
        f"model: LLaVA, LM hidden {args.hidden} x {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"vocab {args.vocab}, {weights / 2**20:.0f} MiB fp32; prompt {m} tokens "
        f"({model.config.image_seq_length} image, {args.question} question); threads {args.threads}; "
        f"backends {', '.join(backends)}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    export_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vlcache-bench-") as tmp:
        runners: dict[str, Any] = {}
        for backend in backends:
            if not backend.startswith("onnx-"):
                continue
            if backend == "onnx-baseline":
                runners[backend] = OnnxRunner(args.baseline, threads=args.threads, prefill_chunk=None)
                continue
            attention = backend.removeprefix("onnx-").removesuffix("-whole")
            folder = f"{tmp}/{attention}"
            if not Path(folder).is_dir():
                te = time.perf_counter()
                export_llava(model, folder, max_input_len=m + args.warmup + args.decode_steps + 8, attention=attention)
                export_seconds[attention] = time.perf_counter() - te
                print(f"exported the {attention} graphs in {export_seconds[attention]:.1f} s", flush=True)
            chunk = args.prefill_chunk if backend == "onnx-fused" else None
            runners[backend] = OnnxRunner(folder, threads=args.threads, prefill_chunk=chunk)
        total = args.warmup + args.decode_steps
        for budget in args.budget_list:
            cfg = CompressionConfig(method="vlcache", budget=budget)
            runs: dict[str, Any] = {}
            prefills: dict[str, list[float]] = {b: [] for b in backends}
            scorings: dict[str, list[float]] = {b: [] for b in backends}
            for repeat in range(args.prefill_repeats):  # alternating; the last set decodes
                for run in runs.values():
                    run.close()
                runs = {}
                for backend in backends:
                    if backend == "torch":
                        runs[backend] = torch_run(model, inputs, cfg, total + 1)
                    else:
                        runs[backend] = onnx_run(runners[backend], inputs, cfg, total + 1)
                    prefills[backend].append(runs[backend].prefill)
                    scorings[backend].append(runs[backend].scoring)
                line = ", ".join(f"{b} {runs[b].prefill:.2f} s" for b in backends)
                print(f"  α={budget} prefill {repeat + 1}: {line}", flush=True)
            try:  # round-robin: noise hits every backend alike
                decode = round_robin({name: run.step for name, run in runs.items()}, args.decode_steps, args.warmup)
            finally:
                for run in runs.values():
                    run.close()
            for backend, run in runs.items():
                results.append(
                    {
                        "backend": backend,
                        "budget": budget,
                        "prefill_s": statistics.median(prefills[backend]),
                        "prefill_s_all": prefills[backend],
                        "scoring_s": statistics.median(scorings[backend]),
                        "decode_ms_per_token": median_ms(decode[backend]),
                        "decode_ms_all": [1000.0 * s for s in decode[backend]],
                        "kv_bytes_before": run.kv_before,
                        "kv_bytes_after": run.kv_after,
                        "kv_bytes_reserved": run.kv_reserved,
                        "kept_per_layer": run.kept,
                        "tokens_agree_with_torch": run.tokens == runs["torch"].tokens if "torch" in runs else None,
                    }
                )
            del runs
            gc.collect()
        for runner in runners.values():
            runner.close()

    by = {(r["backend"], r["budget"]): r for r in results}
    for r in results:  # speed ratios (> 1: faster than the reference)
        torch_r = by.get(("torch", r["budget"]))
        std_r = by.get(("onnx-standard", r["budget"]))
        base_r = by.get(("onnx-baseline", r["budget"]))
        if torch_r is not None:
            r["prefill_speed_vs_torch"] = _ratio(torch_r["prefill_s"], r["prefill_s"])
            r["decode_speed_vs_torch"] = _ratio(torch_r["decode_ms_per_token"], r["decode_ms_per_token"])
        if std_r is not None and r["backend"].startswith("onnx-fused"):
            r["prefill_speed_vs_standard"] = _ratio(std_r["prefill_s"], r["prefill_s"])
            r["decode_speed_vs_standard"] = _ratio(std_r["decode_ms_per_token"], r["decode_ms_per_token"])
        if base_r is not None and r["backend"].startswith("onnx-fused"):
            r["prefill_speed_vs_baseline"] = _ratio(base_r["prefill_s"], r["prefill_s"])
            r["decode_speed_vs_baseline"] = _ratio(base_r["decode_ms_per_token"], r["decode_ms_per_token"])
    print()
    header = (
        f"{'budget':>6} {'backend':>16} {'prefill s':>9} {'scoring s':>9} {'decode ms/tok':>13} "
        f"{'prefill vs torch':>16} {'decode vs torch':>15} {'KV MB before':>12} {'KV MB after':>11} "
        f"{'KV MB reserved':>14} {'tokens = torch':>14}"
    )
    print(header)
    print("-" * len(header))

    def speed(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for budget in args.budget_list:
        for backend in backends:
            r = by[(backend, budget)]
            print(
                f"{budget:>6.2f} {backend:>16} {r['prefill_s']:>9.2f} {r['scoring_s']:>9.3f} "
                f"{r['decode_ms_per_token']:>13.1f} {speed(r.get('prefill_speed_vs_torch')):>16} "
                f"{speed(r.get('decode_speed_vs_torch')):>15} {r['kv_bytes_before'] / 1e6:>12.1f} "
                f"{r['kv_bytes_after'] / 1e6:>11.1f} {r['kv_bytes_reserved'] / 1e6:>14.1f} "
                f"{str(r['tokens_agree_with_torch']):>14}"
            )
        for name in ("onnx-fused", "onnx-fused-whole"):
            fused = by.get((name, budget))
            for ref in ("standard", "baseline"):
                if fused is not None and f"prefill_speed_vs_{ref}" in fused:
                    print(
                        f"{'':>6} {name.removeprefix('onnx-')} vs {ref}: prefill {fused[f'prefill_speed_vs_{ref}']:.2f}x, "
                        f"decode {fused[f'decode_speed_vs_{ref}']:.2f}x"
                    )
    summary = {
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "weight_bytes": weights,
            "context": m,
            "image_tokens": model.config.image_seq_length,
            "question_tokens": args.question,
        },
        "backends": backends,
        "threads": args.threads,
        "prefill_chunk": args.prefill_chunk,
        "decode_steps": args.decode_steps,
        "warmup": args.warmup,
        "prefill_repeats": args.prefill_repeats,
        "export_seconds": export_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "onnx": __import__("onnx").__version__,
        },
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
