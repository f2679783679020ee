"""Token texts of the model format that every layer shares: framework-free, one source of truth.

Imported by the HF adapter (:mod:`vlcache.hf`: prompts, the tiny models' tokenizer), the digits task
(:mod:`vlcache.digits`), the serving engines and the scripts that write checkpoints, so it
imports nothing (no torch, no transformers).
"""

from __future__ import annotations

__all__ = ["IMAGE_TOKEN_TEXT"]

#: LLaVA's image placeholder as text: a processor expands each one into the image's feature tokens.
#: Its id is the tokenizer's (the bundled llava-tiny's: 4, see :data:`vlcache.hf.tiny.SPECIALS`).
IMAGE_TOKEN_TEXT = "<image>"
