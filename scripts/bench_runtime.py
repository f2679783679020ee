"""ONNX Runtime vs torch: prefill time, decode ms/token and KV bytes on the same LLaVA and context.

What it measures, in one process, on one ``LlavaForConditionalGeneration`` with random weights
(Llama-shaped language model, a small CLIP tower; fp32) and one prompt laid out as
``[bos] [text prefix] [image tokens] [question]`` of ``--context`` tokens:

* **torch**: the transformers model with ``vlcache.VLCache(...).apply(model)`` (the torch backend of
  ``vlcache.generate``): prefill with scoring and compaction, then greedy decode with explicit
  positions on the session's compacted ``DynamicCache``.
* **onnx**: the graphs written by ``vlcache.export.export_llava``, run by
  ``vlcache.runtime.OnnxRunner`` (ONNX Runtime, CPU) through ``vlcache.runtime.prefill`` and
  ``GenerationState.step`` — the same loop ``vlcache.runtime.generate`` uses.

For each budget α (method ``vlcache``; α = 1.0 scores but keeps everything) both backends prefill
the same prompt, then decode **side by side**: step by step in round-robin order after
``--warmup`` steps, so CPU noise from other processes hits them alike. Reported per backend and
budget: prefill seconds (image encoding + prompt pass, scoring excluded), scoring seconds (scoring,
allocation and compaction), median decode ms/token, and KV bytes before / after compaction.
The two backends' greedy tokens are compared as a sanity check (they should agree).

Both backends get the same number of intra-op threads (``--threads``; torch.set_num_threads and
ONNX Runtime's intra_op_num_threads). Ends stdout with one JSON line.

    .venv/bin/python scripts/bench_runtime.py --quick     # smoke test, under a minute
    .venv/bin/python scripts/bench_runtime.py             # hidden 1024 x 8 layers, 2048 tokens
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import transformers
from _timing import median_ms, round_robin
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlcache.cli import parse_budgets
from vlcache.config import CompressionConfig
from vlcache.hf.session import VLCache

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
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both backends")
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
    if args.threads < 1 or args.prefill_repeats < 1:
        p.error("--threads and --prefill-repeats must be >= 1")
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


class TorchRun:
    """The torch backend for one budget: a VLCache session, its cache, the next token and position."""

    def __init__(
        self, model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor], cfg: CompressionConfig
    ) -> None:
        self.model = model
        self.session = VLCache(cfg)
        self.context = self.session.apply(model)
        self.context.__enter__()
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = DynamicCache(config=model.config.text_config)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        total = time.perf_counter() - t0
        stats = self.session.stats
        assert stats is not None
        self.scoring = stats.scoring_seconds
        self.prefill = total - self.scoring
        self.kv_before, self.kv_after = stats.kv_bytes_before, stats.kv_bytes_after
        self.kept = stats.kept_per_layer
        self.token = int(out.logits[0, -1].argmax())
        self.position = inputs["input_ids"].shape[1]
        self.tokens = [self.token]

    def step(self, _round: int = 0) -> float:
        """One greedy decode step; returns its seconds (the model call and the argmax)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([[self.token]]),
                position_ids=torch.tensor([[self.position]]),
                use_cache=True,
                **{self.cache_kw: self.cache},
            )
        self.token = int(out.logits[0, -1].argmax())
        seconds = time.perf_counter() - t0
        self.position += 1
        self.tokens.append(self.token)
        return seconds

    def close(self) -> None:
        self.context.__exit__(None, None, None)


class OnnxRun:
    """The ONNX Runtime backend for one budget, through vlcache.runtime.prefill / GenerationState.step."""

    def __init__(self, runner: Any, inputs: dict[str, torch.Tensor], cfg: CompressionConfig, total: int) -> None:
        from vlcache.runtime import prefill

        self.state = prefill(runner, inputs["input_ids"], inputs["pixel_values"], cfg, max_new_tokens=total)
        s = self.state.stats
        self.prefill, self.scoring = s.prefill_seconds, s.scoring_seconds
        self.kv_before, self.kv_after, self.kept = s.kv_bytes_before, s.kv_bytes_after, s.kept_per_layer
        self.token = self.state.greedy()
        self.tokens = [self.token]

    def step(self, _round: int = 0) -> float:
        """One greedy decode step; returns the seconds GenerationState.step measured."""
        self.state.step(self.token)
        self.token = self.state.greedy()
        self.tokens.append(self.token)
        return self.state.step_seconds[-1]

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from vlcache.export import export_llava
    from vlcache.runtime import OnnxRunner

    t0 = time.perf_counter()
    model = build_model(args)
    inputs = build_inputs(model, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    m = inputs["input_ids"].shape[1]
    print(
        f"model: LLaVA, LM hidden {args.hidden} x {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"vocab {args.vocab}, {weights / 2**20:.0f} MiB fp32; prompt {m} tokens "
        f"({model.config.image_seq_length} image, {args.question} question); threads {args.threads}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vlcache-bench-") as tmp:
        te = time.perf_counter()
        export_llava(model, tmp, max_input_len=m + args.warmup + args.decode_steps + 8)
        export_seconds = time.perf_counter() - te
        print(f"exported in {export_seconds:.1f} s", flush=True)
        runner = OnnxRunner(tmp, threads=args.threads)
        total = args.warmup + args.decode_steps
        for budget in args.budget_list:
            cfg = CompressionConfig(method="vlcache", budget=budget)
            runs: dict[str, Any] = {}
            prefills: dict[str, list[float]] = {"torch": [], "onnx": []}
            scorings: dict[str, list[float]] = {"torch": [], "onnx": []}
            for repeat in range(args.prefill_repeats):  # alternating; the last pair decodes
                if "torch" in runs:
                    runs["torch"].close()
                runs = {"torch": TorchRun(model, inputs, cfg), "onnx": OnnxRun(runner, inputs, cfg, total + 1)}
                for backend, run in runs.items():
                    prefills[backend].append(run.prefill)
                    scorings[backend].append(run.scoring)
                print(
                    f"  α={budget} prefill {repeat + 1}: torch {runs['torch'].prefill:.2f} s, onnx {runs['onnx'].prefill:.2f} s",
                    flush=True,
                )
            try:  # round-robin: noise hits both alike
                decode = round_robin({name: run.step for name, run in runs.items()}, args.decode_steps, args.warmup)
            finally:
                runs["torch"].close()
            agree = runs["torch"].tokens == runs["onnx"].tokens
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
                        "kept_per_layer": run.kept,
                        "tokens_agree": agree,
                    }
                )
            del runs
            gc.collect()
        runner.close()

    by = {(r["backend"], r["budget"]): r for r in results}
    print()
    header = f"{'budget':>6} {'backend':>7} {'prefill s':>9} {'scoring s':>9} {'decode ms/tok':>13} {'ORT/torch speed':>15} {'KV MB before':>12} {'KV MB after':>11} {'tokens agree':>12}"
    print(header)
    print("-" * len(header))
    for budget in args.budget_list:
        for backend in ("torch", "onnx"):
            r = by[(backend, budget)]
            speed = by[("torch", budget)]["decode_ms_per_token"] / r["decode_ms_per_token"]
            r["decode_speed_vs_torch"] = speed
            print(
                f"{budget:>6.2f} {backend:>7} {r['prefill_s']:>9.2f} {r['scoring_s']:>9.3f} {r['decode_ms_per_token']:>13.1f} "
                f"{speed:>14.2f}x {r['kv_bytes_before'] / 1e6:>12.1f} {r['kv_bytes_after'] / 1e6:>11.1f} {str(r['tokens_agree']):>12}"
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
        "threads": args.threads,
        "decode_steps": args.decode_steps,
        "warmup": args.warmup,
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
