"""`vlcache-build --backend onnx` + `vlcache-generate`: the artifact a CPU user gets by default, run
as it is served, against the torch backend built from the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlcache.artifact import verify_artifact
from vlcache.cli.build import main as build_main
from vlcache.cli.generate import main as generate_main

PROMPT = "what is at row 1 col 2 ?"


@pytest.fixture(scope="module")
def artifacts(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for backend in ("onnx", "torch"):
        out[backend] = root / backend
        args = ["--model", str(checkpoint), "--backend", backend, "--out", str(out[backend])]
        assert build_main([*args, "--max-input-len", "300", "--budget", "0.1"]) == 0
    return out


def _generate(artifact: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, dict]:
    assert generate_main([str(artifact), "--image", "digits:3", "--prompt", PROMPT, "--max-tokens", "6", *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def test_onnx_artifact_layout_and_manifest(artifacts: dict[str, Path]) -> None:
    m = verify_artifact(artifacts["onnx"])
    assert m.backend == "onnx" and m.build.compression.budget == 0.1 and m.build.max_input_len == 300
    names = set(m.files)
    assert {"onnx/decoder.onnx", "onnx/vision.onnx", "onnx/export.json", "processor/tokenizer.json"} <= names
    assert "onnxruntime" in m.raw["versions"] and "onnx" in m.raw["versions"]
    assert any(n.startswith("triton/vlcache/") for n in names)


@pytest.mark.parametrize("budget", ["1.0", "0.1"])
def test_onnx_generates_what_torch_generates(
    artifacts: dict[str, Path], capsys: pytest.CaptureFixture[str], budget: str
) -> None:
    text_onnx, s_onnx = _generate(artifacts["onnx"], capsys, "--budget", budget)
    text_torch, s_torch = _generate(artifacts["torch"], capsys, "--budget", budget)
    assert text_onnx == text_torch and text_onnx.strip()
    assert (s_onnx["backend"], s_torch["backend"]) == ("onnx", "torch")
    assert s_onnx["kept_per_layer"] == s_torch["kept_per_layer"]
    m, layers = s_onnx["prompt_tokens"], len(s_onnx["kept_per_layer"])
    assert sum(s_onnx["kept_per_layer"]) == round(float(budget) * layers * m)
    assert s_onnx["kv_bytes_after"] == s_torch["kv_bytes_after"]
    expected_after = s_onnx["kv_bytes_before"] * sum(s_onnx["kept_per_layer"]) / (layers * m)
    assert s_onnx["kv_bytes_after"] == pytest.approx(expected_after)


def test_several_budgets_answer_side_by_side_like_single_runs(
    artifacts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    single = {b: _generate(artifacts["onnx"], capsys, "--budget", b) for b in ("1.0", "0.1")}
    argv = [str(artifacts["onnx"]), "--image", "digits:3", "--prompt", PROMPT, "--max-tokens", "6"]
    assert generate_main([*argv, "--budget", "1.0,0.1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    runs = json.loads(out[-1])["runs"]
    assert [r["budget"] for r in runs] == [1.0, 0.1]
    for r, b in zip(runs, ("1.0", "0.1")):
        text, stats = single[b]
        assert r["text"].strip() == text.strip() and r["kept_per_layer"] == stats["kept_per_layer"]
        assert r["kv_bytes_after"] == stats["kv_bytes_after"]
    assert runs[0]["kv_bytes_after"] == runs[0]["kv_bytes_before"] > runs[1]["kv_bytes_after"]
    table = "\n".join(out[:-1])
    assert "[budget 1] " in table and "[budget 0.1] " in table and "of full" in table and "100.0%" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "/no/such.png"], "no such file"),
        (["--image", "digits:x"], "expected digits:N"),
        (["--budget", "1.5"], "budget"),
        (["--budget", "1.0,x"], "'x' is not a number"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        (["--prompt", "  "], "--prompt is empty"),
    ],
)
def test_user_mistakes_are_one_line_errors(
    artifacts: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = {"--image": "digits:0", "--prompt": PROMPT}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    extra = [x for kv in base.items() for x in kv if kv[0] not in args[::2]] + args
    with pytest.raises(SystemExit) as e:
        generate_main([str(artifacts["onnx"]), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_changed_graph_is_refused(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    art = tmp_path / "copy"
    shutil.copytree(artifacts["onnx"], art)
    with (art / "onnx" / "decoder.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit):
        generate_main([str(art), "--image", "digits:0", "--prompt", PROMPT])
    assert "onnx/decoder.onnx changed since the build" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main([str(tmp_path / "nothing"), "--image", "digits:0", "--prompt", PROMPT])
    assert "artifact directory not found" in capsys.readouterr().err
