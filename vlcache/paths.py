"""Where the project's non-Python folders live: one source of truth for their locations.

`vlcache` is installed from a checkout (``pip install -e .``, what ``scripts/setup.sh`` does); the
design card's top-level folders (``builder/`` profiles, ``triton_repo/`` templates, ``plugins/``)
sit beside the package. ``VLCACHE_HOME`` points elsewhere (e.g. a copy of those folders next to a
wheel install).
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The folder holding ``builder/``, ``triton_repo/`` and ``plugins/``."""
    env = os.environ.get("VLCACHE_HOME")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent


def profiles_dir() -> Path:
    """``builder/``: one YAML build profile per model."""
    return project_root() / "builder"
