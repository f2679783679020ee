"""The one base class for user mistakes, framework-free so library code can raise it.

A :class:`UserError` is something the person running a command can fix (a bad flag value, a
missing checkpoint, an occupied output folder). Every vlcache command ends one with a one-line
``PROG: error: message`` and exit status 2 instead of a traceback; library errors that callers may
want to catch specifically (``CheckpointError``, ``ArtifactError``, ...) subclass it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake of the user's: the command prints its message on one line and exits with status 2."""
