"""Serving logic without a server: request validation, the artifact contract, repository rendering,
the torch engine's streaming against the offline path, the build settings engines load with (dtype,
device), the Triton model's setup with a stand-in for Triton, and the client's statistics and errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving_helpers import make_artifact
from vlcache.artifact import MANIFEST, ArtifactError, file_table, read_manifest
from vlcache.config import ARTIFACT_FORMAT
from vlcache.serving import protocol
from vlcache.serving.repository import RenderError, render_repository, render_text
from vlcache.serving.request import InvalidRequest, Limits, parse_request

LIMITS = Limits(methods=("vlcache", "full"), max_tokens_cap=64)


def _png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _obj(value: bytes | str) -> np.ndarray:
    return np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)


def _good(**changes: object) -> dict[str, object]:
    inputs: dict[str, object] = {
        "image": _obj(_png()),
        "prompt": _obj("what is at row 0 col 1 ?"),
        "max_tokens": np.array([4], dtype=np.int32),
    }
    inputs.update(changes)
    return {k: v for k, v in inputs.items() if v is not None}


# --- request validation ------------------------------------------------------------------------
def test_parse_good_request_with_and_without_optional_inputs():
    r = parse_request(_good(), LIMITS)
    assert (r.prompt, r.max_tokens, r.budget, r.method) == ("what is at row 0 col 1 ?", 4, None, None)
    assert r.image.mode == "RGB" and r.image.size == (8, 8)
    r = parse_request(_good(budget=np.array([0.1], dtype=np.float32), method=_obj("full")), LIMITS)
    assert r.budget == 0.1 and r.method == "full"  # the FP32 0.1 comes back as the decimal 0.1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": None}, "missing required input 'image'"),
        ({"prompt": None}, "missing required input 'prompt'"),
        ({"max_tokens": None}, "missing required input 'max_tokens'"),
        ({"image": _obj(b"\x89PNG not really")}, "input 'image' is not a decodable image"),
        ({"image": _obj(b"")}, "input 'image' is empty"),
        ({"prompt": _obj("   ")}, "input 'prompt' is empty"),
        ({"prompt": _obj(b"\xff\xfe")}, "not valid UTF-8"),
        ({"prompt": np.array([1], dtype=np.int32)}, "input 'prompt' must be BYTES"),
        ({"max_tokens": np.array([1.5], dtype=np.float32)}, "input 'max_tokens' must be INT32"),
        ({"max_tokens": np.array([0], dtype=np.int32)}, "must lie in [1, 64], got 0"),
        ({"max_tokens": np.array([65], dtype=np.int32)}, "must lie in [1, 64], got 65"),
        ({"max_tokens": np.array([1, 2], dtype=np.int32)}, "exactly one element"),
        ({"budget": np.array([0.0], dtype=np.float32)}, "input 'budget' must lie in (0, 1]"),
        ({"budget": np.array([1.5], dtype=np.float32)}, "input 'budget' must lie in (0, 1]"),
        ({"budget": np.array([np.nan], dtype=np.float32)}, "input 'budget' must lie in (0, 1]"),
        ({"budget": np.array([1], dtype=np.int32)}, "input 'budget' must be FP32"),
        ({"method": _obj("nope")}, "unknown method 'nope'"),
    ],
)
def test_bad_requests_raise_invalid_argument(changes, message):
    with pytest.raises(InvalidRequest) as info:
        parse_request(_good(**changes), LIMITS)
    text = str(info.value)
    assert text.startswith(f"{protocol.INVALID_ARGUMENT}: ")
    assert message in text


# --- artifact and repository ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(checkpoint, tmp_path_factory.mktemp("serving") / "artifact")


@pytest.fixture(scope="module")
def onnx_artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(checkpoint, tmp_path_factory.mktemp("serving-onnx") / "artifact", backend="onnx")


def test_read_manifest_refuses_broken_artifacts(artifact: Path, tmp_path: Path):
    assert read_manifest(artifact).backend == "torch"
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        read_manifest(tmp_path)
    data = json.loads((artifact / "manifest.json").read_text())
    build = data["build"]
    for name, changes, message in [
        ("format", {"format": 7}, f"artifact format 7, but this vlcache reads format {ARTIFACT_FORMAT}"),
        ("nobuild", {"build": None}, "'build' must be an object"),
        ("backend", {"build": {**build, "backend": "gguf"}}, "bad 'build': unknown backend 'gguf'"),
        ("auto", {"build": {**build, "backend": "auto"}}, "unknown backend 'auto'; expected one of"),
        ("length", {"build": {**build, "max_input_len": 0}}, "bad 'build': max_input_len must be >= 2"),
        ("compression", {"build": {**build, "compression": {"budget": 2.0}}}, "bad 'build': budget"),
        ("field", {"build": {**build, "colour": "red"}}, "bad 'build'"),
    ]:
        broken = tmp_path / name
        broken.mkdir()
        (broken / "processor").mkdir()
        (broken / "manifest.json").write_text(json.dumps({**data, **changes}))
        with pytest.raises(ArtifactError, match=message):
            read_manifest(broken)
    (tmp_path / "nohf" / "processor").mkdir(parents=True)
    (tmp_path / "nohf" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="needs a HF checkpoint"):
        read_manifest(tmp_path / "nohf")


def test_an_artifact_of_the_old_format_is_refused_with_rebuild(artifact: Path, tmp_path: Path, capsys):
    """Format 1 repeated backend, compression, max_input_len and max_batch_size beside ``build``."""
    import shutil

    from vlcache.cli.generate import main as generate_main
    from vlcache.serving.engine import load_engine

    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    data = json.loads((old / MANIFEST).read_text())
    assert not {"backend", "compression", "compression_hash", "max_input_len", "max_batch_size"} & set(data)
    build = data["build"]
    copies = {k: build[k] for k in ("backend", "compression", "max_input_len", "max_batch_size")}
    (old / MANIFEST).write_text(json.dumps({**data, **copies, "format": 1}))
    message = f"artifact format 1, but this vlcache reads format {ARTIFACT_FORMAT} .*rebuild it with vlcache-build"
    with pytest.raises(ArtifactError, match=message):
        load_engine(old, verify=False)
    with pytest.raises(SystemExit) as e:
        generate_main([str(old), "--image", "digits:0", "--prompt", "what is at row 0 col 1 ?"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "rebuild it with vlcache-build" in err and "\n" not in err


def test_render_repository_fills_the_protocol_in(artifact: Path, tmp_path: Path):
    repo = render_repository(artifact, instances=3, max_tokens_cap=77, num_threads=1)
    assert repo == artifact / "triton"
    config = (repo / "vlcache" / "config.pbtxt").read_text()
    assert "${" not in config and "$" not in config
    for spec in protocol.INPUTS + protocol.OUTPUTS:
        assert f'name: "{spec.name}" data_type: {protocol.CONFIG_TYPES[spec.datatype]}' in config
    assert 'name: "budget" data_type: TYPE_FP32 dims: [ 1 ] optional: true' in config
    assert "decoupled: true" in config and "count: 3 kind: KIND_CPU" in config
    assert 'key: "artifact_dir" value: { string_value: "../.." }' in config  # relocatable
    assert 'key: "max_tokens_cap" value: { string_value: "77" }' in config
    # batching: empty parameters = the build's batch size and the default pool (the model decides)
    assert "max_batch_size: 0" in config  # Triton's own batching stays off: the model batches itself
    for key in ("max_batch_size", "kv_cache_mb", "kv_cache_fraction", "max_prefill_tokens"):
        assert f'key: "{key}" value: {{ string_value: "" }}' in config
    batched = render_repository(
        artifact, out=tmp_path / "batched", max_batch_size=3, kv_cache_mb=1.5, max_prefill_tokens=512
    )
    config = (batched / "vlcache" / "config.pbtxt").read_text()
    assert 'key: "max_batch_size" value: { string_value: "3" }' in config
    assert 'key: "kv_cache_mb" value: { string_value: "1.5" }' in config
    assert 'key: "max_prefill_tokens" value: { string_value: "512" }' in config
    unlimited = render_repository(artifact, out=tmp_path / "unlimited", max_prefill_tokens=0)  # 0: no limit
    assert (
        'key: "max_prefill_tokens" value: { string_value: "0" }' in (unlimited / "vlcache" / "config.pbtxt").read_text()
    )
    model_py = (repo / "vlcache" / "1" / "model.py").read_text()
    assert "class TritonPythonModel(ServedModel)" in model_py and len(model_py.splitlines()) < 15
    # rendered elsewhere: the artifact is referenced by absolute path
    other = render_repository(artifact, out=tmp_path / "repo")
    assert f'string_value: "{artifact.resolve()}"' in (other / "vlcache" / "config.pbtxt").read_text()


def test_render_fails_on_unfilled_placeholders_and_bad_settings(artifact: Path):
    with pytest.raises(RenderError, match=r"no value for placeholder \$\{missing\}"):
        render_text('name: "${model_name}" x: ${missing}', {"model_name": "vlcache"})
    with pytest.raises(RenderError, match="Invalid placeholder"):
        render_text("cost: $5", {})
    with pytest.raises(RenderError, match="instances must be >= 1"):
        render_repository(artifact, instances=0)
    with pytest.raises(RenderError, match="device must be cpu or cuda"):
        render_repository(artifact, device="tpu")
    with pytest.raises(RenderError, match="max_batch_size must be an integer >= 1, got 0"):
        render_repository(artifact, max_batch_size=0)
    with pytest.raises(RenderError, match="kv_cache_mb must be > 0, got -2"):
        render_repository(artifact, kv_cache_mb=-2)
    with pytest.raises(RenderError, match=r"kv_cache_fraction must lie in \(0, 1\], got 2"):
        render_repository(artifact, kv_cache_fraction=2)
    with pytest.raises(RenderError, match="max_prefill_tokens must be an integer >= 0, got -1"):
        render_repository(artifact, max_prefill_tokens=-1)
    with pytest.raises(RenderError, match="max_prefill_tokens must be an integer >= 0, got 2.5"):
        render_repository(artifact, max_prefill_tokens=2.5)  # type: ignore[arg-type]


# --- the torch engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(artifact: Path):
    from vlcache.serving.engine import load_engine

    return load_engine(artifact)


def _scene():
    from vlcache.digits import DigitScenes

    return DigitScenes("test", seed=0).sample(0)


def test_engine_streams_the_offline_text_and_reports_stats(engine, checkpoint: Path):
    import vlcache
    from vlcache.digits import format_prompt
    from vlcache.hf.loading import load_model

    sample = _scene()
    deltas: list[str] = []
    stats = engine.generate(sample.image, sample.question, max_tokens=6, budget=0.1, on_text=deltas.append)
    loaded = load_model(str(checkpoint))
    inputs = loaded.processor(images=sample.image, text=format_prompt(sample.question), return_tensors="pt")
    offline = vlcache.generate(loaded.model, inputs, vlcache.CompressionConfig(budget=0.1), max_new_tokens=6)
    expected = loaded.tokenizer.decode(offline.new_tokens.tolist(), skip_special_tokens=True)
    assert len(deltas) >= 2 and "".join(deltas) == expected
    assert set(stats) == set(protocol.STATS_KEYS)
    assert stats["kv_tokens_kept"] == sum(offline.stats.kept_per_layer)
    assert stats["kv_tokens_kept"] == round(0.1 * stats["kv_tokens_total"])
    assert stats["output_tokens"] == len(offline.new_tokens) and stats["finish_reason"] in ("stop", "length")
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] >= 0


def test_engine_refuses_long_prompts_and_stops_when_cancelled(engine):
    sample = _scene()
    with pytest.raises(InvalidRequest, match="above this build's max_input_len 300"):
        engine.generate(sample.image, " ".join(["what"] * 60), max_tokens=2)
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) >= 2

    stats = engine.generate(sample.image, sample.question, max_tokens=20, cancelled=cancelled)
    assert stats["finish_reason"] == "cancelled" and stats["output_tokens"] == 2


@pytest.mark.parametrize("chat", [False, True], ids=["no-chat-template", "chat-template"])
def test_engine_and_eval_runner_hand_a_question_the_same_inputs(engine, chat: bool):
    """One source for a question's prompt and its tensors (:mod:`vlcache.hf.inputs`): the served
    engine and vlcache-eval's runner give the processor what ``image_prompt`` gives, and the model the
    same token ids and pixels, for the bundled format's processor (no chat template: the digits
    task's ``<image> question``) and for the same processor with a chat template."""
    import copy
    import dataclasses

    import torch

    from vlcache.eval.datasets import EvalSample
    from vlcache.eval.runner import build_prompt, prepare_inputs
    from vlcache.hf.inputs import image_prompt
    from vlcache.tokens import IMAGE_TOKEN_TEXT

    processor = copy.deepcopy(engine.processor)
    if chat:
        processor.chat_template = (
            "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + IMAGE_TOKEN_TEXT
            + " {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ={% endif %}"
        )
    served = copy.copy(engine)
    served.processor = processor
    loaded = dataclasses.replace(engine.loaded, processor=processor)
    scene = _scene()
    sample = EvalSample(0, scene.question, scene.answers, image=scene.image)
    expected = f"{IMAGE_TOKEN_TEXT} {scene.question}" + (" =" if chat else "")
    styles = ["chat"] if chat else ["digits", "chat"]  # without a template, chat falls back to "<image>\n q"
    assert served.format_prompt(scene.question) == image_prompt(processor, scene.question) == expected
    assert build_prompt(processor, scene.question, styles[0]) == expected
    assert served.format_prompt(expected) == expected  # a prompt that holds the image token is kept as is
    tensors = served.prepare(scene.image, scene.question)
    assert int(tensors["input_ids"].shape[-1]) == 1 + 256 + len(scene.question.split()) + chat
    for style in styles:
        evaluated = prepare_inputs(loaded, sample, style)
        assert evaluated.keys() == tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(evaluated[key], value), (style, key)


# --- the build's settings: dtype and device --------------------------------------------------------
def test_torch_engine_runs_in_the_build_dtype(engine, checkpoint: Path, tmp_path: Path):
    import torch

    from vlcache.serving.engine import TorchEngine, load_engine

    half = load_engine(make_artifact(checkpoint, tmp_path / "fp16", extra=("--dtype", "float16")))
    assert isinstance(half, TorchEngine) and half.manifest.build.dtype == "float16"
    assert {p.dtype for p in half.loaded.model.parameters()} == {torch.float16}
    sample = _scene()
    stats = half.generate(sample.image, sample.question, max_tokens=2, budget=1.0)
    full = engine.generate(sample.image, sample.question, max_tokens=2, budget=1.0)  # the float32 build
    assert 2 * stats["kv_bytes_before"] == full["kv_bytes_before"] > 0  # 2-byte KV entries, not 4


class _FakeTensorRTRunner:
    """Stands in for TensorRTRunner (GPU only): records the device it is built for."""

    devices: list[str] = []

    def __init__(self, directory: Path, spec: object = None, *, device: str = "cuda") -> None:
        self.spec = spec
        _FakeTensorRTRunner.devices.append(device)


def _as_tensorrt(onnx_artifact: Path, out: Path) -> Path:
    """The onnx artifact relabelled as a tensorrt one (its export folder as engines/), re-hashed."""
    import shutil

    from vlcache.config import BuildConfig

    shutil.copytree(onnx_artifact, out, ignore=shutil.ignore_patterns("triton"))
    (out / "onnx").rename(out / "engines")
    data = json.loads((out / MANIFEST).read_text())
    build = BuildConfig.from_dict({**data["build"], "backend": "tensorrt"})
    data.update(build=build.to_dict(), config_hash=build.compute_hash(), files=file_table(out))
    (out / MANIFEST).write_text(json.dumps(data))
    return out


class _StandInTriton:
    """The triton_python_backend_utils names ServedModel uses, recording what the model does with them."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    logged: list[tuple[str, str]] = []
    gauges: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}

    class Logger:
        @staticmethod
        def log_info(message: str) -> None:
            _StandInTriton.logged.append(("info", message))

        @staticmethod
        def log_warn(message: str) -> None:
            _StandInTriton.logged.append(("warn", message))

        @staticmethod
        def log_error(message: str) -> None:
            _StandInTriton.logged.append(("error", message))

    @staticmethod
    def using_decoupled_model_transaction_policy(config: dict) -> bool:
        return True

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: object = None) -> None:
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    class MetricFamily:
        GAUGE = "gauge"

        def __init__(self, name: str, description: str, kind: str) -> None:
            assert kind == "gauge" and description
            self.name = name

        def Metric(self, labels: dict[str, str]) -> object:  # noqa: N802 - Triton's spelling
            values = _StandInTriton.gauges.setdefault((self.name, tuple(sorted(labels.items()))), [])
            return type("Gauge", (), {"set": lambda _self, value: values.append(value)})()

    @staticmethod
    def get_input_tensor_by_name(request: _StandInRequest, name: str) -> object:
        value = request.inputs.get(name)
        return None if value is None else _StandInTriton.Tensor(name, value)


class _StandInRequest:
    """A request as the Python backend hands it over: inputs, a cancelled flag, a response sender whose
    ``send`` waits for ``gate`` (so a test can show that ``execute`` does not wait for the answer)."""

    def __init__(self, inputs: dict[str, np.ndarray], gate=None, cancel_after: int | None = None) -> None:
        import threading

        self.inputs, self.gate, self.cancel_after = inputs, gate, cancel_after
        self.sent: list[tuple[object, int]] = []
        self.finished = threading.Event()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def get_response_sender(self) -> _StandInRequest:
        return self

    def send(self, response: object = None, flags: int = 0) -> None:
        if self.gate is not None:
            assert self.gate.wait(60)
        assert not self.finished.is_set(), "a response after the final one"
        self.sent.append((response, flags))
        if flags & _StandInTriton.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.finished.set()

    def text(self) -> str:
        return "".join(
            bytes(r.outputs["text"][0]).decode() for r, _ in self.sent if r is not None and "text" in r.outputs
        )

    def final(self) -> object:
        assert self.finished.wait(60), "no final response"
        finals = [r for r, flags in self.sent if flags & _StandInTriton.TRITONSERVER_RESPONSE_COMPLETE_FINAL]
        assert len(finals) == 1
        return finals[0]


def _served_model(tmp_path: Path, **params: str):
    """A ServedModel on the stand-in Triton, initialized with these model-config parameters."""
    from vlcache.serving.model import ServedModel

    class Model(ServedModel):
        pb_utils = _StandInTriton

    config = {"name": "vlcache", "parameters": {k: {"string_value": v} for k, v in params.items()}}
    model = Model()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_name": "vlcache",
            "model_instance_name": "vlcache_0_1",
            "model_instance_device_id": "1",
        }
    )
    return model


def test_the_instance_device_reaches_the_tensorrt_runner(onnx_artifact: Path, tmp_path: Path, monkeypatch):
    from vlcache.serving.engine import load_engine

    monkeypatch.setattr("vlcache.runtime.tensorrt_runner.TensorRTRunner", _FakeTensorRTRunner)
    monkeypatch.setattr(_FakeTensorRTRunner, "devices", [])
    trt = _as_tensorrt(onnx_artifact, tmp_path / "trt")
    assert load_engine(trt).backend == "tensorrt"  # default: the current CUDA device

    model = _served_model(tmp_path, artifact_dir=str(trt), device="cuda", num_threads="0")
    assert model.engine.backend == "tensorrt"
    assert _FakeTensorRTRunner.devices == ["cuda", "cuda:1"]  # the instance's GPU, as model.py computes it
    assert not model.service.batching and model.service.max_batch_size == 1  # TensorRT: one at a time
    model.finalize()
    with pytest.raises(ArtifactError, match="runs on a CUDA device .* not on 'cpu'"):
        load_engine(trt, device="cpu")


def _request_inputs(prompt: str, max_tokens: int, image: bytes | None = None, **extra: np.ndarray) -> dict:
    if image is None:
        buf = io.BytesIO()
        _scene().image.save(buf, format="PNG")
        image = buf.getvalue()
    return {"image": _obj(image), "prompt": _obj(prompt), "max_tokens": np.array([max_tokens], np.int32), **extra}


def _gauge(name: str, instance: str = "vlcache_0_1") -> list[float]:
    return _StandInTriton.gauges[(name, (("instance", instance), ("model", "vlcache")))]


def test_served_model_hands_requests_to_the_batching_service(onnx_artifact: Path, tmp_path: Path, monkeypatch):
    import threading
    import time

    from vlcache.serving.engine import load_engine

    question = _scene().question
    reference = load_engine(onnx_artifact)  # run alone, in this process
    expected = {n: reference.generate(_scene().image, question, max_tokens=n) | {"text": ""} for n in (6, 3)}
    for n in expected:
        expected[n]["text"] = "".join(_deltas(reference, question, n))
    monkeypatch.setattr(_StandInTriton, "gauges", {})
    monkeypatch.setattr(_StandInTriton, "logged", [])
    model = _served_model(
        tmp_path, artifact_dir=str(onnx_artifact), max_batch_size="2", kv_cache_mb="64", max_prefill_tokens="256"
    )
    model.cancel_poll_interval = 0.0  # every poll asks: `late` is cancelled right after its first response
    try:
        assert model.service.batching and model.service.max_batch_size == 2
        assert model.service.kv_cache_bytes == 64 * 2**20
        assert model.service.max_prefill_tokens == 256
        assert any("prefilling at most 256 prompt tokens" in m for kind, m in _StandInTriton.logged if kind == "info")
        # every gauge exists from the load on, labelled with the model and the instance
        assert {name for name, _ in _StandInTriton.gauges} == set(protocol.METRICS)
        assert _gauge(protocol.METRIC_POOL_CAPACITY) == [64 * 2**20] and _gauge(protocol.METRIC_POOL_USED) == [0.0]

        gate = threading.Event()
        good = [_StandInRequest(_request_inputs(question, n), gate) for n in (6, 3)]
        bad = _StandInRequest(_request_inputs(question, 4, image=b"not an image"))
        early = _StandInRequest(_request_inputs(question, 4), cancel_after=0)  # cancelled before execute
        late = _StandInRequest(_request_inputs(question, 32, budget=np.array([1.0], np.float32)), cancel_after=1)
        assert model.execute([*good, bad, early, late]) is None
        # execute returned while the answers' responses are still blocked: they are sent later
        assert not any(r.sent for r in good)
        gate.set()

        for request, max_tokens in zip(good, (6, 3)):
            stats = json.loads(bytes(request.final().outputs["stats"][0]))
            assert set(stats) == set(protocol.STATS_KEYS) and stats["pool_capacity_bytes"] == 64 * 2**20
            assert request.text() == expected[max_tokens]["text"]
            assert stats["output_tokens"] == expected[max_tokens]["output_tokens"]
            assert stats["kept_per_layer"] == expected[max_tokens]["kept_per_layer"]
        error = bad.final().error
        assert error.code == "INVALID_ARG" and error.message.startswith("INVALID_ARGUMENT: input 'image'")
        assert early.final() is None and early.sent == [(None, 1)]  # an empty final response
        assert late.final() is None and len(late.sent) == 2  # one text, then the empty final: no stats
        deadline = time.monotonic() + 10
        while _gauge(protocol.METRIC_POOL_USED)[-1] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert max(_gauge(protocol.METRIC_POOL_USED)) > 0 and _gauge(protocol.METRIC_POOL_USED)[-1] == 0
        assert _gauge(protocol.METRIC_BATCH_SIZE)[-1] == 0

        # an unexpected failure: INTERNAL, with the exception's type; the model goes on
        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        with monkeypatch.context() as patch:
            patch.setattr(model.service, "submit", boom)
            failing = _StandInRequest(_request_inputs(question, 2))
            model.execute([failing])
        error = failing.final().error
        assert (error.code, error.message) == ("INTERNAL", "INTERNAL: RuntimeError: boom")
    finally:
        model.finalize()
    after = _StandInRequest(_request_inputs(question, 2))
    model.execute([after])  # a request after finalize: a clear error, not a hang
    assert after.final().error.message == "INTERNAL: RuntimeError: the service is closed"


def test_a_stream_asks_triton_about_cancellation_at_most_once_per_interval():
    """``is_cancelled()`` is a round trip to Triton's process: polled after every token of every row
    it would cost the batch's decode step; a stream asks at most once per interval and remembers a
    cancellation for good."""
    import time

    from vlcache.serving.model import ServedModel, _Stream

    class Counting(_StandInRequest):
        asked = 0
        flag = False

        def is_cancelled(self) -> bool:
            self.asked += 1
            return self.flag

    model = ServedModel()
    model.cancel_poll_interval = 0.2
    request = Counting({})
    stream = _Stream(model, request)
    assert not any(stream.cancelled() for _ in range(1000))
    assert request.asked == 1
    request.flag = True
    assert not stream.cancelled() and request.asked == 1  # not asked again within the interval
    time.sleep(0.25)
    assert stream.cancelled() and request.asked == 2
    request.flag = False
    assert stream.cancelled() and request.asked == 2  # a cancellation is final; no more questions


def _deltas(engine, question: str, max_tokens: int) -> list[str]:
    out: list[str] = []
    engine.generate(_scene().image, question, max_tokens=max_tokens, on_text=out.append)
    return out


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_batch_size": "0"}, "max_batch_size must be an integer > 0, got '0'"),
        ({"max_batch_size": "2.5"}, "max_batch_size must be an integer > 0, got '2.5'"),
        ({"kv_cache_mb": "-1"}, "kv_cache_mb must be a number > 0, got '-1'"),
        ({"kv_cache_mb": "nan"}, "kv_cache_mb must be a number > 0, got 'nan'"),
        ({"kv_cache_fraction": "1.5"}, r"kv_cache_fraction must be a number in \(0, 1\], got '1.5'"),
        ({"max_prefill_tokens": "-1"}, "max_prefill_tokens must be an integer >= 0, got '-1'"),
        ({"max_prefill_tokens": "2.5"}, "max_prefill_tokens must be an integer >= 0, got '2.5'"),
        ({"max_prefill_tokens": "lots"}, "max_prefill_tokens must be an integer >= 0, got 'lots'"),
    ],
)
def test_served_model_refuses_bad_batching_parameters(params: dict, message: str):
    from vlcache.engine.pool import DEFAULT_POOL_FRACTION, available_memory_bytes
    from vlcache.serving.model import service_settings

    with pytest.raises(ValueError, match=message):
        service_settings(params)
    assert service_settings({"max_batch_size": "", "kv_cache_mb": ""})[0] is None
    assert service_settings({"kv_cache_mb": "1.5"}) == (None, int(1.5 * 2**20), None)
    assert service_settings({"max_prefill_tokens": ""})[2] is None  # empty: the default
    assert service_settings({"max_prefill_tokens": "0"})[2] == 0  # 0: no limit
    assert service_settings({"max_prefill_tokens": "4096"})[2] == 4096
    default = service_settings({})[1]
    assert abs(default - DEFAULT_POOL_FRACTION * available_memory_bytes()) < 0.05 * default


def test_onnx_engine_refuses_a_gpu_device(onnx_artifact: Path):
    from vlcache.serving.engine import load_engine

    assert load_engine(onnx_artifact, device="cpu").backend == "onnx"
    with pytest.raises(ArtifactError, match=r"the onnx backend runs on the CPU \(ONNX Runtime\), not on 'cuda:0'"):
        load_engine(onnx_artifact, device="cuda:0")


# --- client statistics -----------------------------------------------------------------------------
def test_summarize_percentiles_and_throughput():
    from vlcache.client import Generation
    from vlcache.client.stats import summarize

    gens = [
        Generation(
            text="x",
            ttft=t,
            inter_token_latencies=[0.01, 0.03],
            latency=t + 0.04,
            output_tokens=3,
            prompt_tokens=10,
            responses=3,
            stats={"kv_bytes_after": 100, "kv_tokens_kept": 1, "kv_tokens_total": 10},
        )
        for t in (0.1, 0.2, 0.3, 0.4, 0.5)
    ]
    s = summarize(gens, wall_seconds=2.0, failed=1)
    assert (s["requests"], s["succeeded"], s["failed"]) == (6, 5, 1)
    assert s["ttft_ms"]["p50"] == pytest.approx(300.0) and s["ttft_ms"]["p90"] == pytest.approx(460.0)
    assert s["itl_ms"]["mean"] == pytest.approx(20.0)
    assert s["output_tokens_per_s"] == pytest.approx(7.5) and s["requests_per_s"] == pytest.approx(2.5)
    assert s["kv_kept_fraction_mean"] == pytest.approx(0.1)
    assert summarize([], 1.0)["ttft_ms"]["p99"] is None


# --- command lines: user mistakes are one line, exit status 2 ---------------------------------------
def _exit(main, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code), capsys.readouterr().err


def test_serve_and_bench_report_user_mistakes_on_one_line(tmp_path: Path, capsys):
    from vlcache.cli.bench import main as bench_main
    from vlcache.cli.serve import main as serve_main
    from vlcache.serving.server import free_port

    code, err = _exit(serve_main, [str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err.startswith("vlcache-serve: error: artifact directory not found") and err.count("\n") == 1
    for flag, value, message in [
        ("--max-batch-size", "0", "argument --max-batch-size: must be >= 1, got 0"),
        ("--kv-cache-mb", "0", "argument --kv-cache-mb: must be > 0, got 0"),
        ("--kv-cache-mb", "lots", "argument --kv-cache-mb: invalid number: 'lots'"),
        ("--max-prefill-tokens", "-1", "argument --max-prefill-tokens: must be >= 0, got -1"),
        ("--max-prefill-tokens", "2.5", "argument --max-prefill-tokens: invalid int value: '2.5'"),
    ]:
        code, err = _exit(serve_main, [str(tmp_path), flag, value], capsys)
        assert code == 2 and err.startswith(f"vlcache-serve: error: {message}") and err.count("\n") == 1, err
    code, err = _exit(bench_main, ["--budgets", "1.0,0", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "budget 0 is outside (0, 1] in --budgets" in err and err.count("\n") == 1
    argv = ["--url", f"127.0.0.1:{free_port()}", "--requests", "1", "--out", str(tmp_path / "b")]
    code, err = _exit(bench_main, argv, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("vlcache-bench: error: no ready vlcache model at")
    assert not (tmp_path / "b").exists()


def test_free_ports_are_all_different():
    from vlcache.serving.server import free_ports

    for _ in range(200):  # separate free_port() calls could return one port twice (a server refusing to start)
        ports = free_ports("127.0.0.1", [0, 0, 0])
        assert len(set(ports)) == 3 and all(p > 0 for p in ports)
    given = free_ports("127.0.0.1", [8001, 0, 0])
    assert given[0] == 8001 and len(set(given)) == 3


def test_serve_help_states_the_batching_defaults(capsys):
    from vlcache.cli.serve import main as serve_main
    from vlcache.config import DEFAULT_MAX_PREFILL_TOKENS
    from vlcache.engine.pool import DEFAULT_POOL_FRACTION

    with pytest.raises(SystemExit) as e:
        serve_main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the build's max_batch_size)" in text
    assert f"(default: {DEFAULT_POOL_FRACTION:.0%} of the memory available when the model loads)" in text
    assert "0: no limit (every waiting request that fits is prefilled before the next decode step) " in text
    assert f"(default: {DEFAULT_MAX_PREFILL_TOKENS})" in text  # serve.py states the figure without importing it
    assert "(default: None)" not in text


class _StubServer:
    """What :func:`vlcache.serving.server.serve` uses of a TritonServer; ``during`` runs while it waits."""

    def __init__(self, tmp_path: Path, during, exit_code: int | None = None) -> None:
        import types

        self.repository = tmp_path / "repository"
        self.log_path = tmp_path / "tritonserver.log"
        self.log_path.write_text("line 1\nthe last line of the log\n")
        self.url, self.http_port, self.metrics_port = "127.0.0.1:1", 2, 3
        self.during, self.exit_code, self.polls = during, exit_code, 0
        self.process = types.SimpleNamespace(returncode=exit_code)
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def running(self) -> bool:
        self.polls += 1
        if self.polls == 1:
            self.during()
        return self.exit_code is None

    def stop(self) -> int:
        self.calls.append("stop")
        return -15

    def cleanup(self) -> None:
        self.calls.append("cleanup")


def test_serve_stops_on_sigterm_and_restores_the_handler(tmp_path: Path):
    import os
    import signal

    from vlcache.serving.server import serve

    said: list[str] = []
    server = _StubServer(tmp_path, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert serve(server, said.append, said.append) is None  # type: ignore[arg-type]
    assert server.calls == ["start", "stop", "cleanup"]
    assert said[0].startswith("starting tritonserver") and said[1].startswith("ready: gRPC 127.0.0.1:1")
    assert said[2:] == ["stopping", "tritonserver stopped (status -15)"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_serve_stops_on_ctrl_c_and_reports_an_unexpected_exit(tmp_path: Path):
    from vlcache.serving.server import serve

    def interrupt() -> None:
        raise KeyboardInterrupt

    server = _StubServer(tmp_path, interrupt)
    with pytest.raises(KeyboardInterrupt):
        serve(server, print, print)  # type: ignore[arg-type]
    assert server.calls == ["start", "stop", "cleanup"]

    warned: list[str] = []
    server = _StubServer(tmp_path, lambda: None, exit_code=3)
    assert serve(server, print, warned.append) == 3  # type: ignore[arg-type]
    assert len(warned) == 1 and warned[0].startswith("tritonserver exited unexpectedly (status 3)")
    assert warned[0].endswith("the last line of the log") and server.calls == ["start", "stop", "cleanup"]


def test_server_error_class_for_unexpected_failures():
    from vlcache.client import InvalidArgument, ServerError
    from vlcache.client.client import server_error

    assert isinstance(server_error("INVALID_ARGUMENT: input 'image' is empty"), InvalidArgument)
    e = server_error("INTERNAL: RuntimeError: boom")
    assert isinstance(e, ServerError) and not isinstance(e, InvalidArgument)
