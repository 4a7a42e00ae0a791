"""The oracle: plain, readable PyTorch for every op of moe_kernels.

Every other backend is tested against these functions. They favour clarity over speed (loops over
experts), compute in float32 whatever the input dtype, and cast results back to the input dtype.
They are differentiable through ordinary autograd, so they also serve as the ``reference`` backend
on any device.

Conventions shared by every backend (see ``moe_kernels.ops`` for the public, validated entry points):

* A *slot* is one (token, choice) pair, numbered ``s = t * k + j`` for token t's j-th choice.
* Routing returns ``weights`` [T,k] float32 and ``ids`` [T,k] int32, choices ordered by descending
  selection score; ties go to the lower expert index.
* Expert weights use the Hugging Face v5 layout: ``gate_up_proj`` [E, 2I, H] (gate rows first, then up
  rows; or interleaved gate0, up0, gate1, ... when ``interleaved``), ``down_proj`` [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import Backend, Plan
# The activation names and shared constants live in moe_kernels.spec; re-exported here, where callers know them.
from .spec import ADAPTER_ACTIVATIONS, ELEMENTWISE_ACTIVATIONS, GATED_ACTIVATIONS, GPT_OSS_ALPHA, RENORM_EPS


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The elementwise activations: the adapter path, ungated expert MLPs and the gate half of gated ones."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}")


def gated_activation(gate_up: torch.Tensor, name: str, interleaved: bool = False,
                     swiglu_limit: float | None = None,
                     softcaps: tuple[float, float] | None = None) -> torch.Tensor:
    """[N, 2I] -> [N, I]: act(gate) * up, or GPT-OSS's form (up + 1) * gate * sigmoid(alpha gate), alpha =
    GPT_OSS_ALPHA. With ``swiglu_limit``, gate is clamped to <= limit and up to [-limit, limit] first, for every
    activation (GPT-OSS's clamp; DeepSeek-V4, GLM-5 and HunYuan-V4 clamp their SwiGLU the same way).
    "softcap_swiglu" (Inkling2): cg tanh(gate / cg) * sigmoid(gate) * cu tanh(up / cu), (cg, cu) = ``softcaps``."""
    if interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if swiglu_limit is not None:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
    if name == "gpt_oss":
        return (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))
    if name == "softcap_swiglu":
        gate_cap, up_cap = softcaps
        return (torch.tanh(gate / gate_cap) * gate_cap) * torch.sigmoid(gate) * (torch.tanh(up / up_cap) * up_cap)
    return apply_activation(gate, name) * up


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, ties to the lower index (a stable descending sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def route(logits: torch.Tensor, k: int, scoring: str = "softmax", order: str = "softmax_then_topk",
          renormalize: bool = True, bias: torch.Tensor | None = None, n_group: int | None = None,
          topk_group: int | None = None, scale: float = 1.0, weights_dtype: torch.dtype = torch.float32,
          ids_dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing. Returns (weights [T,k] in weights_dtype, ids [T,k] in ids_dtype): the weights are computed
    in float32 and rounded once to weights_dtype.

    softmax_then_topk: scores = softmax(logits) (or sigmoid); choose the top k of scores (+ bias);
                       weights = the chosen scores (unbiased).
    topk_then_softmax: choose the top k of logits (+ bias); weights = softmax (or sigmoid) of the
                       chosen logits.
    n_group/topk_group: DeepSeek-V3's group-limited choice: experts split into n_group equal groups,
                       a group scores the sum of its two best choice scores, only the topk_group best
                       groups stay eligible.
    Then, if renormalize, weights /= sum(weights); finally weights *= scale.
    """
    x = logits.float()
    num_tokens, num_experts = x.shape
    if order == "softmax_then_topk":
        scores = torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)
    else:
        scores = x
    choice = scores.detach()
    if bias is not None:
        choice = choice + bias.float()
    if n_group is not None and n_group > 1:
        per_group = num_experts // n_group
        grouped = choice.view(num_tokens, n_group, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        keep = topk_stable(group_scores, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(per_group, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = topk_stable(choice, k)
    picked = scores.gather(1, ids)
    if order == "topk_then_softmax":
        picked = torch.softmax(picked, dim=-1) if scoring == "softmax" else torch.sigmoid(picked)
    if renormalize:
        picked = picked / (picked.sum(dim=-1, keepdim=True) + RENORM_EPS)
    weights = picked * scale
    return weights.to(weights_dtype), ids.to(ids_dtype)


def plan(ids: torch.Tensor, num_experts: int) -> Plan:
    """Counting sort of the slots by expert (stable). See :class:`moe_kernels.backends.Plan`."""
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    sorted_slots = torch.argsort(flat, stable=True)
    slot_positions = torch.empty_like(sorted_slots)
    slot_positions[sorted_slots] = torch.arange(flat.numel(), device=ids.device)
    return Plan(offsets.to(torch.int32), sorted_slots.to(torch.int32), slot_positions.to(torch.int32))


def moe_mlp(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
            ids: torch.Tensor, activation: str = "silu", gate_up_bias: torch.Tensor | None = None,
            down_bias: torch.Tensor | None = None, interleaved: bool = False,
            swiglu_limit: float | None = None, gated: bool = True,
            softcaps: tuple[float, float] | None = None) -> torch.Tensor:
    """y[t] = sum_j weights[t,j] * down_e(act(gate_e x_t) * up_e x_t), e = ids[t,j]. Loop over experts.

    gated=False: gate_up_proj is the up projection alone [E,I,H] and y[t] = sum_j weights[t,j] * down_e(act(up_e x_t))."""
    def expert(e, rows):
        h = rows @ gate_up_proj[e].float().t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].float()
        act = (gated_activation(h, activation, interleaved, swiglu_limit, softcaps) if gated
               else apply_activation(h, activation))
        y = act @ down_proj[e].float().t()
        if down_bias is not None:
            y = y + down_bias[e].float()
        return y

    return _routed_sum(x, weights, ids, gate_up_proj.shape[0], expert)


def adapter_moe(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor, activation: str = "gelu", scale: float = 1.0) -> torch.Tensor:
    """y[t] = sum_j weights[t,j] * scale * up_e(act(down_e h_t)), e = ids[t,j]; down [E,r,H], up [E,H,r]."""
    def expert(e, rows):
        return apply_activation(rows @ down[e].float().t(), activation) @ up[e].float().t()

    return _routed_sum(h, weights, ids, down.shape[0], expert, scale)


def _routed_sum(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int, expert,
                scale: float = 1.0) -> torch.Tensor:
    """out[t] = sum_j scale * weights[t,j] * expert(e, x[t]), e = ids[t,j]: a loop over experts, each applied
    to its routed rows (fp32) at once; summed in fp32, returned in x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ids = ids.long()
    for e in range(num_experts):
        tokens, choice = torch.where(ids == e)
        if tokens.numel() == 0:
            continue
        y = expert(e, x[tokens].float())
        out = out.index_add(0, tokens, y * (scale * weights[tokens, choice].float()).unsqueeze(-1))
    return out.to(x.dtype)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def load_balancing_loss(logits: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer loss: E * sum_e f_e * P_e, f_e = (choices of e) / T, P_e = mean softmax prob of e.

    Equals transformers' ``load_balancing_loss_func`` for one layer without attention mask. The
    gradient flows through P (f is a count); it is never constant in the logits.
    """
    probs = torch.softmax(_at_least_fp32(logits), dim=-1)
    num_tokens = logits.shape[0]
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=logits.device)
    counts = counts.index_add(0, ids.reshape(-1).long(), torch.ones(ids.numel(), dtype=probs.dtype,
                                                                     device=logits.device))
    return num_experts * torch.sum((counts / num_tokens) * probs.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(_at_least_fp32(logits), dim=-1).square().mean()


class ReferenceBackend(Backend):
    """The oracle run as a backend (any device, plain autograd). The backend methods take the arguments of
    the functions above, in the same order."""

    name = "reference"
    route = staticmethod(route)
    plan = staticmethod(plan)
    moe_mlp = staticmethod(moe_mlp)
    adapter_moe = staticmethod(adapter_moe)


BACKEND = ReferenceBackend()

__all__ = ["route", "plan", "moe_mlp", "adapter_moe", "load_balancing_loss", "z_loss", "BACKEND",
           "GATED_ACTIVATIONS", "ELEMENTWISE_ACTIVATIONS", "ADAPTER_ACTIVATIONS"]
