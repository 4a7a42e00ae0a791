"""The native (C++ CPU) ops of moe_kernels._C against the reference oracle.

Every op: forward, gradients (torch.autograd.grad), fp32/fp16/bf16, the hard-case grid, and
torch.library.opcheck; plus torch.compile(fullgraph=True) of route + moe_mlp on the cpu backend.
Skipped when the extension is not built.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)

ops = torch.ops.moe_kernels
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) of outputs and gradients against the fp32 reference; low precision ones round the
# GEMM inputs/outputs and the intermediate activations to their dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (8e-2, 2e-2)}


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = TOLERANCE[dtype]
    # Tolerances relative to the tensor's scale: sums over many rounded terms, not single values.
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def make_ids(num_tokens, num_experts, k, layout, generator):
    """ids [T,k] int32 with distinct experts per row; layout: random | one_expert | skip_odd (empty experts)."""
    if layout == "one_expert":  # every token's first choice is expert 0: all tokens on one expert
        rest = torch.stack([torch.randperm(num_experts - 1, generator=generator)[: k - 1] + 1
                            for _ in range(num_tokens)]) if k > 1 else torch.empty(num_tokens, 0, dtype=torch.long)
        ids = torch.cat([torch.zeros(num_tokens, 1, dtype=torch.long), rest], dim=1)
    elif layout == "skip_odd":  # only even experts: every odd expert has no tokens
        evens = torch.arange(0, num_experts, 2)
        ids = torch.stack([evens[torch.randperm(len(evens), generator=generator)[:k]] for _ in range(num_tokens)])
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)])
    return ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------- route

ROUTE_VARIANTS = [
    # scoring, order, renormalize, bias, n_group, topk_group, scale
    ("softmax", "softmax_then_topk", True, False, None, None, 1.0),    # Mixtral / Qwen
    ("softmax", "softmax_then_topk", False, False, None, None, 1.0),   # Jamba / Self-MoE
    ("softmax", "topk_then_softmax", False, False, None, None, 1.0),   # GPT-OSS / Granite / PESC
    ("softmax", "topk_then_softmax", True, False, None, None, 2.0),
    ("sigmoid", "softmax_then_topk", True, True, 4, 2, 2.5),           # DeepSeek-V3 / GLM4-MoE
    ("sigmoid", "softmax_then_topk", True, True, None, None, 1.0),
    ("sigmoid", "softmax_then_topk", False, False, None, None, 1.0),
    ("sigmoid", "topk_then_softmax", True, False, None, None, 1.0),
    ("softmax", "softmax_then_topk", True, True, 2, 1, 1.0),
    ("softmax", "topk_then_softmax", False, True, 4, 3, 0.5),
    ("sigmoid", "softmax_then_topk", True, True, 16, 8, 1.0),          # one expert per group
]
ROUTE_SHAPES = [(1, 8, 2), (37, 16, 1), (19, 16, 16), (64, 16, 4), (23, 13, 3)]  # (T, E, k); E=13 prime


def _grouping_fits(variant, shape):
    _, _, _, _, n_group, topk_group, _ = variant
    _, num_experts, k = shape
    return n_group is None or (num_experts % n_group == 0 and k <= topk_group * (num_experts // n_group))


ROUTE_CASES = [(v, s) for v in ROUTE_VARIANTS for s in ROUTE_SHAPES if _grouping_fits(v, s)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant,shape", ROUTE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_route_matches_reference(variant, shape, dtype):
    scoring, order, renormalize, use_bias, n_group, topk_group, scale = variant
    T, E, k = shape
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype).requires_grad_()
    bias = torch.randn(E, generator=g) * 0.1 if use_bias else None
    kwargs = dict(scoring=scoring, order=order, renormalize=renormalize, bias=bias, n_group=n_group,
                  topk_group=topk_group, scale=scale)
    weights, ids = mk.route(logits, k, backend="cpu", **kwargs)
    ref_weights, ref_ids = reference.route(logits, k, **kwargs)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)  # fp32 math either way
    grad = torch.randn(weights.shape, generator=g)
    (grad_logits,) = torch.autograd.grad(weights, logits, grad)
    (ref_grad,) = torch.autograd.grad(ref_weights, logits, grad)
    assert grad_logits.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad_logits, ref_grad, rtol=1e-5, atol=1e-6)
    else:  # both rounded to the logits' dtype from nearly equal fp32 values
        torch.testing.assert_close(grad_logits.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_route_ties_go_to_lower_index(scoring, order):
    # Integer logits from a small range: many exact ties in every row.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 2, (50, 12), generator=g).float()
    weights, ids = mk.route(logits, 5, scoring=scoring, order=order, backend="cpu")
    ref_weights, ref_ids = reference.route(logits, 5, scoring=scoring, order=order)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)


def test_route_masked_minus_inf_and_large_expert_count():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 300, generator=g)
    logits[:, ::3] = float("-inf")  # masked experts take part as -inf, never chosen while others remain
    weights, ids = mk.route(logits, 8, backend="cpu")
    ref_weights, ref_ids = reference.route(logits, 8)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)


def test_route_sigmoid_underflow_renormalizes_to_zero_not_nan():
    logits = torch.full((2, 4), -200.0)
    weights, _ = mk.route(logits, 2, scoring="sigmoid", backend="cpu")
    assert torch.isfinite(weights).all()


# ----------------------------------------------------------------------------------------------- plan

PLAN_CASES = [  # (T, E, k, layout)
    (1, 4, 1, "random"), (1, 7, 7, "random"), (100, 8, 2, "one_expert"), (33, 10, 3, "skip_odd"),
    (257, 13, 4, "random"), (500, 2000, 6, "random"), (3000, 2000, 2, "random"), (20000, 64, 1, "random"),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=str)
def test_plan_matches_reference(case):
    T, E, k, layout = case
    ids = make_ids(T, E, k, layout, torch.Generator().manual_seed(T + E))
    got = mk.plan(ids, E, backend="cpu")
    ref = reference.plan(ids, E)
    for name in ("expert_offsets", "sorted_slots", "slot_positions"):
        assert getattr(got, name).dtype == torch.int32
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_plan_all_slots_on_one_expert_of_many():
    ids = torch.full((4096, 1), 1999, dtype=torch.int32)
    got = mk.plan(ids, 2000, backend="cpu")
    assert got.expert_offsets[:2000].eq(0).all() and got.expert_offsets[2000] == 4096
    assert torch.equal(got.sorted_slots, torch.arange(4096, dtype=torch.int32))


# ------------------------------------------------------------------------ gather / scatter / combine

DISPATCH_SHAPES = [(1, 5, 1, 3), (17, 33, 3, 6), (40, 64, 4, 4), (9, 7, 2, 11)]  # (T, H, k, E)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DISPATCH_SHAPES, ids=str)
def test_gather_scatter_combine(shape, dtype):
    T, H, k, E = shape
    g = torch.Generator().manual_seed(T * H)
    ids = make_ids(T, E, k, "random", g)
    plan = reference.plan(ids, E)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    rows = ops.gather_rows(x, plan.sorted_slots, k)
    assert torch.equal(rows, x.detach()[plan.sorted_slots.long() // k])
    grad_rows = torch.randn(T * k, H, generator=g).to(dtype)
    (grad_x,) = torch.autograd.grad(rows, x, grad_rows)
    expected = grad_rows.float()[plan.slot_positions.long()].view(T, k, H).sum(1)
    assert_close(grad_x, expected, dtype, "scatter_rows_sum")
    assert_close(ops.scatter_rows_sum(grad_rows, plan.slot_positions, k), expected, dtype, "scatter_rows_sum")

    y_sorted = torch.randn(T * k, H, generator=g).to(dtype).requires_grad_()
    weights = torch.rand(T, k, generator=g).requires_grad_()
    out = ops.combine(y_sorted, plan.slot_positions, weights)
    y_slots = y_sorted.float()[plan.slot_positions.long()].view(T, k, H)
    ref_out = (weights.unsqueeze(-1) * y_slots).sum(1)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, "combine")
    grad_out = torch.randn(T, H, generator=g).to(dtype)
    got = torch.autograd.grad(out, (y_sorted, weights), grad_out)
    want = torch.autograd.grad(ref_out, (y_sorted, weights), grad_out.float())
    assert_close(got[0], want[0], dtype, "grad y_sorted")
    assert_close(got[1], want[1], dtype, "grad weights")


def test_gather_scatter_gradcheck_double():
    g = torch.Generator().manual_seed(0)
    T, H, k, E = 5, 3, 2, 4
    plan = reference.plan(make_ids(T, E, k, "random", g), E)
    x = torch.randn(T, H, dtype=torch.double, generator=g, requires_grad=True)
    y = torch.randn(T * k, H, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gather_rows(x, plan.sorted_slots, k), (x,))
    assert torch.autograd.gradcheck(lambda y: ops.scatter_rows_sum(y, plan.slot_positions, k), (y,))


# ------------------------------------------------------------------------------------------ expert paths

MLP_SHAPES = [  # (T, H, I, E, k, layout)
    (1, 8, 4, 4, 2, "random"),        # T = 1
    (13, 33, 10, 7, 3, "random"),     # odd H, prime E
    (24, 16, 8, 4, 1, "one_expert"),  # k = 1, all tokens on one expert
    (10, 12, 6, 5, 5, "random"),      # k = E
    (30, 16, 12, 8, 2, "skip_odd"),   # empty experts
]
ACTIVATION_CASES = [  # (activation, interleaved, swiglu_limit, biases)
    ("silu", False, None, False), ("gelu", False, None, True), ("gelu_tanh", True, None, False),
    ("relu", False, None, True), ("gpt_oss", True, 1.0, True), ("gpt_oss", False, None, False),
]


def _routing(T, E, k, layout, g):
    ids = make_ids(T, E, k, layout, g)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return weights, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_moe_mlp_matches_reference(act_case, shape, dtype):
    """The cpu backend's fused expert op."""
    check_moe_mlp("fused", act_case, shape, dtype)


@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_composed_expert_path_matches_reference(act_case):
    """The cuda backend's expert path (native gather/combine + torch matmuls), run on CPU tensors."""
    check_moe_mlp("composed", act_case, MLP_SHAPES[1], torch.float32)


def check_moe_mlp(path, act_case, shape, dtype):
    activation, interleaved, limit, biases = act_case
    if limit is not None and dtype != torch.float32:
        limit = 7.0  # GPT-OSS's value; at 1.0, rounding to fp16/bf16 moves values across the clamp edge
    T, H, I, E, k, layout = shape
    g = torch.Generator().manual_seed(T * 7 + H)
    weights, ids = _routing(T, E, k, layout, g)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype).requires_grad_()
    b1 = (torch.randn(E, 2 * I, generator=g) * 0.1).to(dtype).requires_grad_() if biases else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(dtype).requires_grad_() if biases else None
    weights.requires_grad_()
    inputs = [t for t in (x, gate_up, down, b1, b2, weights) if t is not None]
    if path == "fused":
        out = mk.moe_mlp(x, gate_up, down, weights, ids, activation=activation, gate_up_bias=b1, down_bias=b2,
                         interleaved=interleaved, swiglu_limit=limit, backend="cpu")
    else:
        out = native.composed_expert_mlp(x, gate_up, down, b1, b2, weights, ids, activation, True, interleaved,
                                         limit, 1.0)
    ref = reference.moe_mlp(x, gate_up, down, weights, ids, activation, b1, b2, interleaved, limit)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, ref, dtype, "output")
    grad = torch.randn(T, H, generator=g).to(dtype)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    names = ["x", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias", "weights"]
    names = [n for n, t in zip(names, (x, gate_up, down, b1, b2, weights)) if t is not None]
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, f"grad {name}")


def test_moe_mlp_transposed_weight_views():
    # GPT-OSS stores gate_up as [E, H, 2I] and down as [E, I, H]: the op takes transposed views.
    g = torch.Generator().manual_seed(11)
    T, H, I, E, k = 20, 16, 8, 4, 2
    weights, ids = _routing(T, E, k, "random", g)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up_storage = torch.randn(E, H, 2 * I, generator=g, requires_grad=True)
    down_storage = torch.randn(E, I, H, generator=g, requires_grad=True)
    args = (x, gate_up_storage.transpose(1, 2), down_storage.transpose(1, 2), weights, ids)
    out = mk.moe_mlp(*args, activation="gpt_oss", interleaved=True, swiglu_limit=7.0, backend="cpu")
    ref = reference.moe_mlp(*args, "gpt_oss", None, None, True, 7.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out.sum(), (x, gate_up_storage, down_storage))
    want = torch.autograd.grad(ref.sum(), (x, gate_up_storage, down_storage))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("expert_parallel", ["0", "1"])
def test_moe_mlp_expert_scheduling(expert_parallel, monkeypatch):
    """Experts in order (threaded GEMMs) or spread over threads: same results, with and without kept hidden."""
    monkeypatch.setenv("MOE_KERNELS_CPU_EXPERT_PARALLEL", expert_parallel)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(13)
        T, H, I, E, k = 40, 24, 8, 10, 3
        weights, ids = _routing(T, E, k, "skip_odd", g)
        weights.requires_grad_()
        x = torch.randn(T, H, generator=g, requires_grad=True)
        gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
        down = torch.randn(E, H, I, generator=g, requires_grad=True)
        b1 = torch.randn(E, 2 * I, generator=g, requires_grad=True)
        b2 = torch.randn(E, H, generator=g, requires_grad=True)
        inputs = (x, gate_up, down, b1, b2, weights)
        out = mk.moe_mlp(x, gate_up, down, weights, ids, activation="gelu", gate_up_bias=b1, down_bias=b2,
                         backend="cpu")
        ref = reference.moe_mlp(x, gate_up, down, weights, ids, "gelu", b1, b2)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        for a, b in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(mk.moe_mlp(x, gate_up, down, weights, ids, activation="gelu", gate_up_bias=b1,
                                                  down_bias=b2, backend="cpu"), ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_moe_mlp_without_grad_keeps_no_hidden():
    g = torch.Generator().manual_seed(12)
    weights, ids = _routing(6, 4, 2, "random", g)
    x, gate_up, down = torch.randn(6, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    plan = mk.plan(ids, 4)
    out, hidden = ops.expert_mlp_forward(x, gate_up, down, None, None, weights, *plan, "silu", True, False, None,
                                         1.0, False)
    assert hidden.shape == (0, 6)
    torch.testing.assert_close(out, reference.moe_mlp(x, gate_up, down, weights, ids), rtol=1e-5, atol=1e-5)
    # The backward recomputes the pre-activation when it was not kept.
    grads = ops.expert_mlp_backward(torch.ones(6, 8), x, gate_up, down, None, None, weights, *plan, hidden, "silu",
                                    True, False, None, 1.0)
    x_r, gu_r, dn_r, w_r = (t.clone().requires_grad_() for t in (x, gate_up, down, weights))
    want = torch.autograd.grad(reference.moe_mlp(x_r, gu_r, dn_r, w_r, ids).sum(), (x_r, gu_r, dn_r, w_r))
    for a, b in zip((grads[0], grads[1], grads[2], grads[5]), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


ADAPTER_CASES = [  # (T, H, r, E, k, layout)
    (1, 8, 1, 3, 1, "random"), (21, 33, 1, 7, 2, "random"), (16, 24, 64, 4, 4, "random"),
    (12, 16, 5, 6, 2, "skip_odd"), (25, 10, 3, 5, 1, "one_expert"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_CASES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_adapter_moe_matches_reference(activation, shape, dtype):
    T, H, r, E, k, layout = shape
    g = torch.Generator().manual_seed(T + r)
    weights, ids = _routing(T, E, k, layout, g)
    weights.requires_grad_()
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    down = (torch.randn(E, r, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    up = (torch.randn(E, H, r, generator=g) / r ** 0.5).to(dtype).requires_grad_()
    out = mk.adapter_moe(h, down, up, weights, ids, activation=activation, scale=0.5, backend="cpu")
    ref = reference.adapter_moe(h, down, up, weights, ids, activation, 0.5)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    grad = torch.randn(T, H, generator=g).to(dtype)
    got = torch.autograd.grad(out, (h, down, up, weights), grad)
    want = torch.autograd.grad(ref, (h, down, up, weights), grad)
    for name, a, b in zip(("h", "down", "up", "weights"), got, want):
        assert_close(a, b, dtype, f"grad {name}")


def test_adapter_large_rank():
    g = torch.Generator().manual_seed(5)
    T, H, r, E, k = 6, 16, 1024, 2, 1
    weights, ids = _routing(T, E, k, "random", g)
    h, down, up = torch.randn(T, H, generator=g), torch.randn(E, r, H, generator=g) * 0.1, torch.randn(E, H, r, generator=g) * 0.1
    out = mk.adapter_moe(h, down, up, weights, ids, backend="cpu")
    torch.testing.assert_close(out, reference.adapter_moe(h, down, up, weights, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ opcheck / compile


def _opcheck_cases():
    g = torch.Generator().manual_seed(9)
    T, H, I, E, k = 6, 8, 4, 5, 2
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    weights, ids = _routing(T, E, k, "random", g)
    plan = tuple(reference.plan(ids, E))
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
    down = torch.randn(E, H, I, generator=g, requires_grad=True)
    b1 = torch.randn(E, 2 * I, generator=g, requires_grad=True)
    b2 = torch.randn(E, H, generator=g, requires_grad=True)
    w = weights.clone().requires_grad_()
    y_sorted = torch.randn(T * k, H, generator=g, requires_grad=True)
    return [
        (ops.route_forward, (logits, k, False, False, True, None, 0, 0, 1.0)),
        (ops.route_forward, (logits, 4, True, False, True, torch.randn(E, generator=g), 0, 0, 2.0)),
        (ops.route_backward, (torch.randn(T, k, generator=g), logits.detach(), ids, True, True, True, 1.0)),
        (ops.plan, (ids, E)),
        (ops.gather_rows, (x, plan[1], k)),
        (ops.scatter_rows_sum, (y_sorted, plan[2], k)),
        (ops.combine, (y_sorted, plan[2], w)),
        (ops.combine_backward, (torch.randn(T, H, generator=g), y_sorted.detach(), plan[2], weights)),
        (ops.expert_mlp_forward, (x, gate_up, down, b1, b2, w, *plan, "gpt_oss", True, True, 3.0, 1.0, True)),
        (ops.expert_mlp_forward, (x, gate_up[:, :I], down, None, None, w, *plan, "gelu", False, False, None, 0.5,
                                  False)),
        (ops.expert_mlp_backward, (torch.randn(T, H, generator=g), x.detach(), gate_up.detach(), down.detach(),
                                   None, b2.detach(), weights, *plan, torch.empty(0, 2 * I), "silu", True, False,
                                   None, 1.0)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_every_op_has_a_cpu_kernel():
    for name in native.SHARED_OPS + native.CPU_ONLY_OPS:
        assert native.has_kernel(name, "CPU"), name
    assert mk.available_backends().count("cpu") == 1


def test_cuda_backend_reports_missing_kernels_clearly():
    reason = native.CUDA_BACKEND.unavailable_reason()
    if native.has_kernel("plan", "CUDA"):
        assert reason is None
    else:
        assert "CUDA" in reason
        with pytest.raises(mk.BackendError, match="cuda"):
            mk.plan(torch.zeros(2, 1, dtype=torch.int32), 2, backend="cuda")


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_route_and_moe_mlp(compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(21)
    T, H, I, E, k = 16, 12, 6, 4, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    router = torch.randn(H, E, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
    down = torch.randn(E, H, I, generator=g, requires_grad=True)

    def block(x, gate_up, down, backend):
        weights, ids = mk.route(x @ router, k, backend=backend)
        return mk.moe_mlp(x, gate_up, down, weights, ids, backend=backend)

    block(x, gate_up, down, "cpu")  # loads the backends eagerly (backend modules import on first use)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out = compiled(x, gate_up, down, "cpu")
    ref = block(x, gate_up, down, "reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (x, gate_up, down))
    want = torch.autograd.grad(ref.sum(), (x, gate_up, down))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
