"""Every vlcache command, and what they share.

One module per command, each holding that command's argparse parser and ``main`` (the console
scripts of pyproject.toml); the work itself is done by the library modules they call:

* :mod:`vlcache.cli.build` — ``vlcache-build`` (:mod:`vlcache.builder`)
* :mod:`vlcache.cli.eval` — ``vlcache-eval`` (:mod:`vlcache.eval`)
* :mod:`vlcache.cli.generate` — ``vlcache-generate`` (:func:`vlcache.serving.load_engine`)
* :mod:`vlcache.cli.serve` — ``vlcache-serve`` (:class:`vlcache.serving.server.TritonServer`)
* :mod:`vlcache.cli.bench` — ``vlcache-bench`` (:mod:`vlcache.client.bench`)
* :mod:`vlcache.cli.compression_flags` — the compression flags derived from ``CompressionConfig``

The shared shape: :class:`Parser` (usage errors are one line, ``PROG: error: ... (see --help)``,
exit status 2) and :func:`run_main` (a :class:`~vlcache.errors.UserError` ends the same way, without
a traceback; Ctrl-C exits 130), and the common flags: ``--out/-o`` with ``--force``
(:func:`add_output_flags`), ``--max-tokens`` (:func:`add_max_tokens_flag`, default
:data:`DEFAULT_MAX_TOKENS`), ``--method`` / ``--methods`` checked against
:func:`vlcache.methods.available` (:func:`method_name`, :func:`method_names`) and ``--budgets``
(:func:`parse_budgets`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vlcache.errors import UserError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Parser",
    "UserError",
    "add_max_tokens_flag",
    "add_output_flags",
    "method_name",
    "method_names",
    "non_negative_int",
    "parse_budgets",
    "positive_int",
    "run_main",
]

#: ``--max-tokens`` of the commands that generate free text (vlcache-generate, vlcache-bench); the
#: same default as :func:`vlcache.generate` and the runtime's generator (``max_new_tokens=32``)
DEFAULT_MAX_TOKENS = 32


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like every other error of a command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None,
    interrupted: str = "interrupted; nothing written",
) -> int:
    """Parse ``argv`` and call ``run``; the exit status.

    A :class:`UserError` ends as ``PROG: error: message`` with status 2, Ctrl-C
    (``KeyboardInterrupt``) as ``PROG: <interrupted>`` with status 130 (both raise ``SystemExit``).
    ``run`` returning an ``int`` makes it the status (e.g. 1 when a benchmark saw failed
    requests); anything else means 0.
    """
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: {interrupted}\n")
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


# --- shared argument types and flags ----------------------------------------------------------------
def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse ``type``: an integer >= 0."""
    return _int_at_least(text, 0)


def method_name(text: str) -> str:
    """argparse ``type`` of ``--method``: a name registered in :func:`vlcache.methods.available`.

    Raises:
        argparse.ArgumentTypeError: one line listing the known methods.
    """
    from vlcache.methods import available

    known = available()
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; known methods: {', '.join(known)}")
    return text


def method_names(text: str) -> list[str]:
    """argparse ``type`` of ``--methods``: comma-separated :func:`method_name` s, in order, without repeats."""
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not methods:
        raise argparse.ArgumentTypeError("empty: expected comma-separated method names")
    return [method_name(m) for m in methods]


def add_output_flags(parser: argparse.ArgumentParser, what: str, default: Path | None = None) -> None:
    """``--out/-o DIR`` (``what`` goes there; ``default``, or None for the command to derive one)
    and ``--force``. The folder must be absent or empty unless ``--force``
    (:func:`vlcache.atomic.check_output_dir`); the commands write it with
    :func:`vlcache.atomic.atomic_dir`, so a failed run leaves it as it was."""
    parser.add_argument(
        "--out", "-o", type=Path, default=default, metavar="DIR", help=f"{what} (absent or empty unless --force)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder once the run succeeds")


def add_max_tokens_flag(parser: argparse.ArgumentParser, help: str, default: int | None = DEFAULT_MAX_TOKENS) -> None:
    """``--max-tokens N`` (>= 1): the most tokens generated per answer."""
    parser.add_argument("--max-tokens", type=positive_int, default=default, metavar="N", help=help)


def parse_budgets(text: str, flag: str = "--budgets") -> list[float]:
    """Comma-separated budgets α, each in (0, 1], in the order given without repeats.

    Raises:
        ValueError: a one-line message naming ``flag``: an item is not a number, lies outside
            (0, 1], or there is none. Each command turns it into a :class:`UserError`.
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
