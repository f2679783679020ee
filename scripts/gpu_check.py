"""The first GPU, one command: every GPU step of vlcache, timed, compared and reported (docs/gpu-check.md).

    bash scripts/gpu_check.sh                      # = .venv/bin/python scripts/gpu_check.py
    bash scripts/gpu_check.sh --out out/gpu_check --requests 16 --require-gpu

Steps, in order (each has its own timeout, and all of them share one deadline, 570 s by default, so the
whole check fits in 10 minutes on one GPU):

1. ``probe``: what the host has: ``nvidia-smi`` and its GPUs, torch and CUDA, TensorRT
   (``python -c 'import tensorrt'``), TensorRT-LLM (``python -c 'import tensorrt_llm'``), the backends
   ``vlcache-build`` accepts, scikit-learn (the digits scenes).
2. ``pytest``: ``pytest -m "gpu or tensorrt"`` (every test marked for a GPU or TensorRT).
3. ``build:onnx``, ``generate:onnx``: the ONNX Runtime reference: ``vlcache-build --backend onnx`` and
   ``vlcache-generate ARTIFACT --image digits:0 --prompt ... --budget 1.0,0.1``.
4. For each backend of ``--backends`` (``tensorrt``, ``trtllm``): ``build:B`` (``vlcache-build --backend
   B``), ``generate:B`` (the same question), ``compare:B`` (the answers against ONNX Runtime's, per
   budget: token ids where both outputs carry them, else the text), ``serve:B`` (``vlcache-serve
   ARTIFACT --grpc-port 0 ...`` on 127.0.0.1) and ``bench:B`` (``vlcache-bench --budgets 1.0,0.1
   --requests N`` against it; the server's Triton metrics and the GPU memory in use are read after it).

A step whose requirements are missing is *skipped* with the reason (no nvidia-smi, no CUDA, no
TensorRT, no TensorRT-LLM, vlcache has no trtllm backend, an earlier step did not pass); on a machine
without a GPU every GPU step is skipped and the check exits 0. A step that the deadline leaves no time
for *fails* ("out of time"): the check did not do what it was asked to. ``--backends torch`` (or
``onnx``) runs the same build → generate → compare → serve → bench path on the CPU (what the tests do).

Writes ``OUT/report.json`` (every figure, every failure; rewritten after each step, ``complete``
false until the end) and ``OUT/report.md``, the logs of every command under ``OUT/logs/``, the
artifacts under ``OUT/artifacts/`` and vlcache-bench's results under ``OUT/bench/``.

Exit status: 0 when no step failed (skipped steps are not failures), 1 when one did, 3 with
``--require-gpu`` when no GPU step could run, 130 when interrupted (the report says how far it got).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REPORT_FORMAT = 1
MODEL = "llava-tiny"
IMAGE = "digits:0"
PROMPT = "what is at row 1 col 2 ?"
BUDGETS = "1.0,0.1"
DEFAULT_BACKENDS = ("tensorrt", "trtllm")
GPU_BACKENDS = ("tensorrt", "trtllm")
CPU_BACKENDS = ("torch",)  # runs the same path without a GPU (the tests use it)
REFERENCE = "onnx"
KINDS = ("build", "generate", "compare", "serve", "bench")
#: Backends whose artifact is TensorRT-LLM's llmapi Triton model (docs/trtllm.md): vlcache-generate,
#: vlcache-serve and vlcache-bench do not run it, so only its build and its load by tritonserver are checked.
LLMAPI_BACKENDS = ("trtllm",)
LLMAPI_UNCHECKED = (
    "not checked: a trtllm artifact is TensorRT-LLM's llmapi model (its own protocol), which vlcache-generate "
    "and vlcache-bench do not speak (docs/trtllm.md)"
)
#: Seconds each kind of step may take at most; every step also stops at the shared deadline.
TIMEOUTS = {"probe": 150.0, "pytest": 180.0, "build": 180.0, "generate": 90.0, "serve": 150.0, "bench": 120.0}
DEADLINE = 570.0
MIN_STEP_SECONDS = 15.0  # a step is not started with less time than this left
TAIL_LINES = 40
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


def log(message: str) -> None:
    print(f"[gpu_check {datetime.now(timezone.utc).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tool(name: str) -> str:
    """A console script of this environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name) or name


# --- facts about the host ----------------------------------------------------------------------
_PYTHON_PROBE = r"""
import importlib.util, json
out = {"sklearn": importlib.util.find_spec("sklearn") is not None}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if out["cuda_available"] else []
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import vlcache
    from vlcache.config import BUILD_BACKENDS
    out["vlcache"] = vlcache.__version__
    out["build_backends"] = list(BUILD_BACKENDS)
except Exception as e:
    out["vlcache_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run_quiet(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(returncode, stdout, stderr) of a short command; returncode None when it could not run or timed out."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "", f"{type(e).__name__}: {e}"
    return done.returncode, done.stdout, done.stderr


def probe_module(module: str, timeout: float) -> tuple[str | None, str | None]:
    """(version, None) when ``python -c 'import MODULE'`` works, else (None, why)."""
    code, out, err = _run_quiet(
        [sys.executable, "-c", f"import {module} as m; print(getattr(m, '__version__', '?'))"], timeout
    )
    if code == 0:
        return _last_line(out) or "?", None
    return None, _last_line(err) or (f"exit status {code}" if code is not None else "did not finish")


def probe(timeout: float = TIMEOUTS["probe"]) -> dict[str, Any]:
    """Everything the steps' requirements are decided on (see :func:`gpu_missing`)."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "nvidia_smi": shutil.which("nvidia-smi"),
        "gpus": [],
        "nvidia_smi_error": None,
    }
    if facts["nvidia_smi"]:
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        code, out, err = _run_quiet([facts["nvidia_smi"], query, "--format=csv,noheader,nounits"], 30)
        if code == 0:
            for line in out.strip().splitlines():
                parts = [p.strip() for p in line.split(",")]
                if parts and parts[0]:
                    keys = ("name", "driver", "memory_mib", "compute_capability")
                    facts["gpus"].append(dict(zip(keys, parts)))
        else:
            facts["nvidia_smi_error"] = _last_line(err) or _last_line(out) or f"exit status {code}"
    code, out, err = _run_quiet([sys.executable, "-c", _PYTHON_PROBE], timeout)
    try:
        facts.update(json.loads(_last_line(out)))
    except ValueError:
        facts["torch_error"] = _last_line(err) or "the Python probe printed nothing"
    facts.setdefault("cuda_available", False)
    facts.setdefault("build_backends", [])
    facts["tensorrt"], facts["tensorrt_error"] = probe_module("tensorrt", timeout)
    facts["tensorrt_llm"], facts["tensorrt_llm_error"] = probe_module("tensorrt_llm", timeout)
    return facts


def gpu_missing(facts: dict[str, Any]) -> list[str]:
    """Why this host cannot run a GPU step ([] when it can): no NVIDIA GPU, or no CUDA in torch."""
    why = []
    if not facts.get("nvidia_smi"):
        why.append("no NVIDIA GPU: nvidia-smi is not on PATH")
    elif facts.get("nvidia_smi_error"):
        why.append(f"no NVIDIA GPU: nvidia-smi failed ({facts['nvidia_smi_error']})")
    elif not facts.get("gpus"):
        why.append("no NVIDIA GPU: nvidia-smi lists none")
    if not facts.get("cuda_available"):
        if facts.get("torch_error"):
            why.append(f"no CUDA: torch does not import ({facts['torch_error']})")
        else:
            why.append(
                f"no CUDA: torch.cuda.is_available() is False (torch {facts.get('torch')}, "
                f"built for CUDA {facts.get('torch_cuda') or 'none'})"
            )
    return why


def requirements_missing(what: str, facts: dict[str, Any]) -> list[str]:
    """Why ``what`` (a backend's steps, or ``pytest``) cannot run here ([] when it can)."""
    if what in CPU_BACKENDS or what == REFERENCE:
        return []
    why = gpu_missing(facts)
    if what in ("tensorrt", "pytest") and not facts.get("tensorrt"):
        why.append(f"no TensorRT: `import tensorrt` fails ({facts.get('tensorrt_error')})")
    if what == "trtllm":
        if not facts.get("tensorrt_llm"):
            why.append(f"no TensorRT-LLM: `import tensorrt_llm` fails ({facts.get('tensorrt_llm_error')})")
        if "trtllm" not in facts.get("build_backends", []):
            choices = ", ".join(facts.get("build_backends", [])) or "unknown"
            why.append(f"this vlcache has no trtllm backend (vlcache-build --backend takes {choices})")
    return why


# --- comparing generate outputs ----------------------------------------------------------------
def parse_json_line(text: str, key: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object with ``key`` (vlcache's CLIs end stdout with one)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and key in value:
                return value
    return None


def generate_runs(output: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a ``vlcache-generate`` JSON line: ``{"runs": [...]}`` (several budgets) or one stats dict."""
    return list(output["runs"]) if "runs" in output else [output]


def token_ids(run: dict[str, Any]) -> list[int] | None:
    for key in ("token_ids", "tokens", "output_ids"):
        value = run.get(key)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return value
    return None


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (the shorter length if one extends the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(reference: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Compare two ``vlcache-generate`` outputs budget by budget.

    Token ids where both runs carry them, else the text, must be equal; every budget must be in both.
    Kept tokens per layer are reported (``kept_equal``) but a difference there is not a failure: another
    precision can reorder near-equal scores without changing the answer. Returns ``{"equal", "budgets":
    [per-budget rows], "problems": [one line per difference]}``.
    """
    ref = {round(float(r["budget"]), 6): r for r in generate_runs(reference)}
    cand = {round(float(r["budget"]), 6): r for r in generate_runs(candidate)}
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for budget in sorted(set(ref) | set(cand), reverse=True):
        r, c = ref.get(budget), cand.get(budget)
        if r is None or c is None:
            problems.append(f"budget {budget:g}: only in the {'reference' if c is None else 'candidate'} output")
            continue
        row: dict[str, Any] = {
            "budget": budget,
            "reference_text": r.get("text"),
            "candidate_text": c.get("text"),
            "reference_kept_per_layer": r.get("kept_per_layer"),
            "candidate_kept_per_layer": c.get("kept_per_layer"),
            "kept_equal": r.get("kept_per_layer") == c.get("kept_per_layer"),
            "reference_output_tokens": r.get("output_tokens"),
            "candidate_output_tokens": c.get("output_tokens"),
        }
        ref_ids, cand_ids = token_ids(r), token_ids(c)
        if ref_ids is not None and cand_ids is not None:
            row["compared"], a, b = "tokens", ref_ids, cand_ids
        elif isinstance(r.get("text"), str) and isinstance(c.get("text"), str):
            row["compared"], a, b = "text", r["text"], c["text"]
        else:
            row.update(compared=None, equal=False, first_difference=None)
            problems.append(f"budget {budget:g}: an output carries neither token ids nor text")
            rows.append(row)
            continue
        row["first_difference"] = first_difference(a, b)
        row["equal"] = row["first_difference"] is None
        if not row["equal"]:
            problems.append(
                f"budget {budget:g}: {row['compared']} differ from position {row['first_difference']}: "
                f"{r.get('text')!r} (reference) vs {c.get('text')!r}"
            )
        rows.append(row)
    return {"equal": not problems, "budgets": rows, "problems": problems}


# --- pytest's junit report ---------------------------------------------------------------------
def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failed / skipped tests of a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            element = case.find(tag)
            if element is not None:
                failed.append({"test": name, "message": (element.get("message") or "")[:500]})
        element = case.find("skipped")
        if element is not None:
            skipped.append({"test": name, "reason": (element.get("message") or "")[:300]})
    return {**counts, "failed_tests": failed, "skipped_tests": skipped}


# --- steps -------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    status: str = "pending"
    reason: str = ""
    seconds: float = 0.0
    command: str | None = None
    returncode: int | None = None
    timeout: float | None = None
    log: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    tail: list[str] = field(default_factory=list)


class OutOfTime(Exception):
    pass


class Check:
    """One run of the check: the steps so far, the report, the deadline."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.started = now_iso()
        self.argv = list(argv)
        self.timeouts = {**TIMEOUTS, **args.timeouts}
        self.steps: list[Step] = []
        self.facts: dict[str, Any] = {}
        self.complete = False
        self.interrupted = False

    # time
    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def budget_for(self, kind: str) -> float:
        left = self.left() - 5.0
        if left < MIN_STEP_SECONDS:
            raise OutOfTime(f"out of time: {max(left + 5.0, 0):.0f} s of the {self.args.deadline:g} s deadline left")
        return min(self.timeouts[kind], left)

    # steps
    def step(self, name: str) -> Step:
        step = Step(name)
        self.steps.append(step)
        return step

    def get(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def ok(self, name: str) -> bool:
        step = self.get(name)
        return step is not None and step.status == PASSED

    def skip(self, name: str, reason: str) -> Step:
        step = self.step(name)
        step.status, step.reason = SKIPPED, reason
        log(f"{name}: skipped: {reason}")
        self.write()
        return step

    def finish(self, step: Step, status: str, reason: str = "", started: float | None = None) -> Step:
        step.status, step.reason = status, reason
        if started is not None:
            step.seconds = round(time.monotonic() - started, 2)
        if status == FAILED and step.log and not step.tail:
            step.tail = tail(self.out / step.log)
        log(f"{step.name}: {status}" + (f": {reason}" if reason else "") + f" ({step.seconds:g} s)")
        self.write()
        return step

    def run(self, step: Step, cmd: list[str], kind: str) -> tuple[int | None, str]:
        """Run ``cmd`` (stdout and stderr to ``logs/STEP.log``) within the step's time; (status, output)."""
        timeout = self.budget_for(kind)
        step.command, step.timeout = shlex.join(cmd), round(timeout, 1)
        path = self.logs / (step.name.replace(":", "-") + ".log")
        step.log = str(path.relative_to(self.out))
        log(f"{step.name}: $ {step.command}  (timeout {timeout:.0f} s)")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with path.open("w") as sink:
            process = subprocess.Popen(
                cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                step.returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_group(process)
                step.returncode = None
            except BaseException:
                stop_group(process)
                raise
        return step.returncode, path.read_text(errors="replace")

    # the report
    def report(self) -> dict[str, Any]:
        counts = {s: sum(1 for step in self.steps if step.status == s) for s in (PASSED, FAILED, SKIPPED)}
        gpu_steps = [s for s in self.steps if is_gpu_step(s.name)]
        return {
            "format": REPORT_FORMAT,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "ok": counts[FAILED] == 0 and not self.interrupted,
            "ran_on_gpu": any(s.status != SKIPPED for s in gpu_steps),
            "started": self.started,
            "finished": now_iso(),
            "seconds": round(time.monotonic() - self.start, 1),
            "deadline_seconds": self.args.deadline,
            "command": shlex.join([sys.executable, str(Path(__file__)), *self.argv]),
            "settings": {
                "model": self.args.model,
                "backends": self.args.backends,
                "reference": REFERENCE,
                "image": self.args.image,
                "prompt": self.args.prompt,
                "budgets": BUDGETS,
                "requests": self.args.requests,
                "max_tokens": self.args.max_tokens,
                "timeouts": self.timeouts,
            },
            "host": self.facts,
            "gpu_missing": gpu_missing(self.facts) if self.facts else [],
            "summary": counts,
            "steps": [asdict(s) for s in self.steps],
            "failures": [{"step": s.name, "reason": s.reason} for s in self.steps if s.status == FAILED],
        }

    def write(self) -> dict[str, Any]:
        report = self.report()
        (self.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (self.out / "report.md").write_text(markdown(report))
        return report


def is_gpu_step(name: str) -> bool:
    return name == "pytest" or name.split(":")[-1] in GPU_BACKENDS


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def stop_group(process: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM to the process group this check started (its own session), then SIGKILL after ``grace``."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the steps themselves ----------------------------------------------------------------------
def step_probe(check: Check) -> None:
    step = check.step("probe")
    started = time.monotonic()
    step.command = "nvidia-smi --query-gpu=...; python -c 'import torch, vlcache'; python -c 'import tensorrt'; python -c 'import tensorrt_llm'"
    check.facts = probe(timeout=min(check.timeouts["probe"], max(check.left(), 30.0)))  # always runs
    step.figures = dict(check.facts)
    missing = gpu_missing(check.facts)
    check.finish(step, PASSED, "GPU: " + ("; ".join(missing) if missing else "yes"), started)


def step_pytest(check: Check) -> None:
    missing = requirements_missing("pytest", check.facts)
    if missing:
        check.skip("pytest", "; ".join(missing))
        return
    step = check.step("pytest")
    started = time.monotonic()
    xml = check.logs / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    code, _ = check.run(step, cmd, "pytest")
    if xml.is_file():
        step.figures = junit_summary(xml)
    if code is None:
        check.finish(step, FAILED, f"timed out after {step.timeout:g} s", started)
    elif code != 0:
        check.finish(step, FAILED, f"pytest exited {code} ({_counts(step.figures)})", started)
    elif step.figures.get("passed", 0) == 0:
        check.finish(step, FAILED, f"no gpu/tensorrt test ran ({_counts(step.figures)})", started)
    else:
        check.finish(step, PASSED, _counts(step.figures), started)


def _counts(figures: dict[str, Any]) -> str:
    keys = ("passed", "failures", "errors", "skipped")
    return ", ".join(f"{figures[k]} {k}" for k in keys if k in figures) or "no junit report"


def step_build(check: Check, backend: str) -> Path | None:
    step = check.step(f"build:{backend}")
    started = time.monotonic()
    artifact = check.out / "artifacts" / backend
    cmd = [tool("vlcache-build"), "--model", check.args.model, "--backend", backend, "--out", str(artifact), "--force"]
    code, output = check.run(step, cmd, "build")
    summary = parse_json_line(output, "config_hash")
    if summary:
        step.figures = summary
    if code != 0 or not (artifact / "manifest.json").is_file():
        why = f"timed out after {step.timeout:g} s" if code is None else f"vlcache-build exited {code}"
        check.finish(step, FAILED, why, started)
        return None
    check.finish(step, PASSED, f"{summary.get('files') if summary else '?'} files", started)
    return artifact


def step_generate(check: Check, backend: str, artifact: Path) -> dict[str, Any] | None:
    step = check.step(f"generate:{backend}")
    started = time.monotonic()
    cmd = [tool("vlcache-generate"), str(artifact), "--image", check.args.image, "--prompt", check.args.prompt]
    cmd += ["--budget", BUDGETS, "--max-tokens", str(check.args.max_tokens)]
    code, output = check.run(step, cmd, "generate")
    result = parse_json_line(output, "runs")
    if result:
        step.figures = result
    if code != 0 or result is None:
        why = f"timed out after {step.timeout:g} s" if code is None else f"vlcache-generate exited {code}"
        check.finish(step, FAILED, why + ("" if result else "; no JSON line"), started)
        return None
    answers = ", ".join(f"{r['budget']:g}: {r.get('text')!r}" for r in generate_runs(result))
    check.finish(step, PASSED, answers, started)
    return result


def step_compare(
    check: Check, backend: str, reference: dict[str, Any] | None, candidate: dict[str, Any] | None
) -> None:
    name = f"compare:{backend}"
    if reference is None:
        check.skip(name, f"no {REFERENCE} output to compare with (generate:{REFERENCE} did not pass)")
        return
    if candidate is None:
        check.skip(name, f"no {backend} output (generate:{backend} did not pass)")
        return
    step = check.step(name)
    step.command = f"compare generate:{REFERENCE} with generate:{backend}, budget by budget"
    step.figures = compare_outputs(reference, candidate)
    if step.figures["equal"]:
        kept = "" if all(r["kept_equal"] for r in step.figures["budgets"]) else " (kept tokens per layer differ)"
        check.finish(step, PASSED, f"same answers as {REFERENCE} at every budget{kept}")
    else:
        check.finish(step, FAILED, "; ".join(step.figures["problems"]))


class Served:
    """``vlcache-serve`` in the background in its own session; its output goes to the step's log."""

    READY = re.compile(r"ready: gRPC (\S+), HTTP (\S+), metrics (\S+);")

    def __init__(self, check: Check, step: Step, artifact: Path) -> None:
        timeout = check.budget_for("serve")
        cmd = [tool("vlcache-serve"), str(artifact), "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
        cmd += ["--timeout", f"{timeout:.0f}"]
        step.command, step.timeout = shlex.join(cmd) + " &", round(timeout, 1)
        path = check.logs / (step.name.replace(":", "-") + ".log")
        step.log = str(path.relative_to(check.out))
        log(f"{step.name}: $ {step.command}  (timeout {timeout:.0f} s)")
        self.sink = path.open("w")
        self.process = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.endpoints: tuple[str, str, str] | None = None
        ready = threading.Event()

        def reader() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.sink.write(line)
                self.sink.flush()
                match = self.READY.search(line)
                if match:
                    self.endpoints = (match.group(1), match.group(2), match.group(3))
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=reader, daemon=True)
        self.reader.start()
        try:
            ready.wait(timeout)
        except BaseException:  # interrupted while it starts: leave no server behind
            self.stop()
            raise

    def stop(self) -> int | None:
        if self.process.poll() is None:
            # vlcache-serve alone: it stops tritonserver and exits 0 (the group gets SIGKILL if it hangs).
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop_group(self.process, grace=0.0)
        self.reader.join(timeout=5)
        self.sink.close()
        return self.process.returncode


def step_serve_and_bench(check: Check, backend: str, artifact: Path) -> None:
    serve = check.step(f"serve:{backend}")
    started = time.monotonic()
    server = Served(check, serve, artifact)
    try:
        if server.endpoints is None:
            status = server.process.poll()
            why = f"vlcache-serve exited {status}" if status is not None else f"not ready after {serve.timeout:g} s"
            check.finish(serve, FAILED, why, started)
            check.skip(f"bench:{backend}", f"serve:{backend} failed")
            return
        grpc, http, metrics = server.endpoints
        serve.figures = {
            "grpc": grpc,
            "http": http,
            "metrics": metrics,
            "ready_seconds": round(time.monotonic() - started, 2),
        }
        check.finish(serve, PASSED, f"ready in {serve.figures['ready_seconds']:g} s on {grpc}", started)
        bench = check.step(f"bench:{backend}")
        bench_started = time.monotonic()
        cmd = [tool("vlcache-bench"), "--url", grpc, "--budgets", BUDGETS, "--requests", str(check.args.requests)]
        cmd += ["--warmup", str(check.args.warmup), "--max-tokens", str(check.args.max_tokens), "--timeout", "60"]
        cmd += ["--out", str(check.out / "bench" / backend), "--force"]
        code, output = check.run(bench, cmd, "bench")
        results = parse_json_line(output, "results")
        if results:
            bench.figures["summaries"] = results["results"]
        bench.figures["triton_metrics"] = triton_metrics(metrics)
        if check.facts.get("nvidia_smi") and not check.facts.get("nvidia_smi_error"):
            bench.figures["gpu_memory_used_mib"] = gpu_memory_used(check.facts["nvidia_smi"])
        if code is None:
            check.finish(bench, FAILED, f"timed out after {bench.timeout:g} s", bench_started)
        elif code != 0 or results is None:
            failed = sum(s.get("failed", 0) for s in results["results"]) if results else None
            why = f"vlcache-bench exited {code}" + (f" ({failed} requests failed)" if failed else "")
            check.finish(bench, FAILED, why, bench_started)
        else:
            check.finish(bench, PASSED, bench_line(results["results"]), bench_started)
    finally:
        status = server.stop()
        serve.figures["exit_status"] = status
        if serve.status == PASSED and status not in (0, None):
            serve.status, serve.reason = FAILED, f"vlcache-serve exited {status} when stopped (0 expected)"
            serve.tail = tail(check.out / serve.log) if serve.log else []
        check.write()


def bench_line(summaries: list[dict[str, Any]]) -> str:
    parts = []
    for s in summaries:
        ttft = (s.get("ttft_ms") or {}).get("p50")
        parts.append(
            f"budget {s.get('budget'):g}: TTFT p50 {_ms(ttft)} ms, {s.get('output_tokens_per_s', 0):.1f} tok/s"
        )
    return "; ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def triton_metrics(address: str, model: str | None = "vlcache") -> dict[str, float] | str:
    """Triton's nv_inference_* series of ``model`` (every model: None), summed over their other labels
    (the HPA's adapter reads two of them), and the nv_gpu_* series by their labels."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError as e:
        return f"unreadable: {e}"
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(nv_\w+)\{([^}]*)\} (\S+)$", line)
        wanted = model is None or f'model="{model}"' in match.group(2) if match else False
        if match and (wanted or match.group(1).startswith("nv_gpu")):
            key = (
                match.group(1) if match.group(1).startswith("nv_inference") else f"{match.group(1)}{{{match.group(2)}}}"
            )
            try:
                found[key] = found.get(key, 0.0) + float(match.group(3))
            except ValueError:
                continue
    return found


def gpu_memory_used(nvidia_smi: str) -> list[int] | str:
    code, out, err = _run_quiet([nvidia_smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], 30)
    if code != 0:
        return f"nvidia-smi failed: {_last_line(err)}"
    return [int(x) for x in re.findall(r"\d+", out)]


def run_check(check: Check) -> None:
    step_probe(check)
    guarded(check, "pytest", lambda: step_pytest(check))
    plans = {backend: requirements_missing(backend, check.facts) for backend in check.args.backends}
    compared = [b for b, missing in plans.items() if not missing and b not in LLMAPI_BACKENDS]
    reference: dict[str, Any] | None = None
    if check.args.reference == "always" or (check.args.reference == "auto" and compared):
        artifact = guarded(check, f"build:{REFERENCE}", lambda: step_build(check, REFERENCE))
        if artifact is not None:
            reference = guarded(check, f"generate:{REFERENCE}", lambda: step_generate(check, REFERENCE, artifact))
        else:
            check.skip(f"generate:{REFERENCE}", f"build:{REFERENCE} did not pass")
    else:
        why = "--reference never" if check.args.reference == "never" else "nothing to compare with: no backend runs"
        check.skip(f"build:{REFERENCE}", why)
        check.skip(f"generate:{REFERENCE}", why)
    for backend in check.args.backends:
        names = {kind: f"{kind}:{backend}" for kind in KINDS}
        if plans[backend]:
            for name in names.values():
                check.skip(name, "; ".join(plans[backend]))
            continue
        built = guarded(check, names["build"], partial(step_build, check, backend))
        if built is None:
            for name in names.values():
                if check.get(name) is None:
                    check.skip(name, f"{names['build']} did not pass")
            continue
        artifact = built
        if backend in LLMAPI_BACKENDS:
            # TensorRT-LLM's llmapi model: tritonserver loads it; vlcache's CLIs do not speak its protocol.
            for kind in ("generate", "compare"):
                check.skip(names[kind], LLMAPI_UNCHECKED)
            guarded(check, names["serve"], partial(step_serve_llmapi, check, backend, artifact))
            check.skip(names["bench"], LLMAPI_UNCHECKED)
            continue
        candidate = guarded(check, names["generate"], partial(step_generate, check, backend, artifact))
        step_compare(check, backend, reference, candidate)
        guarded(check, names["serve"], partial(step_serve_and_bench, check, backend, artifact))
        for name in (names["serve"], names["bench"]):
            if check.get(name) is None:
                check.skip(name, f"{names['serve']} did not run")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step_serve_llmapi(check: Check, backend: str, artifact: Path) -> None:
    """A trtllm artifact's repository (TensorRT-LLM's llmapi model) loaded by the tritonserver on PATH
    (the Triton TensorRT-LLM image's), on 127.0.0.1, until /v2/health/ready answers 200; then stopped."""
    name = f"serve:{backend}"
    binary = shutil.which("tritonserver")
    if binary is None:
        check.skip(
            name,
            "no tritonserver on PATH (a Triton TensorRT-LLM image has one; vlcache-serve refuses trtllm artifacts)",
        )
        return
    step = check.step(name)
    started = time.monotonic()
    timeout = check.budget_for("serve")
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [binary, f"--model-repository={artifact / 'triton'}"]
    cmd += [f"--{k}-address=127.0.0.1" for k in ports] + [f"--{k}-port={v}" for k, v in ports.items()]
    step.command, step.timeout = shlex.join(cmd) + " &", round(timeout, 1)
    path = check.logs / (name.replace(":", "-") + ".log")
    step.log = str(path.relative_to(check.out))
    log(f"{name}: $ {step.command}  (timeout {timeout:.0f} s)")
    with path.open("w") as sink:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = False
            while time.monotonic() - started < timeout and process.poll() is None:
                try:
                    url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        ready = response.status == 200
                except OSError:
                    pass
                if ready:
                    break
                time.sleep(2)
            step.figures = {**ports, "ready_seconds": round(time.monotonic() - started, 2) if ready else None}
            if ready:
                step.figures["triton_metrics"] = triton_metrics(f"127.0.0.1:{ports['metrics']}", model=None)
        finally:
            status = process.poll()
            stop_group(process)
            step.returncode = process.returncode
    if ready:
        check.finish(step, PASSED, f"the llmapi model loaded in {step.figures['ready_seconds']:g} s", started)
    elif status is not None:
        check.finish(step, FAILED, f"tritonserver exited {status} before the model was ready", started)
    else:
        check.finish(step, FAILED, f"not ready after {timeout:.0f} s", started)


def guarded(check: Check, name: str, action: Callable[[], Any]) -> Any:
    """Run a step's function. Out of time, or a crash of the check itself: the steps it left
    unfinished (or ``name``, when it had not begun it) fail with the reason."""
    try:
        return action()
    except OutOfTime as e:
        reason = str(e)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as e:
        reason = f"{type(e).__name__}: {e}"
    status = FAILED
    for step in check.steps:
        if step.status == "pending":
            check.finish(step, status, reason)
    if check.get(name) is None:
        check.finish(check.step(name), status, reason)
    return None


# --- the Markdown report -----------------------------------------------------------------------
def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    host, summary = report["host"], report["summary"]
    if report["interrupted"]:
        result = "**INTERRUPTED**"
    elif not report["ok"]:
        result = f"**FAILED** ({summary['failed']} failed steps)"
    elif not report["ran_on_gpu"]:
        result = "**passed, but nothing ran on a GPU** (every GPU step was skipped)"
    else:
        result = "**passed**"
    lines = [
        "# vlcache GPU check",
        "",
        f"- result: {result}; {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped"
        + ("" if report["complete"] else " (incomplete: the check was still running or was stopped)"),
        f"- run: {report['started']} to {report['finished']}, {report['seconds']:g} s of the {report['deadline_seconds']:g} s deadline",
        f"- command: `{report['command']}`",
    ]
    if host:
        gpus = ", ".join(
            f"{g.get('name')} ({g.get('memory_mib')} MiB, driver {g.get('driver')})" for g in host.get("gpus", [])
        )
        lines += [
            f"- GPU: {gpus or 'none'}" + (f" — {'; '.join(report['gpu_missing'])}" if report["gpu_missing"] else ""),
            f"- torch {host.get('torch')} (CUDA {host.get('torch_cuda') or 'none'}, available: {host.get('cuda_available')}), "
            f"TensorRT {host.get('tensorrt') or 'no'}, TensorRT-LLM {host.get('tensorrt_llm') or 'no'}, "
            f"vlcache {host.get('vlcache')} (backends: {', '.join(host.get('build_backends', []))}), Python {host.get('python')}",
        ]
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:g} | {_cell(s['reason'])} |")
    compares = [s for s in report["steps"] if s["name"].startswith("compare:") and s["figures"].get("budgets")]
    if compares:
        settings = report["settings"]
        lines += [
            "",
            f"## Answers against {settings['reference']}",
            "",
            f"`vlcache-generate ARTIFACT --image {settings['image']} --prompt {shlex.quote(settings['prompt'])} "
            f"--budget {settings['budgets']} --max-tokens {settings['max_tokens']}` on each artifact.",
            "",
            f"| backend | budget | {settings['reference']} | backend's | compared | equal | kept per layer ({settings['reference']} / backend's) |",
            "|---|---:|---|---|---|---|---|",
        ]
        for s in compares:
            backend = s["name"].split(":", 1)[1]
            for row in s["figures"]["budgets"]:
                lines.append(
                    f"| {backend} | {row['budget']:g} | {_cell(repr(row['reference_text']))} | {_cell(repr(row['candidate_text']))} "
                    f"| {row['compared']} | {'yes' if row['equal'] else '**no**'} "
                    f"| {row['reference_kept_per_layer']} / {row['candidate_kept_per_layer']} |"
                )
    benches = [s for s in report["steps"] if s["name"].startswith("bench:") and s["figures"].get("summaries")]
    if benches:
        lines += [
            "",
            "## Benchmarks (vlcache-bench over gRPC, one server per backend)",
            "",
            "| backend | budget | requests | failed | TTFT p50 / p99 ms | ITL p50 ms | latency p50 / p99 ms | tokens/s | requests/s | KV bytes after | kept |",
            "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|",
        ]
        for s in benches:
            backend = s["name"].split(":", 1)[1]
            for b in s["figures"]["summaries"]:
                ttft, itl, lat = b.get("ttft_ms") or {}, b.get("itl_ms") or {}, b.get("latency_ms") or {}
                kept = b.get("kv_kept_fraction_mean")
                lines.append(
                    f"| {backend} | {b.get('budget'):g} | {b.get('requests')} | {b.get('failed')} "
                    f"| {_ms(ttft.get('p50'))} / {_ms(ttft.get('p99'))} | {_ms(itl.get('p50'))} "
                    f"| {_ms(lat.get('p50'))} / {_ms(lat.get('p99'))} | {b.get('output_tokens_per_s', 0):.1f} "
                    f"| {b.get('requests_per_s', 0):.2f} | {b.get('kv_bytes_after_mean') or 0:.0f} "
                    f"| {'-' if kept is None else f'{kept:.1%}'} |"
                )
        for s in benches:
            if s["figures"].get("gpu_memory_used_mib") is not None:
                lines.append(
                    f"\nGPU memory in use after bench:{s['name'].split(':', 1)[1]}: {s['figures']['gpu_memory_used_mib']} MiB"
                )
    failed = [s for s in report["steps"] if s["status"] == FAILED]
    lines += ["", "## Failures", ""]
    if not failed:
        lines.append("None.")
    for s in failed:
        lines += [f"### {s['name']}", "", s["reason"], ""]
        if s["command"]:
            lines += [f"`{s['command']}`" + (f" (log: `{s['log']}`)" if s["log"] else ""), ""]
        if s["tail"]:
            lines += ["```", *s["tail"], "```", ""]
    skipped = sorted({s["reason"] for s in report["steps"] if s["status"] == SKIPPED})
    if skipped:
        lines += ["", "## Why steps were skipped", ""] + [f"- {reason}" for reason in skipped]
    lines += ["", "Every figure is in report.json beside this file."]
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------------
def _timeout_setting(text: str) -> tuple[str, float]:
    kind, _, seconds = text.partition("=")
    if kind not in TIMEOUTS or not seconds:
        raise argparse.ArgumentTypeError(f"expected KIND=SECONDS with KIND one of {', '.join(TIMEOUTS)}, got {text!r}")
    return kind, float(seconds)


def _backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in GPU_BACKENDS + CPU_BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"backends: choose from {', '.join(GPU_BACKENDS + CPU_BACKENDS)}, got {text!r}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_check",
        description="vlcache's GPU steps in one command, with one report (docs/gpu-check.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "out" / "gpu_check", help="report, logs, artifacts, bench results"
    )
    p.add_argument(
        "--backends",
        type=_backends,
        default=list(DEFAULT_BACKENDS),
        help="backends to build, compare with ONNX Runtime, serve and bench (tensorrt, trtllm; torch or onnx run the same path on a CPU)",
    )
    p.add_argument(
        "--reference",
        choices=("auto", "always", "never"),
        default="auto",
        help="build and run the ONNX Runtime reference: auto = when a backend runs",
    )
    p.add_argument("--model", default=MODEL, help="what vlcache-build --model builds")
    p.add_argument("--image", default=IMAGE, help="vlcache-generate --image of the comparison")
    p.add_argument("--prompt", default=PROMPT, help="vlcache-generate --prompt of the comparison")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the comparison and of the bench requests")
    p.add_argument("--requests", type=int, default=16, help="vlcache-bench --requests (per budget)")
    p.add_argument("--warmup", type=int, default=2, help="vlcache-bench --warmup (per budget)")
    p.add_argument("--deadline", type=float, default=DEADLINE, help="seconds for the whole check")
    p.add_argument(
        "--timeout",
        dest="timeouts",
        type=_timeout_setting,
        action="append",
        default=[],
        metavar="KIND=SECONDS",
        help=f"a step kind's timeout ({', '.join(f'{k}={v:g}' for k, v in TIMEOUTS.items())})",
    )
    p.add_argument("--require-gpu", action="store_true", help="exit 3 when no GPU step could run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.timeouts = dict(args.timeouts)
    args.out = args.out.resolve()
    check = Check(args, argv)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = (
        signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        run_check(check)
        check.complete = True
    except KeyboardInterrupt:
        check.interrupted = True
        for step in check.steps:
            if step.status == "pending":
                step.status, step.reason = FAILED, "interrupted"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        report = check.write()
    log(f"report: {check.out / 'report.md'} and report.json")
    print(markdown(report))
    if check.interrupted:
        return 130
    if not report["ok"]:
        return 1
    if args.require_gpu and not report["ran_on_gpu"]:
        log("--require-gpu: no GPU step ran")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
