"""Helpers of the serving tests: a "torch" artifact directory built by `vlcache-build` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

MAX_INPUT_LEN = 300  # the tiny checkpoint's prompts: 256 image tokens + a short question


def make_torch_artifact(
    checkpoint: Path, out: Path, *, budget: float = 0.1, method: str = "vlcache", max_input_len: int = MAX_INPUT_LEN
) -> Path:
    """ARTIFACT/{manifest.json, hf/, processor/, triton/}: the builder's output for backend "torch"."""
    from vlcache.builder.cli import main

    args = ["--model", str(checkpoint), "--backend", "torch", "--output", str(out), "--force"]
    main([*args, "--budget", str(budget), "--method", method, "--max-input-len", str(max_input_len)])
    return out
