"""The cpu backend's expert-path variants (chosen by size and thread count) all match the oracle:
token chunks on/off, experts spread over threads on/off, and the dense two-GEMM inference path for
tiny adapters."""

import pytest
import torch
from moe_testing import assert_close_rel, make_ids

import moe_kernels
from moe_kernels import reference

pytestmark = pytest.mark.skipif("cpu" not in moe_kernels.available_backends(), reason="moe_kernels._C not built")


def _problem(num_tokens=40, hidden=24, inter=16, num_experts=9, k=2, rank=4):
    ids = make_ids("skip_last", num_tokens, num_experts, k)
    tensors = dict(x=torch.randn(num_tokens, hidden), gate_up=torch.randn(num_experts, 2 * inter, hidden) * 0.2,
                   down=torch.randn(num_experts, hidden, inter) * 0.2, weights=torch.rand(num_tokens, k),
                   a_down=torch.randn(num_experts, rank, hidden) * 0.2,
                   a_up=torch.randn(num_experts, hidden, rank) * 0.2)
    return ids, {name: t.requires_grad_(True) for name, t in tensors.items()}


@pytest.mark.parametrize("chunks", ["0", "1"])
@pytest.mark.parametrize("expert_parallel", ["0", "1"])
def test_expert_path_variants_match_oracle(monkeypatch, chunks, expert_parallel):
    monkeypatch.setenv("MOE_KERNELS_CPU_TOKEN_CHUNKS", chunks)
    monkeypatch.setenv("MOE_KERNELS_CPU_EXPERT_PARALLEL", expert_parallel)
    ids, t = _problem()
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
    ids, t = _problem(num_experts=8, rank=8, k=3)
    h, down, up = (t[n].detach().to(dtype) for n in ("x", "a_down", "a_up"))
    weights = t["weights"].detach()
    with torch.no_grad():
        got = moe_kernels.adapter_moe(h, down, up, weights, ids, activation=activation, scale=0.7, backend="cpu")
    want = reference.adapter_moe(h.float(), down.float(), up.float(), weights, ids, activation=activation, scale=0.7)
    assert got.dtype == dtype
    assert_close_rel(got, want, dtype, "dense inference path")
