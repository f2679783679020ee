"""Triton Python-backend entry point of the `vlcache` model: a shim, the logic is vlcache.serving.model."""

import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend stub

from vlcache.serving.model import ServedModel


class TritonPythonModel(ServedModel):
    pb_utils = pb_utils
