"""The grouped-GEMM expert path (ops grouped_mlp_forward / grouped_mlp_backward, csrc/grouped_experts.cpp)
on CPU tensors, against the fp32 oracle.

The CPU kernels of these ops run the same per-row code as the CUDA kernels (csrc/common/grouped_rows.h)
around the same orchestration and torch's grouped GEMM, so these tests cover everything of the cuda
backend's expert path but the kernel launches (tests/test_cuda_grouped.py runs those on a GPU). Tolerances:
the README's, norm-wise against the oracle (gradients twice that).
"""

from __future__ import annotations

import pytest
import torch
from grouped_testing import (ADAPTER_CASES, MLP_SHAPES, ACTIVATION_CASES, make_routing, check_adapter_against_oracle,
                             check_mlp_against_oracle, mlp_problem)
from moe_testing import DTYPES, assert_close_rel

import moe_kernels as mk
from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)
if not native.has_kernel("grouped_mlp_forward", "CPU"):
    pytest.skip("moe_kernels._C was built without the grouped expert ops", allow_module_level=True)
try:  # torch's grouped GEMM on CPU tensors (a loop over groups; torch >= 2.9)
    torch._grouped_mm(torch.zeros(2, 8), torch.zeros(1, 8, 8), torch.tensor([2], dtype=torch.int32))
except (AttributeError, RuntimeError, NotImplementedError) as exc:  # pragma: no cover - older torch
    pytest.skip(f"torch._grouped_mm does not run on CPU tensors here: {exc}", allow_module_level=True)

ops = torch.ops.moe_kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_grouped_moe_mlp_matches_oracle(act_case, shape, dtype):
    check_mlp_against_oracle(native.grouped_expert_mlp, shape, dtype, act_case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_CASES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_grouped_adapter_matches_oracle(activation, shape, dtype):
    check_adapter_against_oracle(native.grouped_expert_mlp, shape, dtype, activation)


def test_grouped_transposed_weight_views():
    """GPT-OSS stores gate_up as [E, H, 2I] and down as [E, I, H]: the op takes the transposed views as they are."""
    g = torch.Generator().manual_seed(11)
    T, H, I, E, k = 20, 16, 8, 4, 2
    weights, ids = make_routing(T, E, k, "random", g)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up_storage = torch.randn(E, H, 2 * I, generator=g, requires_grad=True)
    down_storage = torch.randn(E, I, H, generator=g, requires_grad=True)
    w1, w2 = gate_up_storage.transpose(1, 2), down_storage.transpose(1, 2)
    out = native.grouped_expert_mlp(x, w1, w2, None, None, weights, ids, "gpt_oss", True, True, 7.0, 1.0)
    ref = reference.moe_mlp(x, w1, w2, weights, ids, "gpt_oss", None, None, True, 7.0)
    assert_close_rel(out, ref, torch.float32, "output")
    got = torch.autograd.grad(out.sum(), (x, gate_up_storage, down_storage))
    want = torch.autograd.grad(ref.sum(), (x, gate_up_storage, down_storage))
    for a, b in zip(got, want):
        assert_close_rel(a, b, torch.float32, "grad", factor=2)


def test_grouped_without_grad_keeps_nothing_and_backward_refuses():
    t, ids, _ = mlp_problem(MLP_SHAPES[1], torch.float32, False)
    plan = mk.plan(ids, t["gate_up"].shape[0])
    with torch.no_grad():
        out, xs, hidden = ops.grouped_mlp_forward(t["x"], t["gate_up"], t["down"], None, None, t["weights"], ids,
                                                  *plan, "silu", True, False, None, 1.0, False)
    assert xs.shape == (0, t["x"].shape[1]) and hidden.shape == (0, t["gate_up"].shape[1])
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids).detach()
    assert_close_rel(out, ref, torch.float32, "output")


def test_grouped_is_deterministic():
    t, ids, grad = mlp_problem((40, 24, 16, 6, 2, "random"), torch.bfloat16, True)
    args = (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids, "gelu", True, False, None, 1.0)
    first = None
    for _ in range(2):
        out = native.grouped_expert_mlp(*args)
        result = (out, *torch.autograd.grad(out, list(t.values()), grad))
        if first is None:
            first = result
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, result))


def test_cuda_expert_path_policy(monkeypatch):
    """The cuda backend's choice where the grouped GEMM has no fast path: the documented fallback runs the same
    op; MOE_KERNELS_CUDA_FALLBACK=error raises BackendError (exercised on CPU tensors, policy only)."""
    t, ids, _ = mlp_problem(MLP_SHAPES[0], torch.float32, False)
    args = (t["x"], t["gate_up"], t["down"], None, None, t["weights"], ids, "silu", True, False, None, 1.0)
    assert native.grouped_gemm_status(torch.device("cpu"), torch.float32, 8) is None
    monkeypatch.setattr(native, "grouped_gemm_status", lambda device, dtype, e: "no fast grouped GEMM (test)")
    monkeypatch.setenv("MOE_KERNELS_CUDA_FALLBACK", "error")
    with pytest.raises(mk.BackendError, match="no fast grouped GEMM"):
        native.cuda_expert_path(*args)
    monkeypatch.setenv("MOE_KERNELS_CUDA_FALLBACK", "loop")
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids)
    assert_close_rel(native.cuda_expert_path(*args), ref, torch.float32, "fallback")
    monkeypatch.setenv("MOE_KERNELS_CUDA_FALLBACK", "sometimes")
    with pytest.raises(ValueError, match="MOE_KERNELS_CUDA_FALLBACK"):
        native.cuda_expert_path(*args)


def _opcheck_cases():
    g = torch.Generator().manual_seed(9)
    T, H, I, E, k = 6, 12, 5, 5, 2
    weights, ids = make_routing(T, E, k, "skip_last", g)
    plan = tuple(reference.plan(ids, E))
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
    down = torch.randn(E, H, I, generator=g, requires_grad=True)
    b1 = torch.randn(E, 2 * I, generator=g, requires_grad=True)
    b2 = torch.randn(E, H, generator=g, requires_grad=True)
    w = weights.clone().requires_grad_()
    xs = torch.randn(T * k, 16, generator=g)[:, :H]
    hidden = torch.randn(T * k, 12, generator=g)[:, :2 * I]
    bf = torch.bfloat16
    return [
        (ops.grouped_mlp_forward, (x, gate_up, down, b1, b2, w, ids, *plan, "gpt_oss", True, True, 3.0, 1.0, True)),
        (ops.grouped_mlp_forward, (x, gate_up, down, None, None, w, ids, *plan, "silu", True, False, None, 1.0, False)),
        (ops.grouped_mlp_forward, (x, gate_up[:, :I], down, None, None, w, ids, *plan, "gelu", False, False, None,
                                   0.5, True)),
        (ops.grouped_mlp_forward, (x.detach().to(bf).requires_grad_(), gate_up.detach().to(bf).requires_grad_(),
                                   down.detach().to(bf).requires_grad_(), None, None, w, ids, *plan, "relu", True,
                                   False, None, 1.0, True)),
        (ops.grouped_mlp_backward, (torch.randn(T, H, generator=g), xs, hidden, gate_up.detach(), down.detach(),
                                    b1.detach(), b2.detach(), weights, ids, *plan, "silu", True, False, None, 1.0)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_grouped_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_grouped_torch_compile_fullgraph():
    torch._dynamo.reset()
    t, ids, grad = mlp_problem((16, 16, 8, 4, 2, "random"), torch.float32, True)
    args = (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids, "silu", True, False, None, 1.0)
    compiled = torch.compile(native.grouped_expert_mlp, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    ref = native.grouped_expert_mlp(*args)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, list(t.values()), grad)
    want = torch.autograd.grad(ref, list(t.values()), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
