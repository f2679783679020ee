"""Engines: what generates behind the served model, one per backend of the artifact.

Contract of an :class:`Engine` (any backend):
* ``generate(image, prompt, *, max_tokens, budget=None, method=None, on_text=None, cancelled=None)``
  runs one greedy generation with KV compression, batch size 1. ``budget`` / ``method`` override the
  build's compression config for this call only. ``on_text(delta)`` is called with each new piece of
  text as soon as it is decoded (the concatenation of all deltas is the decoded answer, special
  tokens dropped); ``cancelled()`` is polled after each generated token that does not end the answer
  and stops the generation when it returns True (the token stream is closed: its KV cache is freed
  at once). Returns the stats dict of :data:`vlcache.serving.protocol.STATS_KEYS`.
* A prompt longer than the build's ``max_input_len`` (in tokens, image tokens included) raises
  :class:`~vlcache.serving.request.InvalidRequest` before anything runs.
* One generation at a time per engine (a lock serialises calls): the torch backend installs hooks on
  the model for the duration of a call. Scale with Triton model instances.

Prompt formatting (``manifest.model["prompt_style"]``), by :func:`vlcache.hf.inputs.image_prompt`
(the fidelity harness's too): ``plain`` → ``"<image> {prompt}"`` (the `digits` task's format);
``chat`` → the processor's chat template with one image and the prompt; ``auto`` (default) → the
prompt as is when it already contains the image token, else ``chat`` when the processor has a chat
template, else ``plain``.

:func:`load_engine` dispatches on ``manifest.backend``: ``torch`` is :class:`TorchEngine`
(transformers + :mod:`vlcache.hf`); ``onnx`` and ``tensorrt`` are :class:`RuntimeEngine` over the graphs
run by :mod:`vlcache.runtime`. Both satisfy :class:`Engine`, and both iterate the one token stream
(:class:`vlcache.stream.TokenStream`, from :func:`vlcache.hf.stream` / :func:`vlcache.runtime.stream`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from PIL import Image

from vlcache.artifact import ENGINES_DIR, ArtifactError, Manifest, read_manifest, verify_artifact
from vlcache.config import CompressionConfig
from vlcache.serving.request import InvalidRequest

if TYPE_CHECKING:
    from vlcache.stream import TokenStream

PROMPT_STYLES = ("auto", "plain", "chat")

TextCallback = Callable[[str], None]
CancelledCallback = Callable[[], bool]


@runtime_checkable
class Engine(Protocol):
    """A loaded model that generates with KV compression (see the module docstring)."""

    backend: str
    max_input_len: int
    default_config: CompressionConfig

    def generate(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_tokens: int,
        budget: float | None = None,
        method: str | None = None,
        on_text: TextCallback | None = None,
        cancelled: CancelledCallback | None = None,
    ) -> dict[str, Any]: ...


def resolve_config(default: CompressionConfig, budget: float | None, method: str | None) -> CompressionConfig:
    """The build's config with this request's overrides (InvalidRequest if they are not valid)."""
    overrides: dict[str, object] = {}
    if budget is not None:
        overrides["budget"] = float(budget)
    if method is not None:
        overrides["method"] = method
    if not overrides:
        return default
    try:
        return default.with_changes(**overrides)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


class TextDeltas:
    """Hands on the new text of each generated token (:meth:`add` one token at a time), decoding a
    window of a few tokens, not the whole answer, per token.

    Incremental detokenization (the offsets of vLLM's detokenizer): the text of the tokens since
    ``prefix`` up to ``read`` was sent already; a new token's delta is ``decode(ids[prefix:])``
    minus ``decode(ids[prefix:read])`` — decoding from one token back keeps what a tokenizer does
    at a word's start (SentencePiece drops the leading space of the first token it decodes) out of
    the delta. Text ending in an incomplete character (U+FFFD) is held back until the next token
    completes it; :meth:`end` flushes what is left. The concatenated deltas are the decoded answer
    (special tokens dropped) for byte-level BPE and SentencePiece tokenizers alike.
    """

    def __init__(self, tokenizer: Any, on_text: TextCallback | None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> None:
        self.ids.append(int(token))
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _emit(self, final: bool) -> None:
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > len(before) and text.startswith(before):
            delta = text[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted += delta
            if self.on_text is not None:
                self.on_text(delta)
        elif not text.startswith(before):  # the window's text changed under it: resync on the whole answer
            whole = self._decode(self.ids)
            if whole.startswith(self.emitted) and len(whole) > len(self.emitted):
                delta = whole[len(self.emitted) :]
                self.emitted = whole
                if self.on_text is not None:
                    self.on_text(delta)
            self._prefix = self._read = len(self.ids)


class _ProcessorEngine:
    """What every backend shares: the artifact's processor, prompt formatting, the length check, and
    :meth:`generate` over the token stream a backend's :meth:`_opener` prepares."""

    backend = "base"

    def __init__(self, manifest: Manifest) -> None:
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        from vlcache.hf.inputs import image_token_text

        self.manifest = manifest
        self.max_input_len = manifest.build.max_input_len
        self.default_config = manifest.build.compression
        self.prompt_style = str(manifest.model.get("prompt_style", "auto"))
        if self.prompt_style not in PROMPT_STYLES:
            raise ArtifactError(
                f"unknown prompt_style {self.prompt_style!r}; expected one of {', '.join(PROMPT_STYLES)}"
            )
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.processor = AutoProcessor.from_pretrained(manifest.processor_dir)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot load the processor in {manifest.processor_dir}: {e}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.tokenizer = self.processor.tokenizer
        self.image_token = image_token_text(self.processor)
        self._lock = threading.Lock()

    def format_prompt(self, prompt: str) -> str:
        """The text handed to the processor with the image (see the module docstring)."""
        from vlcache.hf.inputs import image_prompt

        if self.prompt_style == "auto":
            return prompt if self.image_token in prompt else image_prompt(self.processor, prompt)
        return image_prompt(self.processor, prompt, chat=self.prompt_style == "chat")

    def tokenize(self, image: Image.Image, prompt: str) -> dict[str, Any]:
        """Processor outputs (batch 1, torch tensors); InvalidRequest when the prompt is too long."""
        batch = self.processor(images=image, text=self.format_prompt(prompt), return_tensors="pt")
        length = int(batch["input_ids"].shape[-1])
        if length > self.max_input_len:
            raise InvalidRequest(
                f"prompt is {length} tokens (image tokens included), above this build's max_input_len {self.max_input_len}"
            )
        return dict(batch)

    def generate(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_tokens: int,
        budget: float | None = None,
        method: str | None = None,
        on_text: TextCallback | None = None,
        cancelled: CancelledCallback | None = None,
    ) -> dict[str, Any]:
        """One generation (see the module docstring): the build's config with this call's overrides,
        the backend's request (:meth:`_opener`), then its token stream served by :meth:`_serve`."""
        config = resolve_config(self.default_config, budget, method)
        return self._serve(self._opener(image, prompt, config, max_tokens), config, on_text, cancelled)

    def _opener(
        self, image: Image.Image, prompt: str, config: CompressionConfig, max_tokens: int
    ) -> Callable[[], TokenStream]:
        """The backend's part: check and prepare the request now (InvalidRequest when it cannot
        run), and return what opens its token stream (which prefills)."""
        raise NotImplementedError

    def _serve(
        self,
        open_stream: Callable[[], TokenStream],
        config: CompressionConfig,
        on_text: TextCallback | None,
        cancelled: CancelledCallback | None,
    ) -> dict[str, Any]:
        """Iterate the token stream ``open_stream()`` returns (it prefills): stream the text, poll
        ``cancelled`` after each token that does not end the answer (True: close the stream, which
        frees its cache), and return the stats."""
        deltas = TextDeltas(self.tokenizer, on_text)
        with self._lock:
            start = time.perf_counter()
            first: float | None = None
            last: float | None = None
            with open_stream() as tokens:
                for token in tokens:
                    last = time.perf_counter()
                    first = first or last
                    deltas.add(token)
                    if tokens.finish_reason is None and cancelled is not None and cancelled():
                        tokens.close()
            deltas.end()
        end = time.perf_counter()
        first = first or end
        assert tokens.stats is not None and tokens.finish_reason is not None
        return _stats(
            self.backend,
            config,
            tokens.stats,
            len(tokens.tokens),
            tokens.finish_reason,
            first - start,
            (last or first) - first,
        )


def _stats(
    backend: str, config: CompressionConfig, stats: Any, output_tokens: int, finish: str, prefill: float, decode: float
) -> dict[str, Any]:
    """The final response's stats (:data:`vlcache.serving.protocol.STATS_KEYS`) from a backend's stats."""
    return {
        "backend": backend,
        "method": config.method,
        "budget": config.budget,
        "prompt_tokens": int(stats.prompt_tokens),
        "image_tokens": int(stats.image_tokens),
        "output_tokens": output_tokens,
        "kv_tokens_total": int(stats.prompt_tokens) * len(stats.kept_per_layer),
        "kv_tokens_kept": int(sum(stats.kept_per_layer)),
        "kept_per_layer": [int(k) for k in stats.kept_per_layer],
        "kv_bytes_before": int(stats.kv_bytes_before),
        "kv_bytes_after": int(stats.kv_bytes_after),
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "finish_reason": finish,
        # one request at a time, no pool: the batching service (vlcache.serving.service) fills these in
        "queue_seconds": 0.0,
        "batch_size_mean": 1.0 if output_tokens > 1 else 0.0,
        "batch_size_max": 1 if output_tokens > 1 else 0,
        "pool_bytes": int(getattr(stats, "kv_bytes_reserved", 0) or stats.kv_bytes_after),
        "pool_occupancy_peak": 0.0,
        "pool_capacity_bytes": 0,
    }


class TorchEngine(_ProcessorEngine):
    """The ``torch`` backend: the artifact's HF checkpoint run by transformers with :mod:`vlcache.hf`,
    on ``device`` in ``dtype`` (default: the build's dtype, ``manifest.build.dtype``)."""

    backend = "torch"

    def __init__(self, manifest: Manifest, *, device: str = "cpu", dtype: str | None = None) -> None:
        from vlcache.hf.loading import CheckpointError, load_model

        super().__init__(manifest)
        try:
            self.loaded = load_model(str(manifest.hf_dir), device=device, dtype=dtype or manifest.build.dtype)
        except CheckpointError as e:
            raise ArtifactError(str(e)) from None

    def prepare(self, image: Image.Image, prompt: str) -> dict[str, Any]:
        """Processor outputs (batch 1) on the model's device; InvalidRequest when the prompt is too long."""
        from vlcache.hf.inputs import move_inputs

        return move_inputs(self.tokenize(image, prompt), self.loaded.device, self.loaded.dtype)

    def _opener(
        self, image: Image.Image, prompt: str, config: CompressionConfig, max_tokens: int
    ) -> Callable[[], TokenStream]:
        from vlcache.hf.generation import stream

        inputs = self.prepare(image, prompt)
        return lambda: stream(self.loaded.model, inputs, config, max_new_tokens=max_tokens)


def runner_options(backend: str, device: str | None, threads: int) -> dict[str, Any]:
    """:func:`vlcache.runtime.load_runtime`'s options for ``backend``: ONNX Runtime's ``threads`` (0:
    its default) on the CPU, or the CUDA ``device`` of the TensorRT runner (None: ``cuda``, the
    current device). ArtifactError for a device the backend cannot run on."""
    if backend == "onnx":
        if device not in (None, "cpu"):
            raise ArtifactError(f"the onnx backend runs on the CPU (ONNX Runtime), not on {device!r}; use device cpu")
        return {"threads": threads} if threads else {}
    if device is not None and device.split(":")[0] != "cuda":
        raise ArtifactError(f"the {backend} backend runs on a CUDA device (cuda or cuda:N), not on {device!r}")
    return {"device": device or "cuda"}


class RuntimeEngine(_ProcessorEngine):
    """The ``onnx`` (and ``tensorrt``) backends: the artifact's graphs run by :mod:`vlcache.runtime`,
    driven token by token so text streams and a cancelled request stops at the next token.
    ``device`` and ``threads``: as :func:`runner_options` takes them."""

    def __init__(self, manifest: Manifest, *, threads: int = 0, device: str | None = None) -> None:
        from vlcache.runtime import load_runtime

        options = runner_options(manifest.backend, device, threads)
        super().__init__(manifest)
        self.backend = manifest.backend
        folder = manifest.onnx_dir if manifest.backend == "onnx" else manifest.root / ENGINES_DIR
        try:
            self.runner = load_runtime(folder, backend=manifest.backend, **options)
        except (OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"cannot load the {manifest.backend} graphs in {folder}: {e}") from None
        self.eos = {int(e) for e in self.runner.spec.eos_token_id}

    def _opener(
        self, image: Image.Image, prompt: str, config: CompressionConfig, max_tokens: int
    ) -> Callable[[], TokenStream]:
        from vlcache.runtime import stream

        batch = self.tokenize(image, prompt)

        def open_stream() -> TokenStream:
            try:
                return stream(
                    self.runner,
                    batch["input_ids"],
                    batch.get("pixel_values"),
                    config,
                    max_new_tokens=max_tokens,
                    eos_token_id=self.eos,
                )
            except ValueError as e:  # e.g. prompt + max_tokens beyond the export's max_input_len
                raise InvalidRequest(str(e)) from None

        return open_stream


def load_engine(
    artifact_dir: str | Path, *, device: str | None = None, verify: bool = True, threads: int = 0
) -> Engine:
    """The engine for ``artifact_dir``'s backend (ArtifactError when it cannot be loaded), with the
    build's settings (``manifest.build``: dtype, max_input_len, the default compression).

    ``device``: where it runs; None is the backend's default (``cpu`` for torch and onnx, ``cuda``
    for tensorrt); the onnx backend runs on the CPU only, the tensorrt backend on ``cuda[:N]`` only.
    ``verify``: check the manifest's config hash, every file's sha256 and the runtime's package
    versions first (:func:`vlcache.artifact.verify_artifact`); False only checks its structure.
    ``threads``: ONNX Runtime intra-op threads of the ``onnx`` backend (0: ONNX Runtime's default,
    one per physical core); the torch backend takes ``torch.set_num_threads`` from its caller.
    """
    manifest = verify_artifact(artifact_dir) if verify else read_manifest(artifact_dir)
    if manifest.backend == "torch":
        return TorchEngine(manifest, device=device or "cpu")
    return RuntimeEngine(manifest, threads=threads, device=device)
