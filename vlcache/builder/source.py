"""Resolve ``--model``: a profile alias, a HF id found in the local cache, or a local folder.

Nothing is downloaded. What could not be found is reported with every place that was looked at and
how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlcache.artifact import sha256_file
from vlcache.builder.profiles import Profile, available_profiles
from vlcache.errors import UserError
from vlcache.hf.loading import bundled_path, model_type_of


@dataclass(frozen=True)
class ModelSource:
    """spec: what the user typed. path: the checkpoint folder. kind: bundled | hf-cache | local.
    profile: the matching build profile (None for a plain folder or HF id without a profile)."""

    spec: str
    path: Path
    kind: str
    model_type: str
    profile: Profile | None = None
    hf_id: str | None = None


def _hf_cache_lookup(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or a malformed id
        return None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_cached(repo_id: str, alias: str | None) -> UserError:
    what = f"model {alias!r} ({repo_id})" if alias else f"HF model {repo_id}"
    return UserError(
        f"{what} is not in the local HuggingFace cache ({_hf_cache_dir()}) and nothing can be downloaded "
        f"here; fetch it where there is internet access (`hf download {repo_id}`) and copy the cache, "
        "set HF_HUB_CACHE to where it is, or pass a local checkpoint folder to --model"
    )


def _checked(path: Path, spec: str, kind: str, profile: Profile | None, hf_id: str | None) -> ModelSource:
    model_type = model_type_of(path)  # CheckpointError is a UserError
    if profile is not None and profile.model_type != model_type:
        raise UserError(
            f"{path} holds a {model_type!r} model, but profile {profile.name!r} expects {profile.model_type!r}"
        )
    return ModelSource(spec, path, kind, model_type, profile, hf_id)


def resolve_source(spec: str, profiles: dict[str, Profile] | None = None) -> ModelSource:
    """``spec`` -> the checkpoint folder to build from (UserError when it cannot be found)."""
    profiles = available_profiles() if profiles is None else profiles
    if spec in profiles:
        prof = profiles[spec]
        scheme, _, target = prof.source.partition(":")
        if scheme == "bundled":
            path = bundled_path(target)
            if not (path / "config.json").is_file():
                raise UserError(
                    f"bundled model {target!r} not found at {path}; train it with "
                    f"`python scripts/train_tiny_llava.py --out {path}`"
                )
            return _checked(path, spec, "bundled", prof, None)
        if scheme == "hf":
            found = _hf_cache_lookup(target)
            if found is None:
                raise _not_cached(target, spec)
            return _checked(found, spec, "hf-cache", prof, target)
        raise UserError(f"profile {prof.path} has source {prof.source!r}; expected 'bundled:NAME' or 'hf:ORG/NAME'")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a HuggingFace checkpoint folder")
        return _checked(path.resolve(), spec, "local", None, None)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        found = _hf_cache_lookup(spec)
        if found is None:
            raise _not_cached(spec, None)
        return _checked(found, spec, "hf-cache", None, spec)
    aliases = ", ".join(profiles) or "none (the builder/ folder holds no profiles)"
    raise UserError(
        f"--model {spec!r} is not a profile alias ({aliases}), a local folder, or a HF id (org/name) in the local cache"
    )


def hash_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root`` (symlinks followed, sorted)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out
