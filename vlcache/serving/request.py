"""Validation of one inference request: raw input tensors in, a :class:`Request` or :class:`InvalidRequest` out.

Contract:
* :func:`parse_request` takes the request's tensors by name (numpy arrays as the Triton Python
  backend hands them over; a missing optional input is absent or None) and checks, in order:
  every required input present; each input's datatype and that it holds exactly one element; the
  image decodes (PIL, converted to RGB, at most :data:`MAX_IMAGE_PIXELS` pixels); the prompt is
  valid UTF-8 and not blank; ``1 <= max_tokens <= limits.max_tokens_cap``; the budget, when given,
  is finite and in (0, 1]; the method, when given, is one of ``limits.methods``.
* Every failure raises :class:`InvalidRequest` whose message starts with
  ``INVALID_ARGUMENT:`` and names the input. Nothing else is raised for bad input.
* The prompt's length in tokens is checked by the engine (it owns the tokenizer), also with
  :class:`InvalidRequest`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlcache.errors import UserError
from vlcache.serving import protocol

MAX_IMAGE_PIXELS = 4096 * 4096


class InvalidRequest(ValueError, UserError):
    """A request the model refuses; the message is what the client sees."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{protocol.INVALID_ARGUMENT}: {message}")


@dataclass(frozen=True)
class Limits:
    """What a deployment accepts. methods: allowed method names; max_tokens_cap: largest max_tokens."""

    methods: Collection[str]
    max_tokens_cap: int = protocol.DEFAULT_MAX_TOKENS_CAP


@dataclass(frozen=True)
class Request:
    """A validated request. budget / method are None when the request left them to the build's default."""

    image: Image.Image
    prompt: str
    max_tokens: int
    budget: float | None = None
    method: str | None = None


def _single(name: str, value: Any, kinds: str, expected: str) -> Any:
    array = np.asarray(value)
    if array.dtype.kind not in kinds:
        raise InvalidRequest(f"input '{name}' must be {expected}, got dtype {array.dtype}")
    if array.size != 1:
        raise InvalidRequest(f"input '{name}' must hold exactly one element, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _bytes(name: str, value: Any) -> bytes:
    item = _single(name, value, "OSU", "BYTES")
    if isinstance(item, str):
        return item.encode("utf-8")
    if not isinstance(item, (bytes, np.bytes_)):
        raise InvalidRequest(f"input '{name}' must be BYTES, got {type(item).__name__}")
    return bytes(item)


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, or InvalidRequest."""
    if not data:
        raise InvalidRequest("input 'image' is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequest(f"input 'image' is {width}x{height}, above the {MAX_IMAGE_PIXELS} pixel limit")
            img.load()
            return img.convert("RGB")
    except InvalidRequest:
        raise
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError ...)
        raise InvalidRequest(f"input 'image' is not a decodable image ({type(e).__name__}: {e})") from None


def parse_request(inputs: Mapping[str, Any], limits: Limits) -> Request:
    """Validate the tensors of one request (see the module docstring)."""
    for spec in protocol.INPUTS:
        if not spec.optional and inputs.get(spec.name) is None:
            raise InvalidRequest(f"missing required input '{spec.name}'")
    image_bytes = _bytes(protocol.IMAGE.name, inputs[protocol.IMAGE.name])
    try:
        prompt = _bytes(protocol.PROMPT.name, inputs[protocol.PROMPT.name]).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("input 'prompt' is not valid UTF-8") from None
    if not prompt.strip():
        raise InvalidRequest("input 'prompt' is empty")
    max_tokens = int(_single(protocol.MAX_TOKENS.name, inputs[protocol.MAX_TOKENS.name], "iu", "INT32"))
    if not 1 <= max_tokens <= limits.max_tokens_cap:
        raise InvalidRequest(f"input 'max_tokens' must lie in [1, {limits.max_tokens_cap}], got {max_tokens}")
    budget = None
    if inputs.get(protocol.BUDGET.name) is not None:
        raw = float(_single(protocol.BUDGET.name, inputs[protocol.BUDGET.name], "f", "FP32"))
        budget = float(f"{raw:.7g}")  # the decimal the client meant: FP32 0.1 is 0.100000001...
        if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise InvalidRequest(f"input 'budget' must lie in (0, 1] (fraction of the KV cache kept), got {budget}")
    method = None
    if inputs.get(protocol.METHOD.name) is not None:
        try:
            method = _bytes(protocol.METHOD.name, inputs[protocol.METHOD.name]).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidRequest("input 'method' is not valid UTF-8") from None
        if method not in limits.methods:
            raise InvalidRequest(f"unknown method {method!r}; this deployment serves: {', '.join(limits.methods)}")
    image = decode_image(image_bytes)
    return Request(image=image, prompt=prompt, max_tokens=max_tokens, budget=budget, method=method)
