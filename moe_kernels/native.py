"""The native backends, ``cpu`` and ``cuda``: the C++/CUDA ops of ``moe_kernels._C`` (csrc/).

Importing this module loads the extension (which registers ``torch.ops.moe_kernels.*``, their CPU/CUDA
kernels and their autograd, csrc/autograd.cpp), then adds what the C++ side does not provide: fake (meta)
kernels, so the ops trace under ``torch.compile``.

Ops (schemas in csrc/ops.cpp; slot s = t*k + j as in :mod:`moe_kernels.reference`):

* ``route_forward`` / ``route_backward``: fused top-k routing; CPU and CUDA.
* ``plan``, ``gather_rows``, ``scatter_rows_sum``, ``combine``, ``combine_backward``: the dispatch
  plan and the row movements around the expert GEMMs; CPU and CUDA.
* ``expert_mlp_forward`` / ``expert_mlp_backward``: the CPU expert path (csrc/cpu/experts.cpp), two
  GEMMs per expert on contiguous slices with the activation fused between them; CPU only.
* ``grouped_mlp_forward`` / ``grouped_mlp_backward``: the grouped-GEMM expert path
  (csrc/grouped_experts.cpp): gather, activation and combine row kernels around torch's grouped GEMM
  (``at::_grouped_mm``, group offsets on the device, weight gradients from its k-grouped form); CPU and
  CUDA (the CPU kernels run the same per-row code, csrc/common/grouped_rows.h).
* ``decode_mlp_forward``: the decode expert path (csrc/decode_experts.cpp): two GEMV passes over the routed
  slots, no plan, forward only; CPU and CUDA (the same per-element code, csrc/common/grouped_rows.h).

The ``cpu`` backend runs the fused CPU expert op. The ``cuda`` backend runs the decode op for at most
``DECODE_MAX_SLOTS`` routed slots without gradients (:func:`cuda_decode_wanted`), else the grouped op
(:func:`grouped_expert_mlp`) with no host synchronisation where torch's CUTLASS grouped GEMM runs:
bfloat16 on sm90/sm100, fewer than 1024 experts (:func:`grouped_gemm_status`). Elsewhere it follows
``MOE_KERNELS_CUDA_FALLBACK``: ``loop`` (the default) runs the same op over torch's own fallback (a GEMM
per expert after one device-to-host read of the offsets; past 1023 experts, :func:`composed_expert_mlp`),
``error`` raises :class:`~moe_kernels.backends.BackendError`.
"""

from __future__ import annotations

import torch

import os

from . import reference
from .backends import Backend, BackendError, Plan, device_capability, fp32_int32_routing
from .spec import NO_GROUP

try:
    from . import _C  # noqa: F401  (registers torch.ops.moe_kernels.*)
    _LOAD_ERROR = None
except ImportError as exc:  # not built
    _C = None
    ops = None
    _LOAD_ERROR = (f"the C++ extension moe_kernels._C is not built ({exc}); build it with "
                   "`MOE_KERNELS_BUILD_CUDA=0 python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")

# Ops every native build registers for the CPU, and for CUDA when built with the CUDA sources.
SHARED_OPS = ("route_forward", "route_backward", "plan", "gather_rows", "scatter_rows_sum", "combine",
              "combine_backward", "grouped_mlp_forward", "grouped_mlp_backward", "decode_mlp_forward")
CPU_ONLY_OPS = ("expert_mlp_forward", "expert_mlp_backward")


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``moe_kernels::<op_name>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA") in this process."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_kernels::{op_name}", dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


if _C is not None:
    ops = torch.ops.moe_kernels

    # ---- fake kernels: output shapes and dtypes only -------------------------------------------------

    @torch.library.register_fake("moe_kernels::route_forward")
    def _route_forward_fake(logits, k, use_sigmoid, topk_first, renormalize, bias, n_group, topk_group, scale,
                            weights_dtype=None, ids_dtype=None):
        num_tokens = logits.shape[0]
        return (logits.new_empty((num_tokens, k), dtype=weights_dtype or torch.float32),
                logits.new_empty((num_tokens, k), dtype=ids_dtype or torch.int32))

    @torch.library.register_fake("moe_kernels::route_backward")
    def _route_backward_fake(grad_weights, logits, ids, use_sigmoid, topk_first, renormalize, scale):
        return logits.new_empty(logits.shape, dtype=torch.float32)

    @torch.library.register_fake("moe_kernels::plan")
    def _plan_fake(ids, num_experts):
        num_slots = ids.numel()
        return (ids.new_empty((num_experts + 1,), dtype=torch.int32), ids.new_empty((num_slots,), dtype=torch.int32),
                ids.new_empty((num_slots,), dtype=torch.int32))

    @torch.library.register_fake("moe_kernels::gather_rows")
    def _gather_rows_fake(x, sorted_slots, k):
        return x.new_empty((sorted_slots.shape[0], x.shape[1]))

    @torch.library.register_fake("moe_kernels::scatter_rows_sum")
    def _scatter_rows_sum_fake(grad_rows, slot_positions, k):
        return grad_rows.new_empty((slot_positions.shape[0] // k, grad_rows.shape[1]))

    @torch.library.register_fake("moe_kernels::combine")
    def _combine_fake(y_sorted, slot_positions, weights):
        return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1]))

    @torch.library.register_fake("moe_kernels::combine_backward")
    def _combine_backward_fake(grad_out, y_sorted, slot_positions, weights):
        # Contiguous, as the kernels return them whatever the strides of y_sorted and weights.
        return y_sorted.new_empty(y_sorted.shape), weights.new_empty(weights.shape)

    if has_kernel("expert_mlp_forward", "CPU"):
        @torch.library.register_fake("moe_kernels::expert_mlp_forward")
        def _expert_mlp_forward_fake(x, w1, w2, b1, b2, weights, expert_offsets, sorted_slots, slot_positions,
                                     activation, gated, interleaved, limit, scale, keep_hidden, gate_cap=0.0,
                                     up_cap=0.0):
            hidden_rows = sorted_slots.shape[0] if keep_hidden else 0
            return x.new_empty(x.shape), x.new_empty((hidden_rows, w1.shape[1]))

        @torch.library.register_fake("moe_kernels::expert_mlp_backward")
        def _expert_mlp_backward_fake(grad_out, x, w1, w2, b1, b2, weights, expert_offsets, sorted_slots,
                                      slot_positions, hidden, activation, gated, interleaved, limit, scale,
                                      gate_cap=0.0, up_cap=0.0):
            num_experts = w1.shape[0]
            grad_b1 = b1.new_empty(b1.shape) if b1 is not None else x.new_empty((0,))
            grad_b2 = b2.new_empty(b2.shape) if b2 is not None else x.new_empty((0,))
            return (x.new_empty(x.shape), x.new_empty((num_experts, w1.shape[1], w1.shape[2])),
                    x.new_empty((num_experts, w2.shape[1], w2.shape[2])), grad_b1, grad_b2,
                    weights.new_empty(weights.shape))

    def _staging_strides(rows, cols, dtype):
        """Strides of the grouped path's staging rows: rows padded to 16 bytes (csrc/grouped_experts.cpp)."""
        align = 16 // dtype.itemsize
        return ((cols + align - 1) // align * align, 1)

    if has_kernel("grouped_mlp_forward", "CPU"):
        @torch.library.register_fake("moe_kernels::grouped_mlp_forward")
        def _grouped_mlp_forward_fake(x, w1, w2, b1, b2, weights, ids, expert_offsets, sorted_slots, slot_positions,
                                      activation, gated, interleaved, limit, scale, keep, gate_cap=0.0, up_cap=0.0):
            num_tokens, hidden = x.shape
            m1 = w1.shape[1]
            out = x.new_empty((num_tokens, hidden))
            if not keep:
                return out, x.new_empty((0, hidden)), x.new_empty((0, m1))
            rows = sorted_slots.shape[0]
            return (out, x.new_empty_strided((rows, hidden), _staging_strides(rows, hidden, x.dtype)),
                    x.new_empty_strided((rows, m1), _staging_strides(rows, m1, x.dtype)))

        @torch.library.register_fake("moe_kernels::grouped_mlp_backward")
        def _grouped_mlp_backward_fake(grad_out, xs, hidden, w1, w2, b1, b2, weights, ids, expert_offsets,
                                       sorted_slots, slot_positions, activation, gated, interleaved, limit, scale,
                                       gate_cap=0.0, up_cap=0.0):
            grad_b1 = b1.new_empty(b1.shape) if b1 is not None else grad_out.new_empty((0,))
            grad_b2 = b2.new_empty(b2.shape) if b2 is not None else grad_out.new_empty((0,))
            return (grad_out.new_empty(grad_out.shape), grad_out.new_empty(tuple(w1.shape)),
                    grad_out.new_empty(tuple(w2.shape)), grad_b1, grad_b2, weights.new_empty(weights.shape))

    if has_kernel("decode_mlp_forward", "CPU"):
        @torch.library.register_fake("moe_kernels::decode_mlp_forward")
        def _decode_mlp_forward_fake(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale,
                                     gate_cap=0.0, up_cap=0.0):
            return x.new_empty(x.shape)

    # Autograd: csrc/autograd.cpp (C++ torch::autograd::Functions registered for the Autograd key).
    # decode_mlp_forward has none: it runs only where no gradient is needed (cuda_decode_wanted).


# ---- the backend functions -----------------------------------------------------------------------
# Their inputs come validated and normalised by moe_kernels.ops (the Backend contract, backends.py: ids int32
# contiguous and in range, weights float32, one device), so nothing here converts or checks them again; the
# C++ ops make what they read contiguous themselves (free when it already is).


def native_route(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype, ids_dtype):
    """route via ``route_forward``: (weights [T,k] in weights_dtype, ids [T,k] in ids_dtype), differentiable w.r.t.
    logits."""
    # "No group limit" is None in moe_kernels.ops and spec.NO_GROUP (0) in the op schema: converted here, and
    # only here (csrc/common/op_args.h's make_params takes any n_group <= 1 as none).
    n_group, topk_group = (NO_GROUP, NO_GROUP) if n_group is None else (n_group, topk_group)
    return ops.route_forward(logits, k, scoring == "sigmoid", order == "topk_then_softmax", renormalize,
                             None if bias is None else bias.detach(), n_group, topk_group, float(scale), weights_dtype,
                             ids_dtype)


def native_plan(ids, num_experts) -> Plan:
    return Plan(*ops.plan(ids, num_experts))


def _caps(softcaps) -> tuple:
    """The ops' trailing (gate_cap, up_cap) arguments: none (the schema's default 0) unless softcap_swiglu."""
    return () if softcaps is None else (float(softcaps[0]), float(softcaps[1]))


def fused_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale, softcaps=None):
    """The CPU expert path (``expert_mlp_forward``): x [T,H], w1 [E,M1,H], w2 [E,H,M2] -> [T,H] in x's dtype."""
    weights, ids = fp32_int32_routing(weights, ids)  # what the op reads
    plan = native_plan(ids, w1.shape[0])
    keep_hidden = _needs_grad(x, w1, w2, b1, b2, weights)
    out, _hidden = ops.expert_mlp_forward(x.contiguous(), w1, w2, b1, b2, weights, *plan, activation, gated,
                                          interleaved, limit, float(scale), keep_hidden, *_caps(softcaps))
    return out


def composed_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale,
                        softcaps=None):
    """Same math as :func:`fused_expert_mlp`, from the shared native ops and torch matmuls (any device).

    gather_rows into expert order, per expert two matmuls around the reference activation (fp32
    math, cast back), combine back to token order; autograd through every piece. Reads the expert
    offsets on the host (one device sync).
    """
    weights, ids = fp32_int32_routing(weights, ids)  # what the ops read
    num_tokens, k = ids.shape
    plan = native_plan(ids, w1.shape[0])
    xs = ops.gather_rows(x.contiguous(), plan.sorted_slots, k)
    counts = plan.expert_offsets.diff().tolist()
    outputs = []
    for e, rows in enumerate(torch.split(xs, counts)):
        if rows.shape[0] == 0:
            continue
        hidden = rows @ w1[e].t()
        if b1 is not None:
            hidden = hidden + b1[e]
        if gated:
            act = reference.gated_activation(hidden.float(), activation, interleaved, limit, softcaps)
        else:
            act = reference.apply_activation(hidden.float(), activation)
        y = act.to(x.dtype) @ w2[e].t()
        if b2 is not None:
            y = y + b2[e]
        outputs.append(y)
    ys = torch.cat(outputs).contiguous()
    return ops.combine(ys, plan.slot_positions, weights * scale)


# torch's CUTLASS grouped GEMM (at::cuda::detail::bf16bf16_grouped_mm): bfloat16, compute capability 9.x or
# 10.x, at most 1023 groups. Other dtypes and archs take torch's fallback (a GEMM per group after reading
# the offsets on the host).
GROUPED_GEMM_ARCH_MAJORS = (9, 10)
GROUPED_GEMM_MAX_EXPERTS = 1023
def grouped_gemm_status(device: torch.device, dtype: torch.dtype, num_experts: int) -> str | None:
    """None when the grouped expert path runs without a host sync on tensors of ``device`` and ``dtype``
    (torch's CUTLASS grouped GEMM), else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type != "cuda":
        return None  # CPU: torch's grouped GEMM is a loop over groups on the host anyway
    if dtype != torch.bfloat16:
        return f"torch's CUTLASS grouped GEMM takes bfloat16 only, got {dtype}"
    major, minor = device_capability(device)
    if major not in GROUPED_GEMM_ARCH_MAJORS:
        return f"torch's CUTLASS grouped GEMM runs on sm90/sm100, this GPU is sm{major}{minor}"
    if num_experts > GROUPED_GEMM_MAX_EXPERTS:
        return f"torch's CUTLASS grouped GEMM takes at most {GROUPED_GEMM_MAX_EXPERTS} groups, got {num_experts} experts"
    return None


FALLBACK_MODES = ("loop", "error")


def cuda_fallback_mode() -> str:
    """``MOE_KERNELS_CUDA_FALLBACK``: what the cuda expert path does where grouped_gemm_status is not None."""
    mode = os.environ.get("MOE_KERNELS_CUDA_FALLBACK", "loop") or "loop"
    if mode not in FALLBACK_MODES:
        raise ValueError(f"MOE_KERNELS_CUDA_FALLBACK must be one of {list(FALLBACK_MODES)}, got {mode!r}")
    return mode


def grouped_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale, softcaps=None):
    """The grouped-GEMM expert path (``grouped_mlp_forward``): x [T,H], w1 [E,M1,H], w2 [E,H,M2] -> [T,H].

    Same math as :func:`fused_expert_mlp`, on CPU or CUDA tensors; differentiable w.r.t. x, w1, w2, the
    biases and the routing weights (``grouped_mlp_backward``).
    """
    weights, ids = fp32_int32_routing(weights, ids)  # what the op reads
    plan = native_plan(ids, w1.shape[0])
    keep = _needs_grad(x, w1, w2, b1, b2, weights)
    out, _xs, _hidden = ops.grouped_mlp_forward(x, w1, w2, b1, b2, weights, ids, *plan, activation, gated,
                                                interleaved, limit, float(scale), keep, *_caps(softcaps))
    return out


DECODE_MAX_SLOTS = 64  # routed slots (T*k) up to which a call without gradients takes decode_mlp_forward
CUDA_DECODE_MODES = ("gemv", "grouped")


def cuda_decode_wanted(ids: torch.Tensor, *tensors) -> bool:
    """Whether a cuda expert call runs ``decode_mlp_forward`` (two GEMV launches, no plan; csrc/decode_experts.h):
    at most DECODE_MAX_SLOTS routed slots and no gradient to record. ``MOE_KERNELS_CUDA_DECODE=grouped`` keeps
    such calls on the grouped path (the benchmark times both)."""
    if ids.numel() > DECODE_MAX_SLOTS or _needs_grad(*tensors):
        return False
    mode = os.environ.get("MOE_KERNELS_CUDA_DECODE", "gemv") or "gemv"
    if mode not in CUDA_DECODE_MODES:
        raise ValueError(f"MOE_KERNELS_CUDA_DECODE must be one of {list(CUDA_DECODE_MODES)}, got {mode!r}")
    return mode == "gemv"


def decode_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale, softcaps=None):
    """The decode op (no plan, forward only): x [T,H], w1 [E,M1,H], w2 [E,H,M2] -> [T,H], on CPU or CUDA tensors."""
    return ops.decode_mlp_forward(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit,
                                  float(scale), *_caps(softcaps))


def cuda_expert_path(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale, softcaps=None):
    """The cuda backend's expert path: the decode op for a few slots without gradients (any dtype and arch: it
    needs no grouped GEMM), else the grouped op, or the fallback MOE_KERNELS_CUDA_FALLBACK names."""
    if cuda_decode_wanted(ids, x, w1, w2, b1, b2, weights):  # reads the routing as given (decode_experts.h)
        return decode_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale,
                                 softcaps)
    reason = grouped_gemm_status(x.device, x.dtype, w1.shape[0])
    if reason is not None:
        if cuda_fallback_mode() == "error":
            raise BackendError(f"backend 'cuda': no grouped GEMM without a host sync here ({reason}); use "
                               "backend='triton', or MOE_KERNELS_CUDA_FALLBACK=loop for torch's per-expert fallback")
        if w1.shape[0] > GROUPED_GEMM_MAX_EXPERTS and x.dtype == torch.bfloat16:
            # torch would pick its CUTLASS kernel and refuse this many groups: the per-expert loop instead.
            return composed_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit,
                                       scale, softcaps)
    return grouped_expert_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale,
                              softcaps)


def _unavailable(dispatch_key: str, op_names) -> str | None:
    if _LOAD_ERROR:
        return _LOAD_ERROR
    missing = [op for op in op_names if not has_kernel(op, dispatch_key)]
    if missing:
        return f"moe_kernels._C has no {dispatch_key} kernels for {', '.join(missing)}"
    return None


# Kernels register when _C loads, so availability is fixed from here on. Computed once: the checks
# run inside traced code (torch.compile) where the dispatcher query cannot be called.
_CPU_UNAVAILABLE = _unavailable("CPU", SHARED_OPS + CPU_ONLY_OPS)
_CUDA_UNAVAILABLE = _unavailable("CUDA", SHARED_OPS)
if _CUDA_UNAVAILABLE and not _LOAD_ERROR:
    _CUDA_UNAVAILABLE += " (built without the CUDA sources, or with a CPU-only torch)"


class NativeBackend(Backend):
    """Shared routing/plan entry points of the cpu and cuda backends; subclasses pick the expert path."""

    expert_path = staticmethod(composed_expert_mlp)

    def route(self, logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype, ids_dtype):
        return native_route(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype,
                            ids_dtype)

    def plan(self, ids, num_experts):
        return native_plan(ids, num_experts)

    def moe_mlp(self, x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, interleaved,
                swiglu_limit, gated, softcaps):
        # moe_mlp's routing as the caller gave it: each expert path converts where its op needs it
        return self.expert_path(x, gate_up_proj, down_proj, gate_up_bias, down_bias, weights, ids, activation, gated,
                                interleaved, swiglu_limit, 1.0, softcaps)

    def adapter_moe(self, h, down, up, weights, ids, activation, scale):
        return self.expert_path(h, down, up, None, None, weights, ids, activation, False, False, None, scale)


class CPUBackend(NativeBackend):
    name = "cpu"
    expert_path = staticmethod(fused_expert_mlp)

    def unavailable_reason(self):
        return _CPU_UNAVAILABLE

    def device_error(self, device: torch.device):
        return None if device.type == "cpu" else "the cpu backend runs on CPU tensors only"


class CUDABackend(NativeBackend):
    name = "cuda"
    expert_path = staticmethod(cuda_expert_path)

    def unavailable_reason(self):
        return _CUDA_UNAVAILABLE

    def device_error(self, device: torch.device):
        return None if device.type == "cuda" else "the cuda backend runs on CUDA tensors only"


CPU_BACKEND = CPUBackend()
CUDA_BACKEND = CUDABackend()

__all__ = ["CPU_BACKEND", "CUDA_BACKEND", "SHARED_OPS", "CPU_ONLY_OPS", "has_kernel", "native_route", "native_plan",
           "fused_expert_mlp", "composed_expert_mlp", "grouped_expert_mlp", "cuda_expert_path", "grouped_gemm_status",
           "cuda_fallback_mode"]
