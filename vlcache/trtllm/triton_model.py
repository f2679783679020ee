"""The trtllm backend's Triton model: TensorRT-LLM's own ``llmapi`` Python model, with vlcache's
compression installed. NEVER RUN (no GPU, no TensorRT-LLM here); see :mod:`vlcache.trtllm.manager`.

The repository's ``1/model.py`` is a shim over :func:`model_class`. It loads TensorRT-LLM's llmapi
``model.py`` (the Triton TensorRT-LLM images carry it at :data:`DEFAULT_LLMAPI_MODEL`; another place
through the ``VLCACHE_TRTLLM_LLMAPI_MODEL`` environment variable) and subclasses its
``TritonPythonModel``, which reads ``model.yaml`` (LLM() arguments plus ``triton_config``), so
streaming, sampling parameters and metrics are TensorRT-LLM's. vlcache changes two things:

* ``kv_cache_compression_config`` with ``algorithm: vlcache`` is taken out of the arguments the
  upstream model reads (TensorRT-LLM does not know the algorithm) and put back, after
  :func:`vlcache.trtllm.manager.install`, as vlcache's config object;
* a relative ``model`` path (the artifact's ``hf/``) is resolved against the version folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from vlcache.trtllm.manager import ALGORITHM, TensorRTLLMUnavailable

#: where TensorRT-LLM's Triton images keep the llmapi model (its backend Dockerfile copies
#: ``triton_backend/all_models`` to ``/app/all_models``)
DEFAULT_LLMAPI_MODEL = "/app/all_models/llmapi/tensorrt_llm/1/model.py"
LLMAPI_MODEL_ENV = "VLCACHE_TRTLLM_LLMAPI_MODEL"
COMPRESSION_KEY = "kv_cache_compression_config"


def split_compression(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(config without vlcache's compression section, that section)``; other algorithms stay."""
    section = config.get(COMPRESSION_KEY)
    if isinstance(section, dict) and section.get("algorithm") == ALGORITHM:
        return {k: v for k, v in config.items() if k != COMPRESSION_KEY}, section
    return dict(config), None


def resolve_model(args: dict[str, Any], version_dir: str | Path) -> dict[str, Any]:
    """``args`` with a relative local ``model`` path made absolute against ``version_dir`` (a HF id,
    ``org/name``, that is no folder there is left as it is)."""
    model = args.get("model")
    if isinstance(model, str) and not os.path.isabs(model):
        candidate = (Path(version_dir) / model).resolve()
        if candidate.exists():
            return {**args, "model": str(candidate)}
    return dict(args)


def model_class(path: str | Path | None = None) -> type:
    """TensorRT-LLM's llmapi ``TritonPythonModel`` with vlcache's compression (TensorRTLLMUnavailable
    when that model file is not there)."""
    source = Path(path or os.environ.get(LLMAPI_MODEL_ENV, DEFAULT_LLMAPI_MODEL))
    if not source.is_file():
        raise TensorRTLLMUnavailable(
            f"TensorRT-LLM's llmapi Triton model is not at {source}; run in a Triton TensorRT-LLM image "
            f"or set {LLMAPI_MODEL_ENV} to its model.py"
        )
    sys.path.insert(0, str(source.parent))  # its helpers.py
    spec = importlib.util.spec_from_file_location("_vlcache_trtllm_llmapi_model", source)
    if spec is None or spec.loader is None:  # pragma: no cover - a file path always has a loader
        raise TensorRTLLMUnavailable(f"cannot load {source}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    held: dict[str, Any] = {}
    read = module.get_model_config

    def get_model_config(*args: Any, **kwargs: Any) -> Any:
        rest, section = split_compression(read(*args, **kwargs))
        if section is not None:
            held["section"] = section
        return rest

    module.__dict__["get_model_config"] = get_model_config

    class TritonPythonModel(module.TritonPythonModel):  # type: ignore[misc, name-defined]
        def _init_engine(self) -> None:
            from vlcache.trtllm.manager import compression_config, install

            args: dict[str, Any] = self.llm_engine_args  # built by the upstream initialize()
            args.update(resolve_model(args, module.pb_utils.get_model_dir()))
            if "section" in held:
                install()
                args[COMPRESSION_KEY] = compression_config(held["section"])
            super()._init_engine()

    return TritonPythonModel
