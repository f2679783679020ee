"""What a processor and a model are handed: one source for the prompt of an image and a question,
and for moving a processor's outputs to the model's device and dtype.

Shared by the serving engines (:mod:`vlcache.serving.engine`) and the fidelity harness
(:mod:`vlcache.eval.runner`), so that a question is the same tokens wherever it is asked.

Contract of :func:`image_prompt` (``processor``: an HF processor, or anything with the same
attributes):
* ``chat=True``: one user turn holding the image and then ``text``, rendered by the processor's chat
  template with the assistant's turn opened (``add_generation_prompt=True``); a processor without a
  chat template raises transformers' ValueError.
* ``chat=False``: the processor's image token (:data:`vlcache.tokens.IMAGE_TOKEN_TEXT` when it names
  none), ``separator``, then ``text``: with the default ``" "`` the `digits` task's format
  (:func:`vlcache.digits.format_prompt`), which the bundled llava-tiny was trained on.
* ``chat=None`` (default): ``chat=True`` when the processor has a chat template, else ``chat=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlcache.tokens import IMAGE_TOKEN_TEXT

__all__ = ["has_chat_template", "image_prompt", "image_token_text", "move_inputs"]


def has_chat_template(processor: Any) -> bool:
    """True when ``processor`` (or a tokenizer) carries a chat template."""
    return bool(getattr(processor, "chat_template", None))


def image_token_text(processor: Any) -> str:
    """The text of ``processor``'s image placeholder (:data:`IMAGE_TOKEN_TEXT` when it names none)."""
    return str(getattr(processor, "image_token", IMAGE_TOKEN_TEXT))


def image_prompt(processor: Any, text: str, *, chat: bool | None = None, separator: str = " ") -> str:
    """The text handed to ``processor`` with one image and the user's ``text`` (see the module docstring)."""
    if chat is None:
        chat = has_chat_template(processor)
    if chat:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return str(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    return f"{image_token_text(processor)}{separator}{text}"


def move_inputs(batch: Mapping[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    """``batch`` (a processor's outputs) with its tensors on ``device`` and its floating-point tensors
    (pixel values) in ``dtype``; integer tensors (ids, masks, sizes) keep their dtype, and values that
    are not tensors pass through."""
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if hasattr(v, "to") else v
        for k, v in batch.items()
    }
