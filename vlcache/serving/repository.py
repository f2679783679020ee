"""Render the Triton model repository of an artifact from the `triton_repo/` templates.

Contract of :func:`render_repository`:
* Reads ``ARTIFACT/manifest.json`` (:func:`vlcache.artifact.read_manifest`).
* Copies the template tree (``triton_repo/`` at the top of the source tree, shipped inside the
  package as ``vlcache/serving/triton_repo``: a symlink to it in a checkout, which setuptools copies
  into a wheel as package data) into ``out`` (default ``ARTIFACT/triton``); every
  ``*.pbtxt`` goes through ``string.Template.substitute``: a placeholder with no value, or a ``$``
  that is not a placeholder, raises :class:`RenderError`, and so does any ``${`` left afterwards.
* The model's inputs and outputs are rendered from :mod:`vlcache.serving.protocol`.
* ``artifact_dir`` in the config is relative to the model's folder (``../..``) when the repository is
  rendered inside the artifact, so the artifact can be moved as a whole; absolute otherwise.
* ``device`` defaults to ``cuda`` for the ``tensorrt`` backend (instances ``KIND_GPU``) and to
  ``cpu`` otherwise (``KIND_CPU``).
* ``max_batch_size`` (requests decoded together per instance), ``kv_cache_mb`` (each instance's KV
  pool, MiB), ``kv_cache_fraction`` (the pool as a fraction of the memory available at load,
  when ``kv_cache_mb`` is not set) and ``max_prefill_tokens`` (prompt tokens prefilled between two
  decode steps while a batch decodes, 0: no limit) are model parameters, rendered empty when not
  given: the model then uses the build's ``max_batch_size``,
  :data:`vlcache.engine.pool.DEFAULT_POOL_FRACTION` and :data:`vlcache.config.DEFAULT_MAX_PREFILL_TOKENS`
  (:mod:`vlcache.serving.model`). Triton's own ``max_batch_size`` stays 0: the model batches itself.
* ``triton_repo/`` holds one model template per layout: ``vlcache/`` (every backend but ``trtllm``)
  and ``tensorrt_llm/``; a rendered repository holds just the one its backend serves.
* The ``trtllm`` backend gets TensorRT-LLM's ``llmapi`` layout: ``tensorrt_llm/config.pbtxt``,
  ``tensorrt_llm/1/model.py`` and a ``tensorrt_llm/1/model.yaml`` of ``LLM()`` arguments that
  selects the build's VL-Cache compression (:mod:`vlcache.trtllm.llm_args`); its instances are
  ``KIND_CPU`` Python models that drive the GPU themselves, and ``num_threads``/``device`` do not apply.
* The result replaces ``out`` as a whole only when rendering succeeded (written next to it, then
  renamed: :func:`vlcache.atomic.atomic_dir`); returns ``out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
from pathlib import Path
from typing import Any

from vlcache.artifact import Manifest, read_manifest
from vlcache.atomic import atomic_dir
from vlcache.errors import UserError
from vlcache.serving import protocol

#: inside the package (a wheel's copy; in a checkout the top-level ``triton_repo/``, through a symlink)
TEMPLATES = (Path(__file__).parent / "triton_repo").resolve()
#: the model name of the trtllm repository (TensorRT-LLM's llmapi model is called so)
TRTLLM_MODEL_NAME = "tensorrt_llm"


class RenderError(ValueError, UserError):
    """A template could not be rendered completely (a one-line message)."""


def templates_dir() -> Path:
    """The template repository shipped with the package (RenderError when it is missing)."""
    if (TEMPLATES / protocol.MODEL_NAME / "config.pbtxt").is_file():
        return TEMPLATES
    raise RenderError(f"the Triton repository templates are missing from {TEMPLATES} (broken installation?)")


def _model_template(name: str) -> Path:
    """``triton_repo/<name>``: one model's template (RenderError when it is missing)."""
    path = templates_dir() / name
    if not (path / "config.pbtxt").is_file():
        raise RenderError(f"the {name} model template is missing from {templates_dir()} (broken installation?)")
    return path


def _tensor_block(kind: str, specs: tuple[protocol.TensorSpec, ...]) -> str:
    items = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.dims)
        optional = " optional: true" if spec.optional else ""
        items.append(
            f'  {{ name: "{spec.name}" data_type: {protocol.CONFIG_TYPES[spec.datatype]} dims: [ {dims} ]{optional} }}'
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def render_text(template: str, values: dict[str, str], *, source: str = "template") -> str:
    """Fill every ``${name}`` of ``template`` from ``values`` (RenderError when one is missing)."""
    try:
        text = string.Template(template).substitute(values)
    except KeyError as e:
        raise RenderError(f"{source}: no value for placeholder ${{{e.args[0]}}}") from None
    except ValueError as e:
        raise RenderError(f"{source}: {e}") from None
    if "${" in text:
        raise RenderError(f"{source}: a placeholder is left after rendering")
    return text


def render_repository(
    artifact_dir: str | Path,
    *,
    out: str | Path | None = None,
    instances: int = 1,
    max_tokens_cap: int = protocol.DEFAULT_MAX_TOKENS_CAP,
    num_threads: int = 0,
    device: str | None = None,
    max_batch_size: int | None = None,
    kv_cache_mb: float | None = None,
    kv_cache_fraction: float | None = None,
    max_prefill_tokens: int | None = None,
) -> Path:
    """Render the model repository for ``artifact_dir`` into ``out`` (default ``ARTIFACT/triton``).

    Args:
        artifact_dir: the artifact directory (manifest.json, processor/, hf/ for torch).
        out: where the repository goes; replaced as a whole.
        instances: model instances (each a Python stub process with its own engine and KV pool).
        max_tokens_cap: the largest ``max_tokens`` a request may ask for.
        num_threads: torch and ONNX Runtime intra-op threads per instance (0: their defaults).
        device: ``cpu`` or ``cuda``; default by backend (see the module docstring).
        max_batch_size: requests decoded together per instance (None: the build's).
        kv_cache_mb: each instance's KV pool in MiB (None: ``kv_cache_fraction`` of the available memory).
        kv_cache_fraction: the pool as a fraction in (0, 1] of the memory available at load (None: 0.25).
        max_prefill_tokens: prompt tokens each instance prefills between two decode steps while a batch
            decodes, 0 for no limit (None: :data:`vlcache.config.DEFAULT_MAX_PREFILL_TOKENS`).
    """
    manifest = read_manifest(artifact_dir)
    if instances < 1:
        raise RenderError(f"instances must be >= 1, got {instances}")
    if max_tokens_cap < 1:
        raise RenderError(f"max_tokens_cap must be >= 1, got {max_tokens_cap}")
    if num_threads < 0:
        raise RenderError(f"num_threads must be >= 0, got {num_threads}")
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise RenderError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if kv_cache_mb is not None and not (math.isfinite(kv_cache_mb) and kv_cache_mb > 0):
        raise RenderError(f"kv_cache_mb must be > 0, got {kv_cache_mb!r}")
    if kv_cache_fraction is not None and not (0 < kv_cache_fraction <= 1):
        raise RenderError(f"kv_cache_fraction must lie in (0, 1], got {kv_cache_fraction!r}")
    if max_prefill_tokens is not None and (
        not isinstance(max_prefill_tokens, int) or isinstance(max_prefill_tokens, bool) or max_prefill_tokens < 0
    ):
        raise RenderError(f"max_prefill_tokens must be an integer >= 0, got {max_prefill_tokens!r}")
    device = device or ("cuda" if manifest.backend == "tensorrt" else "cpu")
    if device not in ("cpu", "cuda"):
        raise RenderError(f"device must be cpu or cuda, got {device!r}")
    target = Path(out).expanduser().resolve() if out is not None else manifest.triton_dir
    if manifest.backend == "trtllm":
        return _render_trtllm(manifest, target, instances=instances, max_tokens_cap=max_tokens_cap)
    model_dir = target / protocol.MODEL_NAME
    try:
        artifact_ref = os.path.relpath(manifest.root, model_dir) if target.is_relative_to(manifest.root) else None
    except ValueError:
        artifact_ref = None
    values = {
        "model_name": protocol.MODEL_NAME,
        "inputs": _tensor_block("input", protocol.INPUTS),
        "outputs": _tensor_block("output", protocol.OUTPUTS),
        "instances": str(instances),
        "instance_kind": "KIND_GPU" if device == "cuda" else "KIND_CPU",
        "artifact_dir": artifact_ref or str(manifest.root),
        "backend": manifest.backend,
        "config_hash": manifest.config_hash,
        "max_tokens_cap": str(max_tokens_cap),
        "num_threads": str(num_threads),
        "device": device,
        "max_batch_size": "" if max_batch_size is None else str(max_batch_size),
        "kv_cache_mb": "" if kv_cache_mb is None else str(float(kv_cache_mb)),
        "kv_cache_fraction": "" if kv_cache_fraction is None else str(float(kv_cache_fraction)),
        "max_prefill_tokens": "" if max_prefill_tokens is None else str(max_prefill_tokens),
    }
    with atomic_dir(target, force=True, name="out", error=RenderError) as staging:
        _render_tree(_model_template(protocol.MODEL_NAME), staging / protocol.MODEL_NAME, values)
    return target


def _render_tree(source: Path, staging: Path, values: dict[str, str]) -> None:
    """Copy the template tree ``source`` into ``staging``, every ``*.pbtxt`` through :func:`render_text`."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or "__pycache__" in rel.parts:
            continue
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pbtxt":
            dest.write_text(render_text(path.read_text(encoding="utf-8"), values, source=str(rel)), encoding="utf-8")
        else:
            shutil.copyfile(path, dest)


def _image_token_id(checkpoint: Path) -> int | None:
    """The checkpoint's image token id (``image_token_index`` or ``image_token_id`` of config.json)."""
    try:
        config: dict[str, Any] = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("image_token_index", "image_token_id"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _render_trtllm(manifest: Manifest, target: Path, *, instances: int, max_tokens_cap: int) -> Path:
    """The trtllm backend's repository: TensorRT-LLM's llmapi layout with vlcache's model.yaml."""
    from vlcache.trtllm.llm_args import llm_args, model_yaml

    version_dir = target / TRTLLM_MODEL_NAME / "1"
    try:
        inside = target.is_relative_to(manifest.root)
    except ValueError:
        inside = False
    model = os.path.relpath(manifest.hf_dir, version_dir) if inside else str(manifest.hf_dir)
    args = llm_args(
        manifest.build, model=model, image_token_id=_image_token_id(manifest.hf_dir), max_tokens_cap=max_tokens_cap
    )
    values = {"model_name": TRTLLM_MODEL_NAME, "instances": str(instances), "config_hash": manifest.config_hash}
    with atomic_dir(target, force=True, name="out", error=RenderError) as staging:
        _render_tree(_model_template(TRTLLM_MODEL_NAME), staging / TRTLLM_MODEL_NAME, values)
        text = model_yaml(args, config_hash=manifest.config_hash)
        (staging / TRTLLM_MODEL_NAME / "1" / "model.yaml").write_text(text, encoding="utf-8")
    return target
