"""The fused router forwards of the newer Hugging Face families (moe_kernels.hf.routers: AFMoE, Aria, AXK2, Beam,
Cohere2-MoE, dots3/HunYuan-V3, ERNIE-4.5-MoE, Flint, HunYuan-V1-MoE's gate, Inkling2, Kolibri1, Laguna, LaraMini, MiniMax-M2/M3-VL,
Mistral-Large-4, MuseSpark, OpenAI privacy filter) against the transformers forwards they replace, router by router, in fp32
and bf16: logits, ids, weights (dtype included) and the gradients into the hidden states and every router parameter
(tests/test_hf_route_parity.compare_router_forwards). Each case uses the family's own config class with its options
set both ways where the router branches on them (norm_topk_prob, groups, scoring function, soft cap), a nonzero
correction bias and k = 1 / k = E cases. Families missing from this transformers are skipped."""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_kernels.hf import families  # noqa: E402
from moe_kernels.hf import routers as fused  # noqa: E402
from test_hf_route_parity import compare_router_forwards  # noqa: E402

HIDDEN = 24
E = 8
COMMON = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=4, num_experts=E, num_local_experts=E,
              n_routed_experts=E, moe_num_experts=E, num_experts_per_tok=2, moe_topk=2)


def _choice_bias() -> torch.Tensor:
    """A nonzero choice bias [E], as the MoE blocks of AFMoE, dots3, HunYuan-V3 and MiniMax-M2 pass to forward."""
    return torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.3


# (case id, variant, "module:RouterClass", "ConfigClass", config overrides, extra forward args (None: none;
# "bias": a bias tensor [E]), 3-D hidden states)
CASES = [
    ("afmoe", "afmoe", "afmoe:AfmoeTokenChoiceRouter", "AfmoeConfig", dict(route_scale=1.7), "bias", True),
    ("aria", "aria", "aria:AriaTextTopKRouter", "AriaTextConfig", {}, None, False),
    ("aria-k=E", "aria", "aria:AriaTextTopKRouter", "AriaTextConfig", dict(moe_topk=E), None, False),
    ("axk2", "axk2", "axk2:AXK2TopkRouter", "AXK2Config",
     dict(n_group=None, topk_group=None, norm_topk_prob=True, routed_scaling_factor=2.5), None, False),
    ("axk2-groups-original", "axk2", "axk2:AXK2TopkRouter", "AXK2Config",
     dict(n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.0), None, False),
    ("beam", "beam", "beam:BeamTopKRouter", "BeamConfig", dict(n_group=4, topk_group=2, norm_topk_prob=True),
     None, False),
    ("beam-no-norm-k=1", "beam", "beam:BeamTopKRouter", "BeamConfig",
     dict(n_group=2, topk_group=1, norm_topk_prob=False, num_experts_per_tok=1), None, False),
    ("cohere2_moe-softmax", "cohere2_moe", "cohere2_moe:Cohere2MoeTopKRouter", "Cohere2MoeConfig",
     dict(expert_selection_fn="softmax"), None, False),
    ("cohere2_moe-sigmoid", "cohere2_moe", "cohere2_moe:Cohere2MoeTopKRouter", "Cohere2MoeConfig",
     dict(expert_selection_fn="sigmoid", norm_topk_prob=True), None, False),
    ("dots3_note", "dots3_note", "dots3_note:Dots3NoteVisionTopKRouter", "Dots3NoteVisionConfig",
     dict(router_scaling_factor=2.0, adapter_in_dim=HIDDEN, allow_global_per_layer_attribute_access=True), "bias",
     False),
    ("hy_v3", "dots3_note", "hy_v3:HYV3TopKRouter", "HYV3Config", dict(router_scaling_factor=1.5), "bias", False),
    ("ernie4_5_moe", "ernie4_5_moe", "ernie4_5_moe:Ernie4_5_MoeTopKRouter", "Ernie4_5_MoeConfig", {}, None, False),
    ("ernie4_5_moe-norm_min-binds", "ernie4_5_moe", "ernie4_5_moe:Ernie4_5_MoeTopKRouter", "Ernie4_5_MoeConfig",
     dict(moe_norm_min=2.0), None, False),
    ("flint", "flint", "flint:FlintTopKRouter", "FlintConfig", dict(norm_topk_prob=True), None, False),
    ("flint-no-norm", "flint", "flint:FlintTopKRouter", "FlintConfig", dict(norm_topk_prob=False), None, False),
    # HunYuan-V1-MoE's gate (a *Gate class): softmax, renormalised; logits in the gate Linear's dtype, and fp32 when
    # that Linear stays fp32 in a bf16 model (it is built fp32), k = E too
    ("hunyuan_v1_moe", "hunyuan_v1_moe", "hunyuan_v1_moe:HunYuanMoEV1Gate", "HunYuanMoEV1Config", {}, None, True),
    ("hunyuan_v1_moe-fp32-gate", "hunyuan_v1_moe", "hunyuan_v1_moe:HunYuanMoEV1Gate", "HunYuanMoEV1Config", {}, None,
     False),
    ("hunyuan_v1_moe-k=E", "hunyuan_v1_moe", "hunyuan_v1_moe:HunYuanMoEV1Gate", "HunYuanMoEV1Config",
     dict(moe_topk=E), None, False),
    # the router stays fp32 in a bf16 model (Inkling2 keeps it in fp32 and routes in fp32)
    ("inkling2", "inkling2", "inkling2:Inkling2TopKRouter", "Inkling2TextConfig", dict(routed_scaling_factor=2.0),
     None, False),
    ("kolibri1", "kolibri1", "kolibri1:Kolibri1TopKRouter", "Kolibri1Config", dict(norm_topk_prob=True), None,
     False),
    ("laguna-softcap", "laguna", "laguna:LagunaTopKRouter", "LagunaConfig", dict(moe_router_logit_softcapping=2.0),
     None, False),
    ("laguna", "laguna", "laguna:LagunaTopKRouter", "LagunaConfig", dict(moe_router_logit_softcapping=0.0), None,
     False),
    ("lara_mini", "lara_mini", "lara_mini:LaraMiniTopKRouter", "LaraMiniConfig", dict(norm_topk_prob=True), None,
     False),
    ("minimax_m2", "minimax_m2", "minimax_m2:MiniMaxM2TopKRouter", "MiniMaxM2Config", {}, "bias", False),
    ("minimax_m3_vl", "minimax_m3_vl", "minimax_m3_vl:MiniMaxM3VLTopKRouter", "MiniMaxM3VLTextConfig", {}, None,
     False),
    ("mistral_large4", "mistral_large4", "mistral_large4:MistralLarge4TextTopkRouter", "MistralLarge4TextConfig",
     dict(n_group=4, topk_group=2, routed_scaling_factor=1.5), None, False),
    ("muse_spark", "muse_spark", "muse_spark:MuseSparkTopkRouter", "MuseSparkTextConfig",
     dict(output_multiplier=0.7, routed_scaling_factor=2.0), None, False),
    ("openai_privacy_filter", "openai_privacy_filter", "openai_privacy_filter:OpenAIPrivacyFilterTopKRouter",
     "OpenAIPrivacyFilterConfig", dict(num_experts_per_tok=3), None, False),
]


def _build(router_path: str, config_name: str, overrides: dict):
    module_name, class_name = router_path.split(":")
    try:
        modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        configuration = importlib.import_module(f"transformers.models.{module_name}.configuration_{module_name}")
    except ImportError:
        pytest.skip(f"this transformers has no {module_name}")
    config = getattr(configuration, config_name)(**{**COMMON, **overrides})
    router = getattr(modeling, class_name)(config)
    g = torch.Generator().manual_seed(len(router_path))
    with torch.no_grad():
        for param in router.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
        for name, buffer in router.named_buffers():
            if "bias" in name:  # a correction bias that changes the choice
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.3)
    if hasattr(router, "moe_statics"):  # ERNIE's bias is a frozen parameter of a submodule
        router.moe_statics.e_score_correction_bias.requires_grad_(False)
    for name, param in router.named_parameters():
        if "bias" in name and "correction" in name:
            param.requires_grad_(False)
    return router


# cases whose router keeps its fp32 parameters when the inputs are bf16
FP32_ROUTER_CASES = {"inkling2", "hunyuan_v1_moe-fp32-gate"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_router_forward_matches_original(case, dtype):
    case_id, variant_name, router_path, config_name, overrides, extra, three_d = case
    router = _build(router_path, config_name, overrides)
    if case_id not in FP32_ROUTER_CASES:
        router = router.to(dtype)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(33, HIDDEN, generator=g).to(dtype)
    if three_d:
        hidden = hidden.view(3, 11, HIDDEN)
    args = (_choice_bias().to(dtype),) if extra == "bias" else ()
    compare_router_forwards(router, fused.VARIANTS_BY_NAME[variant_name], dtype, hidden, args)


def test_ernie_norm_min_binds_in_its_case():
    """The moe_norm_min case above is a real test of ERNIE's clamp: with min=2.0 the chosen probabilities' sum
    (at most 1) is below it, so weights are probabilities / 2, not renormalised to sum 1."""
    router = _build("ernie4_5_moe:Ernie4_5_MoeTopKRouter", "Ernie4_5_MoeConfig", dict(moe_norm_min=2.0))
    _, weights, _ = fused.VARIANTS_BY_NAME["ernie4_5_moe"].forward(router, torch.randn(5, HIDDEN))
    assert (weights.sum(-1) < 0.51).all()


def test_axk2_with_groups_runs_the_original_forward(monkeypatch):
    """AXK2 masks other groups to 0.0, which route() cannot express: its grouped configuration keeps HF's code."""
    router = _build("axk2:AXK2TopkRouter", "AXK2Config", dict(n_group=4, topk_group=2))
    calls = []
    monkeypatch.setattr(fused.moe_kernels, "route", lambda *a, **k: calls.append(1))
    fused.VARIANTS_BY_NAME["axk2"].forward(router, torch.randn(5, HIDDEN))
    assert calls == []


@pytest.mark.parametrize("model_type", sorted({c[2].split(":")[0] for c in CASES}))
def test_families_table_patches_the_router(model_type):
    """Each family above is listed with its router patched (status "experts+router"), not kept as in transformers."""
    rows = {row["model_type"]: row for row in families.families_table()}
    if model_type not in rows:
        pytest.skip(f"this transformers has no {model_type}")
    row = rows[model_type]
    assert row["router_variant"] != "-", row
    if row["status"] != "unsupported":
        assert row["status"] == "experts+router", row
