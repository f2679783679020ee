"""vlcache.atomic: a folder is replaced whole or not at all, and a non-empty one only with force."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlcache.atomic import OutputDirError, atomic_dir, check_output_dir


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    (out / "sub" / "kept.txt").write_text("old too")
    return out


def test_success_creates_the_folder_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.") and tmp.is_dir()
        assert not out.exists()  # nothing at the target while the block writes
        (tmp / "a.txt").write_text("new")
    assert _tree(out) == {"a.txt": "new"}
    assert out.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_success_with_force_replaces_the_old_folder_whole(tmp_path: Path) -> None:
    out = _old(tmp_path)
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert _tree(out) == {"old.txt": "old", "sub/kept.txt": "old too"}  # untouched until the swap
    assert _tree(out) == {"new.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the temporary nor the old folder


@pytest.mark.parametrize("exc", [RuntimeError("stage failed"), KeyboardInterrupt()])
def test_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path, exc: BaseException) -> None:
    out = _old(tmp_path)
    with pytest.raises(type(exc)):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise exc
    assert _tree(out) == {"old.txt": "old", "sub/kept.txt": "old too"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_without_an_old_folder_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boom"):
        with atomic_dir(tmp_path / "out", suffix=".partial") as tmp:
            assert tmp.name.endswith(".partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_refused_without_force(tmp_path: Path) -> None:
    out = _old(tmp_path)
    with pytest.raises(
        OutputDirError, match=re.escape(f"--out {out} exists and is not empty; pass --force to replace it")
    ):
        check_output_dir(out, False)
    # At the swap too (the folder may have been filled while the block wrote): the old one stays.
    with pytest.raises(OutputDirError, match="not empty"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _tree(out) == {"old.txt": "old", "sub/kept.txt": "old too"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_what_may_be_written(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "missing", False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", False)
    check_output_dir(_old(tmp_path), True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", True)


def test_each_command_keeps_its_flag_and_error_class(tmp_path: Path) -> None:
    class CommandError(Exception):
        pass

    out = _old(tmp_path)
    with pytest.raises(CommandError, match=r"^--out .* pass --force"):
        check_output_dir(out, False, name="--out", error=CommandError)
    with pytest.raises(CommandError):
        with atomic_dir(out, name="--out", error=CommandError):
            pass
    assert _tree(out) == {"old.txt": "old", "sub/kept.txt": "old too"}
