"""The build: resolve the model, load it, write the backend's files, the processor, the Triton model
repository and the manifest — into a temporary folder beside ``--out``, renamed when complete, so
an interrupted or failed build leaves nothing half-written.

The stages are one list, :func:`build_stages` (what ``--dry-run`` shows is what the build runs and
prints). What the backend stage does:

* ``onnx``: vision tower + projector and the decoder as ONNX graphs with the VL-Cache ops as nodes of
  domain ``vlcache`` (:mod:`vlcache.export`), run by ONNX Runtime.
* ``tensorrt``: the same ONNX graphs, the ``vlcache`` nodes rewritten to the TensorRT plugin, engines
  built with TensorRT (GPU hosts only; never run on a GPU by this project yet).
* ``torch``: the HF checkpoint itself (``hf/``), run by PyTorch through :mod:`vlcache.hf`.
* ``trtllm``: the source checkpoint's files copied as they are (``hf/``), for TensorRT-LLM's
  PyTorch backend; the Triton repository is TensorRT-LLM's ``llmapi`` model whose ``model.yaml``
  selects the VL-Cache compression (:mod:`vlcache.trtllm`, docs/trtllm.md). Writing it needs no
  TensorRT-LLM and no GPU; serving it needs both. Never chosen by ``auto``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from vlcache.atomic import atomic_dir, check_output_dir
from vlcache.builder.source import ModelSource, hash_tree, resolve_source
from vlcache.config import ARTIFACT_FORMAT, BuildConfig
from vlcache.errors import UserError
from vlcache.runtime.tensorrt_support import tensorrt_available

Progress = Callable[[str], None]


def resolve_backend(backend: str) -> str:
    """``auto`` -> tensorrt (GPU and TensorRT here) or onnx, never trtllm; UserError for tensorrt without TensorRT."""
    if backend == "auto":
        return "tensorrt" if tensorrt_available() else "onnx"
    if backend == "tensorrt" and not tensorrt_available():
        raise UserError(
            "--backend tensorrt needs TensorRT and an NVIDIA GPU (neither is usable here); "
            "use --backend onnx on a CPU machine, or build on a GPU host with TensorRT installed"
        )
    return backend


@dataclass(frozen=True)
class Plan:
    """What a build will do: the resolved source, the effective config (backend resolved, profile
    defaults applied) and the output folder; :attr:`stages` names the build's stages."""

    source: ModelSource
    config: BuildConfig
    output: Path

    @property
    def stages(self) -> tuple[str, ...]:
        """The stage names :func:`build` prints as ``[i/n] name``, in order (from :func:`build_stages`)."""
        return tuple(name for name, _ in build_stages(self.config.backend))

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
        if config.backend == "trtllm":
            from vlcache.trtllm.plan import check_method

            check_method(config.compression.method)
    except ValueError as e:
        raise UserError(str(e)) from None
    return Plan(source, config, Path(output))


def _check_model_fits(model: Any, config: BuildConfig) -> int:
    """The model's image tokens per image; UserError if max_input_len cannot hold one image and a question."""
    n_image = int(getattr(model.config, "image_seq_length", 0) or 0)
    if n_image and config.max_input_len <= n_image + 1:
        raise UserError(
            f"--max-input-len {config.max_input_len} cannot hold one image ({n_image} image tokens) and a question"
        )
    return n_image


def _export_onnx(model: Any, folder: Path, config: BuildConfig, attention: str = "fused") -> None:
    """``attention``: the decoder graph; ``fused`` for ONNX Runtime, ``standard`` for TensorRT (standard ops only)."""
    try:
        from vlcache.export import export_llava
    except ImportError as e:
        raise UserError(f"the onnx backend needs the onnx extra (pip install 'vlcache[onnx]'): {e}") from None
    try:
        export_llava(
            model,
            folder,
            dtype=config.dtype,
            opset=config.opset,
            max_input_len=config.max_input_len,
            attention=attention,
        )
    except ValueError as e:  # an unsupported model or setting (LLaVA-NeXT, a dtype the exporter refuses)
        raise UserError(f"ONNX export failed: {e}") from None


def _build_engines(model: Any, folder: Path, config: BuildConfig, progress: Progress) -> None:
    """GPU hosts only (guarded by :func:`resolve_backend`); never run on a GPU by this project yet.
    The fp32 ONNX export is the engines' source; TensorRT lowers precision to ``config.dtype``."""
    onnx_dir = folder.parent / ONNX_DIR
    _export_onnx(model, onnx_dir, replace(config, dtype="float32"), attention="standard")
    from vlcache_plugins.build import build_engines

    # the PostVisionStats kernel compiles p in: the build's (a VL-Cache variant's) setting, else the default
    settings = config.compression.settings_dict()
    threshold = {"threshold": settings["threshold"]} if "threshold" in settings else {}
    progress("      building TensorRT engines (this takes minutes)")
    try:
        build_engines(onnx_dir, folder, dtype=config.dtype, max_input_len=config.max_input_len, **threshold)
    except RuntimeError as e:
        raise UserError(f"TensorRT engine build failed: {e}") from None


def _render_triton(artifact: Path) -> None:
    try:
        from vlcache.serving.repository import render_repository
    except ImportError:
        return  # serving not installed: the artifact still runs offline
    try:
        render_repository(artifact)
    except (OSError, ValueError) as e:
        raise UserError(f"rendering the Triton model repository failed: {e}") from None


@dataclass
class _Work:
    """What the stages of one build share: the plan, the temporary folder, what earlier stages made."""

    plan: Plan
    tmp: Path
    progress: Progress
    loaded: Any = None
    n_image: int = 0
    source_files: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


#: a stage does its work in ``work.tmp`` and returns the detail of its "done" line ("" for none)
Stage = Callable[[_Work], str]


def _load_model(work: _Work) -> str:
    from vlcache.hf.loading import load_model

    plan, cfg = work.plan, work.plan.config
    work.progress(f"      {plan.source.spec} ({plan.source.path}, {cfg.dtype})")
    work.loaded = load_model(str(plan.source.path), dtype=cfg.dtype)  # CheckpointError is a UserError
    work.n_image = _check_model_fits(work.loaded.model, cfg)
    params = sum(p.numel() for p in work.loaded.model.parameters())
    return f"{params / 1e6:.1f}M parameters, {work.n_image} image tokens per image"


def _copy_checkpoint(source: Path, folder: Path) -> int:
    """The checkpoint's files as they are (symlinks followed, hidden files left out): what
    TensorRT-LLM's ``LLM(model=...)`` reads. Returns how many."""
    count = 0
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / rel)
            count += 1
    return count


def _save_processor(work: _Work) -> str:
    work.loaded.processor.save_pretrained(work.tmp / PROCESSOR_DIR)
    return ""


def _backend_files(work: _Work) -> str:
    """The backend's own files: the HF checkpoint, the ONNX graphs, or the engines."""
    cfg, tmp, loaded = work.plan.config, work.tmp, work.loaded
    if cfg.backend == "trtllm":
        copied = _copy_checkpoint(work.plan.source.path, tmp / HF_DIR)
        work.loaded = None
        return f"{copied} files"
    if cfg.backend == "torch":
        loaded.model.save_pretrained(tmp / HF_DIR, safe_serialization=True)
        loaded.processor.save_pretrained(tmp / HF_DIR)
    elif cfg.backend == "onnx":
        _export_onnx(loaded.model, tmp / ONNX_DIR, cfg)
    else:
        _build_engines(loaded.model, tmp / ENGINES_DIR, cfg, work.progress)
    work.loaded = None  # the model's memory goes before the remaining stages
    return ""


def _hash_source(work: _Work) -> str:
    work.source_files = hash_tree(work.plan.source.path)
    return f"{len(work.source_files)} files"


def _manifest_dict(work: _Work) -> dict[str, Any]:
    """manifest.json without its file table (:mod:`vlcache.artifact` describes the fields)."""
    plan, cfg = work.plan, work.plan.config
    return {
        "format": ARTIFACT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build": cfg.to_dict(),
        "config_hash": cfg.compute_hash(),
        "image_tokens": work.n_image,
        "model": {
            "spec": plan.source.spec,
            "profile": plan.source.profile.name if plan.source.profile else None,
            "source_kind": plan.source.kind,
            "source": str(plan.source.path),
            "hf_id": plan.source.hf_id,
            "model_type": plan.source.model_type,
            "files": work.source_files,
        },
        "versions": versions(),
    }


def _write_manifest(work: _Work) -> str:
    """The manifest and the Triton repository, which reads the manifest's settings: a first manifest
    (no file table) is written while it renders, then the final one lists every file."""
    manifest = _manifest_dict(work)
    (work.tmp / MANIFEST).write_text(json.dumps({**manifest, "files": {}}, indent=1) + "\n", encoding="utf-8")
    _render_triton(work.tmp)
    manifest["files"] = file_table(work.tmp)
    (work.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    work.manifest = manifest
    return f"{len(manifest['files'])} files"


def _verify(work: _Work) -> str:
    try:
        verify_artifact(work.tmp)
    except ArtifactError as e:
        raise UserError(f"the artifact failed its own verification: {e}") from None
    return ""


_BACKEND_STAGE = {
    "onnx": "export onnx",
    "tensorrt": "export onnx + build engines",
    "torch": "save checkpoint",
    "trtllm": "copy checkpoint",
}


def build_stages(backend: str) -> tuple[tuple[str, Stage], ...]:
    """The build's stages for ``backend`` (resolved, not ``auto``), in order: the one list that
    ``--dry-run`` shows (:attr:`Plan.stages`) and :func:`build` runs and prints as ``[i/n] name``."""
    if backend not in _BACKEND_STAGE:
        raise UserError(f"no build stages for backend {backend!r}; expected one of {', '.join(_BACKEND_STAGE)}")
    return (
        ("load model", _load_model),
        ("processor and tokenizer", _save_processor),
        (_BACKEND_STAGE[backend], _backend_files),
        ("hash model source", _hash_source),
        ("manifest and triton repository", _write_manifest),
        ("verify", _verify),
    )


def build(plan: Plan, *, force: bool = False, progress: Progress = print) -> dict[str, Any]:
    """Run the plan's :func:`build_stages`; returns the manifest. The output appears only when every
    stage succeeded (:func:`vlcache.atomic.atomic_dir`: the stages write a ``.partial`` folder beside it)."""
    output = plan.output.absolute()
    check_output_dir(output, force)  # before the minutes of work, and again at the swap
    t_start = time.perf_counter()
    todo = build_stages(plan.config.backend)
    with atomic_dir(output, force=force, suffix=".partial") as tmp:
        work = _Work(plan, tmp, progress)
        for i, (name, run_stage) in enumerate(todo, start=1):
            progress(f"[{i}/{len(todo)}] {name} ...")
            t0 = time.perf_counter()
            extra = run_stage(work)
            progress(f"      done in {time.perf_counter() - t0:.1f} s{(' — ' + extra) if extra else ''}")
    size = sum(e["bytes"] for e in work.manifest["files"].values())
    progress(f"built {output} ({size / 2**20:.1f} MiB, {time.perf_counter() - t_start:.1f} s)")
    return work.manifest
