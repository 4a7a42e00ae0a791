"""Shared test helpers (imported by name; conftest.py files are not importable reliably when both
tests/ and integration/ are collected): backends that run here and the device each runs on, per-dtype
tolerances, hard-case ids."""

import torch

import moe_kernels
from moe_kernels.backends import get_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative (norm-wise) tolerance of a backend's result in `dtype` against the fp32 oracle.
REL_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

GPU = torch.cuda.is_available()
# Backends that run on CUDA tensors; without a GPU, triton runs on CPU tensors in Triton's interpreter
# (conftest.py sets TRITON_INTERPRET=1 then) and cuda does not run at all.
GPU_BACKENDS = ("triton", "cuda")


def backends_for(device: str = "cpu") -> list[str]:
    """Backends built here that can run on tensors of ``device``."""
    names = []
    for name in moe_kernels.available_backends():
        if get_backend(name).device_error(torch.device(device)) is None:
            names.append(name)
    return names


def device_for(backend: str) -> torch.device:
    """The device a test runs ``backend`` on: CUDA for the GPU backends when a GPU is present, else CPU."""
    return torch.device("cuda" if GPU and backend in GPU_BACKENDS else "cpu")


def backends_under_test() -> list[str]:
    """Every backend built here that can run in this process on the device ``device_for`` gives it: the
    CPU-side backends, plus triton/cuda on CUDA tensors with a GPU, or triton in the interpreter without one.
    (Not named test_*: test modules import it, and pytest would collect it as a test.)"""
    return [name for name in moe_kernels.available_backends()
            if get_backend(name).device_error(device_for(name)) is None]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_close_rel(actual, expected, dtype, what="", factor=1.0):
    err = rel_err(actual, expected)
    assert err <= REL_TOL[dtype] * factor, f"{what}: relative error {err:.3e} > {REL_TOL[dtype] * factor:.1e} ({dtype})"


def make_ids(pattern: str, num_tokens: int, num_experts: int, k: int, generator=None, device=None) -> torch.Tensor:
    """[T,k] int32 expert ids with distinct experts per token, following a hard-case pattern; drawn on the CPU
    (``generator`` is a CPU generator), then moved to ``device`` (default: stay on the CPU).

    random:      k distinct random experts per token
    one_expert:  every token's first choice is expert 0 (all tokens on one expert)
    skip_last:   expert E-1 never chosen (an expert with no tokens); needs k < E
    """
    g = generator or torch.Generator().manual_seed(0)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if pattern == "one_expert":
        scores[:, 0] = 2.0
    elif pattern == "skip_last":
        scores[:, -1] = -1.0
    ids = scores.topk(k, dim=-1).indices.to(torch.int32)
    return ids if device is None else ids.to(device)
