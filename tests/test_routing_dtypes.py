"""moe_mlp's routing in the caller's dtypes (backends.Backend): a Hugging Face router hands the experts int64 ids
and weights in the model's dtype. Every backend gives bit for bit what it gives for the same routing converted
to float32 / int32 first, forward and backward; the triton decode and one-token paths read it with no conversion
call at all, and the paths that need the normalised form convert it once."""

import pytest
import torch

import moe_kernels
from moe_kernels.triton import experts as triton_experts
from moe_testing import backends_under_test, device_for

E, H, I = 7, 24, 20  # a prime expert count, widths that are not powers of two
# (tokens, k): one token (triton's one-token GEMVs), a decode step with k = E, a few slots (triton's decode path),
# and enough slots for the planned path
SHAPES = [(1, 2), (1, E), (3, 2), (40, 3)]


def _problem(num_tokens, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, H, generator=g).to(dtype)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / 5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) / 5).to(dtype)
    weights = torch.rand(num_tokens, k, generator=g).to(dtype)  # as a router returns them: in x's dtype
    ids = torch.argsort(torch.rand(num_tokens, E, generator=g), dim=1)[:, :k]  # int64, distinct per token
    return [t.to(device) for t in (x, gate_up, down, weights, ids)]


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("num_tokens,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_routing_dtypes_give_the_normalised_result(backend, num_tokens, k, dtype):
    x, gate_up, down, weights, ids = _problem(num_tokens, k, dtype, device_for(backend))
    with torch.no_grad():
        given = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)
        normalised = moe_kernels.moe_mlp(x, gate_up, down, weights.float(), ids.int(), backend=backend)
    assert given.dtype == dtype and torch.equal(given, normalised)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("num_tokens,k", [(1, 2), (40, 3)])
def test_routing_dtypes_give_the_normalised_gradients(backend, num_tokens, k):
    dtype = torch.bfloat16
    x, gate_up, down, weights, ids = _problem(num_tokens, k, dtype, device_for(backend), seed=1)
    grad_y = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(2)).to(dtype).to(x.device)
    results = []
    for route_w, route_ids in ((weights, ids), (weights.float(), ids.int())):
        leaves = [t.detach().requires_grad_() for t in (x, gate_up, down, route_w)]
        y = moe_kernels.moe_mlp(*leaves[:3], leaves[3], route_ids, backend=backend)
        y.backward(grad_y)
        results.append([y] + [t.grad for t in leaves])
    (y_given, *grads_given), (y_norm, *grads_norm) = results
    assert torch.equal(y_given, y_norm)
    for name, got, want in zip(("x", "gate_up_proj", "down_proj"), grads_given, grads_norm):
        assert torch.equal(got, want), name
    # the weights' gradient arrives in the weights' own dtype: the float32 one rounded
    assert grads_given[3].dtype == dtype and torch.equal(grads_given[3], grads_norm[3].to(dtype))


@pytest.mark.skipif("triton" not in backends_under_test(), reason="the triton backend is not available here")
@pytest.mark.parametrize("num_tokens,k,converts", [(1, 2, False), (3, 2, False), (40, 3, True)])
def test_triton_decode_paths_read_the_routing_as_given(monkeypatch, num_tokens, k, converts):
    """The one-token and decode paths take int64 ids and bf16 weights into their kernels: no conversion (the
    two launches per MoE layer a Hugging Face router's dtypes cost before); the planned path converts once."""
    calls = []
    convert = triton_experts.fp32_int32_routing

    def counting(weights, ids):
        calls.append((weights.dtype, ids.dtype))
        return convert(weights, ids)

    monkeypatch.setattr(triton_experts, "fp32_int32_routing", counting)
    x, gate_up, down, weights, ids = _problem(num_tokens, k, torch.bfloat16, device_for("triton"))
    conversions = []

    class Conversions(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dtype in (torch.int64, torch.bfloat16) \
                    and args[0].shape == ids.shape:
                conversions.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Conversions():
        moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    assert calls == ([(torch.bfloat16, torch.int64)] if converts else [])
    assert not conversions  # and none outside the registered op (the mode sees no further into it)
