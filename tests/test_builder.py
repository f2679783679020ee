"""`vlcache-build`: model resolution, the manifest and its verification, atomic output, the CLI.

Backend-specific stages (ONNX export, engines) have their own tests; here the `torch` backend (the
checkpoint copied as is) exercises the machinery on the tiny random checkpoint in llava-tiny format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlcache.artifact import MANIFEST, ArtifactError, verify_artifact
from vlcache.builder.profiles import available_profiles
from vlcache.builder.source import resolve_source
from vlcache.cli.build import main
from vlcache.config import BuildConfig, CompressionConfig
from vlcache.errors import UserError


def _build(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["--model", str(checkpoint), "--backend", "torch", "--out", str(out), "--max-input-len", "300", *extra])


@pytest.fixture(scope="module")
def artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    assert _build(checkpoint, out, "--budget", "0.05", "--method", "snapkv", "--no-per-head") == 0
    return out


def test_manifest_records_config_sources_and_files(artifact: Path, checkpoint: Path) -> None:
    manifest = verify_artifact(artifact)
    build, m = manifest.build, manifest.raw
    assert manifest.backend == build.backend == "torch"
    comp = build.compression
    assert (comp.budget, comp.method, comp.per_head) == (0.05, "snapkv", False)
    assert m["config_hash"] == build.compute_hash() and m["build"] == build.to_dict()
    assert build.max_input_len == 300 and m["image_tokens"] == 256
    # the build config is the one source of its settings: no unchecked copies beside it
    assert not {"backend", "compression", "compression_hash", "max_input_len", "max_batch_size"} & set(m)
    # every source file hashed, every artifact file listed with its real size
    assert set(m["model"]["files"]) == {p.name for p in checkpoint.iterdir() if p.is_file()}
    listed = set(m["files"])
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()} - {MANIFEST}
    assert listed == {f for f in on_disk if "__pycache__" not in f}
    assert all((artifact / f).stat().st_size == e["bytes"] for f, e in m["files"].items())
    assert {"vlcache", "torch", "transformers"} <= set(m["versions"])
    assert "config.json" in {Path(f).name for f in listed if f.startswith("hf/")}


def _copy(artifact: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_verify_refuses_a_changed_file(artifact: Path, tmp_path: Path) -> None:
    art = _copy(artifact, tmp_path)
    victim = art / "processor" / "tokenizer.json"
    victim.write_text(victim.read_text() + " ")
    with pytest.raises(ArtifactError, match=r"processor/tokenizer.json changed since the build"):
        verify_artifact(art)
    victim.unlink()
    with pytest.raises(ArtifactError, match=r"incomplete: processor/tokenizer.json is missing"):
        verify_artifact(art)


def test_verify_refuses_other_versions_and_edited_config(artifact: Path, tmp_path: Path) -> None:
    art = _copy(artifact, tmp_path)
    m = json.loads((art / MANIFEST).read_text())
    m["versions"]["transformers"] = "4.0.0"
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"built with transformers 4.0.0 but .* is installed"):
        verify_artifact(art)
    verify_artifact(art, check_versions=False)
    m["build"]["compression"]["budget"] = 0.5
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="config_hash does not match the build config"):
        verify_artifact(art, check_versions=False)
    (art / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not a vlcache artifact"):
        verify_artifact(art)


def test_existing_output_needs_force(artifact: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (artifact / MANIFEST).read_text()
    with pytest.raises(SystemExit) as e:
        _build(checkpoint, artifact)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "exists and is not empty; pass --force" in err and "Traceback" not in err
    assert (artifact / MANIFEST).read_text() == before


def _budget(artifact: Path) -> float:
    return float(json.loads((artifact / MANIFEST).read_text())["build"]["compression"]["budget"])


def test_force_replaces_and_failed_build_leaves_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "art"
    assert _build(checkpoint, out) == 0
    first = _budget(out)
    assert _build(checkpoint, out, "--force", "--budget", "0.2") == 0
    assert _budget(out) == 0.2 != first

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("vlcache.builder.build.hash_tree", boom)
    fresh = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        _build(checkpoint, fresh)
    assert e.value.code == 130
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no .partial left behind
    with pytest.raises(SystemExit):
        _build(checkpoint, out, "--force", "--budget", "0.3")
    assert _budget(out) == 0.2  # old artifact intact


def test_dry_run_writes_nothing(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dry"
    assert _build(checkpoint, out, "--dry-run", "--budget", "0.3") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["build"]["compression"]["budget"] == 0.3 and plan["build"]["backend"] == "torch"
    assert plan["config_hash"] == BuildConfig.from_dict(plan["build"]).compute_hash()
    assert not out.exists()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_build_prints_the_stages_the_dry_run_lists(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    out = tmp_path / "art"
    _ = capsys.readouterr()
    assert _build(checkpoint, out, "--backend", backend, "--dry-run") == 0
    planned = json.loads(capsys.readouterr().out)["stages"]
    assert _build(checkpoint, out, "--backend", backend) == 0
    printed = re.findall(r"^\[(\d+)/(\d+)\] (.+) \.\.\.$", capsys.readouterr().err, flags=re.MULTILINE)
    n = str(len(planned))
    assert printed == [(str(i), n, name) for i, name in enumerate(planned, start=1)]
    assert any("triton repository" in name for name in planned) and (out / "triton" / "vlcache").is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], r"is not a profile alias \(llava, llava-next, llava-tiny, llava-tiny-late\)"),
        (["--model", "llava"], r"not in the local HuggingFace cache .* pass a local checkpoint folder"),
        (["--model", "someorg/somemodel"], "HF model someorg/somemodel is not in the local HuggingFace cache"),
        (["--budget", "0"], "budget"),
        (["--budget", "1.5"], "budget"),
        (["--method", "nope"], r"argument --method: unknown method 'nope'; known methods: .*snapkv"),
        (["--max-batch-size", "0"], "max_batch_size must be >= 1"),
        (["--backend", "tensorrt"], "needs TensorRT and an NVIDIA GPU"),
    ],
)
def test_user_mistakes_are_one_line_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("vlcache.builder.source._hf_cache_dir", lambda: str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_not_a_vlm_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert "not a supported VLM (model_type 'bert')" in capsys.readouterr().err


def test_hf_id_found_in_local_cache(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HF id resolves offline to the snapshot in the hub cache layout (models--org--name/snapshots/rev)."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-llava"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(checkpoint, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    src = resolve_source("someorg/tiny-llava")
    assert (src.kind, src.model_type, src.hf_id) == ("hf-cache", "llava", "someorg/tiny-llava")
    assert src.path.resolve() == snap.resolve()


def test_profiles_are_valid() -> None:
    profiles = available_profiles()
    assert {"llava", "llava-next", "llava-tiny"} <= set(profiles)
    for p in profiles.values():
        assert p.model_type in ("llava", "llava_next")
        BuildConfig(dtype=p.dtype or "float32", max_input_len=p.max_input_len or 2048)


def test_build_config_validates_and_hashes() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        BuildConfig(backend="vllm")
    with pytest.raises(ValueError, match="the onnx backend exports float32 graphs"):
        BuildConfig(backend="onnx", dtype="bfloat16")
    a, b = BuildConfig(), BuildConfig(compression=CompressionConfig(budget=0.2))
    assert a.compute_hash() != b.compute_hash()
    assert a.compute_hash() == BuildConfig.from_dict(a.to_dict()).compute_hash()
    # chunk_size changes memory, not results: same hash
    assert a.compute_hash() == BuildConfig(compression=CompressionConfig(chunk_size=7)).compute_hash()


def test_bundled_profile_missing_model_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("vlcache.builder.source.bundled_path", lambda name: tmp_path / name)
    with pytest.raises(UserError, match=r"bundled model 'llava-tiny' not found .*train_tiny_llava.py"):
        resolve_source("llava-tiny")


def test_tensorrt_engines_get_the_builds_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the PostVisionStats kernel compiles p in; the build passes its VL-Cache threshold (none for others)
    import vlcache_plugins.build as plugin_build
    from vlcache.builder import build as build_mod

    calls: list[dict] = []
    monkeypatch.setattr(build_mod, "_export_onnx", lambda *a, **k: None)
    monkeypatch.setattr(plugin_build, "build_engines", lambda *a, **k: calls.append(k))
    for comp in (CompressionConfig.create("vlcache", 0.1, threshold=0.03), CompressionConfig.create("snapkv", 0.1)):
        cfg = BuildConfig(backend="tensorrt", dtype="float16", compression=comp)
        build_mod._build_engines(None, tmp_path / "engines", cfg, lambda msg: None)
    assert calls[0]["threshold"] == 0.03 and calls[0]["dtype"] == "float16"
    assert "threshold" not in calls[1]
