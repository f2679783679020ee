"""Controls for reading the fidelity table: `random` eviction with some prompt positions pinned.

* ``random-sink``: random, plus the first token always kept;
* ``random-question``: random, plus every post-vision token (the question) always kept.

They are diagnostics, not methods the package ships: registered here, then `vlcache-eval` runs
them (with plain ``random`` beside them) on the same samples, and its table, JSON and plot land in
--out. docs/fidelity.md cites them for what the bundled model needs from a compressed cache.

    .venv/bin/python scripts/fidelity_controls.py --budgets 0.2,0.1,0.05 --samples 200 --out /tmp/controls
"""

from __future__ import annotations

import argparse
import sys

from vlcache.methods.base import PromptLayout, register
from vlcache.methods.random import RandomEviction


@register
class RandomWithSink(RandomEviction):
    name = "random-sink"
    paper = "none: a diagnostic control (random + the first token)"

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        return min(1, k), 0


@register
class RandomWithQuestion(RandomEviction):
    name = "random-question"
    paper = "none: a diagnostic control (random + every post-vision token)"

    def forced(self, layout: PromptLayout, k: int) -> tuple[int, int]:
        return 0, min(k, layout.prompt_len - layout.post_vision_start)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="llava-tiny")
    p.add_argument("--budgets", default="0.2,0.1,0.05")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/fidelity-controls")
    args = p.parse_args()
    from vlcache.cli.eval import main as eval_main

    argv = ["--model", args.model, "--task", "digits", "--methods", "random,random-sink,random-question"]
    argv += ["--budgets", args.budgets, "--samples", str(args.samples), "--seed", str(args.seed)]
    return eval_main(argv + ["--threads", str(args.threads), "--out", args.out, "--force"])


if __name__ == "__main__":
    sys.exit(main())
