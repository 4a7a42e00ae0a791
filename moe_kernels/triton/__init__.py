"""The ``triton`` backend: Triton kernels for routing, the dispatch plan, gather-GEMM-scatter experts and
adapter experts (being written: see issue 3)."""

from __future__ import annotations

import os

import torch

from ..backends import Backend

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as exc:
    _IMPORT_ERROR = f"triton is not installed ({exc})"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self):
        return _IMPORT_ERROR

    def device_error(self, device: torch.device):
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return None
        return ("the triton backend runs on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 "
                "(the interpreter, for tests)")


BACKEND = TritonBackend()
