"""The native backends, ``cpu`` and ``cuda``: the C++/CUDA ops of ``moe_kernels._C`` (csrc/).

(Being written: see issue 4. Until the extension is built, both backends report why they are unavailable.)
"""

from __future__ import annotations

import torch

from .backends import Backend

try:
    from . import _C  # noqa: F401  (registers torch.ops.moe_kernels.*)
    _LOAD_ERROR = None
except ImportError as exc:  # not built
    _C = None
    _LOAD_ERROR = f"the C++ extension moe_kernels._C is not built ({exc})"


class CPUBackend(Backend):
    name = "cpu"

    def unavailable_reason(self):
        return _LOAD_ERROR

    def device_error(self, device: torch.device):
        return None if device.type == "cpu" else "the cpu backend runs on CPU tensors only"


class CUDABackend(Backend):
    name = "cuda"

    def unavailable_reason(self):
        if _LOAD_ERROR:
            return _LOAD_ERROR
        return None if getattr(_C, "WITH_CUDA", False) else "moe_kernels._C was built without CUDA sources"

    def device_error(self, device: torch.device):
        return None if device.type == "cuda" else "the cuda backend runs on CUDA tensors only"


CPU_BACKEND = CPUBackend()
CUDA_BACKEND = CUDABackend()
