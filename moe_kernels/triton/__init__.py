"""The ``triton`` backend: Triton kernels for routing, the dispatch plan, gather-GEMM-scatter experts and
adapter experts, forward and backward.

Modules: :mod:`.routing` (fused top-k routing), :mod:`.plan` (on-device counting sort),
:mod:`.experts` (expert MLP), :mod:`.adapters` (adapter / LoRA experts), :mod:`.configs` (launch
configs per shape class, ``configs.json``), :mod:`.common` (what the kernel modules share: interpreter flag,
``tl.dot`` precision, activations, the plan's tile map, the slot combine),
:mod:`.compile_check` (ahead-of-time compile of every kernel for real GPUs).
Kernel modules are imported on first use, so ``moe_kernels.triton`` stays cheap to import.

Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (the interpreter, for tests).
"""

from __future__ import annotations

import torch

from ..backends import Backend

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as exc:
    _IMPORT_ERROR = f"triton is not installed ({exc})"


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self):
        return _IMPORT_ERROR

    def device_error(self, device: torch.device):
        if device.type == "cuda":  # the hot path: no import statement
            return None
        from .common import interpreting  # imports triton: only once the backend is asked for

        if device.type == "cpu" and interpreting():
            return None
        return ("the triton backend runs on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 "
                "(the interpreter, for tests)")

    def route(self, logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype, ids_dtype):
        from .routing import route
        return route(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype,
                     ids_dtype)

    def plan(self, ids, num_experts):
        from .plan import dispatch_plan
        return dispatch_plan(ids, num_experts)

    def moe_mlp(self, x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                interleaved, swiglu_limit, gated, softcaps):
        from .experts import moe_mlp
        return moe_mlp(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                       interleaved, swiglu_limit, gated, softcaps)

    def adapter_moe(self, h, down, up, weights, ids, activation, scale):
        from .adapters import adapter_moe_triton
        return adapter_moe_triton(h, down, up, weights, ids, activation, scale)


BACKEND = TritonBackend()

# Modules whose kernels the compile check covers; each exposes COMPILE_SPECS or _compile_specs().
KERNEL_MODULES = ("plan", "routing", "experts", "adapters")
