"""Helpers of the serving tests: an artifact directory built by `vlcache-build` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

MAX_INPUT_LEN = 300  # the tiny checkpoint's prompts: 256 image tokens + a short question


def make_artifact(
    checkpoint: Path,
    out: Path,
    *,
    backend: str = "torch",
    budget: float = 0.1,
    method: str = "vlcache",
    max_input_len: int = MAX_INPUT_LEN,
    extra: tuple[str, ...] = (),
) -> Path:
    """ARTIFACT/{manifest.json, processor/, triton/, and hf/ (torch) or onnx/ (onnx)}: the builder's
    output for ``backend``; ``extra``: more vlcache-build flags (``--dtype float16``)."""
    from vlcache.cli.build import main

    args = ["--model", str(checkpoint), "--backend", backend, "--out", str(out), "--force", *extra]
    main([*args, "--budget", str(budget), "--method", method, "--max-input-len", str(max_input_len)])
    return out
