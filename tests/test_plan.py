"""The plan op (the dispatch plan: a stable counting sort of the slots by expert) on every backend that runs
here against the oracle (``reference.plan``), exactly: one token, k = E, all tokens on one expert, empty experts,
thousands of experts, multi-tile scans; opcheck of the registered plan op.

A backend's inputs live on device_for(backend); the sections after the shared tests hold each backend's own
grids. The triton plan kernel's config paths are tested in tests/backends/test_triton_internals.py.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_testing import (backends_under_test, device_for, hypothesis_settings, ids_and_weights, make_ids,
                         native_opcheck_cases, needs_cuda_kernels, needs_native, needs_triton, oracle_for,
                         permuted_ids, routing_problem)

import moe_kernels
from moe_kernels import reference

BACKENDS = backends_under_test()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the triton tests run


def _assert_plan_equal(got, ids, num_experts):
    want = reference.plan(ids, num_experts)
    for name, a, b in zip(("expert_offsets", "sorted_slots", "slot_positions"), got, want):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a} != {b}"


# ----------------------------------------------------------------------------------- every backend vs oracle

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens,num_experts,k,pattern",
                         [(1, 1, 1, "random"), (7, 3, 3, "random"), (50, 2003, 4, "random"),
                          (64, 8, 2, "one_expert"), (9, 5, 2, "skip_last")])
def test_plan_is_a_stable_counting_sort(backend, num_tokens, num_experts, k, pattern):
    device = device_for(backend)
    ids = make_ids(pattern, num_tokens, num_experts, k, device=device)
    plan = moe_kernels.plan(ids, num_experts, backend=backend)
    ref = oracle_for(backend).plan(ids, num_experts)  # the reference backend: against the naive bucket loop
    for got, want in zip(plan, ref):
        assert got.dtype == torch.int32
        assert torch.equal(got, want)
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(plan.expert_offsets[1:].diff().long(), counts[1:]) or num_experts == 1
    # every position of expert e holds a slot routed to e, slots ascending (stable)
    sorted_experts = flat[plan.sorted_slots.long()]
    assert torch.equal(sorted_experts, torch.sort(flat, stable=True).values)
    assert torch.equal(plan.sorted_slots[plan.slot_positions.long()].long(), torch.arange(flat.numel(), device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_property(backend):
    """Hypothesis: random shapes, skewed routing, up to 3000 experts more than the ids use."""
    device = device_for(backend)

    @hypothesis_settings(backend)
    @given(problem=routing_problem(), extra_experts=st.integers(0, 3000), skew=st.booleans())
    def check(problem, extra_experts, skew):
        num_tokens, num_experts, k, seed = problem
        ids, _ = ids_and_weights(num_tokens, num_experts, k, seed, skew, device)
        plan = moe_kernels.plan(ids, num_experts + extra_experts, backend=backend)
        for got, want in zip(plan, oracle_for(backend).plan(ids, num_experts + extra_experts)):
            assert torch.equal(got, want)
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_empty_batch(backend):
    ids = make_ids("random", 3, 4, 2, device=device_for(backend))
    plan = moe_kernels.plan(ids[:0], 4, backend=backend)
    assert plan.expert_offsets.tolist() == [0] * 5 and plan.sorted_slots.numel() == 0


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_native),
                                     pytest.param("cuda", marks=needs_cuda_kernels)])
def test_plan_all_slots_on_one_expert_of_many(backend):
    ids = torch.full((4096, 1), 1999, dtype=torch.int32, device=device_for(backend))
    got = moe_kernels.plan(ids, 2000, backend=backend)
    assert got.expert_offsets[:2000].eq(0).all() and got.expert_offsets[2000].item() == 4096
    assert torch.equal(got.sorted_slots.cpu(), torch.arange(4096, dtype=torch.int32))


# --------------------------------------------------------------------- native backends (C++ op plan, CPU and CUDA)

# (T, E, k, pattern): T=1, k=E, all on one expert, empty (odd) experts, prime E, thousands of experts, a multi-tile
# scan
NATIVE_PLAN_CASES = [
    (1, 4, 1, "random"), (1, 7, 7, "random"), (100, 8, 2, "one_expert"), (33, 10, 3, "skip_odd"),
    (257, 13, 4, "random"), (500, 2000, 6, "random"), (3000, 2000, 2, "random"), (3000, 5000, 2, "random"),
    (20000, 64, 1, "random"), (50000, 64, 2, "random"), (20000, 256, 8, "one_expert"),
]


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_native),
                                     pytest.param("cuda", marks=needs_cuda_kernels)])
@pytest.mark.parametrize("case", NATIVE_PLAN_CASES, ids=str)
def test_native_plan_matches_reference(case, backend):
    T, E, k, pattern = case
    ids = permuted_ids(pattern, T, E, k, torch.Generator().manual_seed(T + E))
    _assert_plan_equal(moe_kernels.plan(ids.to(device_for(backend)), E, backend=backend), ids, E)


@needs_native
def test_native_plan_opcheck():
    ((op, args),) = native_opcheck_cases("plan")
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------- triton backend (triton/plan.py)

@needs_triton
@pytest.mark.parametrize("num_tokens,num_experts,k,pattern", [
    (1, 1, 1, "random"), (1, 8, 2, "random"), (7, 5, 2, "random"), (13, 7, 7, "random"),   # k = E, prime E
    (40, 3, 2, "one_expert"), (30, 6, 2, "skip_last"), (20, 3000, 4, "random"),             # many experts
    (64, 33, 2, "random"), (43, 33, 3, "random"),  # 128 slots: the one-launch small plan; 129: the chunked plan
    (1, 1000, 1, "random"),                        # one slot, the small plan's expert loop over 1000 experts
])
def test_triton_plan_matches_reference(num_tokens, num_experts, k, pattern):
    from moe_kernels.triton.plan import dispatch_plan
    ids = make_ids(pattern, num_tokens, num_experts, k).to(DEVICE)
    _assert_plan_equal(dispatch_plan(ids, num_experts), ids, num_experts)
