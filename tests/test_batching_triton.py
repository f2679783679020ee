"""In-flight batching behind a real `tritonserver` (the nvidia-pytriton wheel's, CPU).

The model is the bundled, trained llava-tiny with its end token removed from the generation config
(every request decodes exactly ``max_tokens`` tokens, so batches hold rows for as long as the test
says), exported for ONNX Runtime (the fused decoder: the engine that batches). What is checked:
batched answers equal solo runs for mixed methods and budgets; 1,000 streamed requests at
concurrency 16 each get exactly one final response and the right text; a pool too small for more
than two requests queues the rest and serves them; a cancelled request gives its KV memory back at
once (the exported gauges); a server killed mid-load ends every open stream with a clear client
error, and a restarted one serves the same load; the custom metrics are on the metrics port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serving_helpers import make_artifact
from vlcache.errors import UserError
from vlcache.serving import protocol
from vlcache.serving.server import TritonServer, find_tritonserver

pytestmark = pytest.mark.triton

try:
    find_tritonserver()
    import tritonclient.grpc  # noqa: F401
except (UserError, ImportError) as e:  # pragma: no cover - CI installs the serve extra
    pytest.skip(f"no Triton server to run: {e}", allow_module_level=True)

from vlcache.client import AsyncClient, Client, ClientError, ServerGone  # noqa: E402
from vlcache.client.client import build_inputs, encode_image  # noqa: E402

MAX_TOKENS_CAP = 4096  # long requests: 4,000 tokens take several seconds, so a freed slot shows
MAX_INPUT_LEN = 261 + MAX_TOKENS_CAP  # the prompt (256 image tokens + the question) + the cap


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import vlcache

    checkpoint = tmp_path_factory.mktemp("llava-tiny-noeos") / "hf"
    shutil.copytree(Path(vlcache.__file__).parent / "models" / "llava-tiny", checkpoint)
    generation = checkpoint / "generation_config.json"
    config = json.loads(generation.read_text())
    generation.write_text(json.dumps({**config, "eos_token_id": []}))  # answers run to max_tokens
    out = tmp_path_factory.mktemp("batching") / "artifact"
    return make_artifact(checkpoint, out, backend="onnx", budget=0.1, max_input_len=MAX_INPUT_LEN)


def _start(artifact: Path, **settings: object) -> TritonServer:
    ports = {"grpc_port": 0, "http_port": 0, "metrics_port": 0, **settings}
    return TritonServer.for_artifact(
        artifact, num_threads=1, max_tokens_cap=MAX_TOKENS_CAP, startup_timeout=180, **ports
    ).start()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(artifact: Path):
    srv = _start(artifact)  # the build's batch size (8), the default pool
    yield srv
    srv.stop()
    srv.cleanup()


@pytest.fixture(scope="module")
def engine(artifact: Path):
    """The same artifact in this process: the solo reference."""
    from vlcache.serving.engine import load_engine

    return load_engine(artifact, threads=1)


@pytest.fixture(scope="module")
def samples():
    from vlcache.digits import DigitScenes

    scenes = DigitScenes("test", seed=0)
    return [scenes[i] for i in range(4)]


def _solo(engine, sample, max_tokens: int, budget: float | None = None, method: str | None = None) -> tuple[str, dict]:
    pieces: list[str] = []
    stats = engine.generate(
        sample.image, sample.question, max_tokens=max_tokens, budget=budget, method=method, on_text=pieces.append
    )
    return "".join(pieces), stats


def _metrics(server: TritonServer) -> dict[str, float]:
    """The vlcache gauges of model ``vlcache`` on the metrics port (summed over instances)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for name in protocol.METRICS:
        for value in re.findall(rf'^{name}\{{[^}}]*model="vlcache"[^}}]*\}} (\S+)$', text, flags=re.M):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _wait_for_metric(server: TritonServer, name: str, ok, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = _metrics(server).get(name)
        if value is not None and ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} = {value} after {timeout:g} s")
        time.sleep(0.05)


async def _gather(coroutines, timeout: float):
    return await asyncio.wait_for(asyncio.gather(*coroutines, return_exceptions=True), timeout=timeout)


# (method, budget, max_tokens): mixed in one batch, rows leaving at different steps
MIX = [
    ("vlcache", 0.1, 24),
    ("full", 1.0, 12),
    ("snapkv", 0.3, 20),
    ("tgvkv", 0.2, 24),
    ("vlcache", 0.5, 8),
    ("pyramidkv", 0.2, 16),
    ("streaming", 0.25, 24),
    ("h2o", 0.15, 10),
    ("vlcache", 1.0, 18),
    ("random", 0.3, 14),
]


def test_batched_answers_equal_solo_runs_for_mixed_methods_and_budgets(server: TritonServer, engine, samples):
    cases = [(samples[i % len(samples)], *mix) for i, mix in enumerate(MIX)]

    async def main():
        async with AsyncClient(server.url, timeout=120) as client:
            return await _gather(
                [client.generate(s.image, s.question, t, budget=b, method=m) for s, m, b, t in cases], timeout=180
            )

    results = asyncio.run(main())
    assert [r for r in results if isinstance(r, BaseException)] == []
    for (sample, method, budget, max_tokens), g in zip(cases, results):
        text, stats = _solo(engine, sample, max_tokens, budget, method)
        assert g.text == text, (method, budget)
        assert (g.stats["method"], g.stats["budget"], g.output_tokens) == (method, budget, max_tokens)
        assert g.stats["kept_per_layer"] == stats["kept_per_layer"] and g.stats["finish_reason"] == "length"
    # they really ran together: most requests shared decode steps with others
    assert max(g.stats["batch_size_max"] for g in results) >= 4
    assert all(1 <= g.stats["batch_size_max"] <= 8 for g in results)


def test_1000_streamed_requests_at_concurrency_16_each_get_one_final_and_their_text(
    server: TritonServer, engine, samples
):
    """16 gRPC streams, each sending its share one after another and read to its end, so a lost
    request (no final) or a duplicated one (a second final, or anything after the final) shows."""
    import tritonclient.grpc.aio as grpcaio

    n, concurrency = 1000, 16
    combos = [(s, t, b) for s in range(len(samples)) for t in (2, 3, 4) for b in (0.1, 1.0)]
    expected = {c: _solo(engine, samples[c[0]], c[1], c[2])[0] for c in combos}
    images = [encode_image(s.image) for s in samples]
    case = {str(i): combos[i % len(combos)] for i in range(n)}
    texts: dict[str, list[str]] = {rid: [] for rid in case}
    finals: dict[str, int] = dict.fromkeys(case, 0)
    after_final: list[str] = []
    errors: list[str] = []
    stats: dict[str, dict] = {}

    async def stream(client, ids: list[str]) -> None:
        done = {rid: asyncio.Event() for rid in ids}

        async def requests():
            for rid in ids:
                s, t, b = case[rid]
                inputs = build_inputs(images[s], samples[s].question, t, b, None)
                yield {
                    "model_name": protocol.MODEL_NAME,
                    "inputs": inputs,
                    "request_id": rid,
                    "enable_empty_final_response": True,
                }
                await done[rid].wait()  # one request in flight per stream

        async for result, error in client.stream_infer(requests()):
            if error is not None:
                errors.append(str(error))
                return
            response = result.get_response()
            rid = response.id
            if finals[rid]:
                after_final.append(rid)
            text = result.as_numpy(protocol.TEXT.name)
            if text is not None:
                texts[rid].extend(bytes(t).decode() for t in text.reshape(-1))
            if response.parameters["triton_final_response"].bool_param:
                finals[rid] += 1
                blob = result.as_numpy(protocol.STATS.name)
                if blob is not None:
                    stats[rid] = json.loads(bytes(blob.reshape(-1)[0]))
                done[rid].set()

    async def main() -> None:
        client = grpcaio.InferenceServerClient(server.url)
        try:
            ids = list(case)
            await _gather([stream(client, ids[k::concurrency]) for k in range(concurrency)], timeout=240)
        finally:
            await client.close()

    t0 = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    assert errors == [] and after_final == []
    assert [rid for rid, count in finals.items() if count != 1] == []  # none lost, none duplicated
    wrong = [rid for rid in case if "".join(texts[rid]) != expected[case[rid]]]
    assert wrong == [], f"{len(wrong)} answers differ from the solo run, e.g. request {wrong[:3]}"
    assert len(stats) == n and all(s["finish_reason"] == "length" for s in stats.values())
    assert all(stats[rid]["output_tokens"] == case[rid][1] for rid in case)
    assert max(s["batch_size_max"] for s in stats.values()) > 1
    print(f"1000 streamed requests at concurrency 16: {elapsed:.1f} s")
    assert elapsed < 240


def test_a_full_pool_queues_requests_then_serves_them(artifact: Path, engine, samples):
    max_tokens, n = 64, 6
    _, solo = _solo(engine, samples[0], max_tokens, 1.0)
    layers, m = len(solo["kept_per_layer"]), solo["prompt_tokens"]
    entry = solo["kv_bytes_before"] // solo["kv_tokens_total"]  # bytes of one K/V entry of one layer
    request_bytes = layers * (m + max_tokens) * entry  # what a prefill reserves; a row at α = 1 holds as much
    pool_mb = 2.5 * request_bytes / 2**20  # room for two requests, not three
    srv = _start(artifact, kv_cache_mb=pool_mb)
    try:

        async def main():
            async with AsyncClient(srv.url, timeout=120) as client:
                return await _gather(
                    [
                        client.generate(samples[i % 4].image, samples[i % 4].question, max_tokens, budget=1.0)
                        for i in range(n)
                    ],
                    timeout=180,
                )

        results = asyncio.run(main())
        assert [r for r in results if isinstance(r, BaseException)] == []
        capacity = results[0].stats["pool_capacity_bytes"]
        assert capacity == int(pool_mb * 2**20)
        fits = capacity // request_bytes
        assert fits == 2
        for i, g in enumerate(results):
            assert g.output_tokens == max_tokens and g.text == _solo(engine, samples[i % 4], max_tokens, 1.0)[0]
            assert g.stats["batch_size_max"] <= fits and g.stats["pool_occupancy_peak"] <= 1.0
            assert g.stats["pool_bytes"] <= capacity
        assert max(g.stats["batch_size_max"] for g in results) == fits  # two ran together ...
        # ... and the others waited in the queue for one of them to finish (longer than a prefill)
        waited = [g.stats["queue_seconds"] for g in results]
        assert sum(q > min(g.stats["prefill_seconds"] for g in results) for q in waited) >= n - fits
        assert _wait_for_metric(srv, protocol.METRIC_POOL_USED, lambda v: v == 0) == 0
    finally:
        srv.stop()
        srv.cleanup()


def test_cancelling_a_request_gives_its_memory_back(server: TritonServer, samples):
    sample = samples[1]
    with Client(server.url, timeout=120) as client:
        _wait_for_metric(server, protocol.METRIC_BATCH_SIZE, lambda v: v == 0)
        stream = client.stream(sample.image, sample.question, 4000, 1.0)
        times = [chunk.time for chunk, _ in zip(stream, range(20)) if chunk.text]
        used = _wait_for_metric(server, protocol.METRIC_POOL_USED, lambda v: v > 0)
        assert _metrics(server)[protocol.METRIC_BATCH_SIZE] == 1
        assert 0 < _metrics(server)[protocol.METRIC_POOL_OCCUPANCY] <= 1
        per_token = (times[-1] - times[0]) / (len(times) - 1)
        cancelled = time.perf_counter()
        stream.close()  # leaves the stream: the request is cancelled on the server
        _wait_for_metric(server, protocol.METRIC_POOL_USED, lambda v: v == 0)
        freed_after = time.perf_counter() - cancelled
        assert _metrics(server)[protocol.METRIC_BATCH_SIZE] == 0
        # freed at once, long before its remaining ~3,980 tokens could have been decoded (several seconds)
        assert freed_after < min(2.0, 0.2 * 3980 * per_token), (freed_after, per_token, used)
        after = client.generate(sample.image, sample.question, 4, budget=1.0)
        assert after.stats["batch_size_max"] == 1  # decoded alone: the cancelled one is gone


_CLIENT = """
import sys, time
from vlcache.client import Client
url, image, question = sys.argv[1:4]
client = Client(url, timeout=300)
for chunk in client.stream(image, question, 4000, 1.0):
    if chunk.text:
        print("streaming", flush=True)
        time.sleep(600)  # killed here, mid-stream
"""


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server: TritonServer, samples, tmp_path: Path):
    import subprocess
    import sys

    image = tmp_path / "scene.png"
    samples[3].image.save(image)
    _wait_for_metric(server, protocol.METRIC_BATCH_SIZE, lambda v: v == 0)
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, server.url, str(image), samples[3].question],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "streaming"
        assert _wait_for_metric(server, protocol.METRIC_POOL_USED, lambda v: v > 0) > 0
        assert _metrics(server)[protocol.METRIC_BATCH_SIZE] == 1
    finally:
        client.kill()  # no cancel sent: the connection just drops
        client.wait()
    gone = time.perf_counter()
    _wait_for_metric(server, protocol.METRIC_POOL_USED, lambda v: v == 0)
    assert _metrics(server)[protocol.METRIC_BATCH_SIZE] == 0
    assert time.perf_counter() - gone < 2.0  # 4,000 tokens take several seconds: it was stopped, not finished


def test_the_custom_metrics_are_on_the_metrics_port(server: TritonServer, samples):
    with Client(server.url, timeout=60) as client:
        g = client.generate(samples[2].image, samples[2].question, 2)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for name, description in protocol.METRICS.items():
        assert f"# TYPE {name} gauge" in text and f"# HELP {name} {description}" in text
        assert re.search(rf'^{name}\{{[^}}]*model="vlcache"[^}}]*\}} \S+$', text, flags=re.M), name
    values = _metrics(server)
    assert values[protocol.METRIC_POOL_CAPACITY] == g.stats["pool_capacity_bytes"] > 0
    assert "nv_inference_request_success" in text  # Triton's own metrics are still there


def _load(url: str, samples, n: int, max_tokens: int, kill=None) -> list:
    """``n`` concurrent streams; each result is its Generation or the exception that ended it."""

    async def main():
        async with AsyncClient(url, timeout=120) as client:
            started: list[int] = []

            async def one(i: int):
                s = samples[i % len(samples)]
                text = []
                async for chunk in client.stream(s.image, s.question, max_tokens, (0.1, 1.0)[i % 2]):
                    if chunk.text and not text:
                        started.append(i)
                    text.append(chunk.text)
                return "".join(text)

            async def killer() -> None:
                while len(started) < 8:
                    await asyncio.sleep(0.01)
                kill()

            jobs = [one(i) for i in range(n)] + ([killer()] if kill else [])
            return (await _gather(jobs, timeout=120))[:n]

    return asyncio.run(main())


def test_a_killed_server_ends_every_open_stream_with_a_clear_error_and_a_restart_serves(artifact: Path, samples):
    n, max_tokens = 16, 300
    srv = _start(artifact)
    ports = {"grpc_port": srv.grpc_port, "http_port": srv.http_port, "metrics_port": srv.metrics_port}
    try:
        killed: list[float] = []

        def kill() -> None:
            killed.append(time.perf_counter())
            os.kill(srv.process.pid, signal.SIGKILL)  # tritonserver only, as a crash would

        results = _load(srv.url, samples, n, max_tokens, kill)
        ended = time.perf_counter()
        assert killed, "the load finished before the kill"
        assert all(isinstance(r, ServerGone) for r in results), results  # every stream: a ClientError, no hang
        assert all(isinstance(r, ClientError) and "went away" in str(r) for r in results)
        assert ended - killed[0] < 30
    finally:
        srv.stop()
        srv.cleanup()
    assert not any(Path("/dev/shm").glob(f"{srv.shm_prefix}*"))  # the killed server's regions are gone

    restarted = _start(artifact, **ports)  # the same artifact and ports, as a supervisor would
    try:
        results = _load(restarted.url, samples, n, max_tokens)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert all(len(r) > 0 for r in results)
    finally:
        restarted.stop()
        restarted.cleanup()
