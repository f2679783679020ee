"""Against a real `tritonserver` (the nvidia-pytriton wheel's, CPU): streaming, budgets, load, bad
inputs, cancellation. A tiny random checkpoint in the bundled llava-tiny format, served by the
"torch" backend (one server for the module, 1 instance, 1 thread) and, for streaming and budgets, by
the "onnx" backend too (the default artifact: a second server, started for those tests)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
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

from vlcache.client import AsyncClient, Client, InvalidArgument  # noqa: E402

MAX_TOKENS_CAP = 32


def _served_artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, backend: str) -> Path:
    from vlcache.serving import render_repository

    path = make_artifact(checkpoint, tmp_path_factory.mktemp(f"triton-{backend}") / "artifact", backend=backend)
    render_repository(path, num_threads=1, max_tokens_cap=MAX_TOKENS_CAP)
    return path


def _serve(artifact: Path):
    with TritonServer(artifact / "triton", grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180) as srv:
        yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _served_artifact(checkpoint, tmp_path_factory, "torch")


@pytest.fixture(scope="module")
def server(artifact: Path):
    yield from _serve(artifact)


@pytest.fixture(scope="module")
def onnx_server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from _serve(_served_artifact(checkpoint, tmp_path_factory, "onnx"))


@pytest.fixture(scope="module")
def client(server: TritonServer):
    with Client(server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module", params=["torch", "onnx"])
def backend_client(request: pytest.FixtureRequest):
    """(backend, a client of the server of that backend's artifact)."""
    served: TritonServer = request.getfixturevalue("server" if request.param == "torch" else "onnx_server")
    with Client(served.url, timeout=60) as c:
        yield request.param, c


@pytest.fixture(scope="module")
def samples():
    from vlcache.digits import DigitScenes

    scenes = DigitScenes("test", seed=0)
    return [scenes[i] for i in range(4)]


def _offline_text(checkpoint: Path, sample, budget: float, max_tokens: int) -> str:
    import vlcache
    from vlcache.digits import format_prompt
    from vlcache.hf.loading import load_model

    loaded = load_model(str(checkpoint))
    inputs = loaded.processor(images=sample.image, text=format_prompt(sample.question), return_tensors="pt")
    result = vlcache.generate(loaded.model, inputs, vlcache.CompressionConfig(budget=budget), max_new_tokens=max_tokens)
    return str(loaded.tokenizer.decode(result.new_tokens.tolist(), skip_special_tokens=True))


def test_stream_matches_the_offline_path(backend_client: tuple[str, Client], checkpoint: Path, samples):
    backend, client = backend_client
    sample = samples[0]
    pieces: list[str] = []
    g = client.generate(sample.image, sample.question, max_tokens=8, on_text=pieces.append)
    assert g.text == _offline_text(checkpoint, sample, budget=0.1, max_tokens=8)  # the build's budget
    assert g.responses >= 2 and "".join(pieces) == g.text  # streamed, not sent at once
    assert set(g.stats) == set(protocol.STATS_KEYS) and g.stats["backend"] == backend
    assert g.stats["budget"] == 0.1 and g.output_tokens == g.stats["output_tokens"] >= 1
    assert g.ttft is not None and 0 < g.ttft <= g.latency
    assert len(g.inter_token_latencies) == g.responses - 1
    assert g.stats["prefill_seconds"] > 0


def test_per_request_budget_changes_the_kv_stats(backend_client: tuple[str, Client], checkpoint: Path, samples):
    backend, client = backend_client
    sample = samples[1]
    runs = {b: client.generate(sample.image, sample.question, max_tokens=4, budget=b) for b in (1.0, 0.1, 0.05)}
    total = runs[1.0].stats["kv_tokens_total"]
    for b, g in runs.items():
        assert g.stats["budget"] == b and g.stats["kv_tokens_kept"] == round(b * total)
    assert runs[1.0].stats["kv_bytes_after"] == runs[1.0].stats["kv_bytes_before"]
    assert runs[1.0].stats["kv_bytes_after"] > runs[0.1].stats["kv_bytes_after"] > runs[0.05].stats["kv_bytes_after"]
    assert runs[1.0].text == _offline_text(checkpoint, sample, budget=1.0, max_tokens=4)
    full = client.generate(sample.image, sample.question, max_tokens=4, budget=0.1, method="full")
    assert full.stats["method"] == "full" and full.stats["kv_tokens_kept"] == total
    assert {g.stats["backend"] for g in (*runs.values(), full)} == {backend}


def test_load_200_streams_at_concurrency_16(server: TritonServer, samples):
    n, concurrency = 200, 16

    async def main() -> tuple[list, list]:
        results: list = []
        errors: list = []
        queue = list(range(n))
        async with AsyncClient(server.url, timeout=60) as aclient:

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    s = samples[i % len(samples)]
                    try:
                        results.append(
                            await aclient.generate(s.image, s.question, max_tokens=4, budget=(0.1, 1.0)[i % 2])
                        )
                    except Exception as e:  # counted, not raised: the assertion reports them all
                        errors.append(repr(e))

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=150)
        return results, errors

    t0 = time.perf_counter()
    results, errors = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    assert errors == [] and len(results) == n
    # every stream ended with its final response carrying the stats (the assembler raises otherwise)
    assert all(g.stats["finish_reason"] in ("stop", "length") and g.output_tokens >= 1 for g in results)
    assert len({g.request_id for g in results}) == n
    assert elapsed < 150


def _raw(inputs: dict[str, tuple[np.ndarray, str]]):
    import tritonclient.grpc as grpcclient

    out = []
    for name, (value, dtype) in inputs.items():
        item = grpcclient.InferInput(name, list(value.shape), dtype)
        item.set_data_from_numpy(value)
        out.append(item)
    return out


def _send_raw(url: str, inputs) -> str:
    """Send one raw request; the error message it gets (fails if it gets none)."""
    import queue

    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        c.async_stream_infer(protocol.MODEL_NAME, inputs, enable_empty_final_response=True)
        while True:
            result, error = events.get(timeout=30)
            if error is not None:
                return str(error)
            assert not result.get_response().parameters["triton_final_response"].bool_param, "no error came back"
    finally:
        c.stop_stream()
        c.close()


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(server: TritonServer, client: Client, samples):
    sample = samples[2]
    png = client_image = sample.image
    cases = [
        (dict(image=b"not an image"), "input 'image' is not a decodable image"),
        (dict(prompt=""), "input 'prompt' is empty"),
        (dict(budget=0.0), "input 'budget' must lie in (0, 1]"),
        (dict(budget=1.5), "input 'budget' must lie in (0, 1]"),
        (dict(method="magic"), "unknown method 'magic'"),
        (dict(prompt=" ".join(["what"] * 60)), "above this build's max_input_len 300"),
        (dict(max_tokens=0), f"must lie in [1, {MAX_TOKENS_CAP}], got 0"),
        (dict(max_tokens=10**6), f"must lie in [1, {MAX_TOKENS_CAP}], got 1000000"),
    ]
    for changes, message in cases:
        args = {"image": client_image, "prompt": sample.question, "max_tokens": 2, **changes}
        with pytest.raises(InvalidArgument) as info:
            client.generate(**args)
        assert str(info.value).startswith("INVALID_ARGUMENT:") and message in str(info.value), str(info.value)
        assert client.generate(png, sample.question, max_tokens=1).output_tokens == 1

    from vlcache.client.client import encode_image

    image = (np.array([encode_image(png)], dtype=np.object_), "BYTES")
    prompt = (np.array([sample.question.encode()], dtype=np.object_), "BYTES")
    tokens = (np.array([2], dtype=np.int32), "INT32")
    raw_cases = [
        ({"image": image, "prompt": prompt}, "max_tokens"),  # missing input (Triton refuses it)
        ({"image": image, "max_tokens": tokens}, "prompt"),
        ({"image": image, "prompt": prompt, "max_tokens": (np.array([2.0], dtype=np.float32), "FP32")}, "'max_tokens' data-type is 'FP32'"),
        ({"image": image, "prompt": (np.array([7], dtype=np.int32), "INT32"), "max_tokens": tokens}, "'prompt' data-type is 'INT32'"),
        ({"image": image, "prompt": prompt, "max_tokens": tokens, "budget": (np.array([1], dtype=np.int32), "INT32")}, "'budget' data-type is 'INT32'"),
    ]  # fmt: skip
    for inputs, needle in raw_cases:
        message = _send_raw(server.url, _raw(inputs))
        assert needle in message, message
        assert client.generate(png, sample.question, max_tokens=1).output_tokens == 1


def test_cancelling_a_stream_leaves_the_others_alone(server: TritonServer, client: Client, samples):
    sample = samples[3]
    reference = client.generate(sample.image, sample.question, max_tokens=MAX_TOKENS_CAP, budget=1.0)

    async def main():
        async with AsyncClient(server.url, timeout=60) as aclient:

            async def cancelled_one() -> int:
                seen = 0
                async for chunk in aclient.stream(sample.image, sample.question, MAX_TOKENS_CAP, 1.0):
                    seen += 1
                    if chunk.text:
                        break  # leaves the stream: cancels the request
                return seen

            async def full_one():
                return await aclient.generate(sample.image, sample.question, MAX_TOKENS_CAP, 1.0)

            return await asyncio.wait_for(
                asyncio.gather(full_one(), cancelled_one(), full_one(), cancelled_one(), full_one()), timeout=120
            )

    outcomes = asyncio.run(main())
    for g in outcomes[0::2]:
        assert g.text == reference.text and g.stats["finish_reason"] == reference.stats["finish_reason"]
    assert outcomes[1] == 1 and outcomes[3] == 1
    after = client.generate(sample.image, sample.question, max_tokens=MAX_TOKENS_CAP, budget=1.0)
    assert after.text == reference.text


def test_server_reports_a_model_that_cannot_load(artifact: Path, tmp_path: Path):
    import shutil

    from vlcache.artifact import read_manifest

    broken = tmp_path / "artifact"
    shutil.copytree(artifact, broken, ignore=shutil.ignore_patterns("triton"))
    from vlcache.serving import render_repository

    render_repository(broken)
    assert read_manifest(broken).backend == "torch"
    (broken / "hf" / "model.safetensors").write_bytes(b"garbage")
    server = TritonServer(broken / "triton", grpc_port=0, http_port=0, metrics_port=0, startup_timeout=120)
    with pytest.raises(UserError, match="exited .* before model 'vlcache' was ready") as info:
        server.start()
    assert "failed to load" in str(info.value)  # the log's tail comes with the error
    assert not server.running()
    server.cleanup()
