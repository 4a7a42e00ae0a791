"""A Hugging Face router's dtypes on both sides of the experts: int64 ids and weights in a model dtype.

``route(..., weights_dtype=, ids_dtype=)`` writes them from the kernel: every backend gives bit for bit its float32 /
int32 result converted, forward and gradient, and a fused HF router forward makes no conversion call.
``moe_mlp`` reads them as given (backends.Backend): every backend gives bit for bit what it gives for the same
routing converted to float32 / int32 first, forward and backward; the triton decode and one-token paths read it
with no conversion call at all, and the paths that need the normalised form convert it once."""

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


# ---- route's outputs in the dtypes a router returns ---------------------------------------------------------------

# (T, E, k, route keywords): one token; k = E at a prime E; top-k first; DeepSeek-V3's grouped sigmoid with a bias and
# a scale; E above the cuda warp kernel's 256 experts (its block kernel)
ROUTE_CASES = [(1, 8, 2, {}), (5, 7, 7, {}), (13, 11, 3, dict(order="topk_then_softmax", renormalize=False)),
               (9, 16, 4, dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2, scale=2.5)), (4, 300, 6, {})]
OUT_DTYPES = [(torch.bfloat16, torch.int64), (torch.float16, torch.int32), (torch.float32, torch.int64)]


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}")
@pytest.mark.parametrize("weights_dtype,ids_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("logits_dtype", [torch.bfloat16, torch.float32])
def test_route_writes_the_dtypes_asked_for(backend, case, weights_dtype, ids_dtype, logits_dtype):
    num_tokens, num_experts, k, kwargs = case
    device = device_for(backend)
    g = torch.Generator().manual_seed(num_experts)
    kwargs = dict(kwargs)
    if kwargs.pop("bias", False):
        kwargs["bias"] = (torch.randn(num_experts, generator=g) * 0.1).to(device)
    logits = torch.randn(num_tokens, num_experts, generator=g).to(device, logits_dtype).requires_grad_(True)
    weights, ids = moe_kernels.route(logits, k, backend=backend, **kwargs)
    got_weights, got_ids = moe_kernels.route(logits, k, backend=backend, weights_dtype=weights_dtype,
                                             ids_dtype=ids_dtype, **kwargs)
    assert (got_weights.dtype, got_ids.dtype) == (weights_dtype, ids_dtype)
    assert torch.equal(got_ids, ids.to(ids_dtype))
    if backend == "triton" and weights_dtype == torch.bfloat16 and device.type == "cpu":
        # Triton's interpreter truncates float32 -> bfloat16 (a compiled kernel rounds to nearest even, as torch):
        # within one bfloat16 step of the rounded weights
        torch.testing.assert_close(got_weights.float(), weights.to(weights_dtype).float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got_weights, weights.to(weights_dtype))  # one rounding of the float32 weights
    cotangent = torch.randn(num_tokens, k, generator=g).to(device, weights_dtype)
    (got_grad,) = torch.autograd.grad(got_weights, logits, cotangent)
    (grad,) = torch.autograd.grad(weights, logits, cotangent.float())
    assert got_grad.dtype == logits_dtype and torch.equal(got_grad, grad)


@pytest.mark.parametrize("kwargs,name", [(dict(weights_dtype=torch.float64), "weights_dtype"),
                                         (dict(weights_dtype=torch.int32), "weights_dtype"),
                                         (dict(ids_dtype=torch.int16), "ids_dtype"),
                                         (dict(ids_dtype=torch.float32), "ids_dtype")])
def test_route_rejects_other_output_dtypes(kwargs, name):
    with pytest.raises(TypeError, match=f"{name} must be one of"):
        moe_kernels.route(torch.randn(3, 4), 2, **kwargs)


def test_route_empty_batch_has_the_dtypes_asked_for():
    weights, ids = moe_kernels.route(torch.randn(0, 4), 2, weights_dtype=torch.bfloat16, ids_dtype=torch.int64)
    assert (weights.shape, weights.dtype, ids.dtype) == ((0, 2), torch.bfloat16, torch.int64)


@pytest.mark.parametrize("backend", [b for b in backends_under_test() if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_hf_router_makes_no_conversion_call(backend, dtype):
    """Qwen3-MoE's router returns weights in its logits' dtype and int64 ids: the fused forward gets both from
    route's kernel, with no conversion call (two launches per MoE layer and decode step before)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from moe_kernels.hf import routers
    from moe_kernels.hf.experts import BACKEND_ATTRIBUTE

    config = transformers.Qwen3MoeConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_experts=8,
                                         num_experts_per_tok=2)
    router = Qwen3MoeTopKRouter(config).to(device_for(backend), dtype)
    torch.nn.init.normal_(router.weight)
    setattr(router, BACKEND_ATTRIBUTE, backend)
    hidden = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(device_for(backend), dtype)
    calls = []

    class Calls(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Calls():
        _, weights, ids = routers.qwen_moe_forward(router, hidden)
    assert (weights.dtype, ids.dtype) == (dtype, torch.int64)
    assert torch.ops.aten._to_copy.default not in calls, calls
    with torch.no_grad():  # and what transformers' own forward returns
        _, hf_weights, hf_ids = type(router).forward(router, hidden)
    assert torch.equal(ids, hf_ids) and hf_weights.dtype == dtype
    torch.testing.assert_close(weights, hf_weights, **(dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else {}))
