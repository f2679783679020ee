"""Locate and load a checkpoint: the bundled `llava-tiny` or a local HF LLaVA folder.

Shared by `vlcache-eval`, `vlcache-build` and the serving engines.

Contract:
* :func:`resolve_model` maps a bundled name (:data:`BUNDLED`) to its package folder ``vlcache/models/NAME``
  and anything else to a local directory; nothing is ever downloaded (these machines are offline).
* :func:`load_model` reads ``config.json`` first and accepts only ``model_type`` ``llava``
  (LlavaForConditionalGeneration) and ``llava_next`` (LlavaNextForConditionalGeneration); it loads
  the processor with ``AutoProcessor``, uses sdpa attention in the text and vision towers, puts the
  model in eval mode on the requested device and dtype.
* Every user mistake raises :class:`CheckpointError` (a ValueError) with a one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from vlcache.config import DTYPES
from vlcache.errors import UserError

#: ``llava-tiny`` (question-routed: reads the asked region at prefill, the default) and
#: ``llava-tiny-late`` (reads the image only while answering: the stress case for query-guided eviction)
BUNDLED = ("llava-tiny", "llava-tiny-late")
SUPPORTED_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


class CheckpointError(ValueError, UserError):
    """The checkpoint asked for is missing, unreadable or not a supported VLM (a user mistake)."""


@dataclass
class LoadedModel:
    """A model ready for :func:`vlcache.generate`.

    Attributes:
        model: the transformers model (eval mode). processor: its processor (a text-only
        model's: its tokenizer). path: the checkpoint folder. model_type: ``llava`` or
        ``llava_next`` (a text-only model's own, e.g. ``llama``).
        eos_token_id: the token that ends an answer (None when the checkpoint names none).
    """

    model: Any
    processor: Any
    path: Path
    model_type: str
    eos_token_id: int | None

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (a text-only model's processor is its tokenizer)."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> Any:
        return next(self.model.parameters()).dtype


def bundled_path(name: str) -> Path:
    """Where the package keeps the bundled checkpoint ``name`` (it may not exist)."""
    return Path(str(files("vlcache") / "models" / name))


def resolve_model(spec: str) -> Path:
    """``llava-tiny`` or a local directory -> the checkpoint folder (checked to hold config.json)."""
    if spec in BUNDLED:
        path = bundled_path(spec)
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"bundled model {spec!r} not found at {path}; train it with "
                f"`python scripts/train_tiny_llava.py --out {path}` (models cannot be downloaded here)"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"model directory not found: {path} (--model takes {', '.join(BUNDLED)} or a local HF "
            "checkpoint folder; models cannot be downloaded here)"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a HuggingFace checkpoint folder")
    return path


def model_type_of(path: Path) -> str:
    """``model_type`` from ``path/config.json``; CheckpointError unless it is a supported VLM."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{path} is not a supported VLM (model_type {model_type!r}); vlcache supports {', '.join(SUPPORTED_TYPES)}"
        )
    return str(model_type)


def check_device(device: str, dtype: str) -> Any:
    """The ``torch.device`` for ``device`` after checking ``dtype`` is one of :data:`DTYPES` and that
    a CUDA device asked for exists (CheckpointError otherwise)."""
    import torch

    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise CheckpointError(f"bad --device {device!r}: {e}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device} asked for, but torch sees no CUDA device")
    return torch_device


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off inside the block, restored after it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``spec`` (see :func:`resolve_model`) in eval mode on ``device`` with ``dtype``."""
    torch_device = check_device(device, dtype)
    path = resolve_model(spec)
    model_type = model_type_of(path)

    import torch
    import transformers

    model_cls = getattr(transformers, SUPPORTED_TYPES[model_type])
    try:
        with quiet_transformers():
            processor = transformers.AutoProcessor.from_pretrained(path)
            model = model_cls.from_pretrained(
                path,
                dtype=getattr(torch, dtype),
                attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"},
            )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the checkpoint in {path}: {str(e).splitlines()[0]}") from None
    model.to(torch_device).eval()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise CheckpointError(f"the processor in {path} has no tokenizer")
    eos = tokenizer.eos_token_id
    if eos is None:
        gen_eos = model.generation_config.eos_token_id
        eos = gen_eos[0] if isinstance(gen_eos, list) and gen_eos else gen_eos
    if model.generation_config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        model.generation_config.pad_token_id = pad
    return LoadedModel(model, processor, path, model_type, None if eos is None else int(eos))
