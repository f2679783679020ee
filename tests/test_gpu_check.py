"""scripts/gpu_check.{sh,py} (docs/gpu-check.md) as far as a machine without a GPU takes it.

* On this machine (made GPU-less for the test even where a GPU exists: nvidia-smi off PATH, no CUDA
  device visible) the check exits 0 and reports every GPU step as skipped, with the reason.
* The requirements of each step, decided from the host's facts: GPU, CUDA, TensorRT, TensorRT-LLM and
  vlcache's trtllm backend.
* The comparison against ONNX Runtime's answers: equal and different outputs, token ids before text,
  a missing budget; the JSON line of vlcache-generate's stdout; pytest's junit counts.
* The deadline: a step it leaves no time for fails, with the reason.
* ``--backends torch`` runs the whole path a GPU backend takes (build, generate, compare with ONNX
  Runtime, serve with a real tritonserver, bench) on the CPU (markers slow and triton).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
WRAPPER = REPO / "scripts" / "gpu_check.sh"
GPU_BACKENDS = ("tensorrt", "trtllm")
KINDS = ("build", "generate", "compare", "serve", "bench")


@pytest.fixture(scope="module")
def gpu_check() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def gpu_less_env(tmp_path: Path) -> dict[str, str]:
    """This environment without a GPU: PATH without nvidia-smi, no CUDA device visible to torch."""
    folders = [p for p in os.environ["PATH"].split(os.pathsep) if p and not (Path(p) / "nvidia-smi").exists()]
    return {**os.environ, "PATH": os.pathsep.join(folders), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def steps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in report["steps"]}


# --- on this machine ---------------------------------------------------------------------------
def test_without_a_gpu_every_gpu_step_is_skipped_with_its_reason(tmp_path: Path):
    out = tmp_path / "report"
    done = subprocess.run(
        ["bash", str(WRAPPER), "--out", str(out)],
        capture_output=True,
        text=True,
        env=gpu_less_env(tmp_path),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["ok"] and not report["ran_on_gpu"]
    assert report["failures"] == []
    by_name = steps(report)
    assert by_name["probe"]["status"] == "passed"
    assert report["host"]["nvidia_smi"] is None and report["host"]["cuda_available"] is False
    gpu_steps = ["pytest"] + [f"{kind}:{backend}" for backend in GPU_BACKENDS for kind in KINDS]
    for name in gpu_steps:
        step = by_name[name]
        assert step["status"] == "skipped", name
        assert "nvidia-smi is not on PATH" in step["reason"], name
        assert "no CUDA: torch.cuda.is_available() is False" in step["reason"], name
        assert step["command"] is None and step["seconds"] == 0, "a skipped step runs nothing"
    if importlib.util.find_spec("tensorrt") is None:
        for name in ["pytest"] + [f"{kind}:tensorrt" for kind in KINDS]:
            assert "no TensorRT: `import tensorrt` fails" in by_name[name]["reason"], name
    for kind in KINDS:
        assert (
            "TensorRT-LLM" in by_name[f"{kind}:trtllm"]["reason"]
            or "no trtllm backend" in by_name[f"{kind}:trtllm"]["reason"]
        )
    # The ONNX Runtime reference is only built when there is something to compare it with.
    for name in ("build:onnx", "generate:onnx"):
        assert by_name[name]["status"] == "skipped"
        assert "nothing to compare with" in by_name[name]["reason"]
    assert set(by_name) == {"probe", "build:onnx", "generate:onnx", *gpu_steps}
    md = (out / "report.md").read_text()
    assert "nothing ran on a GPU" in md and "nvidia-smi is not on PATH" in md
    for name in by_name:
        assert f"| {name} |" in md
    assert "# vlcache GPU check" in done.stdout  # the report is printed too


def test_a_fake_nvidia_smi_is_read_and_cuda_is_still_required(gpu_check, tmp_path: Path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 570.86.15, 143771, 9.0'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{gpu_less_env(tmp_path)['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    facts = gpu_check.probe(timeout=120)
    assert facts["gpus"] == [
        {"name": "NVIDIA H200", "driver": "570.86.15", "memory_mib": "143771", "compute_capability": "9.0"}
    ]
    missing = gpu_check.gpu_missing(facts)
    assert len(missing) == 1 and missing[0].startswith("no CUDA"), missing


# --- requirements --------------------------------------------------------------------------------
def _facts(**changes: Any) -> dict[str, Any]:
    facts = {
        "nvidia_smi": "/usr/bin/nvidia-smi",
        "nvidia_smi_error": None,
        "gpus": [{"name": "NVIDIA H200"}],
        "torch": "2.13.0+cu130",
        "torch_cuda": "13.0",
        "cuda_available": True,
        "tensorrt": "10.13.3.9",
        "tensorrt_error": None,
        "tensorrt_llm": "1.1.0",
        "tensorrt_llm_error": None,
        "build_backends": ["auto", "onnx", "tensorrt", "torch", "trtllm"],
    }
    return {**facts, **changes}


def test_requirements_of_each_backend(gpu_check):
    need = gpu_check.requirements_missing
    full = _facts()
    assert [need(what, full) for what in ("pytest", "tensorrt", "trtllm", "onnx", "torch")] == [[]] * 5

    no_llm = _facts(tensorrt_llm=None, tensorrt_llm_error="ModuleNotFoundError: No module named 'tensorrt_llm'")
    assert need("tensorrt", no_llm) == []
    assert need("trtllm", no_llm) == [
        "no TensorRT-LLM: `import tensorrt_llm` fails (ModuleNotFoundError: No module named 'tensorrt_llm')"
    ]
    old_vlcache = _facts(build_backends=["auto", "onnx", "tensorrt", "torch"])
    (why,) = need("trtllm", old_vlcache)
    assert "has no trtllm backend" in why and "auto, onnx, tensorrt, torch" in why

    no_trt = _facts(tensorrt=None, tensorrt_error="ImportError: libnvinfer.so.10: cannot open shared object file")
    assert need("tensorrt", no_trt) == need("pytest", no_trt)
    assert "libnvinfer.so.10" in need("tensorrt", no_trt)[0]

    broken_driver = _facts(nvidia_smi_error="NVIDIA-SMI has failed because it couldn't communicate with the driver")
    assert need("tensorrt", broken_driver)[0].startswith("no NVIDIA GPU: nvidia-smi failed (NVIDIA-SMI has failed")
    cpu_torch = _facts(torch="2.13.0+cpu", torch_cuda=None, cuda_available=False)
    assert need("tensorrt", cpu_torch) == [
        "no CUDA: torch.cuda.is_available() is False (torch 2.13.0+cpu, built for CUDA none)"
    ]
    assert need("torch", _facts(nvidia_smi=None, cuda_available=False, tensorrt=None)) == []


# --- comparing answers ---------------------------------------------------------------------------
def _run(budget: float, text: str, kept: list[int], **extra: Any) -> dict[str, Any]:
    return {"backend": "x", "budget": budget, "text": text, "kept_per_layer": kept, "output_tokens": 3, **extra}


def test_equal_outputs_compare_equal(gpu_check):
    onnx = {"runs": [_run(1.0, "= 9", [265, 265]), _run(0.1, "= 9", [30, 17])]}
    other = {"runs": [_run(0.1, "= 9", [30, 17]), _run(1.0, "= 9", [265, 265])]}  # order does not matter
    result = gpu_check.compare_outputs(onnx, other)
    assert result["equal"] and result["problems"] == []
    assert [(r["budget"], r["compared"], r["equal"], r["kept_equal"]) for r in result["budgets"]] == [
        (1.0, "text", True, True),
        (0.1, "text", True, True),
    ]


def test_different_outputs_are_found_with_the_position(gpu_check):
    onnx = {"runs": [_run(1.0, "= 9", [265, 265]), _run(0.1, "= 9", [30, 17])]}
    other = {"runs": [_run(1.0, "= 9", [265, 265]), _run(0.1, "= 4", [29, 18])]}
    result = gpu_check.compare_outputs(onnx, other)
    assert not result["equal"]
    (row_full, row_small) = result["budgets"]
    assert row_full["equal"] and not row_small["equal"] and not row_small["kept_equal"]
    assert row_small["first_difference"] == 2
    assert result["problems"] == ["budget 0.1: text differ from position 2: '= 9' (reference) vs '= 4'"]


def test_token_ids_are_compared_before_text_and_kept_tokens_do_not_fail(gpu_check):
    same_text_other_tokens = gpu_check.compare_outputs(
        {"runs": [_run(0.1, "ab", [3], token_ids=[5, 6, 7])]},
        {"runs": [_run(0.1, "ab", [4], token_ids=[5, 6])]},
    )
    (row,) = same_text_other_tokens["budgets"]
    assert row["compared"] == "tokens" and row["first_difference"] == 2 and not same_text_other_tokens["equal"]
    only_kept_differs = gpu_check.compare_outputs(_run(0.1, "ab", [3]), _run(0.1, "ab", [4]))  # one-budget form
    assert only_kept_differs["equal"] and not only_kept_differs["budgets"][0]["kept_equal"]


def test_a_budget_missing_from_one_output_is_a_difference(gpu_check):
    result = gpu_check.compare_outputs(
        {"runs": [_run(1.0, "x", [1]), _run(0.1, "x", [1])]}, {"runs": [_run(1.0, "x", [1])]}
    )
    assert not result["equal"]
    assert result["problems"] == ["budget 0.1: only in the reference output"]


def test_the_json_line_of_vlcache_generate_is_found(gpu_check):
    stdout = "\n".join(
        [
            "[budget 1] = 9",
            "[budget 0.1] = 9",
            " budget  answer           kept tokens   KV bytes  of full",
            "{not json",
            json.dumps({"runs": [_run(1.0, "= 9", [1]), _run(0.1, "= 9", [1])]}),
            "some warning printed on exit",
        ]
    )
    parsed = gpu_check.parse_json_line(stdout, "runs")
    assert [r["budget"] for r in gpu_check.generate_runs(parsed)] == [1.0, 0.1]
    assert gpu_check.parse_json_line(stdout, "results") is None


def test_junit_counts(gpu_check, tmp_path: Path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu"><skipped message="needs TensorRT"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_check.junit_summary(xml)
    assert (summary["tests"], summary["passed"], summary["failures"], summary["skipped"]) == (3, 1, 1, 1)
    assert summary["failed_tests"] == [{"test": "tests.test_a::test_bad", "message": "assert 1 == 2"}]
    assert summary["skipped_tests"] == [{"test": "tests.test_b::test_gpu", "reason": "needs TensorRT"}]


# --- deadline and exit status ----------------------------------------------------------------------
def test_a_step_the_deadline_leaves_no_time_for_fails(gpu_check, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "probe", lambda timeout: _facts(nvidia_smi=None, cuda_available=False))
    out = tmp_path / "late"
    status = gpu_check.main(["--out", str(out), "--backends", "torch", "--deadline", "10"])
    assert status == 1
    report = json.loads((out / "report.json").read_text())
    by_name = steps(report)
    assert by_name["build:onnx"]["status"] == "failed" and by_name["build:onnx"]["reason"].startswith("out of time")
    assert by_name["build:onnx"]["command"] is None, "nothing was started"
    assert by_name["generate:onnx"]["status"] == "skipped"
    assert by_name["build:torch"]["status"] == "failed" and "out of time" in by_name["build:torch"]["reason"]
    assert {by_name[f"{k}:torch"]["status"] for k in KINDS[1:]} == {"skipped"}
    assert report["failures"] == [
        {"step": "build:onnx", "reason": by_name["build:onnx"]["reason"]},
        {"step": "build:torch", "reason": by_name["build:torch"]["reason"]},
    ]
    assert "**FAILED**" in (out / "report.md").read_text()
    capsys.readouterr()


def test_require_gpu_exits_3_when_no_gpu_step_ran(gpu_check, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "probe", lambda timeout: _facts(nvidia_smi=None, cuda_available=False))
    assert gpu_check.main(["--out", str(tmp_path / "a")]) == 0
    assert gpu_check.main(["--out", str(tmp_path / "b"), "--require-gpu"]) == 3
    capsys.readouterr()


def test_a_trtllm_artifact_is_built_and_its_unchecked_steps_say_why(gpu_check, tmp_path: Path, monkeypatch, capsys):
    """With TensorRT-LLM "present" (and no TensorRT): the trtllm build runs for real (it only writes
    files), generate / compare / bench are skipped because vlcache's CLIs do not run the llmapi model,
    and the load by tritonserver needs a tritonserver on PATH."""
    facts = _facts(tensorrt=None, tensorrt_error="ModuleNotFoundError: No module named 'tensorrt'")
    monkeypatch.setattr(gpu_check, "probe", lambda timeout: facts)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    out = tmp_path / "trtllm"
    assert gpu_check.main(["--out", str(out), "--backends", "trtllm"]) == 0
    by_name = steps(json.loads((out / "report.json").read_text()))
    assert by_name["pytest"]["status"] == "skipped" and "no TensorRT" in by_name["pytest"]["reason"]
    build = by_name["build:trtllm"]
    assert build["status"] == "passed", build["tail"]
    assert "--backend trtllm" in build["command"] and build["figures"]["backend"] == "trtllm"
    assert (out / "artifacts" / "trtllm" / "triton" / "tensorrt_llm" / "1" / "model.yaml").is_file()
    for kind in ("generate", "compare", "bench"):
        assert by_name[f"{kind}:trtllm"]["status"] == "skipped"
        assert "llmapi" in by_name[f"{kind}:trtllm"]["reason"]
    assert by_name["serve:trtllm"]["status"] == "skipped"
    assert "no tritonserver on PATH" in by_name["serve:trtllm"]["reason"]
    assert by_name["build:onnx"]["reason"] == "nothing to compare with: no backend runs"
    capsys.readouterr()


# --- the whole path on the CPU ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.triton
def test_the_cpu_backend_runs_every_step_a_gpu_backend_takes(tmp_path: Path):
    """build → generate → compare with ONNX Runtime → serve (real tritonserver) → bench, with torch."""
    from vlcache.errors import UserError
    from vlcache.serving.server import find_tritonserver

    try:
        find_tritonserver()
    except UserError as e:  # pragma: no cover - CI installs the serve extra
        pytest.skip(f"no Triton server to run: {e}")
    if importlib.util.find_spec("sklearn") is None:  # pragma: no cover - the eval extra draws digits:0
        pytest.skip("scikit-learn is not installed (the digits scenes)")
    out = tmp_path / "cpu"
    cmd = ["bash", str(WRAPPER), "--out", str(out), "--backends", "torch", "--requests", "2", "--warmup", "0"]
    done = subprocess.run(
        [*cmd, "--max-tokens", "4"], capture_output=True, text=True, env=gpu_less_env(tmp_path), timeout=600
    )
    report = json.loads((out / "report.json").read_text())
    by_name = steps(report)
    assert done.returncode == 0, json.dumps(report["failures"]) + done.stderr[-3000:]
    for name in ("build:onnx", "generate:onnx", *(f"{kind}:torch" for kind in KINDS)):
        assert by_name[name]["status"] == "passed", (name, by_name[name]["reason"])
    assert by_name["pytest"]["status"] == "skipped"
    compare = by_name["compare:torch"]["figures"]
    assert compare["equal"] and [r["budget"] for r in compare["budgets"]] == [1.0, 0.1]
    assert all(r["compared"] == "text" and r["reference_text"] for r in compare["budgets"])
    assert by_name["serve:torch"]["figures"]["exit_status"] == 0
    bench = by_name["bench:torch"]["figures"]
    assert [s["budget"] for s in bench["summaries"]] == [1.0, 0.1]
    assert all(s["succeeded"] == 2 and s["failed"] == 0 for s in bench["summaries"])
    assert bench["triton_metrics"]["nv_inference_request_success"] == 4  # 2 per budget, no warm-up
    assert "nv_inference_queue_duration_us" in bench["triton_metrics"]
    assert (out / "bench" / "torch" / "results.json").is_file()
    md = (out / "report.md").read_text()
    assert "## Answers against onnx" in md and "## Benchmarks" in md
