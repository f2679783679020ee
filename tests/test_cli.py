"""vlcache.cli: what the commands share — one CLI shape for build, eval, generate, serve and bench.

Every usage error is one line ``PROG: error: ... (see --help)`` with exit status 2, user mistakes
found later end the same way, Ctrl-C exits 130; ``--out/-o`` refuses a non-empty folder without
``--force``; ``--method`` / ``--methods`` are checked against ``vlcache.methods.available()``;
``--max-tokens`` has one default. Every case runs ``main([...])`` in-process, no model needed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tomllib

from vlcache import cli
from vlcache.cli import DEFAULT_MAX_TOKENS, Parser, UserError, parse_budgets, run_main
from vlcache.cli import bench as bench_cli
from vlcache.cli import build as build_cli
from vlcache.cli import eval as eval_cli
from vlcache.cli import generate as generate_cli
from vlcache.cli import serve as serve_cli
from vlcache.methods import available

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "vlcache-build": build_cli,
    "vlcache-eval": eval_cli,
    "vlcache-generate": generate_cli,
    "vlcache-serve": serve_cli,
    "vlcache-bench": bench_cli,
}
GENERATE = ["ARTIFACT", "--image", "digits:0", "--prompt", "what ?"]  # its required arguments


def _fails(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of a ``main`` that must exit."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


def _one_line_error(prog: str, err: str) -> None:
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "usage:" not in err and "Traceback" not in err


# --- the five commands: one module each, one parser class, one error path ----------------------------
def test_every_console_script_is_a_main_of_the_cli_package() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)
        assert module is COMMANDS[name] and attr == "main" and module.__name__.startswith("vlcache.cli.")
        parser = module.build_parser()
        assert isinstance(parser, Parser) and parser.prog == name == module.PROG


@pytest.mark.parametrize(
    ("prog", "argv", "message"),
    [
        ("vlcache-build", ["--bogus"], "unrecognized arguments: --bogus"),
        ("vlcache-build", ["--max-batch-size", "x"], "argument --max-batch-size: invalid int value: 'x'"),
        ("vlcache-eval", ["--bogus"], "unrecognized arguments: --bogus"),
        ("vlcache-eval", ["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        ("vlcache-eval", ["--methods", " , "], "argument --methods: empty"),
        ("vlcache-generate", [], "the following arguments are required: artifact, --image, --prompt"),
        ("vlcache-generate", [*GENERATE, "--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
        ("vlcache-serve", [], "the following arguments are required: artifact_dir"),
        ("vlcache-serve", ["ARTIFACT", "--bogus"], "unrecognized arguments: --bogus"),
        ("vlcache-serve", ["ARTIFACT", "--instances", "0"], "argument --instances: must be >= 1, got 0"),
        ("vlcache-bench", ["--bogus"], "unrecognized arguments: --bogus"),
        ("vlcache-bench", ["--concurrency", "0"], "argument --concurrency: must be >= 1, got 0"),
        ("vlcache-bench", ["--max-tokens", "0"], "argument --max-tokens: must be >= 1, got 0"),
        ("vlcache-bench", ["--output", "x"], "unrecognized arguments: --output x"),  # one output flag: --out
    ],
)
def test_usage_errors_are_one_line_with_status_2(
    prog: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _fails(COMMANDS[prog].main, argv, capsys)
    assert code == 2
    _one_line_error(prog, err)
    assert message in err and err.endswith(" (see --help)\n"), err


@pytest.mark.parametrize(
    ("prog", "argv"),
    [
        ("vlcache-build", ["--method", "nope"]),
        ("vlcache-eval", ["--methods", "full,nope"]),
        ("vlcache-generate", [*GENERATE, "--method", "nope"]),
        ("vlcache-bench", ["--method", "nope"]),
    ],
)
def test_an_unknown_method_is_refused_by_every_command_that_takes_one(
    prog: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _fails(COMMANDS[prog].main, argv, capsys)
    assert code == 2
    _one_line_error(prog, err)
    assert f"unknown method 'nope'; known methods: {', '.join(available())} (see --help)" in err


def test_known_methods_pass_the_same_check() -> None:
    known = available()
    assert build_cli.build_parser().parse_args(["--method", known[-1]]).method == known[-1]
    assert generate_cli.build_parser().parse_args([*GENERATE, "--method", known[0]]).method == known[0]
    assert bench_cli.build_parser().parse_args(["--method", known[1]]).method == known[1]
    assert eval_cli.build_parser().parse_args(["--methods", f"{known[1]}, {known[0]},{known[1]}"]).methods == [
        known[1],
        known[0],
    ]
    assert eval_cli.build_parser().parse_args([]).methods == eval_cli.DEFAULT_METHODS.split(",")


# --- one token flag, one output flag ------------------------------------------------------------------
def test_max_tokens_has_one_name_and_one_default() -> None:
    assert generate_cli.build_parser().parse_args(GENERATE).max_tokens == DEFAULT_MAX_TOKENS
    assert bench_cli.build_parser().parse_args([]).max_tokens == DEFAULT_MAX_TOKENS
    assert eval_cli.build_parser().parse_args([]).max_tokens is None  # the task's answer length
    assert eval_cli.build_parser().parse_args(["--max-tokens", "9"]).max_tokens == 9
    for module in COMMANDS.values():
        flags = {s for a in module.build_parser()._actions for s in a.option_strings}
        assert "--max-new-tokens" not in flags and "--output" not in flags


def test_every_output_flag_is_out_o_with_force() -> None:
    for module in (build_cli, eval_cli, bench_cli):
        parser = module.build_parser()
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"--out", "-o", "--force"} <= flags
        args = parser.parse_args(["-o", "somewhere"])
        assert args.out == Path("somewhere") and args.force is False
    assert build_cli.build_parser().parse_args([]).out is None  # artifacts/<model>
    assert eval_cli.build_parser().parse_args([]).out is None  # out/eval/<task>
    assert eval_cli.default_out("digits") == Path("out/eval/digits")
    assert eval_cli.default_out("data/charts.jsonl") == Path("out/eval/charts")
    assert bench_cli.build_parser().parse_args([]).out == Path("out/bench")


def _occupied(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


def test_eval_refuses_a_non_empty_out_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _occupied(tmp_path)
    argv = ["--model", str(tmp_path / "nowhere"), "--samples", "1", "--no-progress", "--out", str(out)]
    code, err = _fails(eval_cli.main, argv, capsys)
    assert code == 2
    _one_line_error("vlcache-eval", err)
    assert f"--out {out} exists and is not empty; pass --force to replace it" in err
    # with --force the run gets past the check (and stops at the missing model), leaving the folder alone
    code, err = _fails(eval_cli.main, [*argv, "--force"], capsys)
    assert code == 2 and "model directory not found" in err and "not empty" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bench_refuses_a_non_empty_out_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlcache.serving.server import free_port

    out = _occupied(tmp_path)
    argv = ["--url", f"127.0.0.1:{free_port()}", "--requests", "1", "--out", str(out)]
    code, err = _fails(bench_cli.main, argv, capsys)
    assert code == 2
    _one_line_error("vlcache-bench", err)
    assert f"--out {out} exists and is not empty; pass --force to replace it" in err
    code, err = _fails(bench_cli.main, [*argv, "--force"], capsys)
    assert code == 2 and "no ready vlcache model at" in err and "not empty" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("")
    code, err = _fails(bench_cli.main, [*argv[:-1], str(tmp_path / "file"), "--force"], capsys)
    assert code == 2 and "exists and is not a folder" in err


def test_build_refuses_a_non_empty_out_without_force(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _occupied(tmp_path)
    argv = ["--model", str(checkpoint), "--backend", "torch", "--max-input-len", "300", "-o", str(out)]
    code, err = _fails(build_cli.main, argv, capsys)
    assert code == 2
    assert (
        err.splitlines()[-1]
        == f"vlcache-build: error: --out {out.absolute()} exists and is not empty; pass --force to replace it"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bench_writes_out_all_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The measurement stubbed: results.json and summary.csv land in --out; --force replaces it."""
    import json

    from vlcache.client import bench

    summary = {"budget": 1.0, "method": None, "concurrency": 1, "requests": 1, "succeeded": 1, "failed": 0,
               "ttft_ms": {}, "itl_ms": {}, "latency_ms": {}}  # fmt: skip

    async def measured(args: argparse.Namespace, budgets: list[float]) -> tuple[list, list]:
        assert budgets == [1.0] and args.max_tokens == 4
        return [summary], [{"index": 0, "budget": 1.0}]

    monkeypatch.setattr(bench, "run", measured)
    monkeypatch.setattr(bench, "format_table", lambda s: "table")
    monkeypatch.setattr(bench, "write_plots", lambda out, s, r: [])
    out = _occupied(tmp_path)
    argv = ["--budgets", "1.0", "--max-tokens", "4", "--out", str(out), "--force"]
    assert bench_cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "summary.csv"]  # keep.txt replaced
    assert json.loads((out / "results.json").read_text())["results"] == [summary]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"results": [summary]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    summary["failed"] = 1
    assert bench_cli.main(argv) == 1  # some requests failed


# --- Ctrl-C --------------------------------------------------------------------------------------------
def test_ctrl_c_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from vlcache.client import bench
    from vlcache.serving.server import TritonServer

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupt)
    code, err = _fails(bench_cli.main, ["--out", str(tmp_path / "b")], capsys)
    assert (code, err) == (130, "vlcache-bench: interrupted; nothing written\n")
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(TritonServer, "for_artifact", interrupt)
    code, err = _fails(serve_cli.main, [str(tmp_path)], capsys)
    assert (code, err) == (130, "vlcache-serve: interrupted; tritonserver stopped\n")


# --- run_main and UserError ----------------------------------------------------------------------------
def test_run_main_ends_user_errors_on_one_line_and_passes_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    parser = Parser(prog="prog")

    def fail(args: argparse.Namespace) -> None:
        raise UserError("no such thing")

    assert run_main(parser, lambda a: {"a": 1}, []) == 0
    assert run_main(parser, lambda a: 1, []) == 1
    assert run_main(parser, lambda a: True, []) == 0  # a bool is not a status
    code, err = _fails(lambda argv: run_main(parser, fail, argv), [], capsys)
    assert (code, err) == (2, "prog: error: no such thing\n")
    with pytest.raises(ValueError, match="a bug"):  # not a user mistake: a traceback, as it should be
        run_main(parser, lambda a: (_ for _ in ()).throw(ValueError("a bug")), [])


def test_library_errors_are_user_errors_and_keep_their_bases() -> None:
    from vlcache.artifact import ArtifactError
    from vlcache.atomic import OutputDirError
    from vlcache.hf.loading import CheckpointError
    from vlcache.runtime.tensorrt_support import TensorRTUnavailableError
    from vlcache.serving.repository import RenderError
    from vlcache.serving.request import InvalidRequest

    for error in (ArtifactError, OutputDirError, CheckpointError, RenderError, InvalidRequest):
        assert issubclass(error, UserError) and issubclass(error, ValueError)
    assert issubclass(TensorRTUnavailableError, UserError) and issubclass(TensorRTUnavailableError, RuntimeError)
    assert cli.UserError is sys.modules["vlcache.errors"].UserError


def test_the_command_error_classes_are_gone_and_errors_is_framework_free() -> None:
    import vlcache.builder
    import vlcache.client.bench
    import vlcache.eval
    import vlcache.serving.server

    for module, name in [
        (vlcache.builder, "BuildError"),
        (vlcache.eval, "EvalError"),
        (vlcache.serving.server, "ServeError"),
        (vlcache.client.bench, "BenchError"),
    ]:
        assert not hasattr(module, name)
    for gone in ("vlcache.eval.models", "vlcache.eval.cli", "vlcache.builder.cli", "vlcache.serving.generate_cli"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)
    tree = ast.parse((REPO / "vlcache" / "errors.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports)


# --- --budgets -------------------------------------------------------------------------------------------
def test_budgets_keep_their_order_without_repeats() -> None:
    assert parse_budgets("1.0, 0.1,,0.05,0.1") == [1.0, 0.1, 0.05]
    assert parse_budgets("1") == [1.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.1,0", "budget 0 is outside (0, 1] in --budgets"),
        ("1.5", "budget 1.5 is outside (0, 1] in --budgets"),
        ("nan", "budget nan is outside (0, 1]"),
        ("abc", "bad budget 'abc' in --budgets"),
        (" , ", "--budgets is empty"),
    ],
)
def test_bad_budgets_are_one_line_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_budgets(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_message_names_the_flag() -> None:
    with pytest.raises(ValueError, match="in --alphas"):
        parse_budgets("2", flag="--alphas")


# --- the compression flags: common fields, and each method's own settings ----------------------------
def test_a_setting_flag_the_method_does_not_read_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _fails(build_cli.main, ["--method", "vlcache", "--pool-kernel", "3", "--dry-run"], capsys)
    assert code == 2
    _one_line_error("vlcache-build", err)
    assert "--pool-kernel is not a setting of method 'vlcache' (its settings: --threshold" in err


def test_setting_flags_reach_the_manifest_and_only_the_methods_own(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert build_cli.main(["--method", "snapkv", "--window", "7", "--budget", "0.2", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    comp = plan["build"]["compression"]
    assert (comp["method"], comp["budget"], comp["settings"]) == ("snapkv", 0.2, {"window": 7, "pool_kernel": 5})
    # the default method's settings are its own defaults when no flag is given
    assert build_cli.main(["--dry-run"]) == 0
    settings = json.loads(capsys.readouterr().out)["build"]["compression"]["settings"]
    assert settings == {"threshold": 0.01, "query_window": None, "recent_fraction": 0.1}
