"""Shared set-up of the integration suites: Triton's interpreter on GPU-less machines, and which
moe_kernels backends can run the Hugging Face integration here (route + moe_mlp, forward and backward)."""

import functools
import os

import torch

# Without a GPU the triton backend runs in Triton's interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import moe_kernels  # noqa: E402

HF_BACKENDS = ("reference", "cpu", "triton")


@functools.lru_cache(maxsize=None)
def hf_backend_unready_reason(name: str) -> str | None:
    """None if backend ``name`` runs route and moe_mlp (with gradients) on CPU tensors here, else why not."""
    if name not in moe_kernels.available_backends():
        return f"backend {name!r} is not built here (available: {moe_kernels.available_backends()})"
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 8, generator=generator, requires_grad=True)
        gate_up = torch.randn(4, 8, 8, generator=generator, requires_grad=True)
        down = torch.randn(4, 8, 4, generator=generator, requires_grad=True)
        logits = torch.randn(3, 4, generator=generator, requires_grad=True)
        weights, ids = moe_kernels.route(logits, 2, backend=name)
        out = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=name)
        out.sum().backward()
    except (moe_kernels.BackendError, NotImplementedError) as exc:
        return f"backend {name!r} cannot run the HF integration yet: {exc}"
    return None


@pytest.fixture
def require_hf_backend():
    """Call with a backend name: skips the test (with the reason) when that backend cannot run here."""

    def require(name: str) -> None:
        reason = hf_backend_unready_reason(name)
        if reason is not None:
            pytest.skip(reason)

    return require


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly (apply(..., backend=...)); an outer MOE_KERNELS_BACKEND must not leak in."""
    monkeypatch.delenv("MOE_KERNELS_BACKEND", raising=False)
