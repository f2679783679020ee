"""The logic of the Triton Python-backend model `vlcache` (the repository's ``model.py`` only subclasses it).

Contract:
* ``initialize`` reads the model config's parameters (rendered by
  :func:`vlcache.serving.render_repository`): ``artifact_dir`` (absolute, or relative to the model's
  folder in the repository), ``max_tokens_cap``, ``num_threads`` (torch and ONNX Runtime intra-op
  threads, 0 = leave their defaults) and ``device`` (``cuda`` becomes the instance's ``cuda:N``); it
  refuses a config that is not decoupled; then it loads the engine on that device with
  :func:`vlcache.serving.load_engine`.
* ``execute`` serves its requests one after another, each on its own response stream: one response
  per new piece of text (output ``text``), then a final response (flag ``FINAL``) with ``text`` empty
  and ``stats`` (JSON). A bad request gets one final response carrying an ``INVALID_ARG`` error
  whose message starts with ``INVALID_ARGUMENT:``; an unexpected failure gets ``INTERNAL``. Either
  way the instance goes on with the next request.
* A request the client cancels stops generating at the next token and is closed with a final
  response without outputs; other requests are not affected.
* The Triton utilities module (``triton_python_backend_utils``) is a class attribute, ``pb_utils``,
  set by the subclass in ``model.py``, so that this module imports without Triton (unit tests pass a
  stand-in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlcache.serving import protocol
from vlcache.serving.request import InvalidRequest, Limits, parse_request


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``parameters { key: ... value { string_value: ... } }`` of a model config, as a flat dict."""
    raw = model_config.get("parameters", {}) or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


class ServedModel:
    """Base of the repository's ``TritonPythonModel`` (see the module docstring)."""

    pb_utils: Any = None

    def initialize(self, args: dict[str, Any]) -> None:
        from vlcache.methods import available
        from vlcache.serving.engine import load_engine

        pb = self.pb_utils
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise ValueError("the vlcache model streams: its config needs model_transaction_policy { decoupled: true }")
        params = model_parameters(config)
        artifact = Path(params.get("artifact_dir", "../.."))
        if not artifact.is_absolute():
            artifact = Path(args["model_repository"]) / artifact
        threads = int(params.get("num_threads", "0") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        device = params.get("device", "cpu") or "cpu"
        if device == "cuda":  # KIND_GPU instances: one per GPU of the instance group
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        self.engine = load_engine(artifact.resolve(), device=device, threads=max(threads, 0))
        cap = int(params.get("max_tokens_cap", "") or protocol.DEFAULT_MAX_TOKENS_CAP)
        self.limits = Limits(methods=tuple(available()), max_tokens_cap=cap)
        self.logger = pb.Logger
        self.logger.log_info(
            f"vlcache: {self.engine.backend} engine from {artifact.resolve()} "
            f"(default {self.engine.default_config.method} at budget {self.engine.default_config.budget})"
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.serve(request)
        return None

    def finalize(self) -> None:
        del self.engine

    # --- one request -----------------------------------------------------------------------------
    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _response(self, text: str, stats: dict[str, Any] | None = None) -> Any:
        pb = self.pb_utils
        outputs = [pb.Tensor(protocol.TEXT.name, np.array([text.encode("utf-8")], dtype=np.object_))]
        if stats is not None:
            blob = json.dumps(stats, sort_keys=True).encode("utf-8")
            outputs.append(pb.Tensor(protocol.STATS.name, np.array([blob], dtype=np.object_)))
        return pb.InferenceResponse(output_tensors=outputs)

    def _error(self, message: str, code: str) -> Any:
        pb = self.pb_utils
        error = pb.TritonError(message, getattr(pb.TritonError, code))
        return pb.InferenceResponse(output_tensors=[], error=error)

    def serve(self, request: Any) -> None:
        pb = self.pb_utils
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def cancelled() -> bool:
            return bool(request.is_cancelled())

        def on_text(delta: str) -> None:
            if delta and not cancelled():
                sender.send(self._response(delta))

        try:
            if cancelled():
                sender.send(flags=final)
                return
            parsed = parse_request(
                {spec.name: self._input(request, spec.name) for spec in protocol.INPUTS}, self.limits
            )
            stats = self.engine.generate(
                parsed.image,
                parsed.prompt,
                max_tokens=parsed.max_tokens,
                budget=parsed.budget,
                method=parsed.method,
                on_text=on_text,
                cancelled=cancelled,
            )
            if cancelled():
                sender.send(flags=final)
            else:
                sender.send(self._response("", stats), flags=final)
        except InvalidRequest as e:
            self._close_with_error(sender, str(e), "INVALID_ARG")
        except Exception as e:  # keep serving: report the failure to this client only
            self.logger.log_error(f"vlcache: request failed: {type(e).__name__}: {e}")
            self._close_with_error(sender, f"INTERNAL: {type(e).__name__}: {e}", "INTERNAL")

    def _close_with_error(self, sender: Any, message: str, code: str) -> None:
        try:
            sender.send(self._error(message, code), flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # the stream is gone (cancelled, or already closed): nothing to tell
            self.logger.log_warn(f"vlcache: could not send the error response: {e}")
