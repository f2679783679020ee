"""Triton Python-backend entry point of the trtllm backend: a shim. The logic is
vlcache.trtllm.triton_model (TensorRT-LLM's llmapi model with vlcache's compression installed).
Written against pinned TensorRT-LLM sources and never run by this project: docs/trtllm.md."""

from vlcache.trtllm.triton_model import model_class

TritonPythonModel = model_class()
