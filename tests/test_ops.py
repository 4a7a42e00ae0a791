"""Every public op on every backend that runs here, against the reference oracle (forward and gradients),
over the hard-case grid; and the oracle itself against Hugging Face's own eager code. A backend's inputs live
on device_for(backend) (CUDA for triton/cuda with a GPU); the oracle runs on the same device."""

import pytest
import torch
from moe_testing import DTYPES, assert_close_rel, backends_under_test, device_for, make_ids

import moe_kernels
from moe_kernels import reference

BACKENDS = backends_under_test()

# (T, H, I, E, k, ids pattern): one token, tokens fewer than a tile, k = 1, k = E, odd H, prime E,
# all tokens on one expert, an expert with no tokens.
MLP_GRID = [
    (1, 16, 16, 4, 1, "random"),
    (5, 33, 24, 7, 7, "random"),
    (37, 64, 32, 5, 2, "one_expert"),
    (19, 48, 40, 13, 3, "skip_last"),
]
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
    ref_weights, ref_ids = reference.route(logits.detach().float().requires_grad_(True), k, **kwargs)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == (num_tokens, k) and ids.shape == (num_tokens, k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)

    grad_w = torch.randn_like(weights)
    (grad,) = torch.autograd.grad(weights, logits, grad_w)
    ref_logits = logits.detach().float().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(reference.route(ref_logits, k, **kwargs)[0], ref_logits, grad_w)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens,num_experts,k,pattern",
                         [(1, 1, 1, "random"), (7, 3, 3, "random"), (50, 2003, 4, "random"),
                          (64, 8, 2, "one_expert"), (9, 5, 2, "skip_last")])
def test_plan_is_a_stable_counting_sort(backend, num_tokens, num_experts, k, pattern):
    device = device_for(backend)
    ids = make_ids(pattern, num_tokens, num_experts, k, device=device)
    plan = moe_kernels.plan(ids, num_experts, backend=backend)
    ref = reference.plan(ids, num_experts)
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


def _mlp_inputs(num_tokens, hidden, inter, num_experts, k, pattern, dtype, bias=False, device="cpu"):
    """Drawn on the CPU (the same values on every machine), then moved to ``device``."""
    ids = make_ids(pattern, num_tokens, num_experts, k, device=device)
    x = torch.randn(num_tokens, hidden).to(device, dtype)
    gate_up = (torch.randn(num_experts, 2 * inter, hidden) / hidden ** 0.5).to(device, dtype)
    down = (torch.randn(num_experts, hidden, inter) / inter ** 0.5).to(device, dtype)
    weights = torch.rand(num_tokens, k).to(device)
    biases = (torch.randn(num_experts, 2 * inter).to(device, dtype),
              torch.randn(num_experts, hidden).to(device, dtype)) if bias else (None, None)
    return x, gate_up, down, weights, ids, biases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MLP_GRID, ids=lambda s: "T{}-H{}-I{}-E{}-k{}-{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_mlp_matches_oracle(backend, shape, dtype):
    x, gate_up, down, weights, ids, _ = _mlp_inputs(*shape, dtype, device=device_for(backend))
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    out = moe_kernels.moe_mlp(*leaves, ids, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = reference.moe_mlp(*ref_leaves, ids)
    assert_close_rel(out, ref, dtype, "output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, g, leaf, r in zip(("x", "gate_up_proj", "down_proj", "weights"), grads, leaves, ref_grads):
        assert g.dtype == leaf.dtype
        assert_close_rel(g, r, dtype, f"grad {name}", factor=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,interleaved,bias", [("gelu", False, False), ("gelu_tanh", False, True),
                                                          ("relu", True, False), ("gpt_oss", True, True)])
def test_moe_mlp_activations_and_layouts(backend, activation, interleaved, bias):
    x, gate_up, down, weights, ids, (gub, db) = _mlp_inputs(11, 24, 16, 5, 2, "random", torch.float32, bias=bias,
                                                            device=device_for(backend))
    kwargs = dict(activation=activation, interleaved=interleaved, swiglu_limit=1.5 if activation == "gpt_oss" else None)
    leaves = [t.requires_grad_(True) for t in (x, gate_up, down, weights)]
    bias_leaves = [b.requires_grad_(True) for b in (gub, db) if b is not None]
    out = moe_kernels.moe_mlp(*leaves, ids, gate_up_bias=gub, down_bias=db, backend=backend, **kwargs)
    ref = reference.moe_mlp(*leaves, ids, gate_up_bias=gub, down_bias=db, **kwargs)
    assert_close_rel(out, ref, torch.float32, "output")
    grads = torch.autograd.grad(out.sum(), leaves + bias_leaves)
    ref_grads = torch.autograd.grad(ref.sum(), leaves + bias_leaves)
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, torch.float32, "gradient", factor=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 8, 33])
@pytest.mark.parametrize("activation", ["gelu", "identity"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_moe_matches_oracle(backend, rank, activation, dtype):
    num_tokens, hidden, num_experts, k = 21, 40, 7, 2
    device = device_for(backend)
    ids = make_ids("skip_last", num_tokens, num_experts, k, device=device)
    h = torch.randn(num_tokens, hidden).to(device, dtype)
    down = (torch.randn(num_experts, rank, hidden) / hidden ** 0.5).to(device, dtype)
    up = (torch.randn(num_experts, hidden, rank) / rank ** 0.5).to(device, dtype)
    weights = torch.rand(num_tokens, k).to(device)
    leaves = [t.clone().requires_grad_(True) for t in (h, down, up, weights)]
    out = moe_kernels.adapter_moe(*leaves, ids, activation=activation, scale=0.7, backend=backend)
    assert out.dtype == dtype
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = reference.adapter_moe(*ref_leaves, ids, activation=activation, scale=0.7)
    assert_close_rel(out, ref, dtype, "output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, g, r in zip(("h", "down", "up", "weights"), grads, ref_grads):
        assert_close_rel(g, r, dtype, f"grad {name}", factor=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_empty(backend):
    device = device_for(backend)
    x, gate_up, down, weights, ids, _ = _mlp_inputs(3, 8, 8, 4, 2, "random", torch.float32, device=device)
    out = moe_kernels.moe_mlp(x[:0], gate_up, down, weights[:0], ids[:0], backend=backend)
    assert out.shape == (0, 8)
    w, i = moe_kernels.route(torch.randn(0, 4, device=device), 2, backend=backend)
    assert w.shape == (0, 2) and i.shape == (0, 2) and i.dtype == torch.int32
    plan = moe_kernels.plan(ids[:0], 4, backend=backend)
    assert plan.expert_offsets.tolist() == [0] * 5 and plan.sorted_slots.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_ids_and_low_precision_weights_accepted(backend):
    x, gate_up, down, weights, ids, _ = _mlp_inputs(6, 16, 8, 4, 2, "random", torch.bfloat16,
                                                    device=device_for(backend))
    a = moe_kernels.moe_mlp(x, gate_up, down, weights.bfloat16(), ids.long(), backend=backend)
    b = moe_kernels.moe_mlp(x, gate_up, down, weights.bfloat16().float(), ids, backend=backend)
    torch.testing.assert_close(a, b)


# --- the oracle against Hugging Face's own code ---------------------------------------------------------

def test_reference_moe_mlp_equals_hf_mixtral_eager_experts():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=24, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(17, 24)
    logits, weights, ids = block.gate(x)
    expected = block.experts(x, ids, weights)
    got = reference.moe_mlp(x, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    ref_weights, ref_ids = reference.route(logits, 2)
    assert torch.equal(ref_ids.long(), ids)
    torch.testing.assert_close(ref_weights, weights)


def test_reference_moe_mlp_equals_hf_gpt_oss_eager_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    config = GptOssConfig(hidden_size=16, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
                          swiglu_limit=0.5)
    config._experts_implementation = "eager"
    experts = GptOssExperts(config)
    experts.limit = config.swiglu_limit  # transformers <= 5.17 hard-codes 7.0 here instead of reading the config
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(9, 16)
    weights = torch.rand(9, 2)
    ids = make_ids("random", 9, 4, 2).long()
    expected = experts(x, ids, weights)
    got = reference.moe_mlp(x, experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2), weights,
                            ids, activation="gpt_oss", gate_up_bias=experts.gate_up_proj_bias,
                            down_bias=experts.down_proj_bias, interleaved=True, swiglu_limit=config.swiglu_limit)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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


def test_route_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0]])
    weights, ids = moe_kernels.route(logits, 2)
    assert ids.tolist() == [[0, 3]]
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_route_ties_go_to_lower_index():
    weights, ids = moe_kernels.route(torch.zeros(3, 6), 3)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(weights, torch.full((3, 3), 1 / 3))
