"""Every backend is deterministic by construction (no floating-point atomics, fixed reduction order):
forward and backward are bitwise identical across runs, also under torch.use_deterministic_algorithms.
Each backend runs on device_for(backend) (CUDA for triton/cuda with a GPU)."""

import os

import pytest
import torch
from moe_testing import backends_under_test, device_for, make_ids

import moe_kernels

# With torch.use_deterministic_algorithms(True), cuBLAS matmuls on CUDA (the cuda backend's expert path) raise
# unless CUBLAS_WORKSPACE_CONFIG is a deterministic setting. torch may read it only once per process (at its
# first cuBLAS call), so it is set here, at collection, before any test runs a matmul on a GPU (a monkeypatched
# variable would come too late after test_moe_mlp.py). Without a GPU it has no effect.
DETERMINISTIC_CUBLAS_CONFIGS = (":4096:8", ":16:8")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_CONFIGS[0])

BACKENDS = backends_under_test()


def _leaf(t, device):
    """``t`` (drawn on the CPU: the same values on every machine) on ``device``, as a leaf that requires grad."""
    return t.to(device).requires_grad_(True)


def _run(backend):
    torch.manual_seed(0)
    device = device_for(backend)
    T, H, I, E, k, r = 37, 48, 40, 6, 3, 8
    # all tokens on one expert: the worst case for accumulation order
    ids = make_ids("one_expert", T, E, k, device=device)
    x = _leaf(torch.randn(T, H), device)
    gate_up = _leaf(torch.randn(E, 2 * I, H), device)
    down = _leaf(torch.randn(E, H, I), device)
    logits = _leaf(torch.randn(T, E), device)
    weights, _ = moe_kernels.route(logits, k, backend=backend)
    order = torch.argsort(torch.rand(T, k), dim=1).to(device)
    weights = weights.gather(1, order)  # any weights that depend on logits
    a_down = _leaf(torch.randn(E, r, H), device)
    a_up = _leaf(torch.randn(E, H, r), device)
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
    if device_for(backend).type == "cuda" and \
            os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS_CONFIGS:
        pytest.skip(f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']!r} is not a deterministic "
                    f"cuBLAS setting {DETERMINISTIC_CUBLAS_CONFIGS}: cuBLAS matmuls raise under "
                    "torch.use_deterministic_algorithms(True)")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _run(backend), _run(backend)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
