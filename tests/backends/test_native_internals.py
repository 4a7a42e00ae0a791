"""The native backends' own machinery (the public ops on cpu/cuda are tested against the oracle in
tests/test_<op>.py): the row movements around the expert GEMMs (gather_rows, scatter_rows_sum, combine, on CPU
and CUDA tensors), the cuda backend's composed expert path, the C++ CPU expert op's internals and its thread
paths (experts in order or spread over threads, token chunks, the dense path for tiny adapters), which
kernels each build registers, and the ops' C++ autograd (csrc/autograd.cpp).

The CUDA row kernels are checked against the CPU ops on the same inputs: row copies exactly; sums
(scatter_rows_sum, combine and its backward) use the CPU's arithmetic (fp32, j ascending, product rounded
before the add), so they agree to the last bit on x86 and within one rounding of the output dtype anywhere.
"""

from __future__ import annotations

import pytest
import torch
from moe_testing import (ACTIVATION_CASES, DTYPES, MLP_SHAPES, assert_close_rel, assert_close_scaled,
                         check_native_mlp, make_ids, make_routing, mlp_problem, native_opcheck_cases,
                         needs_cuda_kernels, permuted_ids)

import moe_kernels
from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)

ops = torch.ops.moe_kernels
CUDA = torch.device("cuda")
ONE_ROUNDING = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ------------------------------------------------------------------------ gather / scatter / combine (CPU)

DISPATCH_SHAPES = [(1, 5, 1, 3), (17, 33, 3, 6), (40, 64, 4, 4), (9, 7, 2, 11)]  # (T, H, k, E)


def _rows_case(shape, dtype):
    """(T, H, k, generator, plan, x) of a row-op test: random routing of ``shape`` = (T, H, k, E), its plan,
    and x [T, H] in ``dtype`` drawn after it (seeded by the shape)."""
    T, H, k, E = shape
    g = torch.Generator().manual_seed(T * H)
    plan = reference.plan(permuted_ids("random", T, E, k, g), E)
    return T, H, k, g, plan, torch.randn(T, H, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DISPATCH_SHAPES, ids=str)
def test_gather_scatter_combine(shape, dtype):
    T, H, k, g, plan, x = _rows_case(shape, dtype)
    x.requires_grad_()
    rows = ops.gather_rows(x, plan.sorted_slots, k)
    assert torch.equal(rows, x.detach()[plan.sorted_slots.long() // k])
    grad_rows = torch.randn(T * k, H, generator=g).to(dtype)
    (grad_x,) = torch.autograd.grad(rows, x, grad_rows)
    expected = grad_rows.float()[plan.slot_positions.long()].view(T, k, H).sum(1)
    assert_close_scaled(grad_x, expected, dtype, "scatter_rows_sum")
    assert_close_scaled(ops.scatter_rows_sum(grad_rows, plan.slot_positions, k), expected, dtype, "scatter_rows_sum")

    y_sorted = torch.randn(T * k, H, generator=g).to(dtype).requires_grad_()
    weights = torch.rand(T, k, generator=g).requires_grad_()
    out = ops.combine(y_sorted, plan.slot_positions, weights)
    y_slots = y_sorted.float()[plan.slot_positions.long()].view(T, k, H)
    ref_out = (weights.unsqueeze(-1) * y_slots).sum(1)
    assert out.dtype == dtype
    assert_close_scaled(out, ref_out, dtype, "combine")
    grad_out = torch.randn(T, H, generator=g).to(dtype)
    got = torch.autograd.grad(out, (y_sorted, weights), grad_out)
    want = torch.autograd.grad(ref_out, (y_sorted, weights), grad_out.float())
    assert_close_scaled(got[0], want[0], dtype, "grad y_sorted")
    assert_close_scaled(got[1], want[1], dtype, "grad weights")


def test_gather_scatter_gradcheck_double():
    g = torch.Generator().manual_seed(0)
    T, H, k, E = 5, 3, 2, 4
    plan = reference.plan(permuted_ids("random", T, E, k, g), E)
    x = torch.randn(T, H, dtype=torch.double, generator=g, requires_grad=True)
    y = torch.randn(T * k, H, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gather_rows(x, plan.sorted_slots, k), (x,))
    assert torch.autograd.gradcheck(lambda y: ops.scatter_rows_sum(y, plan.slot_positions, k), (y,))


@pytest.mark.parametrize("case", range(4))
def test_row_ops_opcheck(case):
    op, args = native_opcheck_cases("gather_rows", "scatter_rows_sum", "combine", "combine_backward")[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------ gather / scatter / combine (CUDA)

def assert_same_sum(actual, expected):
    """The CUDA and CPU results of the same fp32 sum, rounded to the output dtype."""
    rtol = ONE_ROUNDING[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=rtol * 1e-3)


# (T, H, k, E): odd H (scalar path), H a multiple of 8 (128-bit path), T=1, k=1.
CUDA_DISPATCH_SHAPES = [(1, 5, 1, 3), (17, 33, 3, 6), (40, 64, 4, 4), (9, 7, 2, 11), (300, 1024, 2, 8)]


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_DISPATCH_SHAPES, ids=str)
def test_rows_cuda_match_cpu(shape, dtype):
    T, H, k, g, plan, x = _rows_case(shape, dtype)
    sorted_slots, slot_positions = plan.sorted_slots, plan.slot_positions
    rows = ops.gather_rows(x.to(CUDA), sorted_slots.to(CUDA), k)
    assert torch.equal(rows.cpu(), x[sorted_slots.long() // k])
    # A contiguous tensor starting one element past a 16-byte boundary takes the narrower paths.
    x_shifted = torch.randn(T * H + 1, generator=g).to(dtype).to(CUDA)[1:].view(T, H)
    expected_rows = x_shifted.cpu()[sorted_slots.long() // k]
    assert torch.equal(ops.gather_rows(x_shifted, sorted_slots.to(CUDA), k).cpu(), expected_rows)
    y_shifted = torch.randn(T * k * H + 1, generator=g).to(dtype).to(CUDA)[1:].view(T * k, H)
    w_shifted = torch.rand(T, k, generator=g)
    assert_same_sum(ops.combine(y_shifted, slot_positions.to(CUDA), w_shifted.to(CUDA)),
                    ops.combine(y_shifted.cpu(), slot_positions, w_shifted))

    grad_rows = torch.randn(T * k, H, generator=g).to(dtype)
    summed = ops.scatter_rows_sum(grad_rows.to(CUDA), slot_positions.to(CUDA), k)
    assert_same_sum(summed, ops.scatter_rows_sum(grad_rows, slot_positions, k))

    y_sorted = torch.randn(T * k, H, generator=g).to(dtype)
    weights = torch.rand(T, k, generator=g)
    out = ops.combine(y_sorted.to(CUDA), slot_positions.to(CUDA), weights.to(CUDA))
    assert out.dtype == dtype
    assert_same_sum(out, ops.combine(y_sorted, slot_positions, weights))

    grad_out = torch.randn(T, H, generator=g).to(dtype)
    grad_y, grad_w = ops.combine_backward(grad_out.to(CUDA), y_sorted.to(CUDA), slot_positions.to(CUDA),
                                          weights.to(CUDA))
    cpu_grad_y, cpu_grad_w = ops.combine_backward(grad_out, y_sorted, slot_positions, weights)
    assert_same_sum(grad_y, cpu_grad_y)
    torch.testing.assert_close(grad_w.cpu(), cpu_grad_w, rtol=1e-5, atol=1e-5 * H ** 0.5)  # other sum order


@needs_cuda_kernels
def test_combine_cuda_is_deterministic():
    g = torch.Generator().manual_seed(5)
    T, H, k, E = 512, 768, 4, 16
    plan = reference.plan(permuted_ids("random", T, E, k, g), E)
    y = torch.randn(T * k, H, generator=g).to(CUDA)
    w = torch.rand(T, k, generator=g).to(CUDA)
    positions = plan.slot_positions.to(CUDA)
    grad_out = torch.randn(T, H, generator=g).to(CUDA)
    first = ops.combine_backward(grad_out, y, positions, w)
    for _ in range(3):
        assert torch.equal(ops.combine(y, positions, w), ops.combine(y, positions, w))
        again = ops.combine_backward(grad_out, y, positions, w)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@needs_cuda_kernels
def test_rows_cuda_past_int32_elements():
    """T*k*H > 2^31 elements: row offsets must be computed in int64. Not marked slow: a second of GPU time, and the
    GPU check (which runs ``-m "not slow"``) is the only place it can run."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs about 13 GiB of GPU memory")
    T, H, k = 2**16, 2**14 + 8, 2  # out has 2^17 rows of H bf16: more than 2^31 elements
    x = torch.arange(T, device=CUDA, dtype=torch.float32).to(torch.bfloat16).unsqueeze(1).expand(T, H).contiguous()
    sorted_slots = torch.arange(T * k, device=CUDA, dtype=torch.int32).flip(0)
    rows = ops.gather_rows(x, sorted_slots, k)
    assert torch.equal(rows[-1], x[0]) and torch.equal(rows[0], x[-1])
    del x
    summed = ops.scatter_rows_sum(rows, sorted_slots, k)  # sorted_slots reversed is its own inverse
    assert summed.shape == (T, H) and torch.equal(summed[-1], rows[0].float().mul(2).to(torch.bfloat16))


# ------------------------------------------------------------- the cuda backend's composed path, on CPU tensors

@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_composed_expert_path_matches_reference(act_case):
    """The cuda backend's composed expert path (native gather/combine + torch matmuls), run on CPU tensors."""
    check_native_mlp("composed", act_case, MLP_SHAPES[1], torch.float32)


# --------------------------------------------------------------------------------- the C++ CPU expert op

@pytest.mark.parametrize("expert_parallel", ["0", "1"])
def test_moe_mlp_expert_scheduling(expert_parallel, monkeypatch):
    """Experts in order (threaded GEMMs) or spread over threads: same results, with and without kept hidden."""
    monkeypatch.setenv("MOE_KERNELS_CPU_EXPERT_PARALLEL", expert_parallel)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(13)
        T, H, I, E, k = 40, 24, 8, 10, 3
        weights, ids = make_routing(T, E, k, "skip_odd", g, ids=permuted_ids)
        weights.requires_grad_()
        x = torch.randn(T, H, generator=g, requires_grad=True)
        gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
        down = torch.randn(E, H, I, generator=g, requires_grad=True)
        b1 = torch.randn(E, 2 * I, generator=g, requires_grad=True)
        b2 = torch.randn(E, H, generator=g, requires_grad=True)
        inputs = (x, gate_up, down, b1, b2, weights)
        out = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="gelu", gate_up_bias=b1, down_bias=b2,
                                  backend="cpu")
        ref = reference.moe_mlp(x, gate_up, down, weights, ids, "gelu", b1, b2)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        upstream = torch.randn(out.shape, generator=g)  # random: all ones would hide swapped rows
        for a, b in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="gelu",
                                                           gate_up_bias=b1, down_bias=b2, backend="cpu"),
                                       ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_moe_mlp_without_grad_keeps_no_hidden():
    g = torch.Generator().manual_seed(12)
    weights, ids = make_routing(6, 4, 2, "random", g, ids=permuted_ids)
    x, gate_up, down = torch.randn(6, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    plan = moe_kernels.plan(ids, 4)
    out, hidden = ops.expert_mlp_forward(x, gate_up, down, None, None, weights, *plan, "silu", True, False, None,
                                         1.0, False)
    assert hidden.shape == (0, 6)
    torch.testing.assert_close(out, reference.moe_mlp(x, gate_up, down, weights, ids), rtol=1e-5, atol=1e-5)
    # The backward recomputes the pre-activation when it was not kept.
    upstream = torch.randn(6, 8, generator=g)  # random: all ones would hide rows of it swapped between tokens
    grads = ops.expert_mlp_backward(upstream, x, gate_up, down, None, None, weights, *plan, hidden, "silu",
                                    True, False, None, 1.0)
    x_r, gu_r, dn_r, w_r = (t.clone().requires_grad_() for t in (x, gate_up, down, weights))
    want = torch.autograd.grad(reference.moe_mlp(x_r, gu_r, dn_r, w_r, ids), (x_r, gu_r, dn_r, w_r), upstream)
    for a, b in zip((grads[0], grads[1], grads[2], grads[5]), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _paths_problem(num_tokens=40, hidden=24, inter=16, num_experts=9, k=2, rank=4):
    ids = make_ids("skip_last", num_tokens, num_experts, k)
    tensors = dict(x=torch.randn(num_tokens, hidden), gate_up=torch.randn(num_experts, 2 * inter, hidden) * 0.2,
                   down=torch.randn(num_experts, hidden, inter) * 0.2, weights=torch.rand(num_tokens, k),
                   a_down=torch.randn(num_experts, rank, hidden) * 0.2,
                   a_up=torch.randn(num_experts, hidden, rank) * 0.2)
    return ids, {name: t.requires_grad_(True) for name, t in tensors.items()}


@pytest.mark.parametrize("chunks", ["0", "1"])
@pytest.mark.parametrize("expert_parallel", ["0", "1"])
def test_expert_path_variants_match_oracle(monkeypatch, chunks, expert_parallel):
    """The cpu backend's expert-path variants (chosen by size and thread count): token chunks on/off, experts
    spread over threads on/off."""
    monkeypatch.setenv("MOE_KERNELS_CPU_TOKEN_CHUNKS", chunks)
    monkeypatch.setenv("MOE_KERNELS_CPU_EXPERT_PARALLEL", expert_parallel)
    ids, t = _paths_problem()
    leaves = list(t.values())
    for backend in ("cpu", "reference"):
        y = moe_kernels.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, backend=backend)
        z = moe_kernels.adapter_moe(y, t["a_down"], t["a_up"], t["weights"], ids, scale=0.5, backend=backend)
        grads = torch.autograd.grad(z.square().sum(), leaves)
        if backend == "cpu":
            got = (y, z, *grads)
        else:
            want = (y, z, *grads)
    for a, b in zip(got, want):
        assert_close_rel(a, b, torch.float32, "cpu path variant")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_tiny_adapter_inference_path(dtype, activation):
    # E * r <= 128 and no gradient: the cpu backend runs two dense GEMMs over all experts
    ids, t = _paths_problem(num_experts=8, rank=8, k=3)
    h, down, up = (t[n].detach().to(dtype) for n in ("x", "a_down", "a_up"))
    weights = t["weights"].detach()
    with torch.no_grad():
        got = moe_kernels.adapter_moe(h, down, up, weights, ids, activation=activation, scale=0.7, backend="cpu")
    want = reference.adapter_moe(h.float(), down.float(), up.float(), weights, ids, activation=activation, scale=0.7)
    assert got.dtype == dtype
    assert_close_rel(got, want, dtype, "dense inference path")


# ------------------------------------------------------------------------------------- registered kernels

def test_every_op_has_a_cpu_kernel():
    for name in native.SHARED_OPS + native.CPU_ONLY_OPS:
        assert native.has_kernel(name, "CPU"), name
    assert moe_kernels.available_backends().count("cpu") == 1


def test_cuda_backend_reports_missing_kernels_clearly():
    reason = native.CUDA_BACKEND.unavailable_reason()
    if native.has_kernel("plan", "CUDA"):
        assert reason is None
    else:
        assert "CUDA" in reason
        with pytest.raises(moe_kernels.BackendError, match="cuda"):
            moe_kernels.plan(torch.zeros(2, 1, dtype=torch.int32), 2, backend="cuda")


# Ops whose autograd is a C++ torch::autograd::Function (csrc/autograd.cpp), and the outputs that carry a gradient.
DIFFERENTIABLE_OPS = {"route_forward": (0,), "gather_rows": (0,), "scatter_rows_sum": (0,), "combine": (0,),
                      "expert_mlp_forward": (0,), "grouped_mlp_forward": (0,)}


def test_native_autograd_is_the_cpp_function():
    """Every differentiable op's graph node is its C++ Function (not a Python formula, which cost the expert ops
    ~80 µs a call); the saved intermediates (ids, hidden, xs) are outputs without a gradient."""
    cases = {}
    for op, args in native_opcheck_cases(*DIFFERENTIABLE_OPS):
        cases.setdefault(op.__name__.split(".")[-1], (op, args))
    t, ids, _ = mlp_problem(MLP_SHAPES[1], torch.float32, True)
    plan = reference.plan(ids, t["gate_up"].shape[0])
    cases["grouped_mlp_forward"] = (ops.grouped_mlp_forward, (
        t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids.int(), *plan, "silu", True, False, None,
        1.0, True))
    assert set(cases) == set(DIFFERENTIABLE_OPS)
    for name, (op, args) in cases.items():
        outputs = op(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for i, out in enumerate(outputs):
            if i in DIFFERENTIABLE_OPS[name]:
                assert "moe_kernels::autograd::" in out.grad_fn.name(), (name, out.grad_fn.name())
            else:
                assert not out.requires_grad, (name, i)


@pytest.mark.parametrize("biases", [False, True])
def test_grouped_backward_recomputes_what_the_forward_did_not_keep(biases):
    """grouped_mlp_forward(keep=False) under autograd: the backward recomputes the gathered rows and the hidden
    pre-activation and gets the same gradients as keep=True (bitwise: the same ops on the same inputs)."""
    t, ids, grad = mlp_problem(MLP_SHAPES[1], torch.float32, biases)
    plan = reference.plan(ids, t["gate_up"].shape[0])
    leaves = list(t.values())
    grads = []
    for keep in (True, False):
        out, xs, hidden = ops.grouped_mlp_forward(t["x"], t["gate_up"], t["down"], t.get("b1"), t.get("b2"),
                                                  t["weights"], ids.int(), *plan, "silu", True, False, None, 1.0,
                                                  keep)
        assert (xs.shape[0] > 0) == keep
        grads.append(torch.autograd.grad(out, leaves, grad))
    assert len(grads[0]) == len(leaves) and all(torch.equal(a, b) for a, b in zip(*grads))
