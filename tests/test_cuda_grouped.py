"""The cuda backend's grouped-GEMM expert path on a GPU: ops grouped_mlp_forward / grouped_mlp_backward
(CUDA row kernels of csrc/cuda/grouped_rows.cu around torch's grouped GEMM) against the fp32 oracle, with the
README's tolerances, over the hard cases (one token, empty experts, all tokens on one expert, k = 1, k = E,
odd widths, prime E) and every activation; the no-host-sync promise (torch's sync debug mode) where torch's
CUTLASS grouped GEMM runs (bfloat16 on sm90/sm100); determinism; the fallbacks.

Needs a GPU and an extension built with the CUDA sources; skipped otherwise (CI has no GPU: there
.ci/cuda_compile_check.sh proves the sources compile, and tests/test_native_grouped.py runs the same per-row
code and orchestration on CPU tensors).
"""

from __future__ import annotations

import pytest
import torch
from grouped_testing import (ACTIVATION_CASES, ADAPTER_CASES, MLP_SHAPES, check_adapter_against_oracle,
                             check_mlp_against_oracle, mlp_problem)
from moe_testing import DTYPES, assert_close_rel

import moe_kernels as mk
from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not native.has_kernel("grouped_mlp_forward", "CUDA"):
    pytest.skip("moe_kernels._C was built without the CUDA grouped expert kernels", allow_module_level=True)

CUDA = torch.device("cuda")
FAST = native.grouped_gemm_status(CUDA, torch.bfloat16, 8) is None
needs_fast = pytest.mark.skipif(not FAST, reason="torch's CUTLASS grouped GEMM needs sm90/sm100 (bfloat16)")


def _cuda_backend_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale):
    """The public op on the cuda backend (validation, plan, the expert path the backend picks)."""
    if gated:
        return mk.moe_mlp(x, w1, w2, weights, ids, activation=activation, gate_up_bias=b1, down_bias=b2,
                          interleaved=interleaved, swiglu_limit=limit, backend="cuda")
    return mk.adapter_moe(x, w1, w2, weights, ids, activation=activation, scale=scale, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_grouped_op_cuda_matches_oracle(act_case, shape, dtype):
    """The grouped op on CUDA tensors, every dtype (bfloat16 on sm90: CUTLASS; else torch's fallback GEMMs)."""
    check_mlp_against_oracle(native.grouped_expert_mlp, shape, dtype, act_case, device="cuda")


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_moe_mlp_cuda_backend_bf16(act_case, shape):
    check_mlp_against_oracle(_cuda_backend_mlp, shape, torch.bfloat16, act_case, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_CASES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_adapter_cuda_backend_matches_oracle(activation, shape, dtype):
    check_adapter_against_oracle(_cuda_backend_mlp, shape, dtype, activation, device="cuda")


@pytest.mark.parametrize("shape", [(512, 256, 128, 64, 8, "random"), (300, 128, 96, 16, 2, "one_expert"),
                                   (64, 2048, 768, 128, 8, "random")], ids=str)
def test_grouped_cuda_larger_shapes(shape):
    check_mlp_against_oracle(_cuda_backend_mlp, shape, torch.bfloat16, ("silu", False, None, False), device="cuda")


def test_grouped_cuda_matches_cpu_grouped():
    """Same op, same per-row code on both devices: the GPU result is the CPU result up to GEMM rounding."""
    t, ids, grad = mlp_problem((40, 24, 16, 7, 3, "skip_last"), torch.float32, True)
    args = lambda d: [v.detach().to(d) for v in (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"])]
    outs = []
    for device in ("cpu", "cuda"):
        x, w1, w2, b1, b2, w = args(device)
        outs.append(native.grouped_expert_mlp(x, w1, w2, b1, b2, w, ids.to(device), "gpt_oss", True, True, 7.0, 1.0))
    torch.testing.assert_close(outs[1].cpu(), outs[0], rtol=1e-4, atol=1e-5)


@needs_fast
@pytest.mark.parametrize("adapter", [False, True])
def test_grouped_cuda_no_host_sync(adapter):
    """Forward and backward of the cuda expert path issue no synchronising call (bfloat16, sm90/sm100)."""
    if adapter:
        T, H, r, E, k = 64, 256, 16, 16, 4
        g = torch.Generator().manual_seed(1)
        h = torch.randn(T, H, generator=g).to(CUDA, torch.bfloat16).requires_grad_()
        down = (torch.randn(E, r, H, generator=g) * 0.05).to(CUDA, torch.bfloat16).requires_grad_()
        up = (torch.randn(E, H, r, generator=g) * 0.05).to(CUDA, torch.bfloat16).requires_grad_()
        leaves = [h, down, up]
    else:
        t, _, _ = mlp_problem((64, 256, 128, 16, 4, "random"), torch.bfloat16, True, device="cuda")
        leaves = [v for n, v in t.items() if n != "weights"]  # the routing weights come from route below
    logits = torch.randn(T if adapter else 64, 16, device=CUDA)
    weights, ids = mk.route(logits, 4, backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if adapter:
            out = mk.adapter_moe(h, down, up, weights, ids, backend="cuda")
        else:
            out = mk.moe_mlp(t["x"], t["gate_up"], t["down"], weights, ids, gate_up_bias=t["b1"], down_bias=t["b2"],
                             backend="cuda")
        torch.autograd.grad(out.float().square().sum(), leaves)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_fast
def test_grouped_cuda_is_deterministic():
    t, ids, grad = mlp_problem((256, 128, 64, 16, 4, "random"), torch.bfloat16, True, device="cuda")
    args = (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids, "silu", True, False, None, 1.0)
    results = []
    for _ in range(2):
        out = native.grouped_expert_mlp(*args)
        results.append((out, *torch.autograd.grad(out, list(t.values()), grad)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_grouped_cuda_many_experts_fallback():
    """More experts than torch's CUTLASS grouped GEMM takes (1023): the documented per-expert fallback."""
    T, H, I, E, k = 24, 16, 8, 1100, 2
    t, ids, grad = mlp_problem((T, H, I, E, k, "random"), torch.bfloat16, False, device="cuda")
    out = mk.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, backend="cuda")
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids)
    assert_close_rel(out, ref, torch.bfloat16, "output")


def test_cuda_fallback_error_mode(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_CUDA_FALLBACK", "error")
    t, ids, _ = mlp_problem(MLP_SHAPES[1], torch.float32, False, device="cuda")
    with pytest.raises(mk.BackendError, match="grouped GEMM"):
        mk.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, backend="cuda")


@pytest.mark.parametrize("case", range(3))
def test_grouped_cuda_opcheck(case):
    g = torch.Generator().manual_seed(9)
    T, H, I, E, k = 6, 16, 8, 5, 2
    dtype = (torch.bfloat16, torch.float16, torch.float32)[case]
    t, ids, _ = mlp_problem((T, H, I, E, k, "skip_last"), dtype, True, device="cuda")
    plan = mk.plan(ids, E)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mlp_forward,
                          (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids, *plan, "gelu", True,
                           False, None, 1.0, True))
