"""The build: resolve the model, load it, write the backend's files, the processor, the Triton model
repository and the manifest — into a temporary folder beside ``--output``, renamed when complete, so
an interrupted or failed build leaves nothing half-written.

Stages by backend:

* ``onnx``: vision tower + projector and the decoder as ONNX graphs with the VL-Cache ops as nodes of
  domain ``vlcache`` (:mod:`vlcache.export`), run by ONNX Runtime.
* ``tensorrt``: the same ONNX graphs, the ``vlcache`` nodes rewritten to the TensorRT plugin, engines
  built with TensorRT (GPU hosts only; never run on a GPU by this project yet).
* ``torch``: the HF checkpoint itself (``hf/``), run by PyTorch through :mod:`vlcache.hf`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlcache.artifact import (
    ENGINES_DIR,
    HF_DIR,
    MANIFEST,
    ONNX_DIR,
    PROCESSOR_DIR,
    ArtifactError,
    file_table,
    verify_artifact,
    versions,
)
from vlcache.builder import BuildError
from vlcache.builder.source import ModelSource, hash_tree, resolve_source
from vlcache.config import ARTIFACT_FORMAT, BuildConfig

Progress = Callable[[str], None]


def tensorrt_available() -> bool:
    """TensorRT importable and a CUDA device visible to torch."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "tensorrt" if tensorrt_available() else "onnx"
    if backend == "tensorrt" and not tensorrt_available():
        raise BuildError(
            "--backend tensorrt needs TensorRT and an NVIDIA GPU (neither is usable here); "
            "use --backend onnx on a CPU machine, or build inside the docker/ image on a GPU host"
        )
    return backend


@dataclass(frozen=True)
class Plan:
    """What a build will do: the resolved source, the effective config (backend resolved, profile
    defaults applied), the output folder and the stage names."""

    source: ModelSource
    config: BuildConfig
    output: Path
    stages: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source.spec,
            "source": str(self.source.path),
            "source_kind": self.source.kind,
            "model_type": self.source.model_type,
            "output": str(self.output),
            "build": self.config.to_dict(),
            "config_hash": self.config.compute_hash(),
            "stages": list(self.stages),
        }


def make_plan(model: str, config: BuildConfig, output: Path, *, explicit: frozenset[str] = frozenset()) -> Plan:
    """Resolve the model and the backend; fill what the user did not set (``explicit``) from the profile."""
    overrides: dict[str, Any] = {"backend": resolve_backend(config.backend)}
    source = resolve_source(model)
    if source.profile is not None:
        for key in ("dtype", "max_input_len", "max_batch_size"):
            value = getattr(source.profile, key)
            if value is not None and key not in explicit:
                overrides[key] = value
    if overrides["backend"] == "onnx" and "dtype" not in explicit and overrides.get("dtype") == "float16":
        overrides["dtype"] = "float32"  # profiles default to fp16 for GPUs; ONNX Runtime on a CPU wants fp32
    try:
        config = replace(config, **overrides)
    except ValueError as e:
        raise BuildError(str(e)) from None
    backend_stage = {"onnx": "export onnx", "tensorrt": "export onnx + build engines", "torch": "save checkpoint"}
    stages = ("load model", "processor", backend_stage[config.backend], "triton repository", "manifest", "verify")
    return Plan(source, config, Path(output), stages)


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise BuildError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise BuildError(f"--output {output} exists and is not empty; pass --force to replace it")


def _check_model_fits(model: Any, config: BuildConfig) -> int:
    """The model's image tokens per image; BuildError if max_input_len cannot hold one image and a question."""
    n_image = int(getattr(model.config, "image_seq_length", 0) or 0)
    if n_image and config.max_input_len <= n_image + 1:
        raise BuildError(
            f"--max-input-len {config.max_input_len} cannot hold one image ({n_image} image tokens) and a question"
        )
    return n_image


def _export_onnx(model: Any, folder: Path, config: BuildConfig) -> None:
    try:
        from vlcache.export import export_llava
    except ImportError as e:
        raise BuildError(f"the onnx backend needs the onnx extra (pip install 'vlcache[onnx]'): {e}") from None
    try:
        export_llava(model, folder, dtype=config.dtype, opset=config.opset, max_input_len=config.max_input_len)
    except ValueError as e:  # an unsupported model or setting (LLaVA-NeXT, a dtype the exporter refuses)
        raise BuildError(f"ONNX export failed: {e}") from None


def _build_engines(model: Any, folder: Path, config: BuildConfig, progress: Progress) -> None:
    """GPU hosts only (guarded by :func:`resolve_backend`); never run on a GPU by this project yet.
    The fp32 ONNX export is the engines' source; TensorRT lowers precision to ``config.dtype``."""
    onnx_dir = folder.parent / ONNX_DIR
    _export_onnx(model, onnx_dir, replace(config, dtype="float32"))
    from vlcache_plugins.build import build_engines

    progress("      building TensorRT engines (this takes minutes)")
    try:
        build_engines(onnx_dir, folder, dtype=config.dtype, max_input_len=config.max_input_len)
    except RuntimeError as e:
        raise BuildError(f"TensorRT engine build failed: {e}") from None


def _render_triton(artifact: Path) -> None:
    try:
        from vlcache.serving.repository import render_repository
    except ImportError:
        return  # serving not installed: the artifact still runs offline
    try:
        render_repository(artifact)
    except (OSError, ValueError) as e:
        raise BuildError(f"rendering the Triton model repository failed: {e}") from None


def build(plan: Plan, *, force: bool = False, progress: Progress = print) -> dict[str, Any]:
    """Run the plan; returns the manifest. The output appears only when every stage succeeded."""
    output = plan.output.absolute()
    _check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    t_start = time.perf_counter()
    total = len(plan.stages)

    def stage(i: int, name: str) -> float:
        progress(f"[{i}/{total}] {name} ...")
        return time.perf_counter()

    def done(t0: float, extra: str = "") -> None:
        progress(f"      done in {time.perf_counter() - t0:.1f} s{(' — ' + extra) if extra else ''}")

    try:
        tmp.chmod(0o755)
        cfg = plan.config
        t = stage(1, f"load model {plan.source.spec} ({plan.source.path}, {cfg.dtype})")
        from vlcache.hf.loading import CheckpointError, load_model

        try:
            loaded = load_model(str(plan.source.path), dtype=cfg.dtype)
        except CheckpointError as e:
            raise BuildError(str(e)) from None
        n_image = _check_model_fits(loaded.model, cfg)
        params = sum(p.numel() for p in loaded.model.parameters())
        done(t, f"{params / 1e6:.1f}M parameters, {n_image} image tokens per image")

        t = stage(2, "processor and tokenizer")
        loaded.processor.save_pretrained(tmp / PROCESSOR_DIR)
        done(t)

        t = stage(3, plan.stages[2])
        if cfg.backend == "torch":
            loaded.model.save_pretrained(tmp / HF_DIR, safe_serialization=True)
            loaded.processor.save_pretrained(tmp / HF_DIR)
        elif cfg.backend == "onnx":
            _export_onnx(loaded.model, tmp / ONNX_DIR, cfg)
        else:
            _build_engines(loaded.model, tmp / ENGINES_DIR, cfg, progress)
        done(t)
        del loaded

        t = stage(4, "hash model source")
        source_files = hash_tree(plan.source.path)
        done(t, f"{len(source_files)} files")

        t = stage(5, "manifest")
        manifest: dict[str, Any] = {
            "format": ARTIFACT_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": cfg.backend,
            "build": cfg.to_dict(),
            "config_hash": cfg.compute_hash(),
            "compression": cfg.compression.to_dict(),
            "compression_hash": cfg.compression.compute_hash(),
            "max_input_len": cfg.max_input_len,
            "max_batch_size": cfg.max_batch_size,
            "image_tokens": n_image,
            "model": {
                "spec": plan.source.spec,
                "profile": plan.source.profile.name if plan.source.profile else None,
                "source_kind": plan.source.kind,
                "source": str(plan.source.path),
                "hf_id": plan.source.hf_id,
                "model_type": plan.source.model_type,
                "files": source_files,
            },
            "versions": versions(),
        }
        # The Triton repository reads the manifest's settings, so a first manifest exists while it renders.
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": {}}, indent=1) + "\n", encoding="utf-8")
        _render_triton(tmp)
        manifest["files"] = file_table(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        done(t, f"{len(manifest['files'])} files")

        t = stage(6, "verify")
        try:
            verify_artifact(tmp)
        except ArtifactError as e:
            raise BuildError(f"the artifact failed its own verification: {e}") from None
        _check_output(output, force)
        if output.exists():
            old = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
        done(t)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(e["bytes"] for e in manifest["files"].values())
    progress(f"built {output} ({size / 2**20:.1f} MiB, {time.perf_counter() - t_start:.1f} s)")
    return manifest
