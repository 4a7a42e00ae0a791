"""The CUDA kernels of moe_kernels._C (csrc/cuda) against the reference oracle and the CPU kernels.

Needs a GPU and an extension built with the CUDA sources; skipped otherwise (the CI machine has no GPU:
there `.ci/cuda_compile_check.sh` proves the sources compile and register). Each test runs the same
inputs through the CUDA op and the CPU op (itself tested against the oracle in test_native.py) and the
oracle: ids, plans and row copies must match exactly; sums (scatter_rows_sum, combine and its backward)
use the CPU's arithmetic (fp32, j ascending, product rounded before the add), so they agree to the last
bit on x86 and within one rounding of the output dtype anywhere; routing weights match to fp32 rounding
(the GPU sums softmax terms in a tree order).
"""

from __future__ import annotations

import pytest
import torch

from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None:
    pytest.skip(f"moe_kernels._C is not built: {native._LOAD_ERROR}", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
_missing = [name for name in native.SHARED_OPS if not native.has_kernel(name, "CUDA")]
if _missing:
    pytest.skip(f"moe_kernels._C was built without CUDA kernels for {_missing}", allow_module_level=True)

ops = torch.ops.moe_kernels
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA = torch.device("cuda")
ONE_ROUNDING = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_same_sum(actual, expected):
    """The CUDA and CPU results of the same fp32 sum, rounded to the output dtype."""
    rtol = ONE_ROUNDING[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=rtol * 1e-3)


def random_ids(num_tokens, num_experts, k, generator, layout="random"):
    """ids [T,k] int32, distinct experts per row; layout random | one_expert (expert 0 first in every row)."""
    rows = [torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)]
    ids = torch.stack(rows)
    if layout == "one_expert":
        ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                      (torch.randperm(num_experts - 1, generator=generator)[: k - 1] + 1)])
                           for _ in range(num_tokens)])
    return ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------- route

ROUTE_VARIANTS = [  # use_sigmoid, topk_first, renormalize, bias, n_group, topk_group, scale
    (False, False, True, False, 0, 0, 1.0),   # Mixtral / Qwen
    (False, False, False, False, 0, 0, 1.0),  # Jamba / Self-MoE
    (False, True, False, False, 0, 0, 1.0),   # GPT-OSS / Granite / PESC
    (True, False, True, True, 8, 4, 2.5),     # DeepSeek-V3
    (True, True, True, False, 0, 0, 1.0),
    (False, True, True, True, 4, 2, 0.5),
]
# (T, E, k): the warp kernel for E <= 64 and E <= 256, the block kernel beyond; T=1, k=1, k=E, prime E.
ROUTE_SHAPES = [(1, 8, 2), (37, 16, 1), (19, 16, 16), (64, 64, 6), (129, 256, 8), (5, 13, 3), (33, 1024, 8),
                (3, 4096, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROUTE_SHAPES, ids=str)
@pytest.mark.parametrize("variant", ROUTE_VARIANTS, ids=str)
def test_route_cuda_matches_cpu_and_reference(variant, shape, dtype):
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


def test_route_cuda_ties_go_to_lower_index():
    g = torch.Generator().manual_seed(3)
    for E in (12, 200, 700):  # warp kernels and block kernel
        logits = torch.randint(-2, 2, (50, E), generator=g).float()
        _, ids = ops.route_forward(logits.to(CUDA), 5, False, False, True, None, 0, 0, 1.0)
        _, ref_ids = reference.route(logits, 5)
        assert torch.equal(ids.cpu(), ref_ids), E


# ----------------------------------------------------------------------------------------------- plan

PLAN_CASES = [  # (T, E, k, layout): T=1, k=E, all on one expert, thousands of experts, a multi-tile scan
    (1, 4, 1, "random"), (1, 7, 7, "random"), (100, 8, 2, "one_expert"), (257, 13, 4, "random"),
    (500, 2000, 6, "random"), (3000, 5000, 2, "random"), (50000, 64, 2, "random"), (20000, 256, 8, "one_expert"),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=str)
def test_plan_cuda_matches_reference(case):
    T, E, k, layout = case
    ids = random_ids(T, E, k, torch.Generator().manual_seed(T + E), layout)
    got = ops.plan(ids.to(CUDA), E)
    ref = reference.plan(ids, E)
    for name, tensor in zip(("expert_offsets", "sorted_slots", "slot_positions"), got):
        assert tensor.dtype == torch.int32
        assert torch.equal(tensor.cpu(), getattr(ref, name)), name


def test_plan_cuda_skewed_many_experts():
    ids = torch.full((4096, 1), 1999, dtype=torch.int32)
    offsets, sorted_slots, _ = ops.plan(ids.to(CUDA), 2000)
    assert offsets[:2000].eq(0).all() and offsets[2000].item() == 4096
    assert torch.equal(sorted_slots.cpu(), torch.arange(4096, dtype=torch.int32))


# ------------------------------------------------------------------------ gather / scatter / combine

# (T, H, k, E): odd H (scalar path), H a multiple of 8 (128-bit path), T=1, k=1.
DISPATCH_SHAPES = [(1, 5, 1, 3), (17, 33, 3, 6), (40, 64, 4, 4), (9, 7, 2, 11), (300, 1024, 2, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DISPATCH_SHAPES, ids=str)
def test_rows_cuda_match_cpu(shape, dtype):
    T, H, k, E = shape
    g = torch.Generator().manual_seed(T * H)
    ids = random_ids(T, E, k, g)
    plan = reference.plan(ids, E)
    sorted_slots, slot_positions = plan.sorted_slots, plan.slot_positions
    x = torch.randn(T, H, generator=g).to(dtype)
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


def test_combine_cuda_is_deterministic():
    g = torch.Generator().manual_seed(5)
    T, H, k, E = 512, 768, 4, 16
    plan = reference.plan(random_ids(T, E, k, g), E)
    y = torch.randn(T * k, H, generator=g).to(CUDA)
    w = torch.rand(T, k, generator=g).to(CUDA)
    positions = plan.slot_positions.to(CUDA)
    grad_out = torch.randn(T, H, generator=g).to(CUDA)
    first = ops.combine_backward(grad_out, y, positions, w)
    for _ in range(3):
        assert torch.equal(ops.combine(y, positions, w), ops.combine(y, positions, w))
        again = ops.combine_backward(grad_out, y, positions, w)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.slow
def test_rows_cuda_past_int32_elements():
    """T*k*H > 2^31 elements: row offsets must be computed in int64."""
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
