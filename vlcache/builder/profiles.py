"""Build profiles: one YAML per model in ``builder/`` (``llava``, ``llava-next``, ``llava-tiny``).

The top-level ``builder/`` folder is where profiles are written; the package ships it as
``vlcache/builder/profile_files`` (a symlink to ``../../builder`` in a checkout, which setuptools
copies into a wheel as package data), so an installed vlcache finds its aliases without the checkout.

A profile names where the checkpoint comes from and the build defaults that suit it::

    name: llava                        # the --model alias (equals the file's stem)
    description: LLaVA-1.5-7B
    source: hf:llava-hf/llava-1.5-7b-hf   # or bundled:llava-tiny
    model_type: llava                  # llava | llava_next
    dtype: float16                     # default --dtype
    max_input_len: 4096                # default --max-input-len
    max_batch_size: 8                  # default --max-batch-size
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlcache.errors import UserError

#: the profiles shipped with the package (in a checkout: the top-level ``builder/``, through a symlink)
PROFILES = (Path(__file__).parent / "profile_files").resolve()

REQUIRED = ("name", "source", "model_type")
DEFAULTS = ("dtype", "max_input_len", "max_batch_size")


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    model_type: str
    description: str = ""
    dtype: str | None = None
    max_input_len: int | None = None
    max_batch_size: int | None = None
    path: Path | None = None


def load_profile(path: Path) -> Profile:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read build profile {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"build profile {path} is not a mapping")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"build profile {path} lacks {', '.join(missing)}")
    known = set(REQUIRED) | set(DEFAULTS) | {"description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"build profile {path} has unknown keys: {', '.join(unknown)}")
    if data["name"] != path.stem:
        raise UserError(f"build profile {path} is named {data['name']!r}; the name must equal the file's stem")
    return Profile(**{k: data[k] for k in data}, path=path)


def available_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """Alias -> profile for every ``*.yaml`` in ``directory`` (default: :data:`PROFILES`, the shipped ones)."""
    directory = directory or PROFILES
    if not directory.is_dir():
        return {}
    return {p.stem: load_profile(p) for p in sorted(directory.glob("*.yaml"), key=lambda p: p.stem)}
