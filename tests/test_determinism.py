"""Every backend is deterministic by construction (no floating-point atomics, fixed reduction order):
forward and backward are bitwise identical across runs, also under torch.use_deterministic_algorithms."""

import pytest
import torch
from moe_testing import backends_for, make_ids

import moe_kernels

BACKENDS = backends_for("cpu")


def _run(backend):
    torch.manual_seed(0)
    T, H, I, E, k, r = 37, 48, 40, 6, 3, 8
    ids = make_ids("one_expert", T, E, k)  # all tokens on one expert: the worst case for accumulation order
    x = torch.randn(T, H, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, requires_grad=True)
    down = torch.randn(E, H, I, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    weights, _ = moe_kernels.route(logits, k, backend=backend)
    weights = weights.gather(1, torch.argsort(torch.rand(T, k), dim=1))  # any weights that depend on logits
    a_down = torch.randn(E, r, H, requires_grad=True)
    a_up = torch.randn(E, H, r, requires_grad=True)
    y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)
    z = moe_kernels.adapter_moe(y, a_down, a_up, weights, ids, backend=backend)
    grads = torch.autograd.grad(z.square().sum(), [x, gate_up, down, logits, a_down, a_up])
    return [y, z, *grads]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_identical_across_runs(backend):
    first, second = _run(backend), _run(backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_honours_use_deterministic_algorithms(backend):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _run(backend), _run(backend)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
