"""The logic of the Triton Python-backend model `vlcache` (the repository's ``model.py`` only subclasses it).

Contract:
* ``initialize`` reads the model config's parameters (rendered by
  :func:`vlcache.serving.render_repository`): ``artifact_dir`` (absolute, or relative to the model's
  folder in the repository), ``max_tokens_cap``, ``num_threads`` (torch and ONNX Runtime intra-op
  threads, 0 = leave their defaults), ``device`` (``cuda`` becomes the instance's ``cuda:N``),
  ``max_batch_size`` (requests decoded together; empty = the build's, ``manifest.build.max_batch_size``),
  ``kv_cache_mb`` (the KV pool in MiB; empty = ``kv_cache_fraction`` of the memory available at
  load, empty = :data:`vlcache.engine.pool.DEFAULT_POOL_FRACTION`), ``max_prefill_tokens`` (prompt
  tokens prefilled between two decode steps while a batch decodes, 0 = no limit; empty =
  :data:`vlcache.config.DEFAULT_MAX_PREFILL_TOKENS`); a bad value fails the load with a one-line message. It refuses a config that is not decoupled; then it loads the engine on
  that device with :func:`vlcache.serving.load_engine` and serves it with a
  :class:`vlcache.serving.service.Service` (in-flight batching for ONNX Runtime artifacts; torch and
  TensorRT run one request at a time).
* ``execute`` checks each request and hands it to the service, then returns at once (the model is
  decoupled): the responses are sent later, from the service's thread, on each request's response
  sender (through one sending thread, in order, so that the scheduler does not wait for Triton's
  process) — one response per new piece of text (output ``text``), then a final response (flag
  ``FINAL``) with ``text`` empty and ``stats`` (JSON). A bad request gets one final response
  carrying an ``INVALID_ARG`` error whose message starts with ``INVALID_ARGUMENT:``; an unexpected
  failure gets ``INTERNAL`` (message ``INTERNAL: <type>: <message>``). Every request gets exactly
  one final response; one request's failure leaves the others alone.
* A request the client cancels (Triton marks it cancelled; the service polls it while it waits and
  after each of its tokens, asking Triton's process at most every :data:`CANCEL_POLL_INTERVAL`
  seconds) stops within that time, gives its KV memory back at once, and is closed
  with a final response without outputs; other requests are not affected.
* Metrics: the gauges of :data:`vlcache.serving.protocol.METRICS` are Triton custom metrics
  (``pb_utils.MetricFamily``, kind GAUGE) with labels ``model`` (the model's name) and ``instance``
  (the model instance's name), set once at load and then from the service's listener by a
  publishing thread (only changed values, at most every :data:`METRICS_INTERVAL` seconds; the
  latest values are always published).
* ``finalize`` closes the service (open requests end with an ``INTERNAL`` error) and the metrics.
* The Triton utilities module (``triton_python_backend_utils``) is a class attribute, ``pb_utils``,
  set by the subclass in ``model.py``, so that this module imports without Triton (unit tests pass a
  stand-in).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlcache.serving import protocol
from vlcache.serving.request import InvalidRequest, Limits, parse_request

#: the metrics publisher sets the gauges at most this often (seconds)
METRICS_INTERVAL = 0.05
#: a request's cancellation is asked of Triton at most this often (seconds): ``is_cancelled()`` is a
#: round trip to Triton's process, and the scheduler polls every row after every token
CANCEL_POLL_INTERVAL = 0.05


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``parameters { key: ... value { string_value: ... } }`` of a model config, as a flat dict."""
    raw = model_config.get("parameters", {}) or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


def _optional_number(
    params: dict[str, str], key: str, kind: type, low: float, high: float | None = None, *, inclusive: bool = False
) -> Any:
    """``params[key]`` as ``kind`` (None when empty or absent), ``> low`` (``>= low`` when ``inclusive``)
    and ``<= high``; ValueError naming the parameter."""
    text = params.get(key, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = None
    above = value is not None and (value >= low if inclusive else value > low)
    ok = value is not None and math.isfinite(value) and above and (high is None or value <= high)
    if not ok:
        opening, relation = ("[", ">=") if inclusive else ("(", ">")
        bound = f"in {opening}{low:g}, {high:g}]" if high is not None else f"{relation} {low:g}"
        raise ValueError(
            f"model parameter {key} must be a{'n integer' if kind is int else ' number'} {bound}, got {text!r}"
        )
    return value


def service_settings(params: dict[str, str]) -> tuple[int | None, int, int | None]:
    """``(max_batch_size or None for the build's, KV pool bytes, max_prefill_tokens or None for
    the default)`` from the model parameters."""
    from vlcache.engine.pool import DEFAULT_POOL_FRACTION, pool_bytes

    max_batch = _optional_number(params, "max_batch_size", int, 0)
    megabytes = _optional_number(params, "kv_cache_mb", float, 0)
    fraction = _optional_number(params, "kv_cache_fraction", float, 0, 1)
    max_prefill = _optional_number(params, "max_prefill_tokens", int, 0, inclusive=True)
    return max_batch, pool_bytes(megabytes, DEFAULT_POOL_FRACTION if fraction is None else fraction), max_prefill


class MetricsExporter:
    """The service's gauges as Triton custom metrics (module docstring): :meth:`update` from any thread."""

    def __init__(self, pb: Any, labels: dict[str, str], interval: float = METRICS_INTERVAL) -> None:
        kind = getattr(pb.MetricFamily, "GAUGE", None)
        if kind is None:  # older stubs: the kinds are module attributes
            kind = pb.GAUGE
        self.families = {
            name: pb.MetricFamily(name=name, description=description, kind=kind)
            for name, description in protocol.METRICS.items()
        }
        self.gauges = {name: family.Metric(labels=labels) for name, family in self.families.items()}
        self.interval = interval
        self.sent: dict[str, float] = {}
        self._latest: dict[str, float] | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vlcache-metrics", daemon=True)
        self._thread.start()

    def update(self, values: dict[str, float]) -> None:
        """Publish ``values`` soon (the publisher keeps only the latest)."""
        with self._cond:
            self._latest = dict(values)
            self._cond.notify()

    def publish(self, values: dict[str, float]) -> None:
        """Set every gauge whose value changed, now, on the caller's thread."""
        for name, value in values.items():
            gauge = self.gauges.get(name)
            if gauge is not None and self.sent.get(name) != value:
                gauge.set(float(value))
                self.sent[name] = value

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._stop:
                    self._cond.wait()
                values, self._latest = self._latest, None
                if self._stop or values is None:
                    return
            try:
                self.publish(values)
            except Exception:  # noqa: BLE001 - an exporter must not stop serving
                pass
            with self._cond:
                self._cond.wait_for(lambda: self._stop, timeout=self.interval)

    def close(self) -> None:
        """Stop the publisher, then release the metrics before their families (Triton's order)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self.gauges.clear()
        self.families.clear()


#: what a stream queues: a function building the response (on the sending thread), or None
Build = Callable[[], Any] | None


class _Outbox:
    """Builds and sends the responses on its own thread, in the order they were queued: a
    Python-backend ``send`` waits for Triton's process, and the scheduler's thread should be deciding
    the next decode step meanwhile (the step's ONNX Runtime call releases the GIL)."""

    def __init__(self) -> None:
        self.closed = False
        self._queue: queue.SimpleQueue[tuple[_Stream, Build, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vlcache-responses", daemon=True)
        self._thread.start()

    def put(self, stream: _Stream, build: Build, flags: int) -> None:
        self._queue.put((stream, build, flags))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            stream, build, flags = item
            stream._send(build, flags)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop (later responses are sent on the caller's thread)."""
        self.closed = True
        self._queue.put(None)
        self._thread.join(timeout)


class _Stream:
    """One request's response stream: at most one final response, whatever calls it. Responses go
    through the model's :class:`_Outbox` (or are sent at once when it has none)."""

    def __init__(self, model: ServedModel, request: Any) -> None:
        self.model = model
        self.request = request
        self.sender = request.get_response_sender()
        self.closed = False
        self._cancelled = False
        self._polled = -math.inf
        self._lock = threading.Lock()

    def cancelled(self) -> bool:
        """Whether the client cancelled: asks Triton at most every ``model.cancel_poll_interval`` s."""
        if not self._cancelled:
            now = time.monotonic()
            if now - self._polled >= self.model.cancel_poll_interval:
                self._polled = now
                self._cancelled = bool(self.request.is_cancelled())
        return self._cancelled

    def _queue(self, build: Build, flags: int) -> None:
        outbox = getattr(self.model, "outbox", None)
        if outbox is None or outbox.closed:
            self._send(build, flags)
        else:
            outbox.put(self, build, flags)

    def _send(self, build: Build, flags: int) -> None:
        final = flags == self.model.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not final and self.cancelled():
            return
        try:
            response = None if build is None else build()
            if response is None:
                self.sender.send(flags=flags)
            elif final:
                self.sender.send(response, flags=flags)
            else:
                self.sender.send(response)
        except Exception as e:  # the client is gone (or the stream closed): stop generating for it
            self._cancelled = True
            what = "the final response" if final else "a response, request cancelled"
            self.model.logger.log_warn(f"vlcache: could not send {what}: {e}")

    def text(self, delta: str) -> None:
        if delta and not self.closed and not self.cancelled():
            self._queue(lambda: self.model._response(delta), 0)

    def _final(self, build: Build) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._queue(build, self.model.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def error(self, message: str, code: str) -> None:
        self._final(lambda: self.model._error(message, code))

    def failed(self, error: BaseException) -> None:
        if isinstance(error, InvalidRequest):
            self.error(str(error), "INVALID_ARG")
        else:
            self.model.logger.log_error(f"vlcache: request failed: {type(error).__name__}: {error}")
            self.error(f"INTERNAL: {type(error).__name__}: {error}", "INTERNAL")

    def done(self, stats: dict[str, Any] | None, error: BaseException | None) -> None:
        """The service's ``on_done``."""
        if error is not None:
            self.failed(error)
        elif stats is None or stats.get("finish_reason") == "cancelled" or self.cancelled():
            self._final(None)  # cancelled: an empty final response
        else:
            self._final(lambda: self.model._response("", stats))


class ServedModel:
    """Base of the repository's ``TritonPythonModel`` (see the module docstring)."""

    pb_utils: Any = None
    #: seconds between two questions to Triton about one request's cancellation
    cancel_poll_interval: float = CANCEL_POLL_INTERVAL

    def initialize(self, args: dict[str, Any]) -> None:
        from vlcache.methods import available
        from vlcache.serving.engine import load_engine
        from vlcache.serving.service import Service

        pb = self.pb_utils
        self.logger = pb.Logger
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise ValueError("the vlcache model streams: its config needs model_transaction_policy { decoupled: true }")
        params = model_parameters(config)
        max_batch_size, kv_cache_bytes, max_prefill_tokens = service_settings(params)  # checked before the (slow) load
        artifact = Path(params.get("artifact_dir", "../.."))
        if not artifact.is_absolute():
            artifact = Path(args["model_repository"]) / artifact
        threads = int(params.get("num_threads", "0") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        device = params.get("device", "cpu") or "cpu"
        if device == "cuda":  # KIND_GPU instances: one per GPU of the instance group
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        self.engine = load_engine(artifact.resolve(), device=device, threads=max(threads, 0))
        cap = int(params.get("max_tokens_cap", "") or protocol.DEFAULT_MAX_TOKENS_CAP)
        self.limits = Limits(methods=tuple(available()), max_tokens_cap=cap)
        labels = {
            "model": str(args.get("model_name") or config.get("name") or protocol.MODEL_NAME),
            "instance": str(args.get("model_instance_name") or "0"),
        }
        self.metrics = MetricsExporter(pb, labels)
        self.outbox = _Outbox()
        try:
            self.service = Service(
                self.engine,
                max_batch_size=max_batch_size,
                kv_cache_bytes=kv_cache_bytes,
                max_prefill_tokens=max_prefill_tokens,
                listener=self.metrics.update,
            )
        except BaseException:
            self.outbox.close()
            self.metrics.close()
            raise
        self.metrics.publish(self.service.metrics())  # once at load: every gauge exists from the start
        prefill = self.service.max_prefill_tokens
        limit = f"prefilling at most {prefill} prompt tokens between decode steps" if prefill else "no prefill limit"
        batching = (
            f"in-flight batching of up to {self.service.max_batch_size} requests over a KV pool of "
            f"{self.service.kv_cache_bytes / 2**20:.1f} MiB, {limit}"
            if self.service.batching
            else "one request at a time"
        )
        self.logger.log_info(
            f"vlcache: {self.engine.backend} engine from {artifact.resolve()} "
            f"(default {self.engine.default_config.method} at budget {self.engine.default_config.budget}); {batching}"
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.serve(request)
        return None

    def finalize(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()
        outbox = getattr(self, "outbox", None)
        if outbox is not None:
            outbox.close()  # after the service: the final responses it sent on closing go out first
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        self.__dict__.pop("engine", None)

    # --- one request -----------------------------------------------------------------------------
    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _response(self, text: str, stats: dict[str, Any] | None = None) -> Any:
        pb = self.pb_utils
        outputs = [pb.Tensor(protocol.TEXT.name, np.array([text.encode("utf-8")], dtype=np.object_))]
        if stats is not None:
            blob = json.dumps(stats, sort_keys=True).encode("utf-8")
            outputs.append(pb.Tensor(protocol.STATS.name, np.array([blob], dtype=np.object_)))
        return pb.InferenceResponse(output_tensors=outputs)

    def _error(self, message: str, code: str) -> Any:
        pb = self.pb_utils
        error = pb.TritonError(message, getattr(pb.TritonError, code))
        return pb.InferenceResponse(output_tensors=[], error=error)

    def serve(self, request: Any) -> None:
        """Check ``request`` and hand it to the service; returns at once (module docstring)."""
        stream = _Stream(self, request)
        try:
            if stream.cancelled():
                stream.done(None, None)
                return
            parsed = parse_request(
                {spec.name: self._input(request, spec.name) for spec in protocol.INPUTS}, self.limits
            )
            self.service.submit(
                parsed.image,
                parsed.prompt,
                max_tokens=parsed.max_tokens,
                budget=parsed.budget,
                method=parsed.method,
                on_text=stream.text,
                on_done=stream.done,
                cancelled=stream.cancelled,
            )
        except Exception as e:  # noqa: BLE001 - this request fails alone; the model goes on
            stream.failed(e)
