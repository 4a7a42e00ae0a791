"""The route op (top-k routing) on every backend that runs here against the oracle (``reference.route``):
ids exactly, weights and gradients; the hard cases (one token, k = 1, k = E, prime E, ties, masked experts,
huge logits, thousands of experts); opcheck of the registered route ops; the router losses.

A backend's inputs live on device_for(backend) (CUDA for triton/cuda with a GPU, else triton runs in
Triton's interpreter); the oracle runs on the same values. The sections after the shared tests hold each
backend's own grids (the variant tables they were written against); its private helpers are tested in
tests/backends/.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_testing import (DTYPES, REL_TOL, backends_under_test, device_for, hypothesis_settings, native_opcheck_cases,
                         needs_cuda_kernels, needs_native, needs_triton, oracle_for, routing_problem)

import moe_kernels
from moe_kernels import reference

BACKENDS = backends_under_test()
ops = torch.ops.moe_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the triton tests run

# ----------------------------------------------------------------------------------- every backend vs oracle

ROUTE_VARIANTS = [
    dict(),
    dict(renormalize=False),
    dict(order="topk_then_softmax"),
    dict(scoring="sigmoid", order="topk_then_softmax", renormalize=True),
    dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2, scale=2.5),
    dict(scoring="sigmoid", renormalize=False, scale=0.5),
    dict(scoring="softmax", bias=True),
]


def _route_args(variant, num_experts, device):
    kwargs = dict(variant)
    if kwargs.pop("bias", False):
        kwargs["bias"] = (torch.randn(num_experts) * 0.1).to(device)
    return kwargs


ROUTE_SHAPES = [(1, 8, 1), (13, 8, 8), (40, 16, 3)]
# (variant, shape) pairs that route accepts: group-limited choice needs k <= experts in the kept groups
ROUTE_CASES = [(v, s) for v in ROUTE_VARIANTS for s in ROUTE_SHAPES
               if "n_group" not in v or s[2] <= v["topk_group"] * s[1] // v["n_group"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,shape", ROUTE_CASES,
                         ids=lambda c: ",".join(f"{k}={c[k]}" for k in c) or "default" if isinstance(c, dict)
                         else "T{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_oracle(backend, variant, shape, dtype):
    num_tokens, num_experts, k = shape
    device = device_for(backend)
    kwargs = _route_args(variant, num_experts, device)
    logits = torch.randn(num_tokens, num_experts).to(device, dtype).requires_grad_(True)
    weights, ids = moe_kernels.route(logits, k, backend=backend, **kwargs)
    oracle = oracle_for(backend)  # the reference backend: against the naive per-token loop
    ref_weights, ref_ids = oracle.route(logits.detach().float().requires_grad_(True), k, **kwargs)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == (num_tokens, k) and ids.shape == (num_tokens, k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)

    grad_w = torch.randn_like(weights)
    (grad,) = torch.autograd.grad(weights, logits, grad_w)
    ref_logits = logits.detach().float().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(oracle.route(ref_logits, k, **kwargs)[0], ref_logits, grad_w)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_property(backend):
    """Hypothesis: random shapes, dtypes and routing variants."""
    device = device_for(backend)

    @hypothesis_settings(backend)
    @given(problem=routing_problem(), scoring=st.sampled_from(["softmax", "sigmoid"]),
           order=st.sampled_from(["softmax_then_topk", "topk_then_softmax"]), renormalize=st.booleans(),
           use_bias=st.booleans(), scale=st.floats(0.1, 4.0), dtype=st.sampled_from(DTYPES),
           magnitude=st.sampled_from([1.0, 30.0]))
    def check(problem, scoring, order, renormalize, use_bias, scale, dtype, magnitude):
        num_tokens, num_experts, k, seed = problem
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(num_tokens, num_experts, generator=g) * magnitude).to(device, dtype)
        bias = (torch.randn(num_experts, generator=g) * 0.1).to(device) if use_bias else None
        kwargs = dict(scoring=scoring, order=order, renormalize=renormalize, bias=bias, scale=scale)
        weights, ids = moe_kernels.route(logits, k, backend=backend, **kwargs)
        ref_weights, ref_ids = oracle_for(backend).route(logits.float(), k, **kwargs)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_empty_batch(backend):
    w, i = moe_kernels.route(torch.randn(0, 4, device=device_for(backend)), 2, backend=backend)
    assert w.shape == (0, 2) and i.shape == (0, 2) and i.dtype == torch.int32
    logits = torch.randn(0, 4, device=device_for(backend), requires_grad=True)
    moe_kernels.route(logits, 2, backend=backend)[0].sum().backward()  # the router gets a zero gradient
    assert logits.grad is not None and logits.grad.shape == (0, 4)


def test_route_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0]])
    weights, ids = moe_kernels.route(logits, 2)
    assert ids.tolist() == [[0, 3]]
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_route_zero_logits_tie_to_lower_index():
    weights, ids = moe_kernels.route(torch.zeros(3, 6), 3)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(weights, torch.full((3, 3), 1 / 3))


# ---------------------------------------------------------------------------------------------- router losses

@pytest.mark.parametrize("num_experts,k", [(8, 2), (7, 1), (5, 5)])
def test_load_balancing_loss_equals_transformers(num_experts, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits = torch.randn(23, num_experts, requires_grad=True)
    _, ids = moe_kernels.route(logits, k)
    ours = moe_kernels.load_balancing_loss(logits, ids, num_experts)
    theirs = load_balancing_loss_func((logits,), num_experts, k)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs)
    assert g_ours.abs().sum() > 0, "the load-balancing loss must have a gradient into the logits"


def test_z_loss_value_and_gradient():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    expected = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    torch.testing.assert_close(moe_kernels.z_loss(logits), expected)
    assert torch.autograd.gradcheck(moe_kernels.z_loss, (logits,))


# ------------------------------------------------------------------ cpu backend (C++ ops route_forward/backward)

CPU_ROUTE_VARIANTS = [
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
CPU_ROUTE_SHAPES = [(1, 8, 2), (37, 16, 1), (19, 16, 16), (64, 16, 4), (23, 13, 3)]  # (T, E, k); E=13 prime


def _grouping_fits(variant, shape):
    _, _, _, _, n_group, topk_group, _ = variant
    _, num_experts, k = shape
    return n_group is None or (num_experts % n_group == 0 and k <= topk_group * (num_experts // n_group))


CPU_ROUTE_CASES = [(v, s) for v in CPU_ROUTE_VARIANTS for s in CPU_ROUTE_SHAPES if _grouping_fits(v, s)]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant,shape", CPU_ROUTE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_route_matches_reference(variant, shape, dtype):
    scoring, order, renormalize, use_bias, n_group, topk_group, scale = variant
    T, E, k = shape
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype).requires_grad_()
    bias = torch.randn(E, generator=g) * 0.1 if use_bias else None
    kwargs = dict(scoring=scoring, order=order, renormalize=renormalize, bias=bias, n_group=n_group,
                  topk_group=topk_group, scale=scale)
    weights, ids = moe_kernels.route(logits, k, backend="cpu", **kwargs)
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


@needs_native
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_cpu_route_ties_go_to_lower_index(scoring, order):
    # Integer logits from a small range: many exact ties in every row.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 2, (50, 12), generator=g).float()
    weights, ids = moe_kernels.route(logits, 5, scoring=scoring, order=order, backend="cpu")
    ref_weights, ref_ids = reference.route(logits, 5, scoring=scoring, order=order)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)


@needs_native
def test_cpu_route_masked_minus_inf_and_large_expert_count():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 300, generator=g)
    logits[:, ::3] = float("-inf")  # masked experts take part as -inf, never chosen while others remain
    weights, ids = moe_kernels.route(logits, 8, backend="cpu")
    ref_weights, ref_ids = reference.route(logits, 8)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)


@needs_native
def test_cpu_route_sigmoid_underflow_renormalizes_to_zero_not_nan():
    logits = torch.full((2, 4), -200.0)
    weights, _ = moe_kernels.route(logits, 2, scoring="sigmoid", backend="cpu")
    assert torch.equal(weights, torch.zeros_like(weights))  # sigmoid(-200) is 0 in fp32: 0 / (0 + eps), not 0 / 0
    assert torch.equal(weights, reference.route(logits, 2, scoring="sigmoid")[0])


@needs_native
@pytest.mark.parametrize("case", range(5))
def test_native_route_ops_opcheck(case):
    op, args = native_opcheck_cases("route_forward", "route_backward")[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------- triton backend (triton/routing.py)

TRITON_ROUTE_VARIANTS = [
    dict(),                                                              # Mixtral / Qwen / OLMoE
    dict(renormalize=False),                                             # Jamba, Self-MoE
    dict(order="topk_then_softmax", renormalize=False),                  # GPT-OSS, Granite, PESC
    dict(scoring="sigmoid", renormalize=False, scale=2.5),
    dict(scoring="sigmoid", order="topk_then_softmax"),
    dict(scoring="sigmoid", bias=True, scale=2.5),                       # DeepSeek-V3 without groups
    dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2, scale=2.5),  # DeepSeek-V3 / GLM4-MoE
    dict(n_group=2, topk_group=1, renormalize=False),
    dict(order="topk_then_softmax", bias=True),
]


def _triton_route_args(variant, num_experts, dtype):
    args = {key: value for key, value in variant.items() if key != "bias"}
    if variant.get("bias"):
        args["bias"] = torch.randn(num_experts, device=DEVICE).to(dtype)
    return args


def _check_triton_route(logits, k, args, dtype, grad=True):
    logits = logits.detach().requires_grad_(grad)
    weights, ids = moe_kernels.route(logits, k, backend="triton", **args)
    want_weights, want_ids = reference.route(logits, k, **{"scoring": "softmax", "order": "softmax_then_topk",
                                                           "renormalize": True, **args})
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids), f"ids differ:\n{ids}\n{want_ids}"
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    if grad:
        upstream = torch.randn_like(weights)
        (got,) = torch.autograd.grad(weights, logits, upstream)
        (want,) = torch.autograd.grad(want_weights, logits, upstream)
        assert got.dtype == logits.dtype
        # absolute floor: with k = 1 and renormalisation the exact gradient is 0 (rounding noise remains)
        tol = 1e-5 if dtype == torch.float32 else REL_TOL[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@needs_triton
@pytest.mark.parametrize("variant", TRITON_ROUTE_VARIANTS,
                         ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
@pytest.mark.parametrize("num_tokens,num_experts,k", [(1, 8, 1), (19, 8, 8), (21, 12, 3)])
def test_triton_route_variants_match_oracle(variant, num_tokens, num_experts, k):
    if variant.get("n_group"):
        per_group = num_experts // variant["n_group"]
        if k > variant["topk_group"] * per_group:
            pytest.skip("k larger than the eligible experts is rejected by ops.route")
    logits = torch.randn(num_tokens, num_experts, device=DEVICE) * 2
    _check_triton_route(logits, k, _triton_route_args(variant, num_experts, torch.float32), torch.float32)


TRITON_TIE_VARIANTS = [TRITON_ROUTE_VARIANTS[0], TRITON_ROUTE_VARIANTS[2], TRITON_ROUTE_VARIANTS[6]]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", TRITON_TIE_VARIANTS, ids=["softmax", "topk_then_softmax", "grouped_sigmoid_bias"])
def test_triton_route_low_precision_logits(dtype, variant):
    # bf16/fp16 logits are upcast on load: the choice must equal the oracle's on the same values
    logits = (torch.randn(17, 7 if not variant.get("n_group") else 16, device=DEVICE) * 3).to(dtype)
    _check_triton_route(logits, 3, _triton_route_args(variant, logits.shape[1], dtype), dtype)


@needs_triton
@pytest.mark.parametrize("variant", TRITON_TIE_VARIANTS, ids=["softmax", "topk_then_softmax", "grouped_sigmoid_bias"])
def test_triton_route_ties_go_to_the_lower_index(variant):
    # integer logits with many exact ties (and tied groups)
    logits = torch.randint(-2, 3, (33, 16), device=DEVICE).float()
    args = _triton_route_args(variant, 16, torch.float32)
    if "bias" in args:
        args["bias"] = torch.zeros(16, device=DEVICE)
    _check_triton_route(logits, 4, args, torch.float32)


@needs_triton
def test_triton_route_masked_experts_and_prime_e():
    logits = torch.randn(9, 13, device=DEVICE)
    logits[:, 2] = float("-inf")
    logits[0, :] = float("-inf")
    logits[0, 5] = 1.0  # one finite expert; k = 3 picks the lowest-index masked ones next
    _check_triton_route(logits, 3, dict(renormalize=False), torch.float32)


@needs_triton
def test_triton_route_many_experts():
    logits = torch.randn(3, 3000, device=DEVICE)
    _check_triton_route(logits, 8, {}, torch.float32)


@needs_triton
def test_triton_route_ops_pass_opcheck():
    from moe_kernels.triton.routing import route, route_backward_op, route_op
    logits = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE)
    torch.library.opcheck(route_op, (logits, bias, 3, True, False, True, 4, 2, 2.5, torch.float32, torch.int32))
    torch.library.opcheck(route_op, (logits, None, 2, False, True, False, 1, 1, 1.0, torch.bfloat16, torch.int64))
    weights, ids = route(logits, 3, "softmax", "softmax_then_topk", True, None, None, None, 1.0, torch.float32,
                         torch.int32)
    torch.library.opcheck(route_backward_op, (torch.randn_like(weights), logits.detach(), ids, False, False, True, 1.0))
    torch.library.opcheck(route_backward_op, (torch.randn_like(weights).half(), logits.detach(), ids.long(), False,
                                              False, True, 1.0))


# ------------------------------------------------------------- cuda backend (C++ ops on CUDA tensors vs CPU ops)

CUDA = torch.device("cuda")
CUDA_ROUTE_VARIANTS = [  # use_sigmoid, topk_first, renormalize, bias, n_group, topk_group, scale
    (False, False, True, False, 0, 0, 1.0),   # Mixtral / Qwen
    (False, False, False, False, 0, 0, 1.0),  # Jamba / Self-MoE
    (False, True, False, False, 0, 0, 1.0),   # GPT-OSS / Granite / PESC
    (True, False, True, True, 8, 4, 2.5),     # DeepSeek-V3
    (True, True, True, False, 0, 0, 1.0),
    (False, True, True, True, 4, 2, 0.5),
]
# (T, E, k): the warp kernel for E <= 64 and E <= 256, the block kernel beyond; T=1, k=1, k=E, prime E.
CUDA_ROUTE_SHAPES = [(1, 8, 2), (37, 16, 1), (19, 16, 16), (64, 64, 6), (129, 256, 8), (5, 13, 3), (33, 1024, 8),
                     (3, 4096, 32)]


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_ROUTE_SHAPES, ids=str)
@pytest.mark.parametrize("variant", CUDA_ROUTE_VARIANTS, ids=str)
def test_cuda_route_matches_cpu_and_reference(variant, shape, dtype):
    """The CUDA op against the CPU op (itself tested against the oracle above) and the oracle: ids exactly,
    weights to fp32 rounding (the GPU sums softmax terms in a tree order)."""
    use_sigmoid, topk_first, renormalize, use_bias, n_group, topk_group, scale = variant
    T, E, k = shape
    if n_group and (E % n_group or k > topk_group * (E // n_group)):
        pytest.skip("grouping does not fit this shape")
    g = torch.Generator().manual_seed(T * 7 + E + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    bias = torch.randn(E, generator=g) * 0.1 if use_bias else None
    args = (k, use_sigmoid, topk_first, renormalize)
    tail = (n_group, topk_group, scale)
    weights, ids = ops.route_forward(logits.to(CUDA), *args, None if bias is None else bias.to(CUDA), *tail)
    cpu_weights, cpu_ids = ops.route_forward(logits, *args, bias, *tail)
    ref_weights, ref_ids = reference.route(
        logits, k, "sigmoid" if use_sigmoid else "softmax", "topk_then_softmax" if topk_first else "softmax_then_topk",
        renormalize, bias, n_group or None, topk_group or None, scale)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), cpu_ids) and torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), cpu_weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-7)

    grad = torch.randn(T, k, generator=g)
    grad_logits = ops.route_backward(grad.to(CUDA), logits.to(CUDA), ids, use_sigmoid, topk_first, renormalize, scale)
    cpu_grad = ops.route_backward(grad, logits, cpu_ids, use_sigmoid, topk_first, renormalize, scale)
    torch.testing.assert_close(grad_logits.cpu(), cpu_grad, rtol=1e-4, atol=1e-6)


@needs_cuda_kernels
def test_cuda_route_ties_go_to_lower_index():
    g = torch.Generator().manual_seed(3)
    for E in (12, 200, 700):  # warp kernels and block kernel
        logits = torch.randint(-2, 2, (50, E), generator=g).float()
        _, ids = ops.route_forward(logits.to(CUDA), 5, False, False, True, None, 0, 0, 1.0)
        _, ref_ids = reference.route(logits, 5)
        assert torch.equal(ids.cpu(), ref_ids), E
