"""What every vlcache command shares: one-line errors for user mistakes, no traceback, exit status 2
(130 when interrupted), and the parsing of values several commands take (``--budgets``). Each
command keeps its own ``main`` and argparse parser built on these."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like every other error of a command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None,
    user_errors: tuple[type[BaseException], ...],
    interrupted: str = "interrupted; nothing written",
) -> int:
    """Parse ``argv``, call ``run``; ``user_errors`` end as ``PROG: error: message`` with status 2."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except user_errors as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: {interrupted}\n")
    return 0


def parse_budgets(text: str, flag: str = "--budgets") -> list[float]:
    """Comma-separated budgets α, each in (0, 1], in the order given without repeats.

    Raises:
        ValueError: a one-line message naming ``flag``: an item is not a number, lies outside
            (0, 1], or there is none. Each command turns it into its own user-error class.
    """
    budgets: list[float] = []
    for item in (b.strip() for b in text.split(",")):
        if not item:
            continue
        try:
            b = float(item)
        except ValueError:
            raise ValueError(f"bad budget {item!r} in {flag}: expected numbers in (0, 1]") from None
        if math.isnan(b) or not 0.0 < b <= 1.0:
            raise ValueError(
                f"budget {item} is outside (0, 1] in {flag}: a budget is the fraction of the prompt's KV entries kept"
            )
        if b not in budgets:
            budgets.append(b)
    if not budgets:
        raise ValueError(f"{flag} is empty: expected comma-separated budgets in (0, 1]")
    return budgets
