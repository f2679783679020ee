"""Import layering (DESIGN.md "Layers of the code"): what a client or a command's parser imports
loads no framework. Checked in a fresh interpreter, since this test process has torch loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "sklearn", "onnxruntime", "tritonclient")


@pytest.mark.parametrize(
    "modules",
    [
        ["vlcache"],
        ["vlcache.client", "vlcache.client.stats", "vlcache.client.bench", "vlcache.client.capacity"],
        ["vlcache.digits"],  # the scenes bench, generate and eval share: scikit-learn loads on first use
        ["vlcache.serving.protocol"],
        ["vlcache.errors", "vlcache.cli", "vlcache.cli.bench", "vlcache.cli.serve", "vlcache.cli.generate"],
    ],
)
def test_light_modules_load_no_framework(modules: list[str]) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {modules} loaded {out}"


def test_the_root_package_still_exposes_its_names_lazily() -> None:
    code = (
        "import sys, vlcache\n"
        "assert 'torch' not in sys.modules\n"
        "c = vlcache.CompressionConfig(budget=0.2)\n"
        "assert 'torch' in sys.modules and 'transformers' not in sys.modules\n"
        "print(c.budget, vlcache.VLCache.__name__, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0.2", "VLCache", "True"]


def test_without_scikit_learn_the_default_scenes_are_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlcache import digits
    from vlcache.client.bench import load_workload
    from vlcache.errors import UserError

    digits._digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(UserError, match="need scikit-learn.*pass --images DIR"):
            load_workload(None, None, 2)
    finally:
        digits._digits.cache_clear()
