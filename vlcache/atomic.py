"""Write a folder all at once: the one way vlcache-build, vlcache-eval, vlcache-bench and the Triton
repository renderer replace their output folders.

Contract of :func:`atomic_dir` (``with atomic_dir(target, force=...) as tmp: write into tmp``):

* ``tmp`` is a fresh, empty folder created beside ``target`` (same parent, so the final rename
  stays on one filesystem), named ``.<target name>.<random><suffix>``, mode 0755. The parent is
  created when missing.
* When the block ends normally, ``target`` is checked again (:func:`check_output_dir`: it may have
  been written meanwhile), an existing ``target`` is renamed aside, ``tmp`` is renamed to
  ``target`` and the old folder is removed. ``target`` is never half-written: it is the old folder
  or the new one (missing only for the instant between the two renames; if the second rename
  fails, the old folder is put back).
* When the block raises (``KeyboardInterrupt`` included), or the final check refuses, ``tmp`` is
  removed, the exception propagates and ``target`` is left as it was.

:func:`check_output_dir` is the rule for what may be replaced: a missing path or an empty folder
always; a non-empty folder only with ``force``; never a file. Its errors are one line and name the
folder the way the user gave it (``name``: the flag, ``--out`` for every vlcache command); ``error``
is the exception class raised: :class:`OutputDirError`, a :class:`~vlcache.errors.UserError` (so a
command reports it on one line), unless a caller wants its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vlcache.errors import UserError


class OutputDirError(ValueError, UserError):
    """The output folder may not be replaced (a one-line message)."""


def check_output_dir(
    path: Path, force: bool, *, name: str = "--out", error: Callable[[str], Exception] = OutputDirError
) -> None:
    """Raise ``error(message)`` unless ``path`` is absent, an empty folder, or a folder ``force`` lets us replace."""
    if path.exists() and not path.is_dir():
        raise error(f"{name} {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise error(f"{name} {path} exists and is not empty; pass --force to replace it")


def _swap(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` goes aside first and is removed after."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(
    target: str | Path,
    *,
    force: bool = False,
    name: str = "--out",
    error: Callable[[str], Exception] = OutputDirError,
    suffix: str = ".tmp",
) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` when the block succeeds (see the module docstring)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        check_output_dir(target, force, name=name, error=error)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
