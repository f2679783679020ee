"""`vlcache-generate`: one generation from a built artifact, streamed to the terminal.

    vlcache-generate artifacts/llava-tiny --image scene.png --prompt "what is at row 1 col 2 ?"

Runs exactly what the served model runs (:func:`vlcache.serving.load_engine`: the artifact is
verified against its manifest first), prints the text as it is generated and ends stdout with one
JSON line of stats: prompt tokens, KV tokens kept per layer, KV bytes before/after, prefill and
decode times. ``--image digits:N`` takes scene N of the bundled digits task's test split.
User mistakes end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlcache.cli import Parser, run_main

PROG = "vlcache-generate"


class GenerateError(Exception):
    """A user mistake: printed on one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifact", type=Path, help="artifact directory written by vlcache-build")
    p.add_argument("--image", required=True, help="PNG / JPEG file, or digits:N for scene N of the digits test split")
    p.add_argument("--prompt", required=True, help="the question (the image placeholder is added for you)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--budget", type=float, default=None, help="KV budget α in (0, 1] (default: the build's)")
    p.add_argument("--method", default=None, help="compression method (default: the build's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the library default)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    return p


def load_image(spec: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if spec.startswith("digits:"):
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise GenerateError(f"--image {spec!r}: expected digits:N with an integer N") from None
        from vlcache.eval.tasks import DigitScenes

        return DigitScenes("test").scene(index)[0]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise GenerateError(f"--image: no such file: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise GenerateError(f"--image {path} is not a readable image: {e}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_tokens < 1:
        raise GenerateError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.prompt.strip():
        raise GenerateError("--prompt is empty")
    image = load_image(args.image)
    import torch

    from vlcache.artifact import ArtifactError
    from vlcache.serving.engine import load_engine
    from vlcache.serving.request import InvalidRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        engine = load_engine(args.artifact, verify=not args.no_verify, threads=max(args.threads, 0))
        stats = engine.generate(
            image,
            args.prompt,
            max_tokens=args.max_tokens,
            budget=args.budget,
            method=args.method,
            on_text=lambda delta: print(delta, end="", flush=True),
        )
    except (ArtifactError, InvalidRequest) as e:
        raise GenerateError(str(e)) from None
    print()
    print(json.dumps(stats))
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0 or exits with a one-line error."""
    return run_main(build_parser(), run, argv, (GenerateError,), interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
