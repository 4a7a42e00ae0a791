"""Router forwards that run Hugging Face routers through the fused :func:`moe_kernels.route`.

Each :class:`RouterVariant` reproduces one transformers router ``forward`` exactly -- same logits
computation (dtype, bias), same choice rule, same weight dtype -- and returns what the original
returns, ``(router_logits, top_k_weights, top_k_index)`` with ``top_k_index`` int64, so the model's
output recording (``output_router_logits=True``) and its auxiliary loss see the same tensors.

A variant is tied to a *template*: a transformers router class whose ``forward`` it replaces. Any other
router class whose ``forward`` source is identical to a template's (transformers copies routers between
families with "modular" code generation) gets the same variant; see :mod:`moe_kernels.hf.families`.
Training-time behaviour that lives outside the router (Mixtral's jitter noise is applied by the MoE
block to its input) is untouched.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import moe_kernels

from .experts import BACKEND_ATTRIBUTE, normalised_source


def _route(self, logits: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return moe_kernels.route(logits, self.top_k, backend=getattr(self, BACKEND_ATTRIBUTE, None), **kwargs)


def mixtral_forward(self, hidden_states):
    """MixtralTopKRouter: softmax (fp32) -> top-k -> renormalise; weights stay fp32."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, scoring="softmax", order="softmax_then_topk", renormalize=True)
    return router_logits, weights, ids.long()


def qwen_moe_forward(self, hidden_states):
    """Qwen2/Qwen3-MoE, OLMoE, ...: softmax (fp32) -> top-k -> renormalise if norm_topk_prob;
    weights in the logits' dtype."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, scoring="softmax", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob))
    return router_logits, weights.to(router_logits.dtype), ids.long()


def qwen_vl_moe_forward(self, hidden_states):
    """Qwen3-VL-MoE / Qwen3.5-MoE text routers: softmax (fp32) -> top-k -> always renormalise;
    weights in the logits' dtype."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, scoring="softmax", order="softmax_then_topk", renormalize=True)
    return router_logits, weights.to(router_logits.dtype), ids.long()


def deepseek_v3_forward(self, hidden_states):
    """DeepSeek-V3 (GLM4-MoE, ...): fp32 logits; sigmoid scores; choose on scores + e_score_correction_bias
    within the topk_group best of n_group groups (group score = sum of its best two); weights = unbiased
    scores, renormalised if norm_topk_prob, times routed_scaling_factor; fp32."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob), bias=self.e_score_correction_bias,
                          n_group=int(self.num_group), topk_group=int(self.topk_group),
                          scale=float(self.routed_scaling_factor))
    return router_logits, weights, ids.long()


def deepseek_v2_forward(self, hidden_states):
    """DeepSeek-V2 with topk_method="greedy": fp32 logits, softmax -> top-k, no renormalisation, x scale.
    "group_limited_greedy" (group score = max, not sum of two) has no route equivalent: the original runs."""
    if self.topk_method != "greedy":
        return original_forward(self)(hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, scoring="softmax", order="softmax_then_topk", renormalize=False,
                          scale=float(self.routed_scaling_factor))
    return router_logits, weights, ids.long()


def gpt_oss_forward(self, hidden_states):
    """GPT-OSS: logits with router bias -> top-k of logits -> softmax over the k (in the logits' dtype)."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, ids = _route(self, router_logits, scoring="softmax", order="topk_then_softmax", renormalize=False)
    return router_logits, weights.to(router_logits.dtype), ids.long()


def granite_forward(self, hidden_states):
    """GraniteMoE family: fp32 logits -> top-k of logits -> softmax over the k; weights in the input's dtype."""
    router_logits = F.linear(hidden_states, self.weight).float()
    weights, ids = _route(self, router_logits, scoring="softmax", order="topk_then_softmax", renormalize=False)
    return router_logits, weights.type_as(hidden_states), ids.long()


def jamba_forward(self, hidden_states):
    """Jamba: softmax (fp32) -> top-k, no renormalisation; weights in the input's dtype."""
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, scoring="softmax", order="softmax_then_topk", renormalize=False)
    return router_logits, weights.to(hidden_states.dtype), ids.long()


ORIGINAL_FORWARD = "_moe_kernels_original_router_forward"


def original_forward(module):
    """The transformers forward of a router, bound to ``module``, whether its class or the instance is patched."""
    router_class = type(module)
    original = getattr(router_class, ORIGINAL_FORWARD, None) or router_class.forward
    return original.__get__(module, router_class)


@dataclass(frozen=True)
class RouterVariant:
    """One exact router semantics: the template class it was written from and the fused forward."""

    name: str
    template: str  # "module:Class" inside transformers.models
    route_args: str  # the moe_kernels.route call, for the families table
    forward: Callable

    def template_class(self):
        module_name, class_name = self.template.split(":")
        return getattr(importlib.import_module(f"transformers.models.{module_name}"), class_name)


VARIANTS: tuple[RouterVariant, ...] = (
    RouterVariant("mixtral", "mixtral.modeling_mixtral:MixtralTopKRouter",
                  "softmax, softmax_then_topk, renormalize", mixtral_forward),
    RouterVariant("qwen_moe", "qwen3_moe.modeling_qwen3_moe:Qwen3MoeTopKRouter",
                  "softmax, softmax_then_topk, renormalize=norm_topk_prob", qwen_moe_forward),
    RouterVariant("qwen_vl_moe", "qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeTextTopKRouter",
                  "softmax, softmax_then_topk, renormalize", qwen_vl_moe_forward),
    RouterVariant("deepseek_v3", "deepseek_v3.modeling_deepseek_v3:DeepseekV3TopkRouter",
                  "sigmoid, bias=e_score_correction_bias, n_group, topk_group, renormalize=norm_topk_prob, "
                  "scale=routed_scaling_factor", deepseek_v3_forward),
    RouterVariant("deepseek_v2", "deepseek_v2.modeling_deepseek_v2:DeepseekV2TopkRouter",
                  "softmax, softmax_then_topk, scale (topk_method=greedy; else HF's own)", deepseek_v2_forward),
    RouterVariant("gpt_oss", "gpt_oss.modeling_gpt_oss:GptOssTopKRouter",
                  "router bias, topk_then_softmax", gpt_oss_forward),
    RouterVariant("granite", "granitemoe.modeling_granitemoe:GraniteMoeTopKRouter",
                  "topk_then_softmax", granite_forward),
    RouterVariant("jamba", "jamba.modeling_jamba:JambaTopKRouter",
                  "softmax, softmax_then_topk, no renormalisation", jamba_forward),
)

VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


_template_sources: dict[str, str | None] = {}


def match_variant(router_class: type) -> RouterVariant | None:
    """The variant whose template forward has exactly the source of ``router_class.forward``, if any."""
    forward = router_class.__dict__.get("forward")
    if forward is None:
        return None
    if getattr(forward, "_moe_kernels_variant", None):  # already patched by apply_to
        return VARIANTS_BY_NAME[forward._moe_kernels_variant]
    source = normalised_source(forward)
    if source is None:
        return None
    for variant in VARIANTS:
        if variant.name not in _template_sources:
            try:
                template = variant.template_class()
                original = getattr(template, ORIGINAL_FORWARD, None) or template.__dict__["forward"]
                _template_sources[variant.name] = normalised_source(original)
            except Exception:  # noqa: BLE001 - a template missing from this transformers version
                _template_sources[variant.name] = None
        if _template_sources[variant.name] == source:
            return variant
    return None


for _variant in VARIANTS:
    _variant.forward._moe_kernels_variant = _variant.name

__all__ = ["RouterVariant", "VARIANTS", "VARIANTS_BY_NAME", "match_variant", "normalised_source", "original_forward",
           "ORIGINAL_FORWARD"]
