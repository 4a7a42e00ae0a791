"""Losses: the fused gated cross-entropy of UltraFuser (pure torch).

UltraFuser blends N specialists' logits token by token, o = sum_j w_j * (h_j @ W_j^T + b_j). Training the
fused model with cross-entropy naively keeps all N [T, V] logit tensors (and their gradients) alive.
:func:`fused_gated_cross_entropy` computes the same loss and gradients chunk by chunk over tokens, so
only two chunk-sized [C, V] blocks exist at once (the running blend and one specialist's logits); its
gradients go into the gate weights w, every specialist's hidden states and every head (weight and bias).
:func:`naive_gated_cross_entropy` is the plain form, the oracle of the tests.

Used by :class:`moe_kernels.models.ultrafuser.TokenFuser` and
:class:`moe_kernels.models.UltraFuserForCausalLM`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .first_order import first_order_only

# fp32 [chunk, V] scratch the fused loss allows itself when no chunk size is given (the blend, which becomes
# its gradient, and one specialist's logits): 2**24 elements = 64 MiB in all.
_AUTO_CHUNK_ELEMENTS = 2 ** 24
REDUCTIONS = ("mean", "sum")


def _auto_chunk_size(num_tokens: int, vocab_size: int) -> int:
    return max(1, min(num_tokens, _AUTO_CHUNK_ELEMENTS // (2 * vocab_size) or 1))


class _FusedGatedCrossEntropy(torch.autograd.Function):
    """Loss and all gradients computed together in forward, chunk by chunk; backward scales them.

    Inputs: gate_weights [T, N], labels [T], then N hidden tensors [T, H_j], N head weights [V, H_j] and
    (when has_bias) N head biases [V].
    """

    @staticmethod
    def forward(ctx, gate_weights, labels, num_specialists, has_bias, ignore_index, reduction, chunk_size, *tensors):
        n = num_specialists
        hiddens, heads = tensors[:n], tensors[n:2 * n]
        biases = tensors[2 * n:3 * n] if has_bias else (None,) * n
        offset = 7  # position of the first tensor in forward's inputs (for needs_input_grad)
        need_w = ctx.needs_input_grad[0]
        need_h = [ctx.needs_input_grad[offset + j] for j in range(n)]
        need_head = [ctx.needs_input_grad[offset + n + j] for j in range(n)]
        need_b = [has_bias and ctx.needs_input_grad[offset + 2 * n + j] for j in range(n)]
        need_any = need_w or any(need_h) or any(need_head) or any(need_b)

        num_tokens, vocab = labels.shape[0], heads[0].shape[0]
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
        count = valid.sum()
        denominator = count.clamp_min(1).float() if reduction == "mean" else torch.ones((), device=labels.device)
        chunk = chunk_size or _auto_chunk_size(num_tokens, vocab)

        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        grad_w = torch.zeros(num_tokens, n, dtype=torch.float32, device=labels.device) if need_w else None
        grad_h = [torch.empty_like(hiddens[j]) if need_h[j] else None for j in range(n)]
        grad_head = [torch.zeros(heads[j].shape, dtype=torch.float32, device=heads[j].device) if need_head[j] else None
                     for j in range(n)]
        grad_b = [torch.zeros(vocab, dtype=torch.float32, device=labels.device) if need_b[j] else None
                  for j in range(n)]

        for start in range(0, num_tokens, chunk):
            end = min(num_tokens, start + chunk)
            weights = gate_weights[start:end].float()
            blended = None
            for j in range(n):
                logits_j = F.linear(hiddens[j][start:end], heads[j], biases[j]).float()
                if blended is None:
                    blended = logits_j.mul_(weights[:, :1])
                else:
                    blended.addcmul_(logits_j, weights[:, j:j + 1])
                del logits_j
            lse = torch.logsumexp(blended, dim=-1)
            target = blended.gather(1, safe_labels[start:end, None]).squeeze(1)
            row_valid = valid[start:end].float()
            total = total + ((lse - target) * row_valid).sum()
            if not need_any:
                continue
            # G = dL/d(blended) = (softmax - onehot(label)) / denominator, zero on ignored rows; computed in
            # the blend's buffer. Then per specialist, with w_j a per-row scalar and GW_j = G @ W_j [C, H]
            # (so no [C, V] temporaries and no specialist's logits kept):
            # dL/dw_j = rowdot(GW_j, h_j) + G b_j, dL/dh_j = w_j * GW_j, dL/dW_j = G^T (w_j * h_j), dL/db_j = G^T w_j.
            grad_blended = blended.sub_(lse[:, None]).exp_()
            grad_blended.scatter_add_(1, safe_labels[start:end, None],
                                      -torch.ones((end - start, 1), dtype=torch.float32, device=labels.device))
            grad_blended.mul_((row_valid / denominator)[:, None])
            for j in range(n):
                weight_j = weights[:, j:j + 1]
                if need_w or need_h[j]:
                    grad_times_head = (grad_blended.to(heads[j].dtype) @ heads[j]).float()
                if need_w:
                    grad_w[start:end, j] = (grad_times_head * hiddens[j][start:end].float()).sum(-1)
                    if biases[j] is not None:
                        grad_w[start:end, j] += grad_blended @ biases[j].float()
                if need_h[j]:
                    grad_h[j][start:end] = (grad_times_head * weight_j).to(hiddens[j].dtype)
                if need_head[j]:
                    grad_head[j].addmm_(grad_blended.t(), hiddens[j][start:end].float() * weight_j)
                if need_b[j]:
                    grad_b[j].addmv_(grad_blended.t(), weight_j.view(-1))

        ctx.grads = (grad_w, grad_h, grad_head, grad_b)
        # What first_order_only links a second differentiation to (nothing is saved): the gate weights, heads and
        # biases, alive anyway. Not the hidden states: keeping them would cost N x [T, H] every step, so a second
        # differentiation with respect to them alone (not through the gate or the heads) is not caught.
        ctx.first_order_inputs = (gate_weights, *tensors[n:])
        ctx.dtypes = (gate_weights.dtype, [h.dtype for h in hiddens], [w.dtype for w in heads],
                      [b.dtype if b is not None else None for b in biases])
        ctx.has_bias = has_bias
        return total / denominator

    @staticmethod
    @first_order_only("fused_gated_cross_entropy")
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_gated_cross_entropy: backward ran twice through one loss (retain_graph); "
                               "its gradients are computed in forward and handed over once. Recompute the loss.")
        grad_w, grad_h, grad_head, grad_b = ctx.grads
        ctx.grads = None  # hand the buffers over (no copies kept alive)
        w_dtype, h_dtypes, head_dtypes, b_dtypes = ctx.dtypes
        unit = bool(grad_loss == 1)

        def scaled(g, dtype):
            if g is None:
                return None
            return (g if unit else g.mul_(grad_loss)).to(dtype)

        out = [scaled(grad_w, w_dtype), None, None, None, None, None, None]
        out += [scaled(g, d) for g, d in zip(grad_h, h_dtypes)]
        out += [scaled(g, d) for g, d in zip(grad_head, head_dtypes)]
        if ctx.has_bias:
            out += [scaled(g, d) for g, d in zip(grad_b, b_dtypes)]
        return tuple(out)


def _check_gated_ce_args(hidden_states, head_weights, gate_weights, labels, head_biases, reduction):
    if not isinstance(hidden_states, (list, tuple)) or not hidden_states:
        raise ValueError("hidden_states must be a non-empty list of [T, H] tensors, one per specialist")
    n = len(hidden_states)
    if not isinstance(head_weights, (list, tuple)) or len(head_weights) != n:
        raise ValueError(f"head_weights must be a list of {n} [V, H] tensors (one per hidden_states entry)")
    if head_biases is not None and (not isinstance(head_biases, (list, tuple)) or len(head_biases) != n):
        raise ValueError(f"head_biases must be None or a list of {n} [V] tensors")
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D int64/int32 tensor [T], got shape {tuple(labels.shape)} "
                         f"dtype {labels.dtype}")
    num_tokens = labels.shape[0]
    if gate_weights.shape != (num_tokens, n):
        raise ValueError(f"gate_weights must have shape [T, N] = {(num_tokens, n)}, got {tuple(gate_weights.shape)}")
    vocab = head_weights[0].shape[0]
    for j, (h, w) in enumerate(zip(hidden_states, head_weights)):
        if h.dim() != 2 or h.shape[0] != num_tokens:
            raise ValueError(f"hidden_states[{j}] must have shape [T={num_tokens}, H], got {tuple(h.shape)}")
        if w.dim() != 2 or w.shape[1] != h.shape[1]:
            raise ValueError(f"head_weights[{j}] must have shape [V, H={h.shape[1]}], got {tuple(w.shape)}")
        if w.shape[0] != vocab:
            raise ValueError(f"head_weights[{j}] has vocabulary size {w.shape[0]} but head_weights[0] has {vocab}; "
                             "the specialists must share one vocabulary")
        if head_biases is not None and head_biases[j] is not None and head_biases[j].shape != (vocab,):
            raise ValueError(f"head_biases[{j}] must have shape [{vocab}], got {tuple(head_biases[j].shape)}")
    if head_biases is not None and any(b is None for b in head_biases) and not all(b is None for b in head_biases):
        raise ValueError("head_biases must be all tensors or all None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def fused_gated_cross_entropy(hidden_states: Sequence[torch.Tensor], head_weights: Sequence[torch.Tensor],
                              gate_weights: torch.Tensor, labels: torch.Tensor,
                              head_biases: Sequence[torch.Tensor] | None = None, ignore_index: int = -100,
                              reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the gated blend sum_j w_j * (h_j @ W_j^T + b_j), without materialising the N
    full [T, V] logit tensors.

    hidden_states: N tensors [T, H_j]; head_weights: N tensors [V, H_j]; gate_weights [T, N] (any float
    dtype, used in fp32); labels [T] int (``ignore_index`` rows contribute nothing); head_biases: None
    or N tensors [V]. Works through the tokens in chunks of ``chunk_size`` (default: sized so the
    fp32 scratch stays near 64 MiB whatever N and T); softmax/log-sum-exp in fp32. Returns a float32
    scalar equal to ``naive_gated_cross_entropy`` (mean over non-ignored tokens, or sum), with
    gradients for the gate weights, the hidden states, the head weights and biases. If every label
    is ignored, the mean is 0 (not NaN). The gradients are computed in forward (only for inputs that
    require them) and handed over in backward: not twice differentiable, and backward runs once per loss.
    """
    if head_biases is not None and all(b is None for b in head_biases):
        head_biases = None
    _check_gated_ce_args(hidden_states, head_weights, gate_weights, labels, head_biases, reduction)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    tensors = list(hidden_states) + list(head_weights) + (list(head_biases) if head_biases is not None else [])
    return _FusedGatedCrossEntropy.apply(gate_weights, labels, len(hidden_states), head_biases is not None,
                                         ignore_index, reduction, chunk_size, *tensors)


def naive_gated_cross_entropy(hidden_states: Sequence[torch.Tensor], head_weights: Sequence[torch.Tensor],
                              gate_weights: torch.Tensor, labels: torch.Tensor,
                              head_biases: Sequence[torch.Tensor] | None = None, ignore_index: int = -100,
                              reduction: str = "mean") -> torch.Tensor:
    """The plain form of :func:`fused_gated_cross_entropy` (all N [T, V] logits at once): the oracle."""
    _check_gated_ce_args(hidden_states, head_weights, gate_weights, labels, head_biases, reduction)
    biases = head_biases if head_biases is not None else [None] * len(hidden_states)
    blended = sum(gate_weights[:, j:j + 1].float() * F.linear(h, w, b).float()
                  for j, (h, w, b) in enumerate(zip(hidden_states, head_weights, biases)))
    return F.cross_entropy(blended, labels.long(), ignore_index=ignore_index, reduction=reduction)


__all__ = ["fused_gated_cross_entropy", "naive_gated_cross_entropy", "REDUCTIONS"]
