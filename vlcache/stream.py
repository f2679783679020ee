"""The one token generator: greedy decoding of one prompt on any backend, token by token.

A backend supplies a :class:`Decoder` — one prompt after its prefill (and compression): the
current logits, ``greedy()`` (their argmax), ``step(token)`` (feed one token at the next position,
the decode policy applied) and ``close()`` (drop the cache). :class:`TokenStream` is the greedy
loop on top, the only one: the first token comes from the prefill's logits, every later one from
feeding the previous token; it stops after an end-of-sequence token (``finish_reason`` ``stop``)
or ``max_new_tokens`` tokens (``length``).

Entries: :func:`vlcache.runtime.stream` (ONNX Runtime / TensorRT runners) and
:func:`vlcache.hf.stream` (transformers models); ``generate`` on both backends, the served engines,
follow-up continuation and the benchmarks consume them. Cancelling is stopping the iteration:
:meth:`TokenStream.close` (also on leaving a ``with`` block) releases the decoder and so its KV
buffers; a stream closed before its last token reports ``finish_reason == "cancelled"``. A stream
that ran to its end keeps its decoder (``stream.decoder``, e.g. to append a follow-up question)
until it is closed or dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vlcache.pipeline import CompressionStats

FINISH_REASONS = ("stop", "length", "cancelled")


class Decoder(Protocol):
    """One prompt on a backend, after its prefill (see the module docstring)."""

    #: the compression's stats (None where no compression was recorded, e.g. a bare continuation)
    stats: CompressionStats | None

    @property
    def logits(self) -> Any:
        """The logits of the last fed token, in the backend's type (never modified later)."""

    def greedy(self) -> int:
        """argmax of :attr:`logits`."""

    def step(self, token: int) -> None:
        """Feed ``token`` at the next position (and apply the decode policy)."""

    def close(self) -> None:
        """Drop the cache (and anything else held for decoding)."""


def stop_ids(eos_token_id: int | Iterable[int] | None) -> frozenset[int]:
    """The ids that end a generation: one id, several, or none (None or ``()``)."""
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int) or hasattr(eos_token_id, "__index__"):
        return frozenset({int(eos_token_id)})  # type: ignore[arg-type]
    return frozenset(int(e) for e in eos_token_id)


class TokenStream(Iterator[int]):
    """Greedy tokens of one prompt, each yielded as soon as it is chosen: the one greedy loop.

    Args:
        decoder: the prompt after its prefill.
        max_new_tokens: tokens to generate at most (≥ 1).
        stop: ids that end the generation (the end-of-sequence token is yielded, then it stops).
        keep_logits: also record every yielded token's logits in :attr:`logits`.

    Attributes:
        tokens: the tokens yielded so far.
        logits: their logits (``keep_logits``), in the backend's type; else None.
        finish_reason: None while running; ``stop``, ``length`` once the last token was yielded,
            ``cancelled`` when closed before that.
        step_seconds: the wall time of each decode step (feeding a token; the first token's is the prefill's).
        stats: the compression's stats, kept after :meth:`close`; the stream sets their
            ``new_tokens`` and ``decode_seconds``.
        decoder: None once closed.
    """

    def __init__(
        self, decoder: Decoder, *, max_new_tokens: int, stop: Iterable[int] = (), keep_logits: bool = False
    ) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            decoder.close()
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.decoder: Decoder | None = decoder
        self.stats = decoder.stats
        self.max_new_tokens = max_new_tokens
        self.stop = frozenset(int(s) for s in stop)
        self.tokens: list[int] = []
        self.logits: list[Any] | None = [] if keep_logits else None
        self.step_seconds: list[float] = []
        self.finish_reason: str | None = None

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        decoder = self.decoder
        if decoder is None or self.finish_reason is not None:
            raise StopIteration
        if self.tokens:
            t0 = time.perf_counter()
            decoder.step(self.tokens[-1])
            seconds = time.perf_counter() - t0
            self.step_seconds.append(seconds)
            if self.stats is not None:
                self.stats.decode_seconds += seconds
        token = decoder.greedy()
        self.tokens.append(token)
        if self.stats is not None:
            self.stats.new_tokens = len(self.tokens)
        if self.logits is not None:
            self.logits.append(decoder.logits)
        if token in self.stop:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return token

    def close(self) -> None:
        """Stop here and release the decoder (its KV buffers); ``cancelled`` when tokens were left."""
        decoder, self.decoder = self.decoder, None
        if decoder is None:
            return
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        decoder.close()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
