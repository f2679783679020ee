"""vlcache-bench without a server: the batching summaries (stats, table, CSV) and the capacity mode's
search, probes and command line, over a fake client whose "pool" admits a known number of rows."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vlcache.cli import bench as bench_cli
from vlcache.client import bench, capacity
from vlcache.client.client import Generation, ServerError, ServerGone
from vlcache.client.stats import summarize
from vlcache.errors import UserError


def gen(output_tokens: int = 5, **stats: Any) -> Generation:
    return Generation(
        text="x",
        ttft=0.1,
        inter_token_latencies=[0.01] * max(output_tokens - 1, 0),
        latency=0.2,
        output_tokens=output_tokens,
        prompt_tokens=10,
        responses=output_tokens,
        stats=stats,
    )


# --- batching summaries ----------------------------------------------------------------------------------
def test_batch_size_mean_is_weighted_by_decode_steps_and_the_rest_are_maxima() -> None:
    gens = [
        gen(5, batch_size_mean=2.0, batch_size_max=3, pool_occupancy_peak=0.5, pool_capacity_bytes=2**20,
            pool_bytes=100, queue_seconds=0.010),
        gen(2, batch_size_mean=4.0, batch_size_max=4, pool_occupancy_peak=0.875, pool_capacity_bytes=2**20,
            pool_bytes=300, queue_seconds=0.030),
        gen(1, batch_size_mean=0.0, batch_size_max=0, pool_occupancy_peak=0.25, pool_capacity_bytes=2**20,
            pool_bytes=200, queue_seconds=0.020),  # no decode step: no weight
    ]  # fmt: skip
    s = summarize(gens, 1.0)
    assert s["batch_size_mean"] == pytest.approx((2.0 * 4 + 4.0 * 1) / 5)  # 2.4, not the plain mean 2.0 or 3.0
    assert (s["batch_size_max"], s["pool_occupancy_peak"], s["pool_capacity_bytes"]) == (4, 0.875, 2**20)
    assert s["pool_bytes_mean"] == pytest.approx(200.0)
    assert s["queue_ms"]["p50"] == pytest.approx(20.0) and s["queue_ms"]["p90"] == pytest.approx(28.0)
    assert summarize([gen(1, batch_size_mean=0.0, batch_size_max=0)], 1.0)["batch_size_mean"] == 0.0


def test_stats_of_an_older_server_give_none_and_dashes(tmp_path: Path) -> None:
    old = summarize([gen(5, kv_bytes_after=10), gen(3)], 1.0)  # no batching keys at all
    for key in ("batch_size_mean", "batch_size_max", "pool_occupancy_peak", "pool_capacity_bytes", "pool_bytes_mean"):
        assert old[key] is None, key
    assert old["queue_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    mixed = summarize([gen(5), gen(3, batch_size_mean=3.0, batch_size_max=3, queue_seconds=0.5)], 1.0)
    assert (mixed["batch_size_mean"], mixed["batch_size_max"], mixed["queue_ms"]["p50"]) == (3.0, 3, 500.0)

    old["budget"] = 1.0
    bare = {"budget": 0.1, "requests": 1, "succeeded": 1}  # a summary missing most keys still prints
    text = bench.format_table([old, bare])
    batching = text.split("(server batching")[1].splitlines()
    assert batching[1].split() == ["budget", "batch", "mean", "batch", "max", "pool", "peak", "pool", "MiB",
                                   "queue", "p50", "queue", "p90"]  # fmt: skip
    assert batching[3].split() == ["1", "-", "-", "-", "-", "-", "-"]
    assert batching[4].split() == ["0.1", "-", "-", "-", "-", "-", "-"]
    bench.write_csv(tmp_path / "s.csv", [old, bare])
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert rows[0]["batch_size_max"] == "" and rows[0]["queue_ms_p90"] == "" and rows[1]["ttft_ms_p50"] == ""


def test_table_and_csv_show_the_batching(tmp_path: Path) -> None:
    gens = [gen(5, batch_size_mean=2.5, batch_size_max=4, pool_occupancy_peak=0.87, pool_capacity_bytes=3 * 2**20,
                queue_seconds=0.004)]  # fmt: skip
    s = {"budget": 0.1, **summarize(gens, 1.0)}
    row = bench.format_table([s]).splitlines()[-1].split()
    assert row == ["0.1", "2.50", "4", "87%", "3.0", "4.0", "4.0"]
    no_pool = {**s, "pool_capacity_bytes": 0}
    assert bench.format_table([no_pool]).splitlines()[-1].split()[4] == "none"
    bench.write_csv(tmp_path / "s.csv", [s])
    (row,) = csv.DictReader((tmp_path / "s.csv").open())
    assert (row["batch_size_mean"], row["batch_size_max"], row["pool_occupancy_peak"]) == ("2.5", "4", "0.87")
    assert float(row["queue_ms_p50"]) == pytest.approx(4.0) and row["pool_capacity_bytes"] == str(3 * 2**20)


def test_run_budget_reports_the_servers_batching() -> None:
    class Client:
        async def generate(self, image: bytes, prompt: str, max_tokens: int, budget: float, method: Any, **kw: Any):
            return gen(max_tokens, batch_size_mean=2.0, batch_size_max=2, pool_occupancy_peak=0.4, queue_seconds=0.1)

    class Bar:
        def update(self, n: int) -> None:
            pass

    args = argparse.Namespace(warmup=0, requests=4, duration=None, concurrency=2, max_tokens=3, method=None, timeout=1)
    summary, records = asyncio.run(bench.run_budget(Client(), [(b"png", "q")], 0.5, args, Bar()))  # type: ignore[arg-type]
    assert (summary["succeeded"], summary["batch_size_mean"], summary["batch_size_max"]) == (4, 2.0, 2)
    assert summary["pool_occupancy_peak"] == 0.4 and summary["queue_ms"]["p99"] == pytest.approx(100.0)
    assert [r["index"] for r in records] == [0, 1, 2, 3]


# --- the capacity search ---------------------------------------------------------------------------------
def _search(boundary: int, max_concurrency: int) -> tuple[tuple[int, int | None], list[int]]:
    calls: list[int] = []

    async def probe(c: int) -> bool:
        calls.append(c)
        return c <= boundary

    return asyncio.run(capacity.search(probe, max_concurrency)), calls


@pytest.mark.parametrize("max_concurrency", [1, 10, 64])
@pytest.mark.parametrize("boundary", [0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 33, 63, 64, 100])
def test_search_finds_the_boundary_probing_each_c_once(boundary: int, max_concurrency: int) -> None:
    (found, refused), calls = _search(boundary, max_concurrency)
    if boundary >= max_concurrency:
        assert (found, refused) == (max_concurrency, None)
    else:
        assert (found, refused) == (boundary, boundary + 1)
    assert len(calls) == len(set(calls)) and max(calls) <= max_concurrency
    assert len(calls) <= 2 * max_concurrency.bit_length() + 1
    doubling = [c for c in calls if c & (c - 1) == 0 or c == max_concurrency]
    assert calls[: len(doubling)] == doubling  # 1, 2, 4, ... first


def test_search_doubles_then_bisects() -> None:
    assert _search(5, 64)[1] == [1, 2, 4, 8, 6, 5]
    assert _search(9, 10)[1] == [1, 2, 4, 8, 10, 9]  # the last doubling step clipped to the maximum
    assert _search(0, 64)[1] == [1]  # stops at the first refusal
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        asyncio.run(capacity.search(lambda c: asyncio.sleep(0, True), 0))


def test_judge_admits_only_when_all_decoded_together() -> None:
    ok = [gen(8, batch_size_max=3, pool_occupancy_peak=0.9, pool_capacity_bytes=100, queue_seconds=0.1)] * 3
    p = capacity.judge(3, ok, 0, 8, 1.0)
    assert p.admitted and (p.reached, p.pool_occupancy_peak, p.pool_capacity_bytes, p.stopped_early) == (3, 0.9, 100, 0)
    assert not capacity.judge(4, [*ok, gen(8, batch_size_max=2)], 0, 8, 1.0).admitted  # reached 3 < 4
    assert not capacity.judge(3, ok[:2], 1, 8, 1.0).admitted  # a failed request refuses the probe
    assert capacity.judge(3, [*ok[:2], gen(2, batch_size_max=3)], 0, 8, 1.0).stopped_early == 1
    with pytest.raises(UserError, match="no batch_size_max: it predates in-flight batching"):
        capacity.judge(2, [gen(8), gen(8)], 0, 8, 1.0)


def _args(**kw: Any) -> argparse.Namespace:
    base = dict(url="x", timeout=5.0, warmup=1, max_tokens=64, max_concurrency=16, method=None,
                images=None, prompt=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


class FakeServer:
    """Stands in for ``AsyncClient`` (patched in as the class: calling it returns itself). Its "pool"
    admits ``rows(budget)`` rows: a request sees c = the requests in flight with it (a probe's wave)
    and reports ``batch_size_max = min(c, rows)`` and the occupancy that gives. ``fail(c)``: one
    request of such a wave fails; ``gone(c)``: the server goes away; ``keys=False``: stats of a server
    from before batching; ``capacity_bytes``: the pool's size (0: no pool)."""

    def __init__(
        self,
        rows: Callable[[float], int],
        *,
        fail: Callable[[int], bool] = lambda c: False,
        gone: Callable[[int], bool] = lambda c: False,
        keys: bool = True,
        capacity_bytes: int = 8 * 2**20,
    ) -> None:
        self.rows, self.fail, self.gone, self.keys, self.capacity_bytes = rows, fail, gone, keys, capacity_bytes
        self.url = "x"  # what its errors name, whatever the command line says
        self.inflight = 0
        self.started = 0
        self.wave_first = 0
        self.closed = False

    def __call__(self, url: str, **kw: Any) -> FakeServer:
        return self

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True

    async def generate(self, image: bytes, prompt: str, max_tokens: int, budget: float, method: Any, **kw: Any):
        if self.inflight == 0:
            self.wave_first = self.started
        n = self.started
        self.started += 1
        self.inflight += 1
        try:
            for _ in range(4):  # let the rest of the wave start
                await asyncio.sleep(0)
            c = self.inflight
            if self.gone(c):
                raise ServerGone(f"the vlcache server at {self.url} went away")
            if self.fail(c) and n == self.wave_first:
                raise ServerError("INTERNAL: the fake failed this one")
            if not self.keys:
                return gen(max_tokens)
            rows = self.rows(budget)
            batch = min(c, rows)
            return gen(
                max_tokens,
                batch_size_mean=float(batch),
                batch_size_max=batch,
                pool_occupancy_peak=batch / rows,
                pool_capacity_bytes=self.capacity_bytes,
                pool_bytes=self.capacity_bytes // max(rows, 1),
                queue_seconds=0.001,
            )
        finally:
            for _ in range(4):  # the wave ends together
                await asyncio.sleep(0)
            self.inflight -= 1


def _run(server: FakeServer, budgets: list[float], monkeypatch: pytest.MonkeyPatch, **kw: Any):
    monkeypatch.setattr(capacity, "AsyncClient", server)
    monkeypatch.setattr(capacity, "load_workload", lambda images, prompt, n: [(b"png", f"q{i}") for i in range(n)])
    return asyncio.run(capacity.run(_args(**kw), budgets))


def test_capacity_per_budget_with_ratio_and_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(lambda b: 3 if b == 1.0 else 12)
    summaries, records = _run(server, [1.0, 0.1], monkeypatch)
    full, small = summaries
    assert (full["capacity"], full["refused_at"], full["refused_reached"], full["capacity_is_lower_bound"]) == (
        3, 4, 3, False)  # fmt: skip
    assert (small["capacity"], small["refused_at"], small["refused_reached"]) == (12, 13, 12)
    assert (full["ratio"], small["ratio"]) == (1.0, 4.0)
    assert [p["concurrency"] for p in full["probes"]] == [1, 2, 3, 4]  # sorted; probed 1, 2, 4, 3
    assert full["pool_occupancy_peak"] == 1.0 and full["pool_capacity_bytes"] == 8 * 2**20
    assert full["requests"] == 1 + 2 + 4 + 3 and full["failed"] == 0 and server.closed
    assert len(records) == full["requests"] + small["requests"]
    assert all("error" not in r and {"budget", "concurrency", "index"} <= set(r) for r in records)

    summaries, _ = _run(FakeServer(lambda b: 3 if b == 1.0 else 100), [1.0, 0.1], monkeypatch)
    small = summaries[1]
    assert (small["capacity"], small["capacity_is_lower_bound"], small["refused_at"]) == (16, True, None)
    table = capacity.format_table(summaries)
    assert "≥16" in table and "≥5.33x" in table
    assert "the capacity is at least that (cap reached?" in table


def test_capacity_notes_a_likely_batch_size_cap_and_a_server_without_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    summaries, _ = _run(FakeServer(lambda b: 4), [1.0, 0.5, 0.1], monkeypatch)
    assert [s["capacity"] for s in summaries] == [4, 4, 4]
    assert any("every budget stopped at 4: the server's --max-batch-size" in n for n in capacity.notes(summaries))
    summaries, _ = _run(FakeServer(lambda b: 3 if b == 1.0 else 6), [1.0, 0.1, 0.05], monkeypatch)
    (note,) = capacity.notes(summaries)
    assert note.startswith("budgets 0.1, 0.05 stopped at 6: the server's --max-batch-size is the likely limit")
    summaries, _ = _run(FakeServer(lambda b: 1, capacity_bytes=0), [1.0, 0.1], monkeypatch)
    assert [s["capacity"] for s in summaries] == [1, 1]
    notes = capacity.notes(summaries)
    assert "budget 1: the server has no KV pool (it serves one request at a time)" in notes
    assert not any("max-batch-size is the likely limit" in n for n in notes)
    assert capacity.format_table(summaries).splitlines()[3].split()[-2] == "none"  # pool MiB


def test_a_failing_probe_counts_as_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    summaries, records = _run(FakeServer(lambda b: 8, fail=lambda c: c >= 6), [1.0], monkeypatch)
    (s,) = summaries
    assert (s["capacity"], s["refused_at"]) == (5, 6) and s["failed"] == 2  # probes 8 and 6 lost a request each
    assert sum("error" in r for r in records) == 2


def test_capacity_against_an_older_server_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="predates in-flight batching"):
        _run(FakeServer(lambda b: 4, keys=False), [1.0], monkeypatch)


# --- the command line -----------------------------------------------------------------------------------
def _images(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not decoded by the fake server")
    return images


def test_capacity_command_writes_out_and_ends_with_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(capacity, "AsyncClient", FakeServer(lambda b: 2 if b == 1.0 else 5))
    out = tmp_path / "out"
    argv = ["--capacity", "--images", str(_images(tmp_path)), "--budgets", "1.0,0.1", "--max-concurrency", "8",
            "--max-tokens", "16", "--warmup", "0", "--out", str(out)]  # fmt: skip
    assert bench_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "budget 0.1: 8 concurrent: largest batch 5 (refused)" in captured.err
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["mode"] == "capacity" and [s["capacity"] for s in last["results"]] == [2, 5]
    assert sorted(p.name for p in out.iterdir()) == ["capacity.csv", "results.json"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "capacity" and saved["config"]["capacity"] is True and saved["results"] == last["results"]
    rows = list(csv.DictReader((out / "capacity.csv").open()))
    assert [(r["budget"], r["capacity"], r["ratio"]) for r in rows] == [("1.0", "2", "1.0"), ("0.1", "5", "2.5")]
    assert "2.50x" in captured.out


def test_capacity_command_exits_1_when_requests_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(capacity, "AsyncClient", FakeServer(lambda b: 8, fail=lambda c: c >= 4))
    argv = ["--capacity", "--images", str(_images(tmp_path)), "--budgets", "1.0", "--max-concurrency", "8",
            "--max-tokens", "16", "--out", str(tmp_path / "out")]  # fmt: skip
    assert bench_cli.main(argv) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["capacity"] == 3


def test_a_server_that_goes_away_ends_the_search_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(capacity, "AsyncClient", FakeServer(lambda b: 8, gone=lambda c: c >= 4))
    argv = ["--capacity", "--images", str(_images(tmp_path)), "--max-tokens", "16", "--max-concurrency", "8",
            "--out", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        bench_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err == "vlcache-bench: error: ServerGone: the vlcache server at x went away"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--requests", "4"], "--capacity chooses the concurrency itself: drop --requests"),
        (["--duration", "3"], "--capacity chooses the concurrency itself: drop --duration"),
        (["--max-tokens", "1"], "--capacity needs --max-tokens >= 2"),
        (["--max-concurrency", "0"], "argument --max-concurrency: must be >= 1, got 0"),
        (["--budgets", "2"], "budget 2 is outside (0, 1]"),
    ],
)
def test_capacity_user_mistakes_are_one_line(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["--capacity", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("vlcache-bench: error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_capacity_against_an_older_server_ends_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(capacity, "AsyncClient", FakeServer(lambda b: 4, keys=False))
    argv = ["--capacity", "--images", str(_images(tmp_path)), "--max-tokens", "16", "--max-concurrency", "4",
            "--out", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        bench_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("vlcache-bench: error: the server's stats have no batch_size_max")
    assert not (tmp_path / "o").exists()


def test_capacity_is_off_by_default() -> None:
    args = bench_cli.build_parser().parse_args([])
    assert (args.capacity, args.max_concurrency) == (False, capacity.DEFAULT_MAX_CONCURRENCY)


def test_quickstarts_command_line_reports_the_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/quickstart.sh's vlcache-bench flags, over the fake server: the batching shows up everywhere."""
    monkeypatch.setattr(bench, "AsyncClient", FakeServer(lambda b: 3))
    monkeypatch.setattr(bench, "write_plots", lambda out, s, r: [])
    out = tmp_path / "bench"
    argv = ["--url", "127.0.0.1:1", "--budgets", "1.0,0.1", "--requests", "8", "--concurrency", "4",
            "--max-tokens", "4", "--images", str(_images(tmp_path)), "--out", str(out), "--force"]  # fmt: skip
    assert bench_cli.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    results = json.loads(printed[-1])["results"]
    assert [(s["batch_size_max"], s["pool_occupancy_peak"]) for s in results] == [(3, 1.0), (3, 1.0)]
    assert results[0]["queue_ms"]["p50"] == pytest.approx(1.0)
    batching = printed[printed.index(next(x for x in printed if x.startswith("(server batching"))) + 3]
    assert batching.split() == ["1", "3.00", "3", "100%", "8.0", "1.0", "1.0"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["batch_size_max"] for r in rows] == ["3", "3"] and rows[0]["pool_capacity_bytes"] == str(8 * 2**20)
    assert json.loads((out / "results.json").read_text())["results"] == results
