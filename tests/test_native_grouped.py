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
from moe_testing import DTYPES, assert_close_rel, make_ids

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

# (T, H, I, E, k, pattern): one token, odd widths and prime E, k = 1 with all tokens on one expert, k = E,
# an expert without tokens, widths below the 16-byte alignment.
MLP_SHAPES = [
    (1, 8, 4, 4, 2, "random"),
    (13, 33, 10, 7, 3, "random"),
    (24, 16, 8, 4, 1, "one_expert"),
    (10, 12, 6, 5, 5, "random"),
    (30, 16, 12, 8, 2, "skip_last"),
    (9, 7, 3, 11, 2, "random"),
]
ACTIVATION_CASES = [  # (activation, interleaved, swiglu_limit, biases)
    ("silu", False, None, False), ("gelu", False, None, True), ("gelu_tanh", True, None, False),
    ("relu", False, None, True), ("gpt_oss", True, 1.0, True), ("gpt_oss", False, None, False),
]


def _routing(T, E, k, pattern, g):
    ids = make_ids(pattern, T, E, k, g)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return weights, ids


def mlp_problem(shape, dtype, biases, seed=0, device="cpu"):
    T, H, I, E, k, pattern = shape
    g = torch.Generator().manual_seed(seed + T * 7 + H)
    weights, ids = _routing(T, E, k, pattern, g)
    t = dict(x=torch.randn(T, H, generator=g), gate_up=torch.randn(E, 2 * I, H, generator=g) / H ** 0.5,
             down=torch.randn(E, H, I, generator=g) / I ** 0.5, weights=weights)
    if biases:
        t["b1"] = torch.randn(E, 2 * I, generator=g) * 0.1
        t["b2"] = torch.randn(E, H, generator=g) * 0.1
    t = {n: (v if n == "weights" else v.to(dtype)).to(device).requires_grad_() for n, v in t.items()}
    return t, ids.to(device), torch.randn(T, H, generator=g).to(dtype).to(device)


def check_mlp_against_oracle(path, shape, dtype, act_case, device="cpu"):
    """Runs `path` (the grouped op, or the cuda backend) and the oracle on the same inputs; outputs and every
    gradient within the README's tolerance."""
    activation, interleaved, limit, biases = act_case
    if limit is not None and dtype != torch.float32:
        limit = 7.0  # GPT-OSS's value; at 1.0 rounding to fp16/bf16 moves values across the clamp edge
    t, ids, grad = mlp_problem(shape, dtype, biases, device=device)
    b1, b2 = t.get("b1"), t.get("b2")
    out = path(t["x"], t["gate_up"], t["down"], b1, b2, t["weights"], ids, activation, True, interleaved, limit, 1.0)
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, activation, b1, b2, interleaved,
                            limit)
    assert out.dtype == dtype and out.shape == t["x"].shape and out.device == t["x"].device
    assert_close_rel(out, ref, dtype, "output")
    names = list(t)
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(ref, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_rel(a, b, dtype, f"grad {name}", factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_grouped_moe_mlp_matches_oracle(act_case, shape, dtype):
    check_mlp_against_oracle(native.grouped_expert_mlp, shape, dtype, act_case)


ADAPTER_CASES = [  # (T, H, r, E, k, pattern): rank 1, odd H, k = E, empty experts, all on one expert
    (1, 8, 1, 3, 1, "random"), (21, 33, 1, 7, 2, "random"), (16, 24, 64, 4, 4, "random"),
    (12, 16, 5, 6, 2, "skip_last"), (25, 10, 3, 5, 1, "one_expert"),
]


def check_adapter_against_oracle(path, shape, dtype, activation, device="cpu"):
    T, H, r, E, k, pattern = shape
    g = torch.Generator().manual_seed(T + r)
    weights, ids = _routing(T, E, k, pattern, g)
    t = dict(h=torch.randn(T, H, generator=g).to(dtype), down=(torch.randn(E, r, H, generator=g) / H ** 0.5).to(dtype),
             up=(torch.randn(E, H, r, generator=g) / r ** 0.5).to(dtype), weights=weights)
    t = {n: v.to(device).requires_grad_() for n, v in t.items()}
    ids = ids.to(device)
    out = path(t["h"], t["down"], t["up"], None, None, t["weights"], ids, activation, False, False, None, 0.5)
    ref = reference.adapter_moe(t["h"], t["down"], t["up"], t["weights"], ids, activation, 0.5)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "output")
    grad = torch.randn(T, H, generator=g).to(dtype).to(device)
    names = list(t)
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(ref, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        assert_close_rel(a, b, dtype, f"grad {name}", factor=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_CASES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_grouped_adapter_matches_oracle(activation, shape, dtype):
    check_adapter_against_oracle(native.grouped_expert_mlp, shape, dtype, activation)


def test_grouped_transposed_weight_views():
    """GPT-OSS stores gate_up as [E, H, 2I] and down as [E, I, H]: the op takes the transposed views as they are."""
    g = torch.Generator().manual_seed(11)
    T, H, I, E, k = 20, 16, 8, 4, 2
    weights, ids = _routing(T, E, k, "random", g)
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
    weights, ids = _routing(T, E, k, "skip_last", g)
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
