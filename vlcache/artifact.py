"""The artifact directory: what `vlcache-build` writes and what runtimes and serving load.

Layout (one source of truth for these names)::

    ARTIFACT/
      manifest.json   see below
      processor/      tokenizer + processor files (every backend)
      onnx/           backend "onnx": the exported graphs and export.json (:mod:`vlcache.export`)
      engines/        backend "tensorrt": TensorRT engines (and the ONNX graphs they came from)
      hf/             backend "torch": a HF checkpoint folder (save_pretrained of model + processor)
      triton/         the rendered Triton model repository (:func:`vlcache.serving.render_repository`)

``manifest.json``: ``format``; ``created``; ``backend``; ``build`` (the
:class:`~vlcache.config.BuildConfig`) and ``config_hash``; ``compression`` (the default
:class:`~vlcache.config.CompressionConfig` of served requests) and ``compression_hash``;
``max_input_len`` / ``max_batch_size`` / ``image_tokens``; ``model`` (spec, source kind and folder,
model type, sha256 of every source file; optional ``prompt_style``: ``auto`` | ``plain`` |
``chat``); ``versions`` (vlcache, torch, transformers, onnx, onnxruntime, tensorrt as present);
``files`` (every other file of the artifact: sha256 and size).

:func:`read_manifest` checks the structure; :func:`verify_artifact` also refuses an artifact whose
config hash does not match its config, whose files are missing or changed, or that was built by a
different major.minor version of a package its backend runs with. ``triton/`` is listed but not
checked: it is derived from the manifest and may be re-rendered (other instance counts, devices). Both raise
:class:`ArtifactError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vlcache.config import ARTIFACT_FORMAT, BuildConfig, CompressionConfig

MANIFEST = "manifest.json"
FORMAT = ARTIFACT_FORMAT
BACKENDS = ("torch", "onnx", "tensorrt")
HF_DIR, PROCESSOR_DIR, TRITON_DIR, ONNX_DIR, ENGINES_DIR = "hf", "processor", "triton", "onnx", "engines"
PACKAGES = ("vlcache", "torch", "transformers", "onnx", "onnxruntime", "tensorrt", "triton")
#: packages whose major.minor must match at load time, per backend
RUNTIME_PACKAGES = {"onnx": ("onnxruntime",), "tensorrt": ("tensorrt",), "torch": ("torch", "transformers")}


class ArtifactError(ValueError):
    """The artifact directory is missing, incomplete, altered or malformed (a one-line message)."""


@dataclass(frozen=True)
class Manifest:
    """manifest.json, checked. root: the artifact directory (absolute); raw: the whole JSON object."""

    root: Path
    backend: str
    compression: CompressionConfig
    config_hash: str
    max_input_len: int
    max_batch_size: int
    model: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def processor_dir(self) -> Path:
        return self.root / PROCESSOR_DIR

    @property
    def hf_dir(self) -> Path:
        return self.root / HF_DIR

    @property
    def onnx_dir(self) -> Path:
        return self.root / ONNX_DIR

    @property
    def triton_dir(self) -> Path:
        return self.root / TRITON_DIR


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Installed versions of the packages an artifact depends on (absent ones left out)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` but the manifest: relative path -> {sha256, bytes}."""
    table = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and "__pycache__" not in p.parts:
            table[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def _positive_int(data: dict[str, Any], key: str, path: Path) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArtifactError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Read and check ``artifact_dir/manifest.json`` and the folders its backend needs."""
    root = Path(artifact_dir).expanduser().resolve()
    if not root.is_dir():
        raise ArtifactError(f"artifact directory not found: {root}")
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {MANIFEST}: not a vlcache artifact directory (see vlcache-build)") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if data.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: unsupported format {data.get('format')!r} (this vlcache reads format {FORMAT}); rebuild it"
        )
    backend = data.get("backend")
    if backend not in BACKENDS:
        raise ArtifactError(f"{path}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    compression = data.get("compression")
    if not isinstance(compression, dict):
        raise ArtifactError(f"{path}: 'compression' must be an object (CompressionConfig.to_dict())")
    try:
        config = CompressionConfig.from_dict(compression)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: bad 'compression': {e}") from None
    for key in ("model", "files"):
        if not isinstance(data.get(key, {}), dict):
            raise ArtifactError(f"{path}: '{key}' must be an object")
    manifest = Manifest(
        root=root,
        backend=str(backend),
        compression=config,
        config_hash=str(data.get("config_hash", "")),
        max_input_len=_positive_int(data, "max_input_len", path),
        max_batch_size=_positive_int(data, "max_batch_size", path),
        model=dict(data.get("model", {})),
        files=dict(data.get("files", {})),
        raw=data,
    )
    if not manifest.processor_dir.is_dir():
        raise ArtifactError(f"{root} has no {PROCESSOR_DIR}/ folder (tokenizer and processor files)")
    if backend == "torch" and not (manifest.hf_dir / "config.json").is_file():
        raise ArtifactError(f"{root}: backend 'torch' needs a HF checkpoint in {HF_DIR}/ (config.json missing)")
    return manifest


def _major_minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def verify_artifact(artifact_dir: str | Path, *, check_files: bool = True, check_versions: bool = True) -> Manifest:
    """:func:`read_manifest`, then the config hash, every file's sha256 and the runtime's versions."""
    m = read_manifest(artifact_dir)
    root, where = m.root, m.root / MANIFEST
    if "build" in m.raw:
        try:
            cfg = BuildConfig.from_dict(m.raw["build"])
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: invalid build config: {e}") from None
        if cfg.compute_hash() != m.config_hash:
            raise ArtifactError(f"{where}: config_hash does not match the build config (edited by hand?)")
        if cfg.compression != m.compression:
            raise ArtifactError(f"{where}: 'compression' differs from the build config's (edited by hand?)")
    if check_files:
        if not m.files:
            raise ArtifactError(f"{where} lists no files")
        for rel, entry in m.files.items():
            if rel.startswith(f"{TRITON_DIR}/"):
                continue  # derived from the manifest; vlcache-serve and users may re-render it
            p = root / rel
            if not p.is_file():
                raise ArtifactError(f"{root} is incomplete: {rel} is missing")
            if (
                not isinstance(entry, dict)
                or p.stat().st_size != entry.get("bytes")
                or sha256_file(p) != entry.get("sha256")
            ):
                raise ArtifactError(f"{root}/{rel} changed since the build (sha256 mismatch); rebuild the artifact")
    if check_versions:
        built = m.raw.get("versions", {})
        now = versions()
        for name in ("vlcache", *RUNTIME_PACKAGES.get(m.backend, ())):
            if name not in built:
                continue
            if name not in now:
                raise ArtifactError(f"{root} was built with {name} {built[name]}, which is not installed here")
            if _major_minor(built[name]) != _major_minor(now[name]):
                raise ArtifactError(
                    f"{root} was built with {name} {built[name]} but {now[name]} is installed; "
                    "rebuild the artifact or install the version it was built with"
                )
    return m
