"""Typed gRPC client of the served `vlcache` model, synchronous and asyncio, over `tritonclient.grpc`.

Contract:
* ``generate(image, prompt, max_tokens=..., budget=None, method=None, stream=True)`` sends one
  request on its own gRPC stream and returns a :class:`Generation` once the final response came:
  the text, TTFT (send → first non-empty text), the gaps between successive non-empty text
  responses (one per token in practice: the server sends each token's text as soon as it decodes),
  end-to-end latency (send → final response), token counts and the server's stats
  (:data:`vlcache.serving.protocol.STATS_KEYS`). ``stream=False`` gives the same result without
  calling ``on_text`` (the model is decoupled, so the wire is a stream either way).
* ``stream(...)`` yields :class:`Chunk` s as they arrive; leaving the loop early (``break``, an
  exception, closing the generator) cancels the request on the server.
* Errors: :class:`ServerUnavailable` (cannot connect / server not ready), :class:`ServerGone` (a
  subclass: the connection was lost while the request was open — the server stopped or crashed;
  every open stream ends with it at once, none hangs), :class:`RequestTimeout`
  (no final response within ``timeout`` seconds; the request is cancelled),
  :class:`InvalidArgument` (the server refused the request's inputs), :class:`ServerError` (any
  other failure reported by the server). All derive from :class:`ClientError`.
* The sync :class:`Client` runs one request at a time (a lock); use one client per thread, or the
  :class:`AsyncClient`, which runs any number of requests concurrently on one channel.
* Times are ``time.perf_counter()`` seconds taken when the client receives each response.
"""

from __future__ import annotations

import importlib
import io
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlcache.serving import protocol

ImageLike = Any  # PIL.Image.Image | bytes | str | Path
DEFAULT_URL = "127.0.0.1:8001"


class ClientError(Exception):
    """Base of the client's errors."""


class ServerUnavailable(ClientError):
    """The server cannot be reached, or the model is not ready."""


class ServerGone(ServerUnavailable):
    """The server went away (stopped or crashed) while the request was open; retry once it is back."""


class RequestTimeout(ClientError):
    """No final response within the timeout (the request was cancelled)."""


class ServerError(ClientError):
    """The server answered with an error."""


class InvalidArgument(ServerError):
    """The server refused the request's inputs (message starts with INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Chunk:
    """One streamed response: its new ``text``, arrival ``time`` (perf_counter), and on the final
    response ``final=True`` and the server's ``stats``."""

    text: str
    time: float
    final: bool = False
    stats: dict[str, Any] | None = None


@dataclass
class Generation:
    """One finished request, as the client saw it (seconds throughout).

    Attributes:
        text: the whole new text. ttft: send → first non-empty text (None if there was none).
        inter_token_latencies: gaps between successive non-empty text responses.
        latency: send → final response. output_tokens / prompt_tokens: from the server's stats.
        responses: non-empty text responses received. stats: the server's stats (JSON object).
        request_id: the id sent with the request.
    """

    text: str
    ttft: float | None
    inter_token_latencies: list[float]
    latency: float
    output_tokens: int
    prompt_tokens: int
    responses: int
    stats: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "ttft": self.ttft,
            "inter_token_latencies": list(self.inter_token_latencies),
            "latency": self.latency,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "responses": self.responses,
            "stats": dict(self.stats),
            "request_id": self.request_id,
        }


def encode_image(image: ImageLike) -> bytes:
    """PIL image (sent as PNG), encoded bytes (sent as they are) or a path to an image file."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be a PIL image, bytes or a path, got {type(image).__name__}")


def build_inputs(image: ImageLike, prompt: str, max_tokens: int, budget: float | None, method: str | None) -> list[Any]:
    """The request's ``tritonclient.grpc.InferInput`` list (names and dtypes from the protocol)."""
    import tritonclient.grpc as grpcclient

    def tensor(spec: protocol.TensorSpec, value: np.ndarray) -> Any:
        item = grpcclient.InferInput(spec.name, list(value.shape), spec.datatype)
        item.set_data_from_numpy(value)
        return item

    def text(value: str | bytes) -> np.ndarray:
        return np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=np.object_)

    inputs = [
        tensor(protocol.IMAGE, text(encode_image(image))),
        tensor(protocol.PROMPT, text(prompt)),
        tensor(protocol.MAX_TOKENS, np.array([max_tokens], dtype=np.int32)),
    ]
    if budget is not None:
        inputs.append(tensor(protocol.BUDGET, np.array([budget], dtype=np.float32)))
    if method is not None:
        inputs.append(tensor(protocol.METHOD, text(method)))
    return inputs


def server_error(message: str) -> ServerError:
    """The exception for an error message the server sent."""
    cls = InvalidArgument if protocol.INVALID_ARGUMENT in message.split(":")[0] else ServerError
    return cls(message)


#: gRPC details of a connection that was up and then lost (the server stopped or crashed)
_LOST = ("socket closed", "stream removed", "connection reset", "broken pipe", "goaway", "eof", "end of tcp stream")


def _rpc_error(e: Exception, url: str, request: _Request | None = None) -> ClientError:
    """Map a transport error (grpc / tritonclient) to the client's exceptions; ``request``: the open
    request it ended (a lost connection is then :class:`ServerGone`)."""
    status = str(getattr(e, "status", lambda: "")() if callable(getattr(e, "status", None)) else "")
    code = getattr(e, "code", None)
    if callable(code):
        status = status or str(code())
    text = ""
    for attr in ("details", "message"):  # grpc's AioRpcError: details(); tritonclient's exception: message()
        getter = getattr(e, attr, None)
        if callable(getter) and not text:
            text = str(getter() or "")
    text = " ".join((text or str(e)).split())  # one line
    if "UNAVAILABLE" in status:
        if request is not None and (request.responses > 0 or any(w in text.lower() for w in _LOST)):
            return ServerGone(
                f"the vlcache server at {url} went away during request {request.id} "
                f"(connection lost after {request.responses} response(s): {text}); "
                "it stopped or crashed - retry once it is back"
            )
        return ServerUnavailable(f"cannot reach the vlcache server at {url}: {text}")
    if "DEADLINE_EXCEEDED" in status:
        return RequestTimeout(f"request to {url} timed out: {text}")
    if "INVALID_ARGUMENT" in status:
        return InvalidArgument(text)
    return ServerError(text)


def _chunk(result: Any, now: float) -> Chunk:
    """A Chunk from a tritonclient InferResult."""
    text_out = result.as_numpy(protocol.TEXT.name)
    text = b"".join(bytes(t) for t in text_out.reshape(-1)).decode("utf-8") if text_out is not None else ""
    params = result.get_response().parameters
    final = bool(params["triton_final_response"].bool_param) if "triton_final_response" in params else False
    stats_out = result.as_numpy(protocol.STATS.name)
    stats = json.loads(bytes(stats_out.reshape(-1)[0]).decode("utf-8")) if stats_out is not None else None
    return Chunk(text, now, final, stats)


def _tritonclient(module: str) -> Any:
    """``tritonclient.grpc`` or ``tritonclient.grpc.aio``; ClientError when the serve extra is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ClientError("tritonclient is not installed: pip install 'vlcache[serve]'") from None


class _Request:
    """The protocol side of one request, shared by both clients: its inputs (:func:`build_inputs`),
    id and deadline (``timeout`` seconds from now), and each response turned into a :class:`Chunk`
    (``finished`` once the final response, or an error, came: a request left unfinished is cancelled)."""

    def __init__(self, inputs: list[Any], request_id: str | None, timeout: float, url: str) -> None:
        self.inputs = inputs
        self.id = request_id or uuid.uuid4().hex
        self.timeout = timeout
        self.deadline = time.perf_counter() + timeout
        self.url = url
        self.finished = False
        self.responses = 0  # responses received so far

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once past it)."""
        return max(self.deadline - time.perf_counter(), 0.0)

    def timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"request {self.id}: no final response within {self.timeout:g} s")

    def receive(self, result: Any, error: Any, now: float) -> Chunk:
        """The chunk of one response received at ``now``; an error the stream reported is raised as
        the client's exception (a transport status as :func:`_rpc_error` maps it, else the server's
        message as :func:`server_error` does)."""
        if error is not None:
            self.finished = True
            if "StatusCode." in str(getattr(error, "status", lambda: "")() or ""):
                raise _rpc_error(error, self.url, self)
            raise server_error(str(error.message() if callable(getattr(error, "message", None)) else error))
        self.responses += 1
        chunk = _chunk(result, now)
        self.finished = chunk.final
        return chunk


class _Assembler:
    """Builds a Generation from the chunks of one request."""

    def __init__(self, request_id: str, sent: float, on_text: Callable[[str], None] | None) -> None:
        self.request_id, self.sent, self.on_text = request_id, sent, on_text
        self.parts: list[str] = []
        self.times: list[float] = []
        self.stats: dict[str, Any] | None = None
        self.end: float | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
            self.times.append(chunk.time)
            if self.on_text is not None:
                self.on_text(chunk.text)
        if chunk.stats is not None:
            self.stats = chunk.stats
        if chunk.final:
            self.end = chunk.time

    def result(self) -> Generation:
        if self.end is None:
            raise ServerError(f"request {self.request_id}: the stream ended without a final response")
        stats = self.stats or {}
        if not stats:
            raise ServerError(f"request {self.request_id}: the final response carried no stats (cancelled?)")
        return Generation(
            text="".join(self.parts),
            ttft=(self.times[0] - self.sent) if self.times else None,
            inter_token_latencies=[b - a for a, b in zip(self.times, self.times[1:])],
            latency=self.end - self.sent,
            output_tokens=int(stats.get("output_tokens", len(self.parts))),
            prompt_tokens=int(stats.get("prompt_tokens", 0)),
            responses=len(self.parts),
            stats=stats,
            request_id=self.request_id,
        )


class Client:
    """Synchronous client (see the module docstring). ``url`` is ``host:port`` of Triton's gRPC endpoint."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 300.0, model: str = protocol.MODEL_NAME) -> None:
        self._grpc = _tritonclient("tritonclient.grpc").InferenceServerClient(url)
        self.url, self.timeout, self.model = url, timeout, model
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """The server is live and the model ready."""
        try:
            return bool(self._grpc.is_server_live() and self._grpc.is_model_ready(self.model))
        except Exception:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"model '{self.model}' at {self.url} not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def stream(
        self,
        image: ImageLike,
        prompt: str,
        max_tokens: int = 64,
        budget: float | None = None,
        method: str | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[Chunk]:
        """Yield the request's responses as they arrive (the last one has ``final=True``)."""
        inputs = build_inputs(image, prompt, max_tokens, budget, method)
        request = _Request(inputs, request_id, self.timeout if timeout is None else timeout, self.url)
        events: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
        with self._lock:
            try:
                self._grpc.start_stream(callback=lambda result, error: events.put((result, error, time.perf_counter())))
            except Exception as e:
                raise _rpc_error(e, self.url) from None
            try:
                self._grpc.async_stream_infer(
                    self.model, request.inputs, request_id=request.id, enable_empty_final_response=True
                )
                while not request.finished:
                    try:
                        result, error, now = events.get(timeout=request.remaining())
                    except queue.Empty:
                        raise request.timed_out() from None
                    yield request.receive(result, error, now)
            finally:
                try:
                    self._grpc.stop_stream(cancel_requests=not request.finished)
                except Exception:
                    pass

    def generate(
        self,
        image: ImageLike,
        prompt: str,
        max_tokens: int = 64,
        budget: float | None = None,
        method: str | None = None,
        *,
        stream: bool = True,
        on_text: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Run one request to its end (see the module docstring)."""
        request_id = uuid.uuid4().hex
        image = encode_image(image)  # before the clock starts
        assembler = _Assembler(request_id, time.perf_counter(), on_text if stream else None)
        for chunk in self.stream(image, prompt, max_tokens, budget, method, timeout=timeout, request_id=request_id):
            assembler.add(chunk)
        return assembler.result()

    def close(self) -> None:
        self._grpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client: each request on its own gRPC stream, any number concurrently."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 300.0, model: str = protocol.MODEL_NAME) -> None:
        self._grpc = _tritonclient("tritonclient.grpc.aio").InferenceServerClient(url)
        self.url, self.timeout, self.model = url, timeout, model

    async def ready(self) -> bool:
        try:
            return bool(await self._grpc.is_server_live() and await self._grpc.is_model_ready(self.model))
        except Exception:
            return False

    async def stream(
        self,
        image: ImageLike,
        prompt: str,
        max_tokens: int = 64,
        budget: float | None = None,
        method: str | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Yield the request's responses as they arrive; leaving early cancels the request."""
        import asyncio

        inputs = build_inputs(image, prompt, max_tokens, budget, method)
        request = _Request(inputs, request_id, self.timeout if timeout is None else timeout, self.url)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.model,
                "inputs": request.inputs,
                "request_id": request.id,
                "enable_empty_final_response": True,
            }

        try:
            responses = self._grpc.stream_infer(requests())
        except Exception as e:
            raise _rpc_error(e, self.url) from None
        try:
            iterator = responses.__aiter__()
            while not request.finished:
                try:
                    result, error = await asyncio.wait_for(iterator.__anext__(), timeout=request.remaining())
                except StopAsyncIteration:
                    raise ServerError(f"request {request.id}: the stream ended without a final response") from None
                except asyncio.TimeoutError:
                    raise request.timed_out() from None
                except ClientError:
                    raise
                except Exception as e:
                    raise _rpc_error(e, self.url, request) from None
                yield request.receive(result, error, time.perf_counter())
        finally:
            if not request.finished:
                responses.cancel()

    async def generate(
        self,
        image: ImageLike,
        prompt: str,
        max_tokens: int = 64,
        budget: float | None = None,
        method: str | None = None,
        *,
        stream: bool = True,
        on_text: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Run one request to its end (see the module docstring)."""
        request_id = uuid.uuid4().hex
        image = encode_image(image)  # before the clock starts
        assembler = _Assembler(request_id, time.perf_counter(), on_text if stream else None)
        async for chunk in self.stream(
            image, prompt, max_tokens, budget, method, timeout=timeout, request_id=request_id
        ):
            assembler.add(chunk)
        return assembler.result()

    async def close(self) -> None:
        await self._grpc.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
