"""The service behind the served model: requests in, streamed text and final stats out, batched when the engine can.

Contract of :class:`Service` (what :mod:`vlcache.serving.model` drives; the tests drive it directly):

* ``submit(image, prompt, *, max_tokens, budget, method, on_text, on_done, cancelled)`` checks the
  request on the caller's thread — prompt formatting, tokenization, the length check, the budget and
  method overrides — and raises :class:`~vlcache.serving.request.InvalidRequest` for a bad one
  (nothing is queued then). Otherwise it queues the request and returns at once.
* Then, on the service's thread: ``on_text(delta)`` with each new piece of text, and
  ``on_done(stats, error)`` exactly once — ``stats`` the dict of
  :data:`vlcache.serving.protocol.STATS_KEYS` (``finish_reason`` ``stop`` / ``length`` /
  ``cancelled``) and ``error`` None, or ``stats`` None and the exception that ended the request
  (an :class:`InvalidRequest` when it is the request's fault, e.g. an image the vision tower refuses),
  or ``(None, None)`` for a request cancelled before it ran.
* ``cancelled()`` is polled while the request waits and after each of its tokens; True ends it with
  ``finish_reason == "cancelled"`` and frees its memory at once.
* **Batching** (``batching`` True): an engine whose runner decodes rows with their own lengths in
  place (:func:`vlcache.engine.scheduler.batches`: ONNX Runtime on the fused decoder) is served by
  the in-flight :class:`~vlcache.engine.scheduler.Scheduler` over a KV pool of ``kv_cache_bytes``
  (default: :data:`~vlcache.engine.pool.DEFAULT_POOL_FRACTION` of the available memory) with at most
  ``max_batch_size`` rows (default: the build's, ``manifest.build.max_batch_size``), prefilling at
  most ``max_prefill_tokens`` prompt tokens between two decode steps while a batch decodes (default:
  :data:`~vlcache.config.DEFAULT_MAX_PREFILL_TOKENS`; 0: no limit). Every other engine (torch,
  TensorRT) runs one request at a time on a worker thread (``pool_capacity_bytes`` 0 in the stats
  and metrics; ``max_prefill_tokens`` does not apply).
* ``metrics()``: the gauges of :data:`vlcache.serving.protocol.METRICS` by name; ``listener`` (if
  given) is called with them on the service's thread whenever they may have changed.
* ``close()``: open requests end with an error; the thread stops.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from vlcache.serving import protocol
from vlcache.serving.engine import Engine, RuntimeEngine, TextDeltas, _stats, resolve_config
from vlcache.serving.request import InvalidRequest

DoneCallback = Callable[[dict[str, Any] | None, BaseException | None], None]
MetricsListener = Callable[[dict[str, float]], None]


def _metrics(queue_length: int, batch: int, used: int, capacity: int) -> dict[str, float]:
    return {
        protocol.METRIC_POOL_OCCUPANCY: used / capacity if capacity else 0.0,
        protocol.METRIC_POOL_USED: float(used),
        protocol.METRIC_POOL_CAPACITY: float(capacity),
        protocol.METRIC_QUEUE_LENGTH: float(queue_length),
        protocol.METRIC_BATCH_SIZE: float(batch),
    }


class Service:
    """Serves an :class:`~vlcache.serving.engine.Engine` (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int | None = None,
        kv_cache_bytes: int | None = None,
        max_prefill_tokens: int | None = None,
        listener: MetricsListener | None = None,
    ) -> None:
        from vlcache.config import DEFAULT_MAX_PREFILL_TOKENS
        from vlcache.engine.pool import pool_bytes
        from vlcache.engine.scheduler import Scheduler, batches

        self.engine = engine
        self.listener = listener
        self.batching = isinstance(engine, RuntimeEngine) and batches(engine.runner)
        self._closed = False
        if self.batching:
            assert isinstance(engine, RuntimeEngine)
            self.scheduler: Scheduler | None = Scheduler(
                engine.runner,
                pool_bytes=kv_cache_bytes if kv_cache_bytes is not None else pool_bytes(),
                max_batch_size=max_batch_size or engine.manifest.build.max_batch_size,
                max_prefill_tokens=DEFAULT_MAX_PREFILL_TOKENS if max_prefill_tokens is None else max_prefill_tokens,
                listener=self._scheduler_metrics if listener is not None else None,
            )
        else:
            self.scheduler = None
            self._jobs: queue.Queue[Any] = queue.Queue()
            self._running = 0
            self._worker = threading.Thread(target=self._serial, name="vlcache-serial", daemon=True)
            self._worker.start()

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size if self.scheduler is not None else 1

    @property
    def kv_cache_bytes(self) -> int:
        return self.scheduler.pool.capacity if self.scheduler is not None else 0

    @property
    def max_prefill_tokens(self) -> int:
        return self.scheduler.max_prefill_tokens if self.scheduler is not None else 0

    # --- requests ------------------------------------------------------------------------------
    def submit(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_tokens: int,
        budget: float | None = None,
        method: str | None = None,
        on_text: Callable[[str], None] | None = None,
        on_done: DoneCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Check and queue one request (module docstring); InvalidRequest for a bad one."""
        if self._closed:
            raise RuntimeError("the service is closed")
        done = on_done or (lambda stats, error: None)
        if self.scheduler is None:
            resolve_config(self.engine.default_config, budget, method)  # bad overrides: refused now
            self._jobs.put((time.perf_counter(), image, prompt, max_tokens, budget, method, on_text, done, cancelled))
            self._notify()
            return
        engine = self.engine
        assert isinstance(engine, RuntimeEngine)
        config = resolve_config(engine.default_config, budget, method)
        batch = engine.tokenize(image, prompt)
        deltas = TextDeltas(engine.tokenizer, on_text)
        capacity = self.scheduler.pool.capacity

        def finished(seq: Any) -> None:
            if seq.error is not None:
                error = seq.error
                if isinstance(error, ValueError) and not isinstance(error, InvalidRequest):
                    error = InvalidRequest(str(error))  # the request's own inputs failed (e.g. its image)
                done(None, error)
                return
            if seq.stats is None:  # cancelled while it waited: nothing ran
                done(None, None)
                return
            deltas.end()
            first = seq.first_token or seq.admitted or seq.arrived
            stats = _stats(
                engine.backend,
                config,
                seq.stats,
                len(seq.tokens),
                seq.finish_reason,
                first - (seq.admitted or first),
                (seq.last_token or first) - first,
            )
            sizes = seq.batch_sizes
            stats.update(
                queue_seconds=seq.queue_seconds,
                batch_size_mean=sum(sizes) / len(sizes) if sizes else 0.0,
                batch_size_max=max(sizes, default=0),
                pool_bytes=int(seq.pool_bytes),
                pool_occupancy_peak=float(seq.pool_peak),
                pool_capacity_bytes=int(capacity),
            )
            done(stats, None)

        try:
            self.scheduler.submit(
                batch["input_ids"].numpy(),
                batch.get("pixel_values"),
                config,
                max_tokens=max_tokens,
                stop=engine.eos,
                on_token=deltas.add,
                on_finish=finished,
                cancelled=cancelled,
            )
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    # --- metrics ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        if self.scheduler is not None:
            m = self.scheduler.metrics()
            return _metrics(m.queue_length, m.batch_size, m.pool_used_bytes, m.pool_capacity_bytes)
        return _metrics(self._jobs.qsize(), self._running, 0, 0)

    def _scheduler_metrics(self, m: Any) -> None:
        if self.listener is not None:
            self.listener(_metrics(m.queue_length, m.batch_size, m.pool_used_bytes, m.pool_capacity_bytes))

    def _notify(self) -> None:
        if self.listener is not None:
            try:
                self.listener(self.metrics())
            except Exception:  # noqa: BLE001 - an exporter must not stop serving
                pass

    # --- one at a time ---------------------------------------------------------------------------
    def _serial(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            arrived, image, prompt, max_tokens, budget, method, on_text, done, cancelled = job
            if cancelled is not None and cancelled():
                done(None, None)  # cancelled while it waited
                continue
            self._running = 1
            self._notify()
            started = time.perf_counter()
            try:
                stats = self.engine.generate(
                    image,
                    prompt,
                    max_tokens=max_tokens,
                    budget=budget,
                    method=method,
                    on_text=on_text,
                    cancelled=cancelled,
                )
                stats["queue_seconds"] = started - arrived
                result: tuple[Any, Any] = (stats, None)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                result = (None, e)
            self._running = 0
            self._notify()
            done(*result)

    def close(self) -> None:
        """End open requests with an error and stop the thread."""
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.close()
            return
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[7](None, RuntimeError("the server is shutting down"))
        self._jobs.put(None)
