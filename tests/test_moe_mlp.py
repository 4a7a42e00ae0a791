"""The moe_mlp op (gated expert MLP) on every backend that runs here against the oracle (``reference.moe_mlp``),
forward and every gradient, over the hard-case grid (one token, fewer tokens than a tile, k = 1, k = E, odd
widths, prime E, all tokens on one expert, an expert with no tokens), every activation, layout and bias; opcheck
of the registered expert ops; and the oracle itself against Hugging Face's own eager code.

A backend's inputs live on device_for(backend) (CUDA for triton/cuda with a GPU, else triton runs in Triton's
interpreter); the oracle runs on the same values. The sections after the shared tests hold each backend's own
grids; its private helpers (decode path, grouped row kernels, thread paths) are tested in tests/backends/.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_testing import (ACTIVATION_CASES, DTYPES, MLP_SHAPES, REL_TOL, assert_close_rel, backends_under_test,
                         check_mlp_against_oracle, check_native_mlp, device_for, hypothesis_settings, ids_and_weights,
                         make_ids, make_routing, mlp_problem, native_opcheck_cases, needs_cuda_kernels, needs_native,
                         needs_triton, oracle_for, permuted_ids, rel_err, routing_problem, seeded_mlp_inputs)

import moe_kernels
from moe_kernels import reference

BACKENDS = backends_under_test()

# ----------------------------------------------------------------------------------- every backend vs oracle

# (T, H, I, E, k, ids pattern): one token, tokens fewer than a tile, k = 1, k = E, odd H, prime E,
# all tokens on one expert, an expert with no tokens.
MLP_GRID = [
    (1, 16, 16, 4, 1, "random"),
    (5, 33, 24, 7, 7, "random"),
    (37, 64, 32, 5, 2, "one_expert"),
    (19, 48, 40, 13, 3, "skip_last"),
]


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
    ref = oracle_for(backend).moe_mlp(*ref_leaves, ids)  # the reference backend: against the naive loop
    assert_close_rel(out, ref, dtype, "output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, g, leaf, r in zip(("x", "gate_up_proj", "down_proj", "weights"), grads, leaves, ref_grads):
        assert g.dtype == leaf.dtype
        assert_close_rel(g, r, dtype, f"grad {name}", factor=2.0)


SOFTCAPS = (0.8, 1.2)  # Inkling2's soft caps scaled down so they bind on these inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,interleaved,bias,limit", [
    ("gelu", False, False, None), ("gelu_tanh", False, True, None), ("relu", True, False, None),
    ("gpt_oss", True, True, 1.5),    # GPT-OSS: interleaved rows, biases, clamp
    ("gpt_oss", False, False, 0.6),  # MiniMax-M3-VL: the same gate on concatenated halves
    ("silu", False, False, 0.5),     # DeepSeek-V4 / GLM-5 / HunYuan-V4: clamped SwiGLU
    ("gelu", True, True, 0.4),       # the clamp with any activation
    ("softcap_swiglu", False, True, None),  # Inkling2
])
def test_moe_mlp_activations_and_layouts(backend, activation, interleaved, bias, limit):
    x, gate_up, down, weights, ids, (gub, db) = _mlp_inputs(11, 24, 16, 5, 2, "random", torch.float32, bias=bias,
                                                            device=device_for(backend))
    kwargs = dict(activation=activation, interleaved=interleaved, swiglu_limit=limit,
                  softcaps=SOFTCAPS if activation == "softcap_swiglu" else None)
    leaves = [t.requires_grad_(True) for t in (x, gate_up, down, weights)]
    bias_leaves = [b.requires_grad_(True) for b in (gub, db) if b is not None]
    out = moe_kernels.moe_mlp(*leaves, ids, gate_up_bias=gub, down_bias=db, backend=backend, **kwargs)
    ref = oracle_for(backend).moe_mlp(*leaves, ids, gate_up_bias=gub, down_bias=db, **kwargs)
    assert_close_rel(out, ref, torch.float32, "output")
    # a random upstream gradient: with all ones (out.sum()) rows of it swapped between tokens would go unseen
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(out.device)
    grads = torch.autograd.grad(out, leaves + bias_leaves, upstream)
    ref_grads = torch.autograd.grad(ref, leaves + bias_leaves, upstream)
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, torch.float32, "gradient", factor=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_property(backend):
    """Hypothesis: random shapes, widths from 1, dtypes, skewed routing, every gated activation."""
    device = device_for(backend)

    @hypothesis_settings(backend)
    @given(problem=routing_problem(), hidden=st.integers(1, 40), inter=st.integers(1, 24),
           dtype=st.sampled_from(DTYPES), skew=st.booleans(), activation=st.sampled_from(reference.GATED_ACTIVATIONS))
    def check(problem, hidden, inter, dtype, skew, activation):
        num_tokens, num_experts, k, seed = problem
        ids, weights = ids_and_weights(num_tokens, num_experts, k, seed, skew, device)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
        gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
        down = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(device, dtype)
        caps = dict(softcaps=SOFTCAPS) if activation == "softcap_swiglu" else {}
        out = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation=activation, backend=backend, **caps)
        ref = oracle_for(backend).moe_mlp(x.float(), gate_up.float(), down.float(), weights, ids, activation=activation,
                                          **caps)
        assert out.dtype == dtype and out.shape == x.shape
        # relative error means nothing where the output sits near fp16's subnormal range (a hypothesis
        # example with outputs of ~3e-5 failed on rounding alone): compare where it is well inside the normals
        if ref.norm() > 1e-6 and ref.abs().max() >= 64 * torch.finfo(dtype).tiny:
            assert rel_err(out, ref) <= REL_TOL[dtype] * 2
        else:
            assert torch.isfinite(out).all()
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_empty_batch(backend):
    x, gate_up, down, weights, ids, _ = _mlp_inputs(3, 8, 8, 4, 2, "random", torch.float32,
                                                    device=device_for(backend))
    out = moe_kernels.moe_mlp(x[:0], gate_up, down, weights[:0], ids[:0], backend=backend)
    assert out.shape == (0, 8)
    # a training step on a batch without tokens: every input that needs grad gets a zero gradient
    leaves = {"gate_up": gate_up.requires_grad_(), "down": down.requires_grad_(),
              "weights": weights[:0].clone().requires_grad_()}
    out = moe_kernels.moe_mlp(x[:0], leaves["gate_up"], leaves["down"], leaves["weights"], ids[:0], backend=backend)
    out.sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_ids_and_low_precision_weights_accepted(backend):
    x, gate_up, down, weights, ids, _ = _mlp_inputs(6, 16, 8, 4, 2, "random", torch.bfloat16,
                                                    device=device_for(backend))
    a = moe_kernels.moe_mlp(x, gate_up, down, weights.bfloat16(), ids.long(), backend=backend)
    b = moe_kernels.moe_mlp(x, gate_up, down, weights.bfloat16().float(), ids, backend=backend)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- the oracle against Hugging Face

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


# ------------------------------------------------------- cpu backend (C++ ops expert_mlp_forward/backward)

CPU_MLP_SHAPES = [  # (T, H, I, E, k, pattern)
    (1, 8, 4, 4, 2, "random"),        # T = 1
    (13, 33, 10, 7, 3, "random"),     # odd H, prime E
    (24, 16, 8, 4, 1, "one_expert"),  # k = 1, all tokens on one expert
    (10, 12, 6, 5, 5, "random"),      # k = E
    (30, 16, 12, 8, 2, "skip_odd"),   # empty experts
]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_cpu_moe_mlp_matches_reference(act_case, shape, dtype):
    """The cpu backend's fused expert op."""
    check_native_mlp("fused", act_case, shape, dtype)


@needs_native
def test_cpu_moe_mlp_transposed_weight_views():
    # GPT-OSS stores gate_up as [E, H, 2I] and down as [E, I, H]: the op takes transposed views.
    g = torch.Generator().manual_seed(11)
    T, H, I, E, k = 20, 16, 8, 4, 2
    weights, ids = make_routing(T, E, k, "random", g, ids=permuted_ids)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gate_up_storage = torch.randn(E, H, 2 * I, generator=g, requires_grad=True)
    down_storage = torch.randn(E, I, H, generator=g, requires_grad=True)
    args = (x, gate_up_storage.transpose(1, 2), down_storage.transpose(1, 2), weights, ids)
    out = moe_kernels.moe_mlp(*args, activation="gpt_oss", interleaved=True, swiglu_limit=7.0, backend="cpu")
    ref = reference.moe_mlp(*args, "gpt_oss", None, None, True, 7.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    upstream = torch.randn(out.shape, generator=g)  # random: all ones would hide rows of it swapped between tokens
    got = torch.autograd.grad(out, (x, gate_up_storage, down_storage), upstream)
    want = torch.autograd.grad(ref, (x, gate_up_storage, down_storage), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("case", range(5))
def test_native_expert_ops_opcheck(case):
    op, args = native_opcheck_cases("expert_mlp_forward", "expert_mlp_backward")[case]
    torch.library.opcheck(op, args)


@needs_native
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_cpu_torch_compile_fullgraph_route_and_moe_mlp(compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(21)
    T, H, I, E, k = 16, 12, 6, 4, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    router = torch.randn(H, E, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
    down = torch.randn(E, H, I, generator=g, requires_grad=True)

    def block(x, gate_up, down, backend):
        weights, ids = moe_kernels.route(x @ router, k, backend=backend)
        return moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)

    block(x, gate_up, down, "cpu")  # loads the backends eagerly (backend modules import on first use)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out = compiled(x, gate_up, down, "cpu")
    ref = block(x, gate_up, down, "reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(out.sum(), (x, gate_up, down))
    want = torch.autograd.grad(ref.sum(), (x, gate_up, down))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- triton backend (triton/experts.py)

LOW_PRECISION = [torch.float16, torch.bfloat16]
GPU_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)

# (T, H, I, E, k, ids pattern): one token, fewer tokens than a tile, all tokens on one expert (several
# tiles), an expert without tokens, k = 1, k = E, odd sizes, prime E
TRITON_MLP_GRID = [
    (1, 32, 16, 4, 2, "random"),
    (5, 32, 16, 8, 2, "random"),
    (40, 16, 16, 3, 2, "one_expert"),
    (12, 32, 16, 6, 2, "skip_last"),
    (9, 33, 24, 5, 1, "random"),
    (6, 16, 8, 5, 5, "random"),
    (11, 17, 20, 7, 3, "random"),
]


def _check_triton_mlp(inputs, dtype, activation="silu", interleaved=False, swiglu_limit=None, factor=1.0):
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = inputs
    leaves = [t.detach().requires_grad_() if t is not None else None
              for t in (x, gate_up, down, weights, gate_up_bias, down_bias)]
    x, gate_up, down, weights, gate_up_bias, down_bias = leaves
    kwargs = dict(activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=interleaved,
                  swiglu_limit=swiglu_limit, softcaps=SOFTCAPS if activation == "softcap_swiglu" else None)
    y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="triton", **kwargs)
    want = reference.moe_mlp(x, gate_up, down, weights, ids, **kwargs)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_rel(y.float(), want.float(), dtype, "y", factor)
    upstream = torch.randn_like(want)
    names = ["x", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"]
    live = [(n, t) for n, t in zip(names, leaves) if t is not None]
    got = torch.autograd.grad(y, [t for _, t in live], upstream)
    ref = torch.autograd.grad(want, [t for _, t in live], upstream)
    for (name, leaf), a, b in zip(live, got, ref):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, name
        assert_close_rel(a.float(), b.float(), dtype, f"d {name}", 2 * factor)


@needs_triton
@pytest.mark.parametrize("shape", TRITON_MLP_GRID, ids=lambda s: "T{}-H{}-I{}-E{}-k{}-{}".format(*s))
def test_triton_moe_mlp_hard_cases_fp32(shape):
    _check_triton_mlp(seeded_mlp_inputs(*shape), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [TRITON_MLP_GRID[2], TRITON_MLP_GRID[6]], ids=["one_expert", "prime_E"])
def test_triton_moe_mlp_low_precision(dtype, shape):
    _check_triton_mlp(seeded_mlp_inputs(*shape, dtype=dtype), dtype)


@needs_triton
@pytest.mark.parametrize("activation,interleaved,bias,limit,transposed", [
    ("gelu", False, True, None, False),
    ("gelu_tanh", True, False, None, False),
    ("relu", False, True, None, True),
    ("gpt_oss", True, True, 0.7, True),     # GPT-OSS: transposed storage, interleaved, biases, clamp
    ("gpt_oss", False, False, None, False),
    ("silu", False, True, 0.5, False),      # DeepSeek-V4's clamped SwiGLU
    ("softcap_swiglu", False, True, None, True),  # Inkling2's soft-capped SwiGLU
])
def test_triton_moe_mlp_activations_layouts_biases(activation, interleaved, bias, limit, transposed):
    inputs = seeded_mlp_inputs(10, 24, 16, 5, 2, "skip_last", bias=bias, transposed=transposed)
    _check_triton_mlp(inputs, torch.float32, activation, interleaved, limit)


@needs_triton
def test_triton_moe_mlp_bf16_gpt_oss():
    inputs = seeded_mlp_inputs(8, 32, 16, 4, 2, "random", dtype=torch.bfloat16, bias=True, transposed=True)
    _check_triton_mlp(inputs, torch.bfloat16, "gpt_oss", True, 0.7)


@needs_triton
def test_triton_moe_mlp_bf16_softcap_swiglu():
    inputs = seeded_mlp_inputs(8, 32, 16, 4, 2, "random", dtype=torch.bfloat16, bias=True)
    _check_triton_mlp(inputs, torch.bfloat16, "softcap_swiglu")


@needs_triton
def test_triton_moe_mlp_recompute_mode(monkeypatch):
    # MOE_KERNELS_RECOMPUTE=1: forward keeps no pre-activation, backward re-runs the gate/up GEMM
    monkeypatch.setenv("MOE_KERNELS_RECOMPUTE", "1")
    inputs = seeded_mlp_inputs(9, 24, 16, 4, 2, "skip_last", bias=True)
    _check_triton_mlp(inputs, torch.float32, "gpt_oss", True, 0.7)


@needs_triton
def test_triton_moe_mlp_frozen_experts_and_no_grad():
    from moe_kernels.triton.experts import moe_mlp
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(7, 16, 16, 4, 2, "random")
    x.requires_grad_()
    with torch.no_grad():
        y_nograd = moe_mlp(x, gate_up, down, weights, ids)
    y = moe_mlp(x, gate_up, down, weights, ids)  # only x needs a gradient: no weight-gradient kernels
    torch.testing.assert_close(y_nograd, y.detach())
    (dx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference.moe_mlp(xr, gate_up, down, weights, ids).sum(), xr)
    assert_close_rel(dx, dx_ref, torch.float32, "dx")


@needs_triton
@pytest.mark.skipif(not GPU_SM90, reason="the grouped-GEMM weight gradients need an sm90+ GPU")
@pytest.mark.parametrize("wgrad", ["grouped_mm", "triton"])
@pytest.mark.parametrize("shape,activation,interleaved,limit,transposed", [
    ((40, 16, 16, 3, 2, "one_expert"), "silu", False, None, False),
    ((12, 32, 16, 6, 2, "skip_last"), "silu", False, None, False),    # an expert without rows
    ((70, 64, 48, 7, 2, "random"), "gelu_tanh", False, None, False),
    ((10, 24, 16, 5, 2, "skip_last"), "gpt_oss", True, 0.7, True),    # GPT-OSS layout, no biases
])
def test_triton_moe_mlp_weight_grads_both_ways(monkeypatch, wgrad, shape, activation, interleaved, limit, transposed):
    monkeypatch.setenv("MOE_KERNELS_WGRAD", wgrad)
    inputs = seeded_mlp_inputs(*shape, dtype=torch.bfloat16, transposed=transposed)
    _check_triton_mlp(inputs, torch.bfloat16, activation, interleaved, limit)


@needs_triton
def test_triton_moe_mlp_is_deterministic():
    from moe_kernels.triton.experts import moe_mlp
    inputs = seeded_mlp_inputs(12, 16, 16, 3, 3, "one_expert", dtype=torch.bfloat16)
    x, gate_up, down, weights, ids, _, _ = (t.detach().requires_grad_() if t is not None and t.is_floating_point()
                                            else t for t in inputs)
    runs = []
    for _ in range(2):
        y = moe_mlp(x, gate_up, down, weights, ids)
        runs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, gate_up, down, weights))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# The three forms the registered ops take: SwiGLU, no gate (ReLU^2), Inkling2's soft-capped SwiGLU (float[] caps).
OP_FORMS = {"silu": (True, None), "relu2": (False, None), "softcap_swiglu": (True, [0.8, 1.2])}


def _op_inputs(pattern, activation):
    """seeded_mlp_inputs with I = 16; without a gate the first weight (and its bias) keeps its first I rows.
    Returns the op's tensor inputs and (activation, interleaved, swiglu_limit, gated, softcaps)."""
    gated, softcaps = OP_FORMS[activation]
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = seeded_mlp_inputs(5, 16, 16, 3, 2, pattern, bias=True)
    if not gated:
        gate_up, gate_up_bias = gate_up[:, :16].contiguous(), gate_up_bias[:, :16].contiguous()
    return (x, gate_up, down, weights, ids, gate_up_bias, down_bias), (activation, False, None, gated, softcaps)


@needs_triton
@pytest.mark.parametrize("activation", list(OP_FORMS))
def test_triton_moe_mlp_op_passes_opcheck(activation):
    from moe_kernels.triton.experts import moe_mlp_forward_op
    tensors, options = _op_inputs("random", activation)
    for t in tensors[:4]:
        t.requires_grad_()
    torch.library.opcheck(moe_mlp_forward_op, (*tensors, *options, True))


@needs_triton
@pytest.mark.parametrize("activation", list(OP_FORMS))
def test_triton_moe_mlp_backward_op_passes_opcheck(activation):
    from moe_kernels.triton.experts import moe_mlp_backward_op, moe_mlp_forward_op
    tensors, options = _op_inputs("skip_last", activation)
    x, gate_up, ids = tensors[0], tensors[1], tensors[4]
    _, pre, expert_offsets, sorted_slots, tiles = moe_mlp_forward_op(*tensors, *options, True)
    assert pre.shape == (ids.numel(), gate_up.shape[1])  # [N, 2I] gated, [N, I] without a gate
    for need_x, need_params in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(moe_mlp_backward_op, (torch.randn_like(x), *tensors, pre, expert_offsets, sorted_slots,
                                                    tiles, *options, need_x, need_params))


@needs_triton
def test_triton_moe_mlp_ops_are_not_differentiable_alone():
    """The registered ops carry no autograd formula (MoeMLPFunction does): their outputs never require grad, so a
    backward through a bare op fails loudly instead of returning no gradient."""
    from moe_kernels.triton.experts import moe_mlp_forward_op
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(4, 16, 16, 3, 2, "random")
    x.requires_grad_()
    y = moe_mlp_forward_op(x, gate_up, down, weights, ids, None, None, "silu", False, None, True, None, True)[0]
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


@needs_triton
def test_triton_torch_compile_fullgraph_route_and_moe_mlp():
    """The triton path (autograd.Functions around registered ops) traces whole under torch.compile, forward and
    backward, and matches eager."""
    torch._dynamo.reset()
    device = device_for("triton")
    g = torch.Generator().manual_seed(22)
    T, H, I, E, k = 9, 16, 16, 5, 2
    x = torch.randn(T, H, generator=g).to(device).requires_grad_()
    router = torch.randn(H, E, generator=g).to(device)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device).requires_grad_()

    def block(x, gate_up, down):
        weights, ids = moe_kernels.route(x @ router, k, backend="triton")
        return moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="triton")

    ref = block(x, gate_up, down)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, gate_up, down)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.square().sum(), (x, gate_up, down))
    want = torch.autograd.grad(ref.square().sum(), (x, gate_up, down))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.parametrize("activation", list(OP_FORMS))
def test_triton_moe_mlp_inference_op_passes_opcheck(activation):
    """The no-gradient op at one token (the GEMV path), at a decode size (3 tokens) and, for the plain SwiGLU, past the
    decode config's BLOCK_M (the planned forward inside the same op)."""
    from moe_kernels.triton import configs
    from moe_kernels.triton.experts import moe_mlp_inference_op
    (x, gate_up, down, weights, ids, gate_up_bias, down_bias), options = _op_inputs("random", activation)
    for T in (1, 3):
        torch.library.opcheck(moe_mlp_inference_op, (x[:T], gate_up, down, weights[:T], ids[:T], gate_up_bias,
                                                     down_bias, *options))
    if activation == "silu":
        T = configs.decode_config(1, fp32=True)["BLOCK_M"] // 2 + 1  # k = 2: one slot past the decode path
        x, gate_up, down, weights, ids, gate_up_bias, down_bias = seeded_mlp_inputs(T, 16, 16, 3, 2, "random", bias=True)
        assert configs.decode_config(ids.numel(), fp32=True) is None
        torch.library.opcheck(moe_mlp_inference_op, (x, gate_up, down, weights, ids, gate_up_bias, down_bias, *options))


# ------------------------------------------------------- cuda backend (the grouped expert path on CUDA tensors)

def _cuda_backend_mlp(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale, softcaps=None):
    """The public op on the cuda backend (validation, plan, the expert path the backend picks)."""
    return moe_kernels.moe_mlp(x, w1, w2, weights, ids, activation=activation, gate_up_bias=b1, down_bias=b2,
                               interleaved=interleaved, swiglu_limit=limit, gated=gated, softcaps=softcaps,
                               backend="cuda")


@needs_cuda_kernels
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_cuda_moe_mlp_bf16(act_case, shape):
    check_mlp_against_oracle(_cuda_backend_mlp, shape, torch.bfloat16, act_case, device="cuda")


@needs_cuda_kernels
@pytest.mark.parametrize("shape", [(512, 256, 128, 64, 8, "random"), (300, 128, 96, 16, 2, "one_expert"),
                                   (64, 2048, 768, 128, 8, "random")], ids=str)
def test_cuda_moe_mlp_larger_shapes(shape):
    check_mlp_against_oracle(_cuda_backend_mlp, shape, torch.bfloat16, ACTIVATION_CASES[0], device="cuda")


@needs_cuda_kernels
def test_cuda_moe_mlp_many_experts_fallback():
    """More experts than torch's CUTLASS grouped GEMM takes (1023): the documented per-expert fallback."""
    T, H, I, E, k = 24, 16, 8, 1100, 2
    t, ids, grad = mlp_problem((T, H, I, E, k, "random"), torch.bfloat16, False, device="cuda")
    out = moe_kernels.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, backend="cuda")
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids)
    assert_close_rel(out, ref, torch.bfloat16, "output")


@needs_cuda_kernels
def test_cuda_moe_mlp_fallback_error_mode(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_CUDA_FALLBACK", "error")
    t, ids, _ = mlp_problem(MLP_SHAPES[1], torch.float32, False, device="cuda")
    with pytest.raises(moe_kernels.BackendError, match="grouped GEMM"):
        moe_kernels.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, backend="cuda")
