"""Fused top-k routing in Triton: logits -> (weights, ids) in one pass, and its backward.

Every variant of :func:`moe_kernels.reference.route` is one specialisation of the same kernel (the
variant flags are constexprs): softmax or sigmoid scoring, softmax-then-top-k or top-k-then-softmax,
renormalisation, a selection-only bias, DeepSeek-V3's group-limited choice and a final scale.
A program holds BLOCK_T whole rows of logits in registers (BLOCK_E >= E), so the row max/sum, the
group scores and the k selections never leave the chip. Selection is k rounds of "largest remaining
score, lowest index among equals", which gives exactly the reference's stable descending order,
including ties and -inf (masked) logits.

Registered as ``moe_kernels_triton::route`` and ``moe_kernels_triton::route_backward`` (``common.register_op``);
``RouteFunction`` pairs them (autograd into the logits).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..first_order import first_order_only
from ..spec import NO_GROUP, RENORM_EPS
from ..validation import check_finite_scalars
from .common import cdiv, launcher, next_power_of_2, register_op
from .configs import entries, route_config

_RENORM_EPS = tl.constexpr(RENORM_EPS)


@triton.jit
def _take_largest(values, taken, cols, BLOCK: tl.constexpr):
    """Index [BLOCK_T] of the largest not-yet-taken value per row, lowest index among equals. A row with no
    comparable value left (NaN scores: a row of logits -inf in every column, which only unchecked GPU calls can
    pass) takes its lowest untaken index, as the C++ kernels do, so an id never leaves [0, E)."""
    best = tl.max(tl.where(taken != 0, float("-inf"), values), axis=1)
    hit = (values == best[:, None]) & (taken == 0)
    found = tl.min(tl.where(hit, cols[None, :], BLOCK), axis=1)
    untaken = tl.min(tl.where(taken == 0, cols[None, :], BLOCK), axis=1)
    return tl.where(found < BLOCK, found, untaken)


@triton.jit
def _row_scores(x, col_valid, SIGMOID: tl.constexpr):
    """softmax (over the valid columns) or sigmoid of fp32 logits [BLOCK_T, BLOCK_E]."""
    if SIGMOID:
        return tl.sigmoid(x)
    row_max = tl.max(tl.where(col_valid[None, :], x, float("-inf")), axis=1)
    e = tl.where(col_valid[None, :], tl.exp(x - row_max[:, None]), 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _route_fwd_kernel(logits_ptr, stride_lt, stride_le, bias_ptr, weights_ptr, ids_ptr,
                      num_tokens, num_experts, scale,
                      K: tl.constexpr, SIGMOID: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr,
                      HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    """Route BLOCK_T tokens.

    logits_ptr:  [T, E] any float dtype, strides (stride_lt, stride_le); computed in fp32.
    bias_ptr:    [E] float, contiguous (read when HAS_BIAS): added to the scores for selection only.
    weights_ptr: [T, K] out, contiguous: float32, float16 or bfloat16 (computed in fp32, rounded once on the store).
    ids_ptr:     [T, K] out, contiguous: int32 or int64.
    scale:       fp32 multiplier of the final weights.
    K: top-k; SIGMOID: sigmoid instead of softmax; TOPK_FIRST: select on logits, then score the k;
    RENORM: divide the k weights by their sum (+ spec.RENORM_EPS = 1e-20); N_GROUP/TOPK_GROUP: group-limited selection
    (N_GROUP = spec.NO_GROUP = 0 disables it, as does 1). BLOCK_E >= E, BLOCK_K >= K, BLOCK_G >= N_GROUP: powers of two.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_valid = rows < num_tokens
    cols = tl.arange(0, BLOCK_E)
    col_valid = cols < num_experts
    mask = row_valid[:, None] & col_valid[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask,
                other=0.0).to(tl.float32)
    x = tl.where(col_valid[None, :], x, float("-inf"))  # padding rows stay finite: no NaN in dead lanes
    if TOPK_FIRST:
        scores = x
    else:
        scores = _row_scores(x, col_valid, SIGMOID)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    # taken: 1 where a column is unavailable (padding) or already chosen
    col_taken = tl.where(col_valid, 0, 1)
    taken = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32) + col_taken[None, :]
    if N_GROUP > 1:
        per_group = num_experts // N_GROUP
        group_of_col = cols // per_group
        gcols = tl.arange(0, BLOCK_G)
        group_scores = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = (group_of_col == g)[None, :] & col_valid[None, :]
            not_in_group = tl.where(in_group, 0, 1)
            first = _take_largest(choice, not_in_group, cols, BLOCK_E)
            best = tl.max(tl.where(in_group, choice, float("-inf")), axis=1)
            second = tl.max(tl.where(in_group & (cols[None, :] != first[:, None]), choice, float("-inf")), axis=1)
            best = tl.where(per_group > 1, best + second, best)
            group_scores = tl.where(gcols[None, :] == g, best[:, None], group_scores)
        group_taken = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int32) + tl.where(gcols < N_GROUP, 0, 1)[None, :]
        for _ in tl.static_range(TOPK_GROUP):
            g_best = _take_largest(group_scores, group_taken, gcols, BLOCK_G)
            group_taken = tl.where(gcols[None, :] == g_best[:, None], 2, group_taken)
        kept_col = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for g in tl.static_range(N_GROUP):
            kept_g = tl.sum(tl.where((gcols[None, :] == g) & (group_taken == 2), 1, 0), axis=1) > 0
            kept_col = kept_col | ((group_of_col == g)[None, :] & kept_g[:, None])
        choice = tl.where(kept_col, choice, float("-inf"))
    kcols = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in range(K):
        best_col = _take_largest(choice, taken, cols, BLOCK_E)
        hit = cols[None, :] == best_col[:, None]
        taken = tl.where(hit, 1, taken)
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        picked = tl.where(kcols[None, :] == j, value[:, None], picked)
        chosen = tl.where(kcols[None, :] == j, best_col[:, None], chosen)
    k_valid = kcols < K
    if TOPK_FIRST:
        if SIGMOID:
            picked = tl.sigmoid(picked)
        else:
            pm = tl.max(tl.where(k_valid[None, :], picked, float("-inf")), axis=1)
            pe = tl.where(k_valid[None, :], tl.exp(picked - pm[:, None]), 0.0)
            picked = pe / tl.sum(pe, axis=1)[:, None]
    picked = tl.where(k_valid[None, :], picked, 0.0)
    if RENORM:
        picked = picked / (tl.sum(picked, axis=1)[:, None] + _RENORM_EPS)
    out_mask = row_valid[:, None] & k_valid[None, :]
    out_offsets = rows[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out_offsets, (picked * scale).to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offsets, chosen.to(ids_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _route_bwd_kernel(grad_w_ptr, logits_ptr, stride_lt, stride_le, ids_ptr, grad_logits_ptr,
                      num_tokens, num_experts, scale,
                      K: tl.constexpr, SIGMOID: tl.constexpr, TOPK_FIRST: tl.constexpr, RENORM: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gradient of the routing weights into the logits (scores recomputed from the logits).

    grad_w_ptr:      [T, K] float (any of the forward's weight dtypes; read as fp32), contiguous: dL/dweights.
    logits_ptr:      [T, E] float, strides (stride_lt, stride_le).
    ids_ptr:         [T, K] int32 or int64, contiguous: the forward's choices.
    grad_logits_ptr: [T, E] out, contiguous, logits' dtype.
    The selection (bias, groups) is piecewise constant and has no gradient; meta-parameters as in
    ``_route_fwd_kernel``.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_valid = rows < num_tokens
    cols = tl.arange(0, BLOCK_E)
    col_valid = cols < num_experts
    kcols = tl.arange(0, BLOCK_K)
    k_valid = kcols < K
    mask = row_valid[:, None] & col_valid[None, :]
    kmask = row_valid[:, None] & k_valid[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask,
                other=0.0).to(tl.float32)
    x = tl.where(col_valid[None, :], x, float("-inf"))  # padding rows stay finite: no NaN in dead lanes
    ids = tl.load(ids_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=-1).to(tl.int32)
    g = tl.load(grad_w_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0).to(tl.float32) * scale
    if TOPK_FIRST:
        scores = x
    else:
        scores = _row_scores(x, col_valid, SIGMOID)
    # gather the chosen scores (or logits) into [BLOCK_T, BLOCK_K]
    picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in range(K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        value = tl.sum(tl.where(cols[None, :] == id_j[:, None], scores, 0.0), axis=1)
        picked = tl.where(kcols[None, :] == j, value[:, None], picked)
    if TOPK_FIRST:
        if SIGMOID:
            probs = tl.sigmoid(picked)
        else:
            pm = tl.max(tl.where(k_valid[None, :], picked, float("-inf")), axis=1)
            pe = tl.where(k_valid[None, :], tl.exp(picked - pm[:, None]), 0.0)
            probs = pe / tl.sum(pe, axis=1)[:, None]
    else:
        probs = picked
    probs = tl.where(k_valid[None, :], probs, 0.0)
    if RENORM:
        denom = tl.sum(probs, axis=1) + _RENORM_EPS
        g = g / denom[:, None] - (tl.sum(g * probs, axis=1) / (denom * denom))[:, None]
    if TOPK_FIRST:
        if SIGMOID:
            g = g * probs * (1.0 - probs)
        else:
            g = probs * (g - tl.sum(g * probs, axis=1)[:, None])
    # scatter the per-choice gradient onto the expert columns
    grad_cols = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in range(K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        g_j = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
        grad_cols = tl.where(cols[None, :] == id_j[:, None], g_j[:, None], grad_cols)
    if TOPK_FIRST:
        grad = grad_cols
    elif SIGMOID:
        grad = grad_cols * scores * (1.0 - scores)
    else:
        grad = scores * (grad_cols - tl.sum(grad_cols * scores, axis=1)[:, None])
    tl.store(grad_logits_ptr + rows[:, None] * num_experts + cols[None, :],
             grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _blocks(num_tokens: int, num_experts: int, k: int, n_group: int):
    cfg = route_config(num_tokens, num_experts)
    return cfg, next_power_of_2(num_experts), next_power_of_2(k), next_power_of_2(max(n_group, 1))


def _route_impl(logits: torch.Tensor, bias: Optional[torch.Tensor], k: int, sigmoid: bool, topk_first: bool,
                renormalize: bool, n_group: int, topk_group: int, scale: float, weights_dtype: torch.dtype,
                ids_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T,E] -> (weights [T,k] in weights_dtype, ids [T,k] in ids_dtype: checked by moe_kernels.ops.route);
    n_group = topk_group = 0 (spec.NO_GROUP): no group limit."""
    check_finite_scalars(scale=scale)  # a traced float reaches the op unchecked (validation.finite_or_traced)
    num_tokens, num_experts = logits.shape
    weights = torch.empty((num_tokens, k), dtype=weights_dtype, device=logits.device)
    ids = torch.empty((num_tokens, k), dtype=ids_dtype, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    cfg, block_e, block_k, block_g = _blocks(num_tokens, num_experts, k, n_group)
    bias_arg = bias.contiguous() if bias is not None else weights  # (not read without HAS_BIAS)
    grid = (cdiv(num_tokens, cfg["BLOCK_T"]),)
    launcher(_route_fwd_kernel, grid)(logits, logits.stride(0), logits.stride(1), bias_arg, weights, ids,
                                      num_tokens, num_experts, float(scale),
                                      K=k, SIGMOID=sigmoid, TOPK_FIRST=topk_first, RENORM=renormalize,
                                      HAS_BIAS=bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
                                      BLOCK_T=cfg["BLOCK_T"], BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_G=block_g,
                                      num_warps=cfg["num_warps"])
    return weights, ids


def _route_fake(logits, bias, k, sigmoid, topk_first, renormalize, n_group, topk_group, scale, weights_dtype,
                ids_dtype):
    num_tokens = logits.shape[0]
    return (logits.new_empty((num_tokens, k), dtype=weights_dtype),
            logits.new_empty((num_tokens, k), dtype=ids_dtype))


def _route_backward_impl(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, sigmoid: bool,
                         topk_first: bool, renormalize: bool, scale: float) -> torch.Tensor:
    """dL/dweights [T,k] -> dL/dlogits [T,E] (logits' dtype)."""
    num_tokens, num_experts = logits.shape
    k = ids.shape[1]
    grad_logits = torch.empty((num_tokens, num_experts), dtype=logits.dtype, device=logits.device)
    if num_tokens == 0:
        return grad_logits
    cfg, block_e, block_k, _ = _blocks(num_tokens, num_experts, k, 1)
    grid = (cdiv(num_tokens, cfg["BLOCK_T"]),)
    launcher(_route_bwd_kernel, grid)(grad_weights.contiguous(), logits, logits.stride(0), logits.stride(1),
                                      ids.contiguous(), grad_logits, num_tokens, num_experts, float(scale),
                                      K=k, SIGMOID=sigmoid, TOPK_FIRST=topk_first, RENORM=renormalize,
                                      BLOCK_T=cfg["BLOCK_T"], BLOCK_E=block_e, BLOCK_K=block_k,
                                      num_warps=cfg["num_warps"])
    return grad_logits


def _route_backward_fake(grad_weights, logits, ids, sigmoid, topk_first, renormalize, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


route_op = register_op("route", _route_impl, _route_fake)
route_backward_op = register_op("route_backward", _route_backward_impl, _route_backward_fake)


class RouteFunction(torch.autograd.Function):
    """Routing with its backward (d logits from d weights; the ids are not differentiable)."""

    @staticmethod
    def forward(ctx, logits, bias, k, sigmoid, topk_first, renormalize, n_group, topk_group, scale, weights_dtype,
                ids_dtype):
        weights, ids = route_op(logits, bias, k, sigmoid, topk_first, renormalize, n_group, topk_group, scale,
                                weights_dtype, ids_dtype)
        ctx.save_for_backward(logits, ids)
        ctx.variant = (sigmoid, topk_first, renormalize, scale)
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    @first_order_only("route (triton)")
    def backward(ctx, grad_weights, grad_ids):
        logits, ids = ctx.saved_tensors
        sigmoid, topk_first, renormalize, scale = ctx.variant
        if grad_weights is None:
            grad_weights = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        grad_logits = route_backward_op(grad_weights, logits, ids, sigmoid, topk_first, renormalize, scale)
        return grad_logits, None, None, None, None, None, None, None, None, None, None


def route(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype, ids_dtype):
    """Backend entry point (arguments validated by :func:`moe_kernels.ops.route`; n_group None: no group limit,
    which the op takes as spec.NO_GROUP)."""
    args = (logits, bias, k, scoring == "sigmoid", order == "topk_then_softmax", renormalize,
            NO_GROUP if n_group is None else n_group, NO_GROUP if topk_group is None else topk_group, scale,
            weights_dtype, ids_dtype)
    if torch.is_grad_enabled() and logits.requires_grad:
        return RouteFunction.apply(*args)
    return route_op(*args)


# Representative routing shapes compiled by the compile check, one per family: (E, k, sigmoid, topk_first,
# renormalize, bias, n_group, topk_group, the weights' storage as that family's Hugging Face router returns them).
_COMPILE_FAMILIES = [
    (8, 2, False, False, True, False, NO_GROUP, NO_GROUP, "*fp32"),      # Mixtral
    (128, 8, False, False, True, False, NO_GROUP, NO_GROUP, "*bf16"),    # Qwen3-MoE / OLMoE
    (32, 4, False, True, False, False, NO_GROUP, NO_GROUP, "*bf16"),     # GPT-OSS / Granite (top-k then softmax)
    (256, 8, True, False, True, True, 8, 4, "*fp32"),                    # DeepSeek-V3 / GLM4-MoE
    (4096, 8, False, False, False, False, NO_GROUP, NO_GROUP, "*fp32"),  # many experts
]


def _in_arg_order(kernel, signature: dict) -> dict:
    return {name: signature[name] for name in kernel.arg_names}


def _compile_specs():
    """(kernel, signature, constexprs, options) for the routing kernels at every shipped config, each with the
    default outputs (fp32 weights, int32 ids) and with the family's Hugging Face ones (int64 ids)."""
    specs = []
    for num_experts, k, sigmoid, topk_first, renorm, has_bias, n_group, topk_group, hf_weights in _COMPILE_FAMILIES:
        for cfg in [c for c in entries("route") if c.get("max_experts") is None or num_experts <= c["max_experts"]][:1]:
            block_e, block_k = next_power_of_2(num_experts), next_power_of_2(k)
            common = {"K": k, "SIGMOID": sigmoid, "TOPK_FIRST": topk_first, "RENORM": renorm,
                      "BLOCK_T": cfg["BLOCK_T"], "BLOCK_E": block_e, "BLOCK_K": block_k}
            opts = {"num_warps": cfg["num_warps"], "num_stages": 1}
            fwd_const = dict(common, HAS_BIAS=has_bias, N_GROUP=n_group, TOPK_GROUP=topk_group,
                             BLOCK_G=next_power_of_2(max(n_group, 1)))
            for weights, ids in (("*fp32", "*i32"), (hf_weights, "*i64")):
                fwd_sig = {"logits_ptr": "*bf16", "stride_lt": "i32", "stride_le": "i32",
                           "bias_ptr": "*fp32" if has_bias else weights,  # (the weights stand in for no bias)
                           "weights_ptr": weights, "ids_ptr": ids, "num_tokens": "i32", "num_experts": "i32",
                           "scale": "fp32"}
                fwd_sig.update({name: "constexpr" for name in fwd_const})
                specs.append((_route_fwd_kernel, _in_arg_order(_route_fwd_kernel, fwd_sig), fwd_const, opts))
                bwd_sig = {"grad_w_ptr": weights, "logits_ptr": "*bf16", "stride_lt": "i32", "stride_le": "i32",
                           "ids_ptr": ids, "grad_logits_ptr": "*bf16", "num_tokens": "i32", "num_experts": "i32",
                           "scale": "fp32"}
                bwd_sig.update({name: "constexpr" for name in common})
                specs.append((_route_bwd_kernel, _in_arg_order(_route_bwd_kernel, bwd_sig), dict(common), opts))
    return specs


__all__ = ["route", "route_op", "route_backward_op"]
