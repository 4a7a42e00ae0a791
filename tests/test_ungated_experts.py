"""Experts without a gate (``moe_mlp(..., gated=False)``: y[t] = sum_j w[t,j] * down_e(act(up_e x_t))), Nemotron-H's
form, on every backend that runs here against the oracle: forward and every gradient over the hard-case grid, the
elementwise activations (ReLU^2 first), biases, the decode path and the recompute mode; the arguments it refuses;
and Hugging Face's NemotronHExperts (ReLU^2, its default) run through the experts implementation against
transformers' own forward, with the up projection passed as it is (no copy)."""

from __future__ import annotations

import pytest
import torch
from moe_testing import (DTYPES, assert_close_rel, backends_under_test, check_hf_experts_against_transformers,
                         device_for, make_ids, oracle_for)

import moe_kernels
from moe_kernels import reference, spec

BACKENDS = backends_under_test()

# (T, H, I, E, k, ids pattern): one token, tokens fewer than a tile, k = E, odd widths, prime E, all tokens on one
# expert, an expert with no tokens.
GRID = [
    (1, 16, 16, 4, 1, "random"),
    (5, 33, 24, 7, 7, "random"),
    (37, 64, 31, 5, 2, "one_expert"),
    (19, 48, 40, 13, 3, "skip_last"),
]


def _inputs(num_tokens, hidden, inter, num_experts, k, pattern, dtype, bias, device):
    """Drawn on the CPU (the same values on every machine), then moved to ``device``."""
    g = torch.Generator().manual_seed(num_tokens * 131 + inter)
    ids = make_ids(pattern, num_tokens, num_experts, k, generator=g, device=device)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = rand(num_tokens, hidden)
    up = rand(num_experts, inter, hidden, scale=hidden ** -0.5)
    down = rand(num_experts, hidden, inter, scale=inter ** -0.5)
    weights = torch.rand(num_tokens, k, generator=g).to(device)
    biases = (rand(num_experts, inter, scale=0.3), rand(num_experts, hidden, scale=0.3)) if bias else (None, None)
    return x, up, down, weights, ids, biases


def _check(backend, shape, dtype, activation, bias):
    device = device_for(backend)
    x, up, down, weights, ids, (up_bias, down_bias) = _inputs(*shape, dtype, bias, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, up, down, weights)]
    bias_leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (up_bias, down_bias)]
    out = moe_kernels.moe_mlp(*leaves, ids, activation=activation, gated=False, gate_up_bias=bias_leaves[0],
                              down_bias=bias_leaves[1], backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref_bias = [t.detach().float().requires_grad_(True) if t is not None else None for t in bias_leaves]
    ref = oracle_for(backend).moe_mlp(*ref_leaves, ids, activation=activation, gate_up_bias=ref_bias[0],
                                      down_bias=ref_bias[1], gated=False)  # the reference backend: the naive loop
    assert_close_rel(out, ref, dtype, "output")
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(device)
    got = torch.autograd.grad(out, leaves + [b for b in bias_leaves if b is not None], grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves + [b for b in ref_bias if b is not None], grad)
    names = ["x", "up_proj", "down_proj", "weights", "up_bias", "down_bias"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == (torch.float32 if name == "weights" else dtype), name
        assert_close_rel(a, b, dtype, f"grad {name}", factor=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "T{}-H{}-I{}-E{}-k{}-{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ungated_relu2_matches_oracle(backend, shape, dtype):
    _check(backend, shape, dtype, "relu2", bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", spec.ELEMENTWISE_ACTIVATIONS)
def test_ungated_every_activation_with_biases(backend, activation):
    _check(backend, (11, 40, 24, 6, 2, "random"), torch.float32, activation, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_ungated_inference_matches_oracle(backend, num_tokens):
    """Without gradients (the decode path on triton for few slots): output only."""
    device = device_for(backend)
    x, up, down, weights, ids, (up_bias, down_bias) = _inputs(num_tokens, 48, 40, 8, 2, "random", torch.float32,
                                                              True, device)
    with torch.no_grad():
        out = moe_kernels.moe_mlp(x, up, down, weights, ids, activation="relu2", gated=False, gate_up_bias=up_bias,
                                  down_bias=down_bias, backend=backend)
    ref = oracle_for(backend).moe_mlp(x, up, down, weights, ids, activation="relu2", gate_up_bias=up_bias,
                                      down_bias=down_bias, gated=False)
    assert_close_rel(out, ref, torch.float32, "output")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_ungated_recompute_mode(backend, monkeypatch):
    """MOE_KERNELS_RECOMPUTE=1: the backward re-runs the up GEMM (pre [N, I]) instead of keeping it."""
    monkeypatch.setenv("MOE_KERNELS_RECOMPUTE", "1")
    _check(backend, (9, 32, 24, 5, 2, "random"), torch.float32, "relu2", bias=True)


def test_relu2_is_relu_squared_with_its_derivative():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], dtype=torch.float64, requires_grad=True)
    y = reference.apply_activation(z, "relu2")
    torch.testing.assert_close(y, torch.relu(z) ** 2)
    (grad,) = torch.autograd.grad(y.sum(), z)
    torch.testing.assert_close(grad, 2 * torch.relu(z.detach()))


def test_gated_false_equals_the_gated_form_with_a_unit_up_half():
    """act(up x + b) is the gated act(gate) * up with gate := up_proj and an "up" half of zero rows and bias one:
    the two contracts agree (the oracle on both sides)."""
    x, up, down, weights, ids, (up_bias, down_bias) = _inputs(13, 24, 16, 5, 2, "random", torch.float32, True, "cpu")
    ungated = reference.moe_mlp(x, up, down, weights, ids, activation="relu", gate_up_bias=up_bias,
                                down_bias=down_bias, gated=False)
    gate_up = torch.cat([up, torch.zeros_like(up)], dim=1)
    gate_up_bias = torch.cat([up_bias, torch.ones_like(up_bias)], dim=1)
    gated = reference.moe_mlp(x, gate_up, down, weights, ids, activation="relu", gate_up_bias=gate_up_bias,
                              down_bias=down_bias)
    torch.testing.assert_close(ungated, gated)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(activation="gpt_oss"), ValueError, "activation"),
    (dict(activation="relu2", interleaved=True), ValueError, "interleaved"),
    (dict(activation="relu2", swiglu_limit=7.0), ValueError, "swiglu_limit"),
    (dict(activation="relu2", gated=1), TypeError, "gated"),
])
def test_ungated_refuses_gated_only_arguments(kwargs, error, match):
    x, up, down, weights, ids, _ = _inputs(4, 16, 8, 3, 1, "random", torch.float32, False, "cpu")
    kwargs = {"gated": False, **kwargs}
    with pytest.raises(error, match=match):
        moe_kernels.moe_mlp(x, up, down, weights, ids, backend="reference", **kwargs)


def test_shapes_are_checked_against_the_gate_flag():
    x, up, down, weights, ids, _ = _inputs(4, 16, 8, 3, 1, "random", torch.float32, False, "cpu")
    with pytest.raises(ValueError, match="intermediate size"):  # an ungated up_proj taken as gated: I = 4 != 8
        moe_kernels.moe_mlp(x, up, down, weights, ids, activation="relu", backend="reference")
    gate_up = torch.cat([up, up], dim=1)
    with pytest.raises(ValueError, match="intermediate size"):  # a gated [E, 2I, H] weight with gated=False
        moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="relu", gated=False, backend="reference")
    with pytest.raises(ValueError, match="gate_up_bias"):
        moe_kernels.moe_mlp(x, up, down, weights, ids, activation="relu", gated=False,
                            gate_up_bias=torch.zeros(3, 16), backend="reference")
    with pytest.raises(ValueError, match="activation"):  # relu2 is elementwise only
        moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="relu2", backend="reference")


# ------------------------------------------------------------------------------- Hugging Face's Nemotron-H experts

transformers = pytest.importorskip("transformers")


def _nemotron_experts(**overrides):
    try:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    except ImportError:
        pytest.skip("this transformers has no nemotron_h")
    config = transformers.NemotronHConfig(hidden_size=32, moe_intermediate_size=24, n_routed_experts=8,
                                          num_experts_per_tok=2, **overrides)
    experts = NemotronHExperts(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.4)
    return experts


def test_nemotron_h_default_activation_is_relu2_and_runs_ungated():
    from moe_kernels.hf.experts import describe_experts

    experts = _nemotron_experts()
    assert type(experts.act_fn).__name__ == "ReLUSquaredActivation"  # the config's default mlp_hidden_act
    info = describe_experts(experts)
    assert (info["has_gate"], info["activation"]) == (False, "relu2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nemotron_h_experts_match_transformers(backend):
    check_hf_experts_against_transformers(_nemotron_experts().to(device_for(backend)), backend, "nemotron_h")


def test_nemotron_h_up_projection_is_passed_without_a_copy(monkeypatch):
    """The ungated path hands moe_mlp the module's own up_proj (the gated emulation concatenated a zero half, a
    copy of every expert's weights on every forward)."""
    from moe_kernels.hf import experts as hf_experts

    experts = _nemotron_experts()
    seen = {}
    real = moe_kernels.moe_mlp

    def spy(x, gate_up_proj, *args, **kwargs):
        seen.update(gate_up_proj=gate_up_proj, gated=kwargs.get("gated"))
        return real(x, gate_up_proj, *args, **kwargs)

    monkeypatch.setattr(hf_experts.moe_kernels, "moe_mlp", spy)
    setattr(experts, hf_experts.BACKEND_ATTRIBUTE, "reference")
    x = torch.randn(3, 32)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    hf_experts.moe_kernels_experts_forward(experts, x, ids, torch.full((3, 2), 0.5))
    assert seen["gated"] is False
    assert seen["gate_up_proj"] is experts.up_proj


def test_relu2_in_a_gated_experts_module_is_refused():
    """ReLU^2 is elementwise only: a gated family configured with it gets a clear error, not a wrong result."""
    from moe_kernels.hf.experts import UnsupportedExpertsError, describe_experts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, hidden_act="relu2")
    with pytest.raises(UnsupportedExpertsError, match="gated"):
        describe_experts(Qwen3MoeExperts(config))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])  # the oracle loops over experts
def test_ungated_and_softcapped_forms_compile_fullgraph(backend):
    """torch.compile (aot_eager: the ops' fake kernels, fullgraph) of both newer forms -- an ungated ReLU^2 MLP and
    Inkling2's soft-capped SwiGLU (its caps a float[] argument of the registered ops) -- matches eager, forward and
    gradients."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(12)
    T, H, I, E, k = 9, 16, 16, 5, 2
    x = torch.randn(T, H, generator=g).to(device).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device).requires_grad_()
    up = (torch.randn(E, I, H, generator=g) * H ** -0.5).to(device).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device).requires_grad_()
    weights = torch.rand(T, k, generator=g).to(device)
    ids = make_ids("random", T, E, k, generator=g, device=device)

    def block(x, gate_up, up, down):
        capped = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="softcap_swiglu",
                                     softcaps=(0.8, 1.2), backend=backend)
        ungated = moe_kernels.moe_mlp(x, up, down, weights, ids, activation="relu2", gated=False, backend=backend)
        return capped + ungated

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = (x, gate_up, up, down)
    got, want = compiled(*leaves), block(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(a, b)


def test_sparse_moe_layer_without_a_gate():
    """layers.SparseMoE(gated=False) holds up_proj [E, I, H] (no gate_up_proj) and runs the ungated op: equal to
    the naive loop on its own routing (the layer runs the reference backend: reference.moe_mlp on the same arguments
    would check only the wiring), and its state dict round-trips."""
    from moe_kernels.layers import SparseMoE

    torch.manual_seed(4)
    layer = SparseMoE(16, 8, num_experts=5, top_k=2, activation="relu2", gated=False, backend="reference")
    assert dict((n, tuple(p.shape)) for n, p in layer.named_parameters()) == {
        "up_proj": (5, 8, 16), "down_proj": (5, 16, 8), "router.weight": (5, 16)}
    x = torch.randn(2, 3, 16)
    _, weights, ids = layer.route(x.reshape(-1, 16))
    want = oracle_for("reference").moe_mlp(x.reshape(-1, 16), layer.up_proj, layer.down_proj, weights, ids,
                                           activation="relu2", gated=False)
    torch.testing.assert_close(layer(x).reshape(-1, 16), want)
    twin = SparseMoE(16, 8, num_experts=5, top_k=2, activation="relu2", gated=False, backend="reference")
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin(x), layer(x))
