"""Packaging: a wheel of the checkout, installed (not editable) into a fresh virtual environment, finds
its build profiles, Triton templates and bundled models inside its own site-packages.

The profiles (``builder/``) and templates (``triton_repo/``) are edited at the top of the tree and
reach the package through symlinks that setuptools follows when it builds the wheel; nothing may be
looked up in the checkout at run time. The wheel is built from a copy of the files a clean clone
would hold (tracked, plus untracked files git does not ignore), so a file the wheel needs but git
ignores fails here rather than in CI, and no ``build/`` or ``*.egg-info`` is left in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ALIASES = {"llava", "llava-next", "llava-tiny", "llava-tiny-late"}

# Run by the fresh environment's python, from a folder outside the checkout, in isolated mode (-I:
# no PYTHONPATH, no current directory on sys.path): a vlcache-build of the llava-tiny alias with the
# torch backend (profile -> bundled model -> artifact with its Triton repository), then a second
# rendering of the templates through the public render_repository, then a build with the trtllm
# backend (TensorRT-LLM's llmapi repository, from its own templates).
CHECK = """
import json, sys
from pathlib import Path

import vlcache
import vlcache_plugins
from vlcache.builder.build import build, make_plan
from vlcache.builder.profiles import available_profiles
from vlcache.config import BuildConfig
from vlcache.serving.repository import render_repository, templates_dir

out = Path(sys.argv[1])
profiles = available_profiles()
plan = make_plan("llava-tiny", BuildConfig(backend="torch"), out / "artifact")
build(plan, progress=lambda line: None)
repo = render_repository(out / "artifact", out=out / "repo", instances=2)
build(make_plan("llava-tiny", BuildConfig(backend="trtllm"), out / "trtllm"), progress=lambda line: None)
print(json.dumps({
    "vlcache": vlcache.__file__,
    "vlcache_plugins": vlcache_plugins.__file__,
    "sys_path": sys.path,
    "profiles": {name: str(p.path) for name, p in profiles.items()},
    "templates": str(templates_dir()),
    "trtllm_templates": str(templates_dir() / "tensorrt_llm"),
    "model": [plan.source.kind, str(plan.source.path)],
    "repo": str(repo),
}))
"""


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    what = " ".join(str(a) for a in args)[:300]
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _clean_clone(dest: Path) -> list[str]:
    """Copy what a clean clone would hold (symlinks stay symlinks) into ``dest``; its relative paths."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = _run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    names = [n for n in listed.split("\0") if n and os.path.lexists(REPO / n)]  # not deleted in the tree
    for name in names:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return names


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def test_wheel_install_finds_profiles_templates_and_models(tmp_path: Path):
    start = time.perf_counter()
    src, wheels, venv, elsewhere = (tmp_path / n for n in ("src", "wheels", "venv", "elsewhere"))
    names = _clean_clone(src)

    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-q", "-w", wheels, src)
    (wheel,) = wheels.glob("vlcache-*.whl")
    built = time.perf_counter()

    # The bundled models, profiles and templates are in the wheel, under the package.
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    expected = {n for n in names if n.startswith("vlcache/models/")}
    assert {
        "vlcache/models/llava-tiny/model.safetensors",
        "vlcache/models/llava-tiny-late/model.safetensors",
    } <= expected
    expected |= {
        f"vlcache/builder/profile_files/{n.removeprefix('builder/')}" for n in names if n.startswith("builder/")
    }
    expected |= {f"vlcache/serving/{n}" for n in names if n.startswith("triton_repo/")}
    assert expected - in_wheel == set()
    assert {f"vlcache/builder/profile_files/{a}.yaml" for a in ALIASES} <= in_wheel

    # A fresh environment that reuses this one's packages (torch, transformers, ...) through a .pth
    # line: such a line only adds the folder to sys.path, so the editable install of vlcache there (a
    # .pth hook of its own) is not loaded, and the environment's own site-packages comes first.
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    (purelib / "reuse-test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(*pip, "--python", python, "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", wheel)
    installed = time.perf_counter()

    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    lines = _run(python, "-I", "-c", CHECK, elsewhere, cwd=elsewhere, env=env).strip().splitlines()
    found = json.loads(lines[-1])
    done = time.perf_counter()

    for package in ("vlcache", "vlcache_plugins"):
        assert _inside(found[package], purelib) and not _inside(found[package], REPO), found[package]
    # nothing of the checkout on sys.path but this environment's site-packages (the .pth line)
    reused = {Path(p).resolve() for p in site.getsitepackages()}
    assert not [p for p in found["sys_path"] if _inside(p, REPO) and Path(p).resolve() not in reused]
    assert ALIASES <= set(found["profiles"])
    assert all(_inside(p, purelib) for p in found["profiles"].values()), found["profiles"]
    assert _inside(found["templates"], purelib), found["templates"]
    assert _inside(found["trtllm_templates"], purelib), found["trtllm_templates"]
    assert found["model"][0] == "bundled" and _inside(found["model"][1], purelib), found["model"]
    for repo in (elsewhere / "artifact" / "triton", Path(found["repo"])):
        config = (repo / "vlcache" / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and "${" not in config
        model_py = repo / "vlcache" / "1" / "model.py"
        assert model_py.read_bytes() == (REPO / "triton_repo" / "vlcache" / "1" / "model.py").read_bytes()
    assert "count: 2" in (Path(found["repo"]) / "vlcache" / "config.pbtxt").read_text()
    trtllm = elsewhere / "trtllm" / "triton" / "tensorrt_llm"
    assert (
        "${" not in (trtllm / "config.pbtxt").read_text()
        and "algorithm: vlcache" in (trtllm / "1" / "model.yaml").read_text()
    )
    model_py = (REPO / "triton_repo" / "tensorrt_llm" / "1" / "model.py").read_bytes()
    assert (trtllm / "1" / "model.py").read_bytes() == model_py
    print(
        f"\npackaging: wheel {built - start:.1f} s, venv + install {installed - built:.1f} s, "
        f"build + render from the install {done - installed:.1f} s, total {done - start:.1f} s"
    )
