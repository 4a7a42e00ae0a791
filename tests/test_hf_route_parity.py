"""moe_kernels.route (every backend that runs here) against Hugging Face's own routers, and the fused
router forwards of moe_kernels.hf.routers against the forwards they replace. With a GPU, triton and cuda route
on CUDA tensors and the fused forwards run on CUDA too (tests/gpu_test_files.txt); the HF routers stay on the CPU.

Routers are built from tiny transformers configs with random weights: Mixtral, Qwen3-MoE, DeepSeek-V3
(nonzero e_score_correction_bias, n_group/topk_group, routed_scaling_factor) and GPT-OSS (router bias).
fp32: equal expert ids, weights equal to ~1e-6, and equal gradients into the router logits.
DeepSeek-V3 returns its top-k unsorted (``sorted=False``), so choices are compared per token as sets.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels.backends import BackendError, get_backend
from moe_testing import GPU, device_for

transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402
from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter  # noqa: E402
from transformers.models.jamba.modeling_jamba import JambaTopKRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextTopKRouter  # noqa: E402

from moe_kernels.hf import routers as fused  # noqa: E402

HIDDEN = 24
SMALL = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=4)


def route_backends() -> list:
    """Backends available here that can route on the device device_for gives them (skip-marked otherwise)."""
    params = []
    for name in ("reference", "cpu", "triton", "cuda"):
        reason = None
        if name not in moe_kernels.available_backends():
            reason = f"backend {name!r} not built here"
        else:
            try:
                reason = get_backend(name).device_error(device_for(name))
                if reason is None:
                    moe_kernels.route(torch.randn(2, 4, device=device_for(name)), 2, backend=name)
            except (BackendError, NotImplementedError) as exc:
                reason = str(exc)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def mixtral_router(num_experts, k):
    config = transformers.MixtralConfig(**SMALL, num_local_experts=num_experts, num_experts_per_tok=k)
    return MixtralTopKRouter(config), dict(scoring="softmax", order="softmax_then_topk", renormalize=True)


def qwen3_router(num_experts, k, norm_topk_prob=True):
    config = transformers.Qwen3MoeConfig(**SMALL, num_experts=num_experts, num_experts_per_tok=k,
                                         norm_topk_prob=norm_topk_prob)
    return Qwen3MoeTopKRouter(config), dict(scoring="softmax", order="softmax_then_topk", renormalize=norm_topk_prob)


def deepseek_v3_router(num_experts, k, n_group=4, topk_group=2, scale=2.5, norm=True):
    config = transformers.DeepseekV3Config(**SMALL, n_routed_experts=num_experts, num_experts_per_tok=k,
                                           n_group=n_group, topk_group=topk_group, routed_scaling_factor=scale,
                                           norm_topk_prob=norm)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0.0, 0.3)
    return router, dict(scoring="sigmoid", order="softmax_then_topk", renormalize=norm,
                        bias=router.e_score_correction_bias, n_group=n_group, topk_group=topk_group, scale=scale)


def gpt_oss_router(num_experts, k):
    config = transformers.GptOssConfig(**SMALL, num_local_experts=num_experts, num_experts_per_tok=k)
    router = GptOssTopKRouter(config)
    with torch.no_grad():
        router.bias.normal_(0.0, 0.5)
    return router, dict(scoring="softmax", order="topk_then_softmax", renormalize=False)


# (family, builder, num_experts, k) -- includes k=1, k=E, prime E
ROUTER_CASES = [
    ("mixtral", mixtral_router, 8, 2), ("mixtral", mixtral_router, 7, 1), ("mixtral", mixtral_router, 5, 5),
    ("qwen3_moe", qwen3_router, 8, 2), ("qwen3_moe", lambda e, k: qwen3_router(e, k, False), 11, 3),
    ("deepseek_v3", deepseek_v3_router, 16, 4),
    ("deepseek_v3", lambda e, k: deepseek_v3_router(e, k, 8, 3, 1.5, False), 16, 2),
    ("gpt_oss", gpt_oss_router, 8, 2), ("gpt_oss", gpt_oss_router, 7, 7),
]


def _by_expert(weights, ids):
    """Sort each token's choices by expert id (DeepSeek-V3 returns them unsorted)."""
    ids = ids.long()
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def _init(router, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
    return router


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("family,builder,num_experts,k", [pytest.param(*c, id=f"{c[0]}-E{c[2]}-k{c[3]}")
                                                          for c in ROUTER_CASES])
@pytest.mark.parametrize("backend", route_backends())
def test_route_matches_hf_router(backend, family, builder, num_experts, k, num_tokens):
    router, route_kwargs = builder(num_experts, k)
    _init(router, num_tokens)
    hidden = torch.randn(num_tokens, HIDDEN)
    hf_logits, hf_weights, hf_ids = router(hidden)
    hf_logits.retain_grad()
    device = device_for(backend)
    logits = hf_logits.detach().to(device).clone().requires_grad_(True)
    route_kwargs = {name: value.detach().to(device) if torch.is_tensor(value) else value
                    for name, value in route_kwargs.items()}
    weights, ids = moe_kernels.route(logits, k, backend=backend, **route_kwargs)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (num_tokens, k) and weights.device == ids.device == logits.device

    hf_w, hf_i = _by_expert(hf_weights.float(), hf_ids)
    got_w, got_i = _by_expert(weights.detach().cpu(), ids.cpu())
    assert torch.equal(got_i, hf_i), f"ids differ:\n{got_i}\nvs HF\n{hf_i}"
    # fp32 throughout; a GPU's exp/sigmoid may differ from the CPU's by a few ulps more
    tol = dict(rtol=2e-6, atol=1e-7) if device.type == "cpu" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, hf_w, **tol)

    upstream = torch.randn(num_tokens, k)  # a cotangent attached to each (token, expert) pair
    upstream_by_id = torch.zeros(num_tokens, num_experts).scatter_(1, hf_i, upstream)
    (hf_weights.float() * upstream_by_id.gather(1, hf_ids.long())).sum().backward()
    (weights * upstream_by_id.to(device).gather(1, ids.long())).sum().backward()
    grad_tol = dict(rtol=1e-5, atol=1e-6) if device.type == "cpu" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.grad.cpu(), hf_logits.grad, **grad_tol)


# Router-level parity of the fused forwards that moe_kernels.hf installs (every variant).
def _variant_routers():
    qwen2 = Qwen2MoeTopKRouter(transformers.Qwen2MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2,
                                                           norm_topk_prob=False))
    qwen_vl = Qwen3VLMoeTextTopKRouter(transformers.Qwen3VLMoeTextConfig(**SMALL, num_experts=8,
                                                                         num_experts_per_tok=2))
    granite = GraniteMoeTopKRouter(transformers.GraniteMoeConfig(**SMALL, num_local_experts=8,
                                                                 num_experts_per_tok=2))
    jamba = JambaTopKRouter(transformers.JambaConfig(**SMALL, num_experts=8, num_experts_per_tok=2))
    deepseek_v2 = DeepseekV2TopkRouter(transformers.DeepseekV2Config(**SMALL, n_routed_experts=8,
                                                                     num_experts_per_tok=2, topk_method="greedy",
                                                                     routed_scaling_factor=1.7))
    deepseek_v2_grouped = DeepseekV2TopkRouter(transformers.DeepseekV2Config(
        **SMALL, n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2))
    return [
        ("mixtral", mixtral_router(8, 2)[0]), ("qwen_moe", qwen3_router(8, 2)[0]), ("qwen_moe", qwen2),
        ("qwen_vl_moe", qwen_vl), ("deepseek_v3", deepseek_v3_router(16, 4)[0]), ("gpt_oss", gpt_oss_router(8, 2)[0]),
        ("granite", granite), ("jamba", jamba), ("deepseek_v2", deepseek_v2), ("deepseek_v2", deepseek_v2_grouped),
    ]


def compare_router_forwards(router, variant, dtype, hidden, extra=()):
    """``variant.forward`` returns what the transformers forward of ``router`` returns for ``hidden`` (and the extra
    forward arguments): same logits (same tensor computation), same ids (int64), same weights (dtype included),
    same gradients into every router parameter and the hidden states. In bf16 only a tie (equal logits, or equal
    choice scores) may be broken differently; fp32 must agree exactly on the ids."""
    assert fused.match_variant(type(router)) is variant
    results = []
    for forward in (type(router).forward, variant.forward):
        router.zero_grad()
        h = hidden.clone().requires_grad_(True)
        logits, weights, ids = forward(router, h, *extra)
        weights_sorted, ids_sorted = _by_expert(weights, ids)
        cotangent = torch.linspace(-1, 1, weights.numel(), device=weights.device).view_as(weights)
        (weights_sorted.float() * cotangent).sum().backward()
        grads = [p.grad.clone() for p in router.parameters() if p.grad is not None]
        results.append((logits.detach(), weights_sorted.detach(), ids_sorted, ids.dtype, weights.dtype, h.grad,
                        grads))
    ref, got = results
    assert got[3] == ref[3] == torch.int64
    assert got[4] == ref[4], f"weights dtype {got[4]} != {ref[4]}"
    assert torch.equal(got[0], ref[0])
    logits = ref[0].float()
    differing = (got[2] != ref[2]).any(dim=-1)
    for row in differing.nonzero().flatten().tolist():
        # only a bf16 tie (equal logits) may be broken differently
        assert dtype != torch.float32, f"token {row}: ids {got[2][row].tolist()} != {ref[2][row].tolist()}"
        chosen_got, chosen_ref = logits[row, got[2][row]].sort().values, logits[row, ref[2][row]].sort().values
        assert torch.equal(chosen_got, chosen_ref), f"token {row}: different experts without a tie"
    same = ~differing
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1][same].float(), ref[1][same].float(), **tol)
    if differing.any():
        return  # gradients of a differently broken tie legitimately differ
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got[5].float(), ref[5].float(), **grad_tol)
    assert len(got[6]) == len(ref[6]) >= 1
    for a, b in zip(got[6], ref[6]):
        torch.testing.assert_close(a.float(), b.float(), **grad_tol)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if GPU else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(10), ids=lambda i: f"router{i}")
def test_fused_router_forward_matches_original(index, dtype, device):
    """Each routers.<variant>_forward returns what the transformers forward returns (compare_router_forwards), on
    the CPU and, with a GPU, on CUDA (where the default backend routes with triton or cuda)."""
    variant_name, router = _variant_routers()[index]
    _init(router, index)
    compare_router_forwards(router.to(device=device, dtype=dtype), fused.VARIANTS_BY_NAME[variant_name], dtype,
                            torch.randn(33, HIDDEN, dtype=dtype).to(device))


def test_unknown_router_is_not_matched():
    class OddRouter(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states, hidden_states, hidden_states

    assert fused.match_variant(OddRouter) is None


def test_each_variant_pins_its_templates_source():
    """Every variant's pinned hash is its template's forward source in this transformers (where the template
    exists). When this fails, transformers changed a router moe_kernels reproduces: its families now keep
    transformers' own router (match_variant answers None); review the new code, update the variant, re-pin."""
    checked = 0
    for variant in fused.VARIANTS:
        try:
            template = variant.template_class()
        except (ImportError, AttributeError):
            continue  # a family this transformers lacks
        forward = getattr(template, fused.ORIGINAL_FORWARD, None) or template.__dict__["forward"]
        assert fused.source_hash(forward) == variant.source_hash, (
            f"{variant.template} changed in transformers {transformers.__version__}: review {variant.name}")
        checked += 1
    assert checked >= 10, checked  # the families of transformers 5.21, the oldest allowed
    assert len(fused.VARIANTS_BY_HASH) == len(fused.VARIANTS), "two variants pin the same source"


def test_a_router_whose_source_changed_is_not_matched(tmp_path, monkeypatch):
    """A router class with Mixtral's name whose forward differs from the pinned source by one token (here a
    sigmoid for the softmax) keeps transformers' forward: a transformers release that changes a template leaves
    its families unpatched, never wrong."""
    import importlib
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(MixtralTopKRouter.forward))
    assert "softmax" in source
    module_file = tmp_path / "changed_mixtral_router.py"
    module_file.write_text("import torch\nimport torch.nn.functional as F\n\n\nclass MixtralTopKRouter(torch.nn.Module):\n"
                           + textwrap.indent(source.replace("softmax", "sigmoid", 1), "    "))
    monkeypatch.syspath_prepend(str(tmp_path))
    changed = importlib.import_module("changed_mixtral_router").MixtralTopKRouter
    assert fused.source_hash(changed.forward) not in (None, fused.VARIANTS_BY_NAME["mixtral"].source_hash)
    assert fused.match_variant(changed) is None
    assert fused.match_variant(MixtralTopKRouter) is fused.VARIANTS_BY_NAME["mixtral"]


def test_a_copied_router_matches_without_its_template(monkeypatch):
    """Matching needs only the pinned hash, not the template class: HunYuan-V3's router is dots3's, and
    transformers 5.21 ships HunYuan-V3 without dots3."""
    modeling = pytest.importorskip("transformers.models.hy_v3.modeling_hy_v3")

    def missing(self):
        raise ImportError(f"no {self.template} in this transformers")

    monkeypatch.setattr(fused.RouterVariant, "template_class", missing)
    assert fused.match_variant(modeling.HYV3TopKRouter) is fused.VARIANTS_BY_NAME["dots3_note"]
