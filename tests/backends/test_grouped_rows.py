"""The grouped-GEMM expert path (ops grouped_mlp_forward / grouped_mlp_backward, csrc/grouped_experts.cpp): the
row kernels of csrc/common/grouped_rows.h (CPU) and csrc/cuda/grouped_rows.cu (CUDA) around torch's grouped GEMM,
against the fp32 oracle with the README's tolerances (norm-wise; gradients twice that), over the hard cases (one
token, empty experts, all tokens on one expert, k = 1, k = E, odd widths, prime E) and every activation; opcheck,
torch.compile, determinism, the no-host-sync promise (torch's sync debug mode) where torch's CUTLASS grouped GEMM
runs (bfloat16 on sm90/sm100), and the cuda backend's fallback policy.

The CPU kernels run the same per-row code as the CUDA kernels around the same orchestration, so the CPU tests
cover everything of the cuda backend's expert path but the kernel launches; the CUDA tests need a GPU and an
extension built with the CUDA sources (CI has none: there .ci/cuda_compile_check.sh proves the sources compile).
The public ops on the cuda backend are tested in tests/test_moe_mlp.py and tests/test_adapter_moe.py.
"""

from __future__ import annotations

import pytest
import torch
from moe_testing import (ACTIVATION_CASES, ADAPTER_SHAPES, DTYPES, GPU, MLP_SHAPES, assert_close_rel,
                         check_adapter_against_oracle, check_mlp_against_oracle, expert_leaves, make_routing, mlp_problem)

import moe_kernels as mk
from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)


def _cpu_grouped_unavailable():
    if not native.has_kernel("grouped_mlp_forward", "CPU"):
        return "moe_kernels._C was built without the grouped expert ops"
    try:  # torch's grouped GEMM on CPU tensors (a loop over groups; torch >= 2.9)
        torch._grouped_mm(torch.zeros(2, 8), torch.zeros(1, 8, 8), torch.tensor([2], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError) as exc:  # pragma: no cover - older torch
        return f"torch._grouped_mm does not run on CPU tensors here: {exc}"
    return None


CPU_REASON = _cpu_grouped_unavailable()
needs_cpu_grouped = pytest.mark.skipif(CPU_REASON is not None, reason=CPU_REASON or "")
CUDA_GROUPED = GPU and native.has_kernel("grouped_mlp_forward", "CUDA")
needs_cuda_grouped = pytest.mark.skipif(
    not CUDA_GROUPED, reason="needs a CUDA device and moe_kernels._C built with the CUDA grouped expert kernels")
CUDA = torch.device("cuda")
FAST = CUDA_GROUPED and native.grouped_gemm_status(CUDA, torch.bfloat16, 8) is None
needs_fast = pytest.mark.skipif(not FAST, reason="torch's CUTLASS grouped GEMM needs sm90/sm100 (bfloat16)")
ops = torch.ops.moe_kernels


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_cpu_grouped),
                                    pytest.param("cuda", marks=needs_cuda_grouped)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_grouped_moe_mlp_matches_oracle(act_case, shape, dtype, device):
    """The grouped op on each device, every dtype (on CUDA: bfloat16 on sm90 runs CUTLASS, the rest torch's
    fallback GEMMs)."""
    check_mlp_against_oracle(native.grouped_expert_mlp, shape, dtype, act_case, device=device)


# ----------------------------------------------------------------------------------------------- CPU tensors

@needs_cpu_grouped
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_grouped_adapter_matches_oracle(activation, shape, dtype):
    check_adapter_against_oracle(native.grouped_expert_mlp, shape, dtype, activation)


@needs_cpu_grouped
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
    upstream = torch.randn(out.shape, generator=g)  # random: all ones would hide rows of it swapped between tokens
    got = torch.autograd.grad(out, (x, gate_up_storage, down_storage), upstream)
    want = torch.autograd.grad(ref, (x, gate_up_storage, down_storage), upstream)
    for a, b in zip(got, want):
        assert_close_rel(a, b, torch.float32, "grad", factor=2)


@needs_cpu_grouped
def test_grouped_without_grad_keeps_nothing_and_backward_refuses():
    t, ids, _ = mlp_problem(MLP_SHAPES[1], torch.float32, False)
    plan = mk.plan(ids, t["gate_up"].shape[0])
    with torch.no_grad():
        out, xs, hidden = ops.grouped_mlp_forward(t["x"], t["gate_up"], t["down"], None, None, t["weights"], ids,
                                                  *plan, "silu", True, False, None, 1.0, False)
    assert xs.shape == (0, t["x"].shape[1]) and hidden.shape == (0, t["gate_up"].shape[1])
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids).detach()
    assert_close_rel(out, ref, torch.float32, "output")
    # the backward needs the forward's kept rows: given the empty ones, it refuses instead of reading past them
    with pytest.raises(RuntimeError, match="xs must be the forward's"):
        ops.grouped_mlp_backward(torch.ones_like(out), xs, hidden, t["gate_up"], t["down"], None, None, t["weights"],
                                 ids, *plan, "silu", True, False, None, 1.0)


@needs_cpu_grouped
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


@needs_cpu_grouped
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
    x, gate_up, down, b1, b2 = expert_leaves(T, H, I, E, g)
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
        # Inkling2's soft-capped SwiGLU: the trailing gate_cap / up_cap arguments
        (ops.grouped_mlp_forward, (x, gate_up, down, b1, None, w, ids, *plan, "softcap_swiglu", True, False, None,
                                   1.0, True, 0.8, 1.2)),
        (ops.grouped_mlp_backward, (torch.randn(T, H, generator=g), xs, hidden, gate_up.detach(), down.detach(),
                                    None, None, weights, ids, *plan, "softcap_swiglu", True, False, None, 1.0, 0.8,
                                    1.2)),
    ]


@needs_cpu_grouped
@pytest.mark.parametrize("case", range(7))
def test_grouped_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@needs_cpu_grouped
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


# ---------------------------------------------------------------------------------------------- CUDA tensors

@needs_cuda_grouped
def test_grouped_cuda_matches_cpu_grouped():
    """Same op, same per-row code on both devices: the GPU result is the CPU result up to GEMM rounding."""
    t, ids, grad = mlp_problem((40, 24, 16, 7, 3, "skip_last"), torch.float32, True)
    args = lambda d: [v.detach().to(d) for v in (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"])]
    outs = []
    for device in ("cpu", "cuda"):
        x, w1, w2, b1, b2, w = args(device)
        outs.append(native.grouped_expert_mlp(x, w1, w2, b1, b2, w, ids.to(device), "gpt_oss", True, True, 7.0, 1.0))
    torch.testing.assert_close(outs[1].cpu(), outs[0], rtol=1e-4, atol=1e-5)


@needs_cuda_grouped
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


@needs_cuda_grouped
@needs_fast
def test_grouped_cuda_is_deterministic():
    t, ids, grad = mlp_problem((256, 128, 64, 16, 4, "random"), torch.bfloat16, True, device="cuda")
    args = (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids, "silu", True, False, None, 1.0)
    results = []
    for _ in range(2):
        out = native.grouped_expert_mlp(*args)
        results.append((out, *torch.autograd.grad(out, list(t.values()), grad)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_cuda_grouped
@pytest.mark.parametrize("case", range(3))
def test_grouped_cuda_opcheck(case):
    T, H, I, E, k = 6, 16, 8, 5, 2
    dtype = (torch.bfloat16, torch.float16, torch.float32)[case]
    t, ids, _ = mlp_problem((T, H, I, E, k, "skip_last"), dtype, True, device="cuda")
    plan = mk.plan(ids, E)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mlp_forward,
                          (t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids, *plan, "gelu", True,
                           False, None, 1.0, True))
