"""Router forwards that run Hugging Face routers through the fused :func:`moe_kernels.route`.

Each :class:`RouterVariant` reproduces one transformers router ``forward`` exactly -- same logits
computation (dtype, bias), same choice rule, same weight dtype -- and returns what the original
returns, ``(router_logits, top_k_weights, top_k_index)`` with ``top_k_index`` int64, so the model's
output recording (``output_router_logits=True``) and its auxiliary loss see the same tensors.

A variant is tied to a *template*: a transformers router class whose ``forward`` it replaces, pinned by the hash
of that forward's source as the variant was written against. Any router class whose ``forward`` has that source
(transformers copies routers between families with "modular" code generation) gets the same variant; see
:mod:`moe_kernels.hf.families`. A template whose code later changes matches nothing until it is reviewed.
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
from moe_kernels.ops import ROUTE_WEIGHT_DTYPES

from .experts import BACKEND_ATTRIBUTE, source_hash


def _route(self, logits: torch.Tensor, weights_dtype: torch.dtype, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_kernels.route with the router's backend: (weights in ``weights_dtype``, ids int64), what transformers'
    routers return, written so by the routing kernel itself (no conversion launches; a weight dtype route does not
    write, float64, is converted after)."""
    written = weights_dtype in ROUTE_WEIGHT_DTYPES
    weights, ids = moe_kernels.route(logits, self.top_k, backend=getattr(self, BACKEND_ATTRIBUTE, None),
                                     weights_dtype=weights_dtype if written else None, ids_dtype=torch.int64,
                                     **kwargs)
    return (weights if written else weights.to(weights_dtype)), ids


def mixtral_forward(self, hidden_states):
    """MixtralTopKRouter: softmax (fp32) -> top-k -> renormalise; weights stay fp32."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, torch.float32, scoring="softmax", order="softmax_then_topk",
                          renormalize=True)
    return router_logits, weights, ids


def qwen_moe_forward(self, hidden_states):
    """Qwen2/Qwen3-MoE, OLMoE, ...: softmax (fp32) -> top-k -> renormalise if norm_topk_prob;
    weights in the logits' dtype."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, router_logits.dtype, scoring="softmax", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob))
    return router_logits, weights, ids


def qwen_vl_moe_forward(self, hidden_states):
    """Qwen3-VL-MoE / Qwen3.5-MoE text routers: softmax (fp32) -> top-k -> always renormalise;
    weights in the logits' dtype."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, router_logits.dtype, scoring="softmax", order="softmax_then_topk",
                          renormalize=True)
    return router_logits, weights, ids


def deepseek_v3_forward(self, hidden_states):
    """DeepSeek-V3 (GLM4-MoE, ...): fp32 logits; sigmoid scores; choose on scores + e_score_correction_bias
    within the topk_group best of n_group groups (group score = sum of its best two); weights = unbiased
    scores, renormalised if norm_topk_prob, times routed_scaling_factor; fp32."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob), bias=self.e_score_correction_bias,
                          n_group=int(self.num_group), topk_group=int(self.topk_group),
                          scale=float(self.routed_scaling_factor))
    return router_logits, weights, ids


def deepseek_v2_forward(self, hidden_states):
    """DeepSeek-V2 with topk_method="greedy": fp32 logits, softmax -> top-k, no renormalisation, x scale.
    "group_limited_greedy" (group score = max, not sum of two) has no route equivalent: the original runs."""
    if self.topk_method != "greedy":
        return original_forward(self)(hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, torch.float32, scoring="softmax", order="softmax_then_topk",
                          renormalize=False, scale=float(self.routed_scaling_factor))
    return router_logits, weights, ids


def gpt_oss_forward(self, hidden_states):
    """GPT-OSS: logits with router bias -> top-k of logits -> softmax over the k (in the logits' dtype)."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, ids = _route(self, router_logits, router_logits.dtype, scoring="softmax", order="topk_then_softmax",
                          renormalize=False)
    return router_logits, weights, ids


def granite_forward(self, hidden_states):
    """GraniteMoE family: fp32 logits -> top-k of logits -> softmax over the k; weights in the input's dtype."""
    router_logits = F.linear(hidden_states, self.weight).float()
    weights, ids = _route(self, router_logits, hidden_states.dtype, scoring="softmax", order="topk_then_softmax",
                          renormalize=False)
    return router_logits, weights, ids


def jamba_forward(self, hidden_states):
    """Jamba: softmax (fp32) -> top-k, no renormalisation; weights in the input's dtype."""
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, hidden_states.dtype, scoring="softmax", order="softmax_then_topk",
                          renormalize=False)
    return router_logits, weights, ids


# ---- routers of the newer families: the same route() variants, each family's own dtypes, bias source and scale.
# "renormalise" below is route's w / (sum + 1e-20); a family that divides by the bare sum differs only where the sum
# is ~1e-20 (0/0 there), as Qwen's does.


def _no_autocast(hidden_states: torch.Tensor):
    """The autocast-free region of routers that force fp32 (transformers' ``maybe_autocast(enabled=False)``)."""
    device_type = hidden_states.device.type if isinstance(hidden_states.device.type, str) else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def afmoe_forward(self, hidden_states, expert_bias):
    """AFMoE: fp32 logits of the gate Linear; sigmoid; choose on scores + expert_bias (the MoE block's buffer);
    renormalise (+1e-20); x route_scale; fp32 weights."""
    _, _, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states).to(torch.float32)
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=True, bias=expert_bias, scale=float(self.route_scale))
    return router_logits, weights, ids


def aria_forward(self, hidden_states):
    """Aria: top-k of the logits, softmax over the k; weights in the logits' dtype."""
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, router_logits.dtype, scoring="softmax", order="topk_then_softmax",
                          renormalize=False)
    return router_logits, weights, ids


def axk2_forward(self, hidden_states):
    """AXK2 without expert groups (its light checkpoints): DeepSeek-V3's sigmoid choice on scores +
    e_score_correction_bias, renormalised if norm_topk_prob, x routed_scaling_factor. With groups AXK2 masks the
    other groups' experts to 0.0, not -inf (a negative biased score then loses to them): the original runs."""
    if self.num_group is not None and int(self.num_group) > 1:
        return original_forward(self)(hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob), bias=self.e_score_correction_bias,
                          scale=float(self.routed_scaling_factor))
    return router_logits, weights, ids


def beam_forward(self, hidden_states):
    """Beam: DeepSeek-V3's group-limited sigmoid choice (groups masked to -inf), renormalised if norm_topk_prob,
    no scale here (Beam's MoE block applies routed_scaling_factor after the experts); fp32."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.float(), self.weight.float())
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob), bias=self.e_score_correction_bias,
                          n_group=int(self.num_group), topk_group=int(self.topk_group))
    return router_logits, weights, ids


def cohere2_moe_forward(self, hidden_states):
    """Cohere2-MoE: top-k of the logits, then softmax over the k (expert_selection_fn "softmax") or sigmoid of
    each, renormalised if norm_topk_prob ("sigmoid"); weights in the input's dtype."""
    router_logits = F.linear(hidden_states, self.weight)
    if self.expert_selection_fn == "softmax":
        scoring, renormalize = "softmax", False
    elif self.expert_selection_fn == "sigmoid":
        scoring, renormalize = "sigmoid", bool(self.norm_topk_prob)
    else:
        raise ValueError("`expert_selection_fn` can only be `softmax` or `sigmoid`")
    weights, ids = _route(self, router_logits, hidden_states.dtype, scoring=scoring, order="topk_then_softmax",
                          renormalize=renormalize)
    return router_logits, weights, ids


def dots3_note_forward(self, hidden_states, e_score_correction_bias):
    """dots3 (vision) and HunYuan-V3: fp32 sigmoid choice on scores + the MoE block's e_score_correction_bias;
    renormalise (+1e-20); x router_scaling_factor; fp32 weights."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.float(), self.weight.float())
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=True, bias=e_score_correction_bias, scale=float(self.router_scaling_factor))
    return router_logits, weights, ids


def ernie4_5_moe_forward(self, hidden_states):
    """ERNIE-4.5-MoE (and -VL): fp32 softmax without autocast; choose on probabilities +
    moe_statics.e_score_correction_bias; weights = chosen probabilities / max(their sum, moe_norm_min) (that
    division done here, as ERNIE does it); in the input's dtype."""
    with _no_autocast(hidden_states):
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        weights, ids = _route(self, router_logits, torch.float32, scoring="softmax", order="softmax_then_topk",
                              renormalize=False, bias=self.moe_statics.e_score_correction_bias.reshape(-1))
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min)
    return router_logits, weights.to(hidden_states.dtype), ids


def flint_forward(self, hidden_states):
    """Flint: fp32 logits without autocast; sigmoid; top-k of the scores (no bias); renormalised if
    norm_topk_prob; fp32 weights."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    with _no_autocast(hidden_states):
        router_logits = F.linear(hidden_states.float(), self.weight.float())
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob))
    return router_logits, weights, ids


def hunyuan_v1_moe_forward(self, hidden_states):
    """HunYuan-V1-MoE's gate (HunYuanMoEV1Gate, a *Gate class): logits of its Linear, fp32 when that Linear is
    (the hidden states cast up to it); softmax (fp32) -> top-k -> renormalise; weights in the logits' dtype."""
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    if self.wg.weight.dtype == torch.float32:
        hidden_states = hidden_states.float()
    router_logits = self.wg(hidden_states)
    weights, ids = _route(self, router_logits, router_logits.dtype, scoring="softmax", order="softmax_then_topk",
                          renormalize=True)
    return router_logits, weights, ids


def inkling2_forward(self, hidden_states):
    """Inkling2: fp32 routing; sigmoid (its score_fn) choice on scores + e_score_correction_bias; renormalise
    (+1e-20); x routed_scaling_factor. Another score_fn has no route() equivalent: the original runs."""
    if not isinstance(self.score_fn, torch.nn.Sigmoid):
        return original_forward(self)(hidden_states)
    hidden_states = hidden_states.float()
    flat = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(flat, self.weight)
    weights, ids = _route(self, logits, torch.float32, scoring="sigmoid", order="softmax_then_topk", renormalize=True,
                          bias=self.e_score_correction_bias, scale=float(self.routed_scaling_factor))
    return logits, weights, ids


def kolibri1_forward(self, hidden_states):
    """Kolibri1: fp32 logits (from a bf16 GEMM with fp32 output at CUDA inference, as Kolibri1 does); top-k of
    logits + e_score_correction_bias; weights = sigmoid of the chosen logits, renormalised if norm_topk_prob."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    if hidden_states.is_cuda and hidden_states.dtype == self.weight.dtype and not torch.is_grad_enabled():
        router_logits = torch.mm(hidden_states, self.weight.t(), out_dtype=torch.float32)  # torch >= 2.8
    else:
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="topk_then_softmax",
                          renormalize=bool(self.norm_topk_prob), bias=self.e_score_correction_bias)
    return router_logits, weights, ids


def laguna_forward(self, hidden_states):
    """Laguna: logits to fp32, soft-capped (tanh) when moe_router_logit_softcapping > 0; sigmoid choice on
    scores + e_score_correction_bias; renormalise; weights in the input's dtype."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight).float()
    if self.router_logit_softcapping > 0.0:
        router_logits = torch.tanh(router_logits / self.router_logit_softcapping) * self.router_logit_softcapping
    weights, ids = _route(self, router_logits, hidden_states.dtype, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=True, bias=self.e_score_correction_bias.float())
    return router_logits, weights, ids


def lara_mini_forward(self, hidden_states):
    """LaraMini: fp32 logits; softmax -> top-k -> renormalised if norm_topk_prob; weights in the input's dtype."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.float(), self.weight.float())
    weights, ids = _route(self, router_logits, hidden_states.dtype, scoring="softmax", order="softmax_then_topk",
                          renormalize=bool(self.norm_topk_prob))
    return router_logits, weights, ids


def minimax_m2_forward(self, hidden_states, e_score_correction_bias):
    """MiniMax-M2: logits in the weight's dtype; fp32 sigmoid; choose on scores + the MoE block's
    e_score_correction_bias; renormalise; fp32 weights."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.to(self.weight.dtype), self.weight)
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=True, bias=e_score_correction_bias)
    return router_logits, weights, ids


def minimax_m3_vl_forward(self, hidden_states):
    """MiniMax-M3-VL: MiniMax-M2's routing with the bias held by the router."""
    return minimax_m2_forward(self, hidden_states, self.e_score_correction_bias)


def mistral_large4_forward(self, hidden_states):
    """Mistral-Large-4: fp32 softmax; DeepSeek-V3's group-limited choice (group score = sum of its best two);
    renormalise (+1e-20); x routed_scaling_factor. It masks the other groups' experts to 0.0 where route uses -inf:
    the same choice unless fewer than k experts of the kept groups have a probability above 0 (fp32 underflow)."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.float(), self.weight.float())
    weights, ids = _route(self, router_logits, torch.float32, scoring="softmax", order="softmax_then_topk",
                          renormalize=True, n_group=int(self.num_group), topk_group=int(self.topk_group),
                          scale=float(self.routed_scaling_factor))
    return router_logits, weights, ids


def muse_spark_forward(self, hidden_states):
    """MuseSpark: fp32 logits x output_multiplier; sigmoid choice on scores + e_score_correction_bias; weights =
    chosen scores / (sum + 1e-15, its own eps, done here) x routed_scaling_factor; fp32."""
    if not isinstance(self.scoring_function, torch.nn.Sigmoid):
        return original_forward(self)(hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    router_logits = router_logits * self.output_multiplier
    weights, ids = _route(self, router_logits, torch.float32, scoring="sigmoid", order="softmax_then_topk",
                          renormalize=False, bias=self.e_score_correction_bias)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + self.norm_topk_prob_eps)
    return router_logits, weights * self.routed_scaling_factor, ids


def openai_privacy_filter_forward(self, hidden_states):
    """OpenAI privacy filter: fp32 logits with the router bias; top-k of logits, softmax over the k, / k."""
    router_logits = F.linear(hidden_states.float(), self.weight.float(), self.bias.float())
    weights, ids = _route(self, router_logits, torch.float32, scoring="softmax", order="topk_then_softmax",
                          renormalize=False, scale=1.0 / self.top_k)
    return router_logits, weights, ids


ORIGINAL_FORWARD = "_moe_kernels_original_router_forward"


def original_forward(module):
    """The transformers forward of a router, bound to ``module``, whether its class or the instance is patched."""
    router_class = type(module)
    original = getattr(router_class, ORIGINAL_FORWARD, None) or router_class.forward
    return original.__get__(module, router_class)


@dataclass(frozen=True)
class RouterVariant:
    """One exact router semantics: the template class it was written from, the hash of that class's ``forward``
    source as it was written against, and the fused forward."""

    name: str
    template: str  # "module:Class" inside transformers.models
    source_hash: str  # experts.source_hash of the template's forward, the code this variant reproduces
    route_args: str  # the moe_kernels.route call, for the families table
    forward: Callable

    def template_class(self):
        module_name, class_name = self.template.split(":")
        return getattr(importlib.import_module(f"transformers.models.{module_name}"), class_name)


VARIANTS: tuple[RouterVariant, ...] = (
    RouterVariant("mixtral", "mixtral.modeling_mixtral:MixtralTopKRouter", "c97ef63ea84be7bd",
                  "softmax, softmax_then_topk, renormalize", mixtral_forward),
    RouterVariant("qwen_moe", "qwen3_moe.modeling_qwen3_moe:Qwen3MoeTopKRouter", "217f7068448531cf",
                  "softmax, softmax_then_topk, renormalize=norm_topk_prob", qwen_moe_forward),
    RouterVariant("qwen_vl_moe", "qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeTextTopKRouter", "2a5edbb09368e93e",
                  "softmax, softmax_then_topk, renormalize", qwen_vl_moe_forward),
    RouterVariant("deepseek_v3", "deepseek_v3.modeling_deepseek_v3:DeepseekV3TopkRouter", "dd62e721dd18df15",
                  "sigmoid, bias=e_score_correction_bias, n_group, topk_group, renormalize=norm_topk_prob, "
                  "scale=routed_scaling_factor", deepseek_v3_forward),
    RouterVariant("deepseek_v2", "deepseek_v2.modeling_deepseek_v2:DeepseekV2TopkRouter", "6f8cfc0b80b74cd6",
                  "softmax, softmax_then_topk, scale (topk_method=greedy; else HF's own)", deepseek_v2_forward),
    RouterVariant("gpt_oss", "gpt_oss.modeling_gpt_oss:GptOssTopKRouter", "c688df3b8d7fba67",
                  "router bias, topk_then_softmax", gpt_oss_forward),
    RouterVariant("granite", "granitemoe.modeling_granitemoe:GraniteMoeTopKRouter", "fb098cbd018abf0f",
                  "topk_then_softmax", granite_forward),
    RouterVariant("jamba", "jamba.modeling_jamba:JambaTopKRouter", "7d48cb7418da0b85",
                  "softmax, softmax_then_topk, no renormalisation", jamba_forward),
    RouterVariant("afmoe", "afmoe.modeling_afmoe:AfmoeTokenChoiceRouter", "e9bf7030c62d1db6",
                  "sigmoid, bias=expert_bias, renormalize, scale=route_scale", afmoe_forward),
    RouterVariant("aria", "aria.modeling_aria:AriaTextTopKRouter", "58d0b0dddc2cbeae", "topk_then_softmax", aria_forward),
    RouterVariant("axk2", "axk2.modeling_axk2:AXK2TopkRouter", "2d5a886ca7a0bb4b",
                  "sigmoid, bias=e_score_correction_bias, renormalize=norm_topk_prob, scale (no groups; else HF's "
                  "own)", axk2_forward),
    RouterVariant("beam", "beam.modeling_beam:BeamTopKRouter", "cca42cffa0bc6b3b",
                  "sigmoid, bias=e_score_correction_bias, n_group, topk_group, renormalize=norm_topk_prob",
                  beam_forward),
    RouterVariant("cohere2_moe", "cohere2_moe.modeling_cohere2_moe:Cohere2MoeTopKRouter", "730ed8deeda7505b",
                  "topk_then_softmax, softmax or sigmoid (renormalize=norm_topk_prob)", cohere2_moe_forward),
    RouterVariant("dots3_note", "dots3_note.modeling_dots3_note:Dots3NoteVisionTopKRouter", "10cd9c003413afd4",
                  "sigmoid, bias=e_score_correction_bias, renormalize, scale=router_scaling_factor",
                  dots3_note_forward),
    RouterVariant("ernie4_5_moe", "ernie4_5_moe.modeling_ernie4_5_moe:Ernie4_5_MoeTopKRouter", "ded19195531f6edd",
                  "softmax, bias=e_score_correction_bias, then / max(sum, moe_norm_min)", ernie4_5_moe_forward),
    RouterVariant("flint", "flint.modeling_flint:FlintTopKRouter", "95e7977402a2e769", "sigmoid, renormalize=norm_topk_prob",
                  flint_forward),
    RouterVariant("hunyuan_v1_moe", "hunyuan_v1_moe.modeling_hunyuan_v1_moe:HunYuanMoEV1Gate", "a7559b6517f52c2b",
                  "softmax, softmax_then_topk, renormalize (fp32 logits when the gate's Linear is fp32)",
                  hunyuan_v1_moe_forward),
    RouterVariant("inkling2", "inkling2.modeling_inkling2:Inkling2TopKRouter", "2fdb56a4f6f203be",
                  "sigmoid, bias=e_score_correction_bias, renormalize, scale", inkling2_forward),
    RouterVariant("kolibri1", "kolibri1.modeling_kolibri1:Kolibri1TopKRouter", "9d452a09ad63914a",
                  "sigmoid, topk_then_softmax, bias=e_score_correction_bias, renormalize=norm_topk_prob",
                  kolibri1_forward),
    RouterVariant("laguna", "laguna.modeling_laguna:LagunaTopKRouter", "77efc0da9a9281a4",
                  "logit softcap, sigmoid, bias=e_score_correction_bias, renormalize", laguna_forward),
    RouterVariant("lara_mini", "lara_mini.modeling_lara_mini:LaraMiniTopKRouter", "fb2ad9e78df55322",
                  "softmax, softmax_then_topk, renormalize=norm_topk_prob", lara_mini_forward),
    RouterVariant("minimax_m2", "minimax_m2.modeling_minimax_m2:MiniMaxM2TopKRouter", "832f40deca48ad09",
                  "sigmoid, bias=e_score_correction_bias, renormalize", minimax_m2_forward),
    RouterVariant("minimax_m3_vl", "minimax_m3_vl.modeling_minimax_m3_vl:MiniMaxM3VLTopKRouter", "c3c39dde6f9ed7a2",
                  "sigmoid, bias=e_score_correction_bias, renormalize", minimax_m3_vl_forward),
    RouterVariant("mistral_large4", "mistral_large4.modeling_mistral_large4:MistralLarge4TextTopkRouter", "ba6f00a1a12f9e64",
                  "softmax, n_group, topk_group, renormalize, scale=routed_scaling_factor", mistral_large4_forward),
    RouterVariant("muse_spark", "muse_spark.modeling_muse_spark:MuseSparkTopkRouter", "418f15fdab10cc88",
                  "logits x output_multiplier, sigmoid, bias=e_score_correction_bias, then / (sum + 1e-15), scale",
                  muse_spark_forward),
    RouterVariant("openai_privacy_filter",
                  "openai_privacy_filter.modeling_openai_privacy_filter:OpenAIPrivacyFilterTopKRouter", "bc8909d3bb67347e",
                  "router bias, topk_then_softmax, scale=1/k", openai_privacy_filter_forward),
)

VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


VARIANTS_BY_HASH = {variant.source_hash: variant for variant in VARIANTS}


def match_variant(router_class: type) -> RouterVariant | None:
    """The variant written against exactly the source of ``router_class.forward``, if any.

    Matched by the pinned hash, not against the template class as installed: a router copied from a template
    matches whether or not this transformers still ships the template (HunYuan-V3 copies dots3's, which
    transformers 5.21 lacks), and a template whose code changed in a later transformers matches nothing, so its
    family keeps transformers' own router instead of running semantics the variant was not written for."""
    forward = router_class.__dict__.get("forward")
    if forward is None:
        return None
    if getattr(forward, "_moe_kernels_variant", None):  # already patched by apply_to
        return VARIANTS_BY_NAME[forward._moe_kernels_variant]
    return VARIANTS_BY_HASH.get(source_hash(forward))


for _variant in VARIANTS:
    _variant.forward._moe_kernels_variant = _variant.name

__all__ = ["RouterVariant", "VARIANTS", "VARIANTS_BY_HASH", "VARIANTS_BY_NAME", "match_variant", "original_forward",
           "source_hash", "ORIGINAL_FORWARD"]
