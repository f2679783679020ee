"""The scheduler: in-flight (continuous) batching of greedy generations over one runner and a KV pool.

Contract:

* :meth:`Scheduler.submit` checks a request (its prompt ids, images, compression config and
  ``max_tokens``) and queues it; it raises ``ValueError`` at once for a request that can never run
  (prompt + max_tokens beyond the export's ``max_input_len``, or a prefill larger than the whole
  pool). Everything else happens on the scheduler's own thread, which alternates:

  1. **admission** — the queue's head is prefilled (vision tower, prompt, scoring, compaction: the
     one pipeline of :class:`vlcache.runtime.loop.PromptPrefill`, at batch size 1) when the batch has
     a free row and the pool has room for its prefill buffers (``L · (m + max_tokens)`` entries). Its
     first token is sent at once. It then joins the batch when the rebuilt buffers fit in the pool;
     until then it waits, staged, and no other prefill starts (first come, first served).
     **Chunked prefill**: a prefill runs in the runner's chunks (``runner.prefill_chunk`` prompt
     tokens per decoder call; the checks, embedding and vision tower come first, as one more
     piece). While no batch is decoding, prefills run back to back. While a batch decodes, pieces
     run between two decode steps until ``max_prefill_tokens`` prompt tokens were fed (at least
     one piece; 0: no limit) — vLLM's token budget per step: a burst of short prompts still fills
     the batch at once, and a long prompt delays the running rows' next token by about
     ``max_prefill_tokens`` tokens' prefill instead of its whole prefill.
  2. **a decode step** — one decoder call for every row (each at its own position, over its own
     per-layer lengths), then per row: the method's decode policy (TGV-KV), the greedy token, the
     stop checks and the ``cancelled()`` poll. Rows that finished, were cancelled or failed leave
     the batch and their memory returns to the pool at once.

* Greedy tokens are those of running the request alone (:func:`vlcache.runtime.stream`): the same
  prefill and compression, and a decode step whose attention reads row r's entries only. Budgets and
  methods stay per request, so one batch mixes them.
* A request that fails (its prefill raises: e.g. an image the vision tower refuses) fails alone:
  ``on_finish`` gets the exception; the others go on. A failing decode step fails the rows it ran.
* Callbacks run on the scheduler's thread: ``on_token(token)`` for each token as soon as it is
  chosen, ``on_finish(sequence)`` exactly once (``sequence.error`` is the exception, or None and
  ``sequence.finish_reason`` is ``stop`` / ``length`` / ``cancelled``). ``cancelled()`` is polled
  while the request waits and after each of its tokens.
* :meth:`Scheduler.close` ends every open request with an error and stops the thread.

Only runners that write KV in place with per-row lengths batch (ONNX Runtime on the ``fused``
decoder: :func:`batches`); :class:`vlcache.serving.service.Service` serves the others one at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlcache.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_PREFILL_TOKENS, CompressionConfig
from vlcache.engine.pool import BatchKV, KVPool, RowSource
from vlcache.pipeline import CacheOps, Compression, CompressionStats
from vlcache.runtime.base import Runner
from vlcache.runtime.loop import PromptPrefill

TokenCallback = Callable[[int], None]
FinishCallback = Callable[["Sequence"], None]


def batches(runner: Runner) -> bool:
    """True when ``runner`` decodes a batch of rows with their own lengths in preallocated buffers."""
    return bool(getattr(runner, "fused", False))


class SchedulerClosed(RuntimeError):
    """The scheduler stopped before the request finished."""


@dataclass
class Sequence:
    """One request in the scheduler, and what happened to it.

    Times are ``time.perf_counter()`` values: ``arrived`` (submit), ``admitted`` (its prefill
    started), ``first_token`` / ``last_token``. ``batch_sizes``: the batch size of every decode step
    it took part in. ``pool_bytes``: the pool bytes its row held at most (its share of the padded
    buffers: ``Σ_l C_l`` entries); ``pool_peak``: the pool's largest occupancy while it was in it.
    """

    id: int
    input_ids: np.ndarray
    pixel_values: Any
    config: CompressionConfig
    max_tokens: int
    stop: frozenset[int]
    on_token: TokenCallback | None = None
    on_finish: FinishCallback | None = None
    cancelled: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    position: int = 0
    compression: Compression | None = None
    stats: CompressionStats | None = None
    finish_reason: str | None = None
    error: BaseException | None = None
    arrived: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    batch_sizes: list[int] = field(default_factory=list)
    pool_bytes: int = 0
    pool_peak: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    _staged_bytes: int = 0
    _source: RowSource | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    @property
    def queue_seconds(self) -> float:
        """From submit to the start of its prefill (to its end when it never started)."""
        end = self.admitted if self.admitted is not None else (self.last_token or self.arrived)
        return max(0.0, end - self.arrived)

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and bool(self.cancelled())

    def remaining(self) -> int:
        """Tokens it may still feed to the decoder (the last generated token is never fed)."""
        return max(0, self.max_tokens - len(self.tokens))


@dataclass(frozen=True)
class SchedulerMetrics:
    """A snapshot: requests waiting (queued or staged), rows in the decode batch, the pool."""

    queue_length: int
    batch_size: int
    pool_used_bytes: int
    pool_capacity_bytes: int
    pool_peak_bytes: int
    finished: int


class _RowOps(CacheOps):
    """Row r of the batch as the pipeline's decode policy sees it (batch size 1)."""

    def __init__(self, runner: Runner, kv: BatchKV, row: int) -> None:
        self.runner, self.kv, self.row = runner, kv, row

    def keys(self, layer: int) -> Any:
        layer_kv = self.kv.layers[layer]
        n = int(layer_kv.lengths[self.row])
        return self.runner.to_torch(layer_kv.keys[self.row : self.row + 1, :, :n])

    def keep(self, layer: int, indices: Any) -> None:  # compaction happens before a row joins
        raise NotImplementedError("rows of the batch are not compacted")

    def evict(self, layer: int, index: int) -> None:
        self.kv.evict(self.row, layer, index)

    def lengths(self) -> list[int]:
        return [int(kv.lengths[self.row]) for kv in self.kv.layers]

    def kv_bytes(self) -> int:
        return sum(self.lengths()) * self.kv.entry_bytes


class Scheduler:
    """In-flight batching over ``runner`` with a KV pool of ``pool_bytes`` (module docstring).

    Args:
        runner: a runner that :func:`batches` (ONNX Runtime on the fused decoder).
        pool_bytes: the pool's capacity in bytes.
        max_batch_size: rows decoded together at most.
        max_prefill_tokens: prompt tokens prefilled between two decode steps while a batch decodes
            (whole chunks, at least one; 0: no limit); see the module docstring.
        listener: called on the scheduler's thread with :meth:`metrics` after every iteration that
            changed something (e.g. to export them).
    """

    def __init__(
        self,
        runner: Runner,
        *,
        pool_bytes: int,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        listener: Callable[[SchedulerMetrics], None] | None = None,
    ) -> None:
        if not batches(runner):
            raise ValueError(
                f"the {runner.backend} runner does not batch (it needs KV buffers written in place with a "
                "length per row: ONNX Runtime on the fused decoder)"
            )
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 0:
            raise ValueError(f"max_prefill_tokens must be an integer >= 0 (0: no limit), got {max_prefill_tokens!r}")
        self.max_prefill_tokens = max_prefill_tokens
        spec = runner.spec
        self.runner = runner
        self.pool = KVPool(pool_bytes)
        self.max_batch_size = max_batch_size
        self.listener = listener
        self.kv = BatchKV(spec.num_layers, spec.num_kv_heads, spec.head_dim)
        self.batch: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._staged: Sequence | None = None
        self._job: PromptPrefill | None = None  # the staged request's prefill while it runs
        self._fed = 0  # prompt tokens prefilled in this iteration
        self._ids = itertools.count()
        self._finished = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vlcache-scheduler", daemon=True)
        self._thread.start()

    # --- the caller's side ----------------------------------------------------------------------
    def prefill_bytes(self, prompt_len: int, max_tokens: int) -> int:
        """Pool bytes a prefill of ``prompt_len`` tokens with room for ``max_tokens`` takes."""
        return self.runner.spec.num_layers * (prompt_len + max_tokens) * self.kv.entry_bytes

    def submit(
        self,
        input_ids: np.ndarray,
        pixel_values: Any,
        config: CompressionConfig,
        *,
        max_tokens: int,
        stop: Iterable[int] = (),
        on_token: TokenCallback | None = None,
        on_finish: FinishCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Sequence:
        """Queue one request (see the module docstring); ValueError when it can never run."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (n,) or (1, n) with n >= 1, got shape {ids.shape}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        m, limit = ids.shape[1], self.runner.spec.max_input_len
        if m + max_tokens > limit:
            raise ValueError(
                f"prompt ({m} tokens) + max_tokens ({max_tokens}) exceeds the export's max_input_len ({limit})"
            )
        need = self.prefill_bytes(m, max_tokens)
        if need > self.pool.capacity:
            raise ValueError(
                f"this request's prefill needs {need / 2**20:.1f} MiB of KV cache, more than the whole pool "
                f"({self.pool.capacity / 2**20:.1f} MiB); shorten it or give the server a larger --kv-cache-mb"
            )
        seq = Sequence(
            next(self._ids),
            ids,
            pixel_values,
            config,
            max_tokens,
            frozenset(int(s) for s in stop),
            on_token,
            on_finish,
            cancelled,
            arrived=time.perf_counter(),
        )
        with self._cond:
            if self._stopping:
                raise SchedulerClosed("the scheduler is closed")
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def metrics(self) -> SchedulerMetrics:
        with self._cond:
            return SchedulerMetrics(
                queue_length=len(self._waiting) + (self._staged is not None),
                batch_size=len(self.batch),
                pool_used_bytes=self.pool.used,
                pool_capacity_bytes=self.pool.capacity,
                pool_peak_bytes=self.pool.peak,
                finished=self._finished,
            )

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; open requests end with :class:`SchedulerClosed`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the scheduler's thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self.batch or self._staged):
                    self._cond.wait()
                if self._stopping:
                    break
            changed, self._fed = False, 0
            while self._admit():  # admission first: every waiting request that fits, then a step ...
                changed = True
                if self.batch and self.max_prefill_tokens and self._fed >= self.max_prefill_tokens:
                    break  # ... but at most max_prefill_tokens prompt tokens while a batch is running
            if self.batch:
                self._step()
                changed = True
            if changed and self.listener is not None:
                try:
                    self.listener(self.metrics())
                except Exception:  # noqa: BLE001 - an exporter must not stop the batch
                    pass
        error = SchedulerClosed("the server is shutting down")
        with self._cond:
            open_ = list(self.batch) + ([self._staged] if self._staged else []) + list(self._waiting)
            self._waiting.clear()
        for seq in open_:
            self._finish(seq, error=error)
        self.batch, self._staged, self._job = [], None, None
        self.kv.rebuild([], [])
        self.pool.set_batch(0)

    def _finish(self, seq: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        if seq.finished:
            return
        seq.finish_reason, seq.error = reason, error
        if seq._staged_bytes:
            self.pool.unstage(seq._staged_bytes)
            seq._staged_bytes = 0
        seq._source = seq.compression = None  # the stats stay; the cache's bookkeeping goes
        self._finished += 1
        seq.done.set()
        if seq.on_finish is not None:
            try:
                seq.on_finish(seq)
            except Exception:  # noqa: BLE001 - one client's callback must not stop the others
                pass

    def _emit(self, seq: Sequence, token: int) -> str | None:
        """Record ``token``; returns the finish reason when it ends the request."""
        now = time.perf_counter()
        seq.tokens.append(token)
        seq.first_token = seq.first_token or now
        seq.last_token = now
        if seq.stats is not None:
            seq.stats.new_tokens = len(seq.tokens)
        if seq.on_token is not None:
            seq.on_token(token)
        if token in seq.stop:
            return "stop"
        if len(seq.tokens) >= seq.max_tokens:
            return "length"
        if seq.is_cancelled():
            return "cancelled"
        return None

    def _admit(self) -> bool:
        """Join the staged request if it fits, else prefill the queue's head if it fits."""
        with self._cond:
            for seq in [s for s in self._waiting if s.is_cancelled()]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
        if self._staged is not None:
            if self._staged.is_cancelled():
                staged, self._staged, self._job = self._staged, None, None
                self._finish(staged, "cancelled")
                return True
            if self._job is not None:
                self._advance(self._staged, self._job)
                return True
            return self._join()
        with self._cond:
            if not self._waiting or len(self.batch) >= self.max_batch_size:
                return False
            head = self._waiting[0]
            need = self.prefill_bytes(head.prompt_len, head.max_tokens)
            if need > self.pool.free:
                return False
            self._waiting.popleft()
            self._staged = head
        head._staged_bytes = need
        self.pool.stage(need)
        head.admitted = time.perf_counter()
        # the checks, the embedding and the vision tower: a piece of its own (no prompt tokens)
        try:
            self._job = PromptPrefill(
                self.runner, head.input_ids, head.pixel_values, head.config, max_new_tokens=head.max_tokens
            )
        except Exception as e:  # noqa: BLE001 - this request fails alone
            self._staged = None
            self._finish(head, error=e)
        return True

    def _advance(self, seq: Sequence, job: PromptPrefill) -> None:
        """Run the next chunk of ``seq``'s prefill; after the last, compress and stage its rows."""
        before = job.fed
        try:
            done = job.advance()
            self._fed += job.fed - before
            if not done:
                return
            self._job = None
            state = job.finish()
            reason = self._emit(seq, state.greedy())
        except Exception as e:  # noqa: BLE001 - this request fails alone
            self._staged, self._job = None, None
            self._finish(seq, error=e)
            return
        seq.compression, seq.stats, seq.position = state.compression, state.stats, state.position
        if reason is not None:
            self._staged = None
            state.close()
            self._finish(seq, reason)
            return
        # what it holds now replaces the prefill's reservation
        layers = state.cache
        seq._source = RowSource(
            [np.asarray(kv.keys)[0] for kv in layers],
            [np.asarray(kv.values)[0] for kv in layers],
            [int(kv.lengths[0]) for kv in layers],
        )
        held = sum(self.runner.kv_reserved_bytes(kv) for kv in layers)
        self.pool.unstage(seq._staged_bytes)
        seq._staged_bytes = held
        self.pool.stage(held)

    def _needs(self, rows: list[Sequence], sources: list[RowSource]) -> list[list[int]]:
        return [[n + seq.remaining() for n in src.lengths] for seq, src in zip(rows, sources)]

    def _join(self) -> bool:
        """Rebuild the batch with the staged request when the result fits in the pool."""
        seq = self._staged
        assert seq is not None and seq._source is not None
        if len(self.batch) >= self.max_batch_size:
            return False
        rows = [*self.batch, seq]
        sources = [self.kv.row(r) for r in range(len(self.batch))] + [seq._source]
        needs = self._needs(rows, sources)
        new_bytes = self.kv.bytes_for(needs)
        # the old buffers and the staged ones are freed once the new ones are filled
        if new_bytes > self.pool.capacity - (self.pool.staged - seq._staged_bytes):
            return False
        self.kv.rebuild(sources, needs)
        self.pool.unstage(seq._staged_bytes)
        seq._staged_bytes, seq._source = 0, None
        with self._cond:
            self.batch, self._staged = rows, None
        self._account(needs)
        return True

    def _account(self, needs: list[list[int]]) -> None:
        self.pool.set_batch(self.kv.nbytes)
        if needs:
            capacities = np.max(np.asarray(needs), axis=0)
            row_bytes = int(capacities.sum()) * self.kv.entry_bytes
            for seq in self.batch:
                seq.pool_bytes = max(seq.pool_bytes, row_bytes)
        occupancy = self.pool.occupancy
        for seq in self.batch:
            seq.pool_peak = max(seq.pool_peak, occupancy)

    def _leave(self, gone: set[int]) -> None:
        keep = [r for r, seq in enumerate(self.batch) if seq.id not in gone]
        rows = [self.batch[r] for r in keep]
        sources = [self.kv.row(r) for r in keep]
        needs = self._needs(rows, sources)
        self.kv.rebuild(sources, needs)
        with self._cond:
            self.batch = rows
        self._account(needs)

    def _step(self) -> None:
        runner, batch = self.runner, self.batch
        size = len(batch)
        ended: dict[int, tuple[str | None, BaseException | None]] = {}
        try:
            tokens = np.array([[seq.tokens[-1] for seq in batch]], dtype=np.int64)  # (1, B): one embedding call
            embeds = runner.embed(tokens).reshape(size, 1, -1)
            positions = np.array([[seq.position] for seq in batch], dtype=np.int64)
            out = runner.forward(embeds, positions, self.kv.layers)
        except Exception as e:  # noqa: BLE001 - the step failed for every row it ran
            for seq in batch:
                ended[seq.id] = (None, e)
        else:
            self.kv.layers = out.cache
            scale = runner.spec.attention_scale
            for r, seq in enumerate(batch):
                seq.position += 1
                seq.batch_sizes.append(size)
                try:
                    compression = seq.compression
                    if compression is not None and compression.policy is not None:
                        ops = _RowOps(runner, self.kv, r)
                        for layer in range(runner.spec.num_layers):
                            query = runner.to_torch(out.queries[layer])[r : r + 1]
                            compression.decode_step(ops, layer, query, scale)
                    t0 = seq.last_token or time.perf_counter()
                    reason = self._emit(seq, int(np.argmax(out.logits[r])))
                    if seq.stats is not None and seq.last_token is not None:
                        seq.stats.decode_seconds += seq.last_token - t0
                except Exception as e:  # noqa: BLE001 - this row fails alone
                    ended[seq.id] = (None, e)
                    continue
                if reason is not None:
                    ended[seq.id] = (reason, None)
        if ended:
            self._leave(set(ended))
            for seq in batch:
                if seq.id in ended:
                    reason, error = ended[seq.id]
                    self._finish(seq, reason, error)
