"""The experts gates moe_kernels recognises from an experts class's ``_apply_gate`` source
(moe_kernels.hf.experts.gate_form), and experts-level parity with transformers' own forward for each family that
uses one: the clamped SwiGLU (DeepSeek-V4, GLM-5-next, HunYuan-V4) and GPT-OSS's SwiGLU on concatenated halves
(MiniMax-M3-VL, OpenAI privacy filter), act(gate) * up in fp32 (Beam) and with GELU-tanh (Gemma 4, DiffusionGemma),
GPT-OSS itself as the control. Output and every gradient, per backend, with
a clamp that binds."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("transformers")

import moe_kernels  # noqa: E402

from moe_kernels.hf.experts import (GateForm, UnsupportedExpertsError, describe_experts, gate_form,  # noqa: E402
                                    moe_kernels_experts_forward)
from moe_kernels.hf.experts import BACKEND_ATTRIBUTE  # noqa: E402
from moe_kernels.hf.families import EXPERTS_PARITY_TESTED, families_table  # noqa: E402
from moe_testing import backends_under_test, check_hf_experts_against_transformers, device_for  # noqa: E402

# model_type -> (config class, experts class, expected activation, interleaved)
FAMILIES = {
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4Experts", "silu", False),
    "glm5_next": ("Glm5NextTextConfig", "Glm5NextTextExperts", "silu", False),
    "hy_v4": ("HYV4Config", "HYV4Experts", "silu", False),
    "minimax_m3_vl": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLExperts", "gpt_oss", False),
    "openai_privacy_filter": ("OpenAIPrivacyFilterConfig", "OpenAIPrivacyFilterExperts", "gpt_oss", False),
    "gpt_oss": ("GptOssConfig", "GptOssExperts", "gpt_oss", True),
    "beam": ("BeamConfig", "BeamExperts", "silu", False),  # act(gate) * up in fp32, no clamp
    # act_fn(gate, up): Inkling2's soft-capped SwiGLU, caps small enough to bind (GATE_CAP, UP_CAP)
    "inkling2": ("Inkling2TextConfig", "Inkling2Experts", "softcap_swiglu", False),
    # act(gate) * up with Gemma's gelu_pytorch_tanh (k named top_k_experts in their configs)
    "gemma4": ("Gemma4TextConfig", "Gemma4TextExperts", "gelu_tanh", False),
    "diffusion_gemma": ("DiffusionGemmaTextConfig", "DiffusionGemmaTextExperts", "gelu_tanh", False),
}
LIMIT = 0.5  # small enough that the clamp binds on the random pre-activations below
GATE_CAP, UP_CAP = 1.0, 1.5  # Inkling2's soft caps (defaults 4 and 25), small enough to bind here


def _experts(model_type: str):
    config_name, experts_name, _, _ = FAMILIES[model_type]
    try:
        config_module = importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
        model_module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        pytest.skip(f"this transformers has no {model_type}")
    config = getattr(config_module, config_name)(
        hidden_size=32, intermediate_size=16, moe_intermediate_size=16, num_local_experts=8, n_routed_experts=8,
        num_experts=8, num_experts_per_tok=2, top_k_experts=2, swiglu_limit=LIMIT, mlp_gate_softcap=GATE_CAP,
        mlp_up_softcap=UP_CAP)
    experts = getattr(model_module, experts_name)(config)
    form = gate_form(type(experts))
    if form.limit_attribute is not None:
        setattr(experts, form.limit_attribute, LIMIT)  # some transformers versions hard-code GPT-OSS's 7.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * (0.5 if param.dim() == 3 else 0.2))
    return experts


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_gate_form_is_recognised(model_type):
    experts = _experts(model_type)
    _, _, activation, interleaved = FAMILIES[model_type]
    info = describe_experts(experts)
    limit = LIMIT if gate_form(type(experts)).limit_attribute else None
    assert (info["activation"], info["interleaved"], info["swiglu_limit"]) == (activation, interleaved, limit)
    assert info["softcaps"] == ((GATE_CAP, UP_CAP) if activation == "softcap_swiglu" else None)
    row = next(r for r in families_table() if r["model_type"] == model_type)
    assert row["status"] != "unsupported", row


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_experts_match_transformers(model_type, backend):
    experts = _experts(model_type).to(device_for(backend))
    x, ids, weights, want = check_hf_experts_against_transformers(experts, backend, model_type)

    if info_caps := describe_experts(experts)["softcaps"]:  # the soft caps bind here, as the clamp below does
        experts.act_fn.gate_softcap.softcap = experts.act_fn.up_softcap.softcap = 1e9
        with torch.no_grad():
            uncapped = experts(x, ids, weights)
        assert (uncapped - want).norm() > 1e-2 * want.norm(), info_caps
        return
    # the clamp binds here: without it, transformers' own output changes
    if gate_form(type(experts)).limit_attribute is None:
        return
    setattr(experts, gate_form(type(experts)).limit_attribute, 1e9)
    with torch.no_grad():
        unclamped = experts(x, ids, weights)
    assert (unclamped - want).norm() > 1e-2 * want.norm()


# _apply_gate sources that must stay "custom" (near misses of a recognised form), and one recognised
class _ExtraExpression:  # the clamped SwiGLU, plus code around its return
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return torch.nn.functional.silu(gate) * up if False else F.silu(gate) * up  # noqa: F821


class _OtherActivation:
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return F.gelu(gate) * up  # noqa: F821


class _TwoLimits:
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.a)
        up = up.clamp(min=-self.b, max=self.b)
        return F.silu(gate) * up  # noqa: F821


class _OneSidedUp:
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(max=self.limit)
        return F.silu(gate) * up  # noqa: F821


class _OtherOffset:
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 2.0) * glu


class _Recognised:
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return F.silu(gate) * up  # noqa: F821


def test_softcap_description_follows_the_caps_and_refuses_other_pair_activations():
    """The cached description is keyed on the caps (they live on act_fn's submodules); an act_fn(gate, up) module
    of another kind is refused by name."""
    from moe_kernels.hf.experts import _cached_description

    experts = _experts("inkling2")
    assert _cached_description(experts)["softcaps"] == (GATE_CAP, UP_CAP)
    experts.act_fn.up_softcap.softcap = 3.0
    assert _cached_description(experts)["softcaps"] == (GATE_CAP, 3.0)

    class OtherPair(torch.nn.Module):
        def forward(self, gate, up):
            return gate * up

    experts.act_fn = OtherPair()
    with pytest.raises(UnsupportedExpertsError, match="OtherPair"):
        describe_experts(experts)


def test_unknown_gates_stay_custom():
    assert gate_form(_Recognised) == GateForm("act", limit_attribute="swiglu_limit", act_fn=False)
    for cls in (_ExtraExpression, _OtherActivation, _TwoLimits, _OneSidedUp, _OtherOffset):
        assert gate_form(cls).kind == "custom", cls.__name__


def test_a_limit_that_is_not_a_finite_number_is_refused():
    experts = _experts("deepseek_v4")
    experts.limit = float("nan")
    with pytest.raises(UnsupportedExpertsError, match="limit"):
        describe_experts(experts)
    experts.limit = float("inf")  # a clamp at +inf changes nothing: run without one
    assert describe_experts(experts)["swiglu_limit"] is None


@pytest.mark.parametrize("model_type", ["deepseek_v4", "minimax_m3_vl", "inkling2", "gpt_oss"])
def test_recognised_gates_trace_under_torch_compile(model_type):
    """The gate (and Inkling2's soft caps) is read from source once per class; torch.compile folds that reading, so a
    compiled forward of a fresh class traces whole (fullgraph) on the cpu backend (the reference oracle has
    data-dependent shapes and never traces whole)."""
    if "cpu" not in moe_kernels.available_backends():
        pytest.skip("the cpu backend (moe_kernels._C) is not built here")
    experts = _experts(model_type)
    setattr(experts, BACKEND_ATTRIBUTE, "cpu")
    gate_form.cache_clear()  # as in a new process: the first call is the compiled one
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)])
    weights = torch.softmax(torch.randn(5, 2, generator=g), -1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: moe_kernels_experts_forward(experts, x, ids, weights), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), experts(x, ids, weights), rtol=1e-5, atol=1e-6)


def test_the_families_table_names_exactly_these_families():
    # muse_spark's experts (a post-expert norm, not a gate form) are compared in tests/test_hf_post_expert_norm.py
    assert EXPERTS_PARITY_TESTED == set(FAMILIES) | {"muse_spark"}
