"""The artifact directory: what `vlcache-build` writes and what runtimes and serving load.

Layout (one source of truth for these names)::

    ARTIFACT/
      manifest.json   see below
      processor/      tokenizer + processor files (every backend)
      onnx/           backend "onnx": the exported graphs and export.json (:mod:`vlcache.export`)
      engines/        backend "tensorrt": TensorRT engines (and the ONNX graphs they came from)
      hf/             backend "torch": a HF checkpoint folder (save_pretrained of model + processor);
                      backend "trtllm": the source checkpoint's files, copied as they are
      triton/         the rendered Triton model repository (:func:`vlcache.serving.render_repository`):
                      the ``vlcache`` model, or for ``trtllm`` TensorRT-LLM's ``llmapi`` model
                      (``tensorrt_llm/config.pbtxt``, ``tensorrt_llm/1/model.yaml``; docs/trtllm.md)

``manifest.json``: ``format``; ``created``; ``build`` (the :class:`~vlcache.config.BuildConfig`:
backend, dtype, ``max_input_len``, ``max_batch_size``, ``compression`` — the default
:class:`~vlcache.config.CompressionConfig` of served requests) and ``config_hash``;
``image_tokens``; ``model`` (spec, source kind and folder, model type, sha256 of every source file;
optional ``prompt_style``: ``auto`` | ``plain`` | ``chat``); ``versions`` (vlcache, torch,
transformers, onnx, onnxruntime, tensorrt as present); ``files`` (every other file of the artifact:
sha256 and size). ``build`` is the one source of the build's settings: readers take them from
:attr:`Manifest.build`, and the manifest repeats none of them at its top level.

Format history (``format``, :data:`vlcache.config.ARTIFACT_FORMAT`): 1 repeated ``backend``,
``compression``, ``max_input_len`` and ``max_batch_size`` beside ``build``; 2 keeps them in ``build``
only. An artifact of another format is refused with a message that says to rebuild it. (The format
of an export directory's ``export.json`` is versioned apart: :data:`vlcache.export.spec.EXPORT_FORMAT_NAME`
and :data:`~vlcache.export.spec.EXPORT_FORMAT_VERSION`.)

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

from vlcache.config import ARTIFACT_BACKENDS, ARTIFACT_FORMAT, BuildConfig
from vlcache.errors import UserError

MANIFEST = "manifest.json"
HF_DIR, PROCESSOR_DIR, TRITON_DIR, ONNX_DIR, ENGINES_DIR = "hf", "processor", "triton", "onnx", "engines"
PACKAGES = ("vlcache", "torch", "transformers", "onnx", "onnxruntime", "tensorrt", "tensorrt_llm", "triton")
#: packages whose major.minor must match at load time, per backend
RUNTIME_PACKAGES = {
    "onnx": ("onnxruntime",),
    "tensorrt": ("tensorrt",),
    "torch": ("torch", "transformers"),
    "trtllm": ("tensorrt_llm",),
}


class ArtifactError(ValueError, UserError):
    """The artifact directory is missing, incomplete, altered or malformed (a one-line message)."""


@dataclass(frozen=True)
class Manifest:
    """manifest.json, checked. root: the artifact directory (absolute); build: the build's settings
    (backend, dtype, max_input_len, the default compression, ...); raw: the whole JSON object."""

    root: Path
    build: BuildConfig
    config_hash: str
    model: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """``build.backend``: ``torch``, ``onnx``, ``tensorrt`` or ``trtllm``."""
        return self.build.backend

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


def _check_format(data: dict[str, Any], path: Path) -> None:
    """ArtifactError unless the manifest is of this vlcache's :data:`ARTIFACT_FORMAT` (it says to rebuild)."""
    found = data.get("format")
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path}: artifact format {found!r}, but this vlcache reads format {ARTIFACT_FORMAT} "
            "(built by another vlcache version); rebuild it with vlcache-build"
        )


def _build_config(data: dict[str, Any], path: Path) -> BuildConfig:
    """``data["build"]`` as a BuildConfig with a backend an artifact can have (ArtifactError otherwise)."""
    raw = data.get("build")
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: 'build' must be an object (BuildConfig.to_dict())")
    try:
        config = BuildConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: bad 'build': {e}") from None
    if config.backend not in ARTIFACT_BACKENDS:
        raise ArtifactError(
            f"{path}: unknown backend {config.backend!r}; expected one of {', '.join(ARTIFACT_BACKENDS)}"
        )
    return config


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
    _check_format(data, path)
    build = _build_config(data, path)
    for key in ("model", "files"):
        if not isinstance(data.get(key, {}), dict):
            raise ArtifactError(f"{path}: '{key}' must be an object")
    manifest = Manifest(
        root=root,
        build=build,
        config_hash=str(data.get("config_hash", "")),
        model=dict(data.get("model", {})),
        files=dict(data.get("files", {})),
        raw=data,
    )
    if not manifest.processor_dir.is_dir():
        raise ArtifactError(f"{root} has no {PROCESSOR_DIR}/ folder (tokenizer and processor files)")
    if build.backend in ("torch", "trtllm") and not (manifest.hf_dir / "config.json").is_file():
        raise ArtifactError(
            f"{root}: backend {build.backend!r} needs a HF checkpoint in {HF_DIR}/ (config.json missing)"
        )
    return manifest


def _major_minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def verify_artifact(artifact_dir: str | Path, *, check_files: bool = True, check_versions: bool = True) -> Manifest:
    """:func:`read_manifest`, then the config hash, every file's sha256 and the runtime's versions."""
    m = read_manifest(artifact_dir)
    root, where = m.root, m.root / MANIFEST
    if m.build.compute_hash() != m.config_hash:
        raise ArtifactError(f"{where}: config_hash does not match the build config (edited by hand?)")
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
