"""`vlcache-generate`: one generation from a built artifact, streamed to the terminal.

    vlcache-generate artifacts/llava-tiny --image scene.png --prompt "what is at row 1 col 2 ?"

Runs exactly what the served model runs (:func:`vlcache.serving.load_engine`: the artifact is
verified against its manifest first), prints the text as it is generated and ends stdout with one
JSON line of stats: prompt tokens, KV tokens kept per layer, KV bytes before/after, prefill and
decode times. ``--image digits:N`` takes scene N of the bundled digits task's test split.

``--budget 1.0,0.1`` answers the same question once per budget (one engine, loaded once), streams
each answer behind its budget, prints a side-by-side table (answer, kept KV bytes, share of the
full cache) and ends with one JSON line ``{"runs": [stats, ...]}`` whose stats carry the ``text``.
User mistakes end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlcache.cli import Parser, UserError, add_max_tokens_flag, method_name, run_main

PROG = "vlcache-generate"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by vlcache-build")
    p.add_argument("--image", required=True, help="PNG / JPEG file, or digits:N for scene N of the digits test split")
    p.add_argument("--prompt", required=True, help="the question (the image placeholder is added for you)")
    add_max_tokens_flag(p, help="tokens to generate at most")
    p.add_argument(
        "--budget",
        default=None,
        help="KV budget α in (0, 1] (default: the build's); several, comma-separated (1.0,0.1), answer the "
        "question once per budget and print them side by side",
    )
    p.add_argument("--method", type=method_name, default=None, help="compression method (default: the build's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the library default)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    return p


def load_image(spec: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if spec.startswith("digits:"):
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--image {spec!r}: expected digits:N with an integer N") from None
        from vlcache.digits import DigitScenes

        try:
            return DigitScenes("test").scene(index)[0]
        except ImportError as e:
            raise UserError(f"--image {spec}: {e}") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--image: no such file: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--image {path} is not a readable image: {e}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    image = load_image(args.image)
    import torch

    from vlcache.serving.engine import load_engine

    budgets = parse_budget_list(args.budget)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    # ArtifactError (a changed or missing artifact) and InvalidRequest (a budget out of range) are UserErrors
    engine = load_engine(args.artifact, verify=not args.no_verify, threads=max(args.threads, 0))
    for budget in budgets:
        if len(budgets) > 1:
            print(f"[budget {budget:g}] ", end="", flush=True)
        text: list[str] = []

        def on_text(delta: str, text: list[str] = text) -> None:
            text.append(delta)
            print(delta, end="", flush=True)

        stats = engine.generate(
            image, args.prompt, max_tokens=args.max_tokens, budget=budget, method=args.method, on_text=on_text
        )
        print()
        runs.append({**stats, "text": "".join(text)})
    if len(runs) == 1:
        stats = {k: v for k, v in runs[0].items() if k != "text"}
        print(json.dumps(stats))
        return stats
    print(format_side_by_side(runs))
    print(json.dumps({"runs": runs}))
    return {"runs": runs}


def parse_budget_list(text: str | None) -> list[float | None]:
    """``None`` (the build's budget) or comma-separated floats; the engine checks each is in (0, 1]."""
    if text is None:
        return [None]
    budgets: list[float | None] = []
    for item in (b.strip() for b in text.split(",")):
        if not item:
            continue
        try:
            budgets.append(float(item))
        except ValueError:
            raise UserError(f"--budget: {item!r} is not a number") from None
    if not budgets:
        raise UserError("--budget is empty")
    return budgets


def format_side_by_side(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run: budget, answer, kept KV tokens and bytes, and the bytes as a share of all."""
    header = f"{'budget':>7}  {'answer':<16} {'kept tokens':>11} {'KV bytes':>10} {'of full':>8}"
    rows = [header, "-" * len(header)]
    for r in runs:
        answer = " ".join(r["text"].split()) or "(nothing)"
        share = r["kv_bytes_after"] / r["kv_bytes_before"] if r["kv_bytes_before"] else 1.0
        rows.append(
            f"{r['budget']:>7g}  {answer[:16]:<16} {sum(r['kept_per_layer']):>11} "
            f"{r['kv_bytes_after']:>10} {share:>8.1%}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0 or exits with a one-line error."""
    return run_main(build_parser(), run, argv, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
