"""An independent, naive second oracle: route, plan, moe_mlp and adapter_moe written token by token (and slot by slot),
with the activations spelled out from their formulas, sharing no code with ``moe_kernels.reference``.

The "every backend against the oracle" tests check the reference backend against these functions instead of against
``moe_kernels.reference`` itself (which would compare the oracle with itself and could not fail); see
``moe_testing.oracle_for``. Same signatures as the reference functions; float32 arithmetic, results in the reference's
dtypes; differentiable through ordinary autograd. Slow (Python loops): for the small test problems only.
"""

import math

import torch

from moe_kernels.backends import Plan

GPT_OSS_ALPHA = 1.702  # GPT-OSS's gate: gate * sigmoid(1.702 gate) (transformers' GptOssExperts.alpha)
RENORM_EPS = 1e-20  # README: renormalised weights divide by (sum + 1e-20)


def _sigmoid(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def _act(z, name):
    if name == "silu":
        return z * _sigmoid(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "relu2":
        return torch.where(z > 0, z * z, torch.zeros_like(z))
    if name == "identity":
        return z
    raise ValueError(f"naive oracle: unknown activation {name!r}")


def _gated(h, name, interleaved, limit, softcaps):
    """One row [2I] -> [I]."""
    inter = h.shape[0] // 2
    if interleaved:
        gate = torch.stack([h[2 * i] for i in range(inter)])
        up = torch.stack([h[2 * i + 1] for i in range(inter)])
    else:
        gate, up = h[:inter], h[inter:]
    if limit is not None:
        gate = torch.minimum(gate, torch.tensor(limit, dtype=gate.dtype))
        up = torch.minimum(torch.maximum(up, torch.tensor(-limit, dtype=up.dtype)), torch.tensor(limit, dtype=up.dtype))
    if name == "gpt_oss":
        return (up + 1.0) * gate * _sigmoid(GPT_OSS_ALPHA * gate)
    if name == "softcap_swiglu":
        gate_cap, up_cap = softcaps
        return gate_cap * torch.tanh(gate / gate_cap) * _sigmoid(gate) * up_cap * torch.tanh(up / up_cap)
    return _act(gate, name) * up


def _ranked(values, candidates):
    """``candidates`` by descending value, ties to the lower index."""
    return sorted(candidates, key=lambda e: (-values[e], e))


def route(logits, k, scoring="softmax", order="softmax_then_topk", renormalize=True, bias=None, n_group=None,
          topk_group=None, scale=1.0, weights_dtype=torch.float32, ids_dtype=torch.int32):
    num_tokens, num_experts = logits.shape
    all_weights, all_ids = [], []
    for t in range(num_tokens):
        z = logits[t].float()
        probs = _softmax(z) if scoring == "softmax" else _sigmoid(z)
        scores = probs if order == "softmax_then_topk" else z
        choice = scores.detach() + (bias.float() if bias is not None else 0.0)  # float32, as the kernels add
        values = choice.tolist()
        eligible = range(num_experts)
        if n_group is not None and n_group > 1:
            per_group = num_experts // n_group
            group_score = []
            for g in range(n_group):
                best = sorted(choice[g * per_group:(g + 1) * per_group].tolist(), reverse=True)[:2]
                group_score.append(torch.tensor(best, dtype=torch.float32).sum().item())
            kept = _ranked(group_score, range(n_group))[:topk_group]
            eligible = [e for g in sorted(kept) for e in range(g * per_group, (g + 1) * per_group)]
        ids = _ranked(values, eligible)[:k]
        picked = torch.stack([scores[e] for e in ids])
        if order == "topk_then_softmax":
            picked = _softmax(picked) if scoring == "softmax" else _sigmoid(picked)
        if renormalize:
            picked = picked / (picked.sum() + RENORM_EPS)
        all_weights.append(picked * scale)
        all_ids.append(ids)
    weights = torch.stack(all_weights) if all_weights else logits.new_zeros((0, k), dtype=torch.float32)
    return weights.to(weights_dtype), torch.tensor(all_ids, dtype=ids_dtype, device=logits.device).reshape(-1, k)


def plan(ids, num_experts):
    flat = ids.reshape(-1).tolist()
    buckets = [[] for _ in range(num_experts)]
    for slot, expert in enumerate(flat):
        buckets[expert].append(slot)
    offsets, sorted_slots = [0], []
    for bucket in buckets:
        sorted_slots += bucket
        offsets.append(len(sorted_slots))
    positions = [0] * len(flat)
    for position, slot in enumerate(sorted_slots):
        positions[slot] = position

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32, device=ids.device)

    return Plan(as_tensor(offsets), as_tensor(sorted_slots), as_tensor(positions))


def _routed(x, weights, ids, expert, scale=1.0):
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        for j in range(ids.shape[1]):
            acc = acc + scale * weights[t, j].float() * expert(int(ids[t, j]), x[t].float())
        rows.append(acc)
    out = torch.stack(rows) if rows else torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.to(x.dtype)


def moe_mlp(x, gate_up_proj, down_proj, weights, ids, activation="silu", gate_up_bias=None, down_bias=None,
            interleaved=False, swiglu_limit=None, gated=True, softcaps=None):
    def expert(e, row):
        h = gate_up_proj[e].float() @ row
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].float()
        a = _gated(h, activation, interleaved, swiglu_limit, softcaps) if gated else _act(h, activation)
        y = down_proj[e].float() @ a
        if down_bias is not None:
            y = y + down_bias[e].float()
        return y

    return _routed(x, weights, ids, expert)


def adapter_moe(h, down, up, weights, ids, activation="gelu", scale=1.0):
    return _routed(h, weights, ids, lambda e, row: up[e].float() @ _act(down[e].float() @ row, activation), scale)
