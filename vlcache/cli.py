"""What every vlcache command shares: one-line errors for user mistakes, no traceback, exit status 2
(130 when interrupted). Each command keeps its own ``main`` and argparse parser built on these."""

from __future__ import annotations

import argparse
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
