"""Self-MoE (MiXSE): a frozen linear plus N routed LoRA experts.

    y = base(x) + sum_i alpha_i * s_i * B_i A_i x,    alpha = top-k mask of softmax(router logits) over all N

alpha is *not* renormalised after the top-k (top-1 by default, so alpha is the winner's probability).
The LoRA products run through :func:`moe_kernels.adapter_moe` with ``activation="identity"``: only the
routed experts are computed for each token, never all N.

Layout. Expert i is A_i [r_i, in] and B_i [out, r_i] (PEFT's ``lora_A.weight`` / ``lora_B.weight``) with
scaling s_i (PEFT: lora_alpha / r_i, or lora_alpha / sqrt(r_i) with rsLoRA). They are stored stacked as
``lora_down`` [N, R, D] and ``lora_up`` [N, D, R] where R = max_i r_i and D = max(in, out):
experts of rank r_i < R get zero rows in A and zero columns in B beyond r_i, and when in != out the
input is zero-padded to D and the output cut back to ``out`` (``adapter_moe`` takes square [H -> H]
adapters). Zero padding changes no result and receives zero gradient, so it stays zero in training.
The per-expert scalings s_i multiply the routing weights (the stored A, B are PEFT's, unscaled).

Routing. A :class:`SelfMoERouter` maps hidden states [T, H] to (weights [T,k] fp32, ids [T,k] int32).
A LoRAMoE either owns one and routes on its own input x (standalone use), or reads the routing of its
decoder layer from a :class:`RoutingSlot` that a shared router fills (see
:func:`moe_kernels.hf.compose_lora_experts`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import MAX_ADAPTER_RANK
from ..validation import check_hidden


class SelfMoERouter(nn.Module):
    """Linear router (no bias) with Self-MoE's routing: softmax over all N experts, keep the top k, no
    renormalisation. ``forced_expert = i`` sends every token to expert i with weight 1 (for checks and
    ablations). Input [T, H]; output (weights [T,k] fp32, ids [T,k] int32); ``last_logits`` keeps [T, N]."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, backend: str | None = None,
                 init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts = {num_experts}], got {top_k!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.backend = backend
        self.forced_expert: int | None = None
        self.linear = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.linear.weight, std=init_std)
        self.last_logits: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_hidden(hidden, self.hidden_size)
        hidden = hidden.reshape(-1, self.hidden_size)
        if self.forced_expert is not None:
            if not 0 <= self.forced_expert < self.num_experts:
                raise ValueError(f"forced_expert must be in [0, {self.num_experts}), got {self.forced_expert!r}")
            num_tokens = hidden.shape[0]
            weights = torch.ones(num_tokens, 1, dtype=torch.float32, device=hidden.device)
            ids = torch.full((num_tokens, 1), self.forced_expert, dtype=torch.int32, device=hidden.device)
            return weights, ids
        logits = self.linear(hidden.to(self.linear.weight.dtype))
        self.last_logits = logits
        return ops.route(logits, self.top_k, order="softmax_then_topk", renormalize=False, backend=self.backend)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"


class RoutingSlot:
    """The routing (weights [T,k], ids [T,k]) of one decoder layer's tokens, filled by a forward pre-hook
    before the layer runs and read by every LoRAMoE inside it. Not a module: holds no parameters."""

    __slots__ = ("value",)

    def __init__(self):
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None


class LoRAMoE(nn.Module):
    """A linear with routed LoRA experts (Self-MoE).

    Args:
        base: the wrapped nn.Linear (kept as ``base``; frozen by the builder, not here).
        lora_A: N tensors [r_i, in] (PEFT lora_A.weight), 1 <= r_i <= 1024.
        lora_B: N tensors [out, r_i] (PEFT lora_B.weight).
        scalings: N floats s_i.
        top_k: experts per token for the layer's own router (ignored when a routing slot is used).
        routing_slot: a :class:`RoutingSlot` filled by a shared router; None: the layer owns a
            :class:`SelfMoERouter` (``router``) on its input x.
        trainable_experts: whether ``lora_down``/``lora_up`` require grad (Self-MoE trains the router only).
        backend: moe_kernels backend for ``route`` and ``adapter_moe``.

    Forward: x [..., in] -> [..., out] in the base layer's output dtype.
    """

    def __init__(self, base: nn.Linear, lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                 scalings: Sequence[float], *, top_k: int = 1, routing_slot: RoutingSlot | None = None,
                 trainable_experts: bool = False, backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        num_experts = len(lora_A)
        if num_experts < 1 or len(lora_B) != num_experts or len(scalings) != num_experts:
            raise ValueError(f"lora_A, lora_B and scalings must have the same positive length, got "
                             f"{len(lora_A)}, {len(lora_B)}, {len(scalings)}")
        in_features, out_features = base.in_features, base.out_features
        ranks = []
        for i, (a, b) in enumerate(zip(lora_A, lora_B)):
            rank = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or a.shape[1] != in_features or not 1 <= rank <= MAX_ADAPTER_RANK:
                raise ValueError(f"lora_A[{i}] must have shape [r, in = {in_features}] with 1 <= r <= "
                                 f"{MAX_ADAPTER_RANK}, got {tuple(a.shape)}")
            if tuple(b.shape) != (out_features, rank):
                raise ValueError(f"lora_B[{i}] must have shape [out, r] = {(out_features, rank)}, got {tuple(b.shape)}")
            ranks.append(rank)
        for i, s in enumerate(scalings):
            if not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"scalings[{i}] must be a finite number, got {s!r}")

        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.ranks, self.backend = num_experts, ranks, backend
        self.padded_dim = max(in_features, out_features)
        max_rank = max(ranks)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        down = torch.zeros(num_experts, max_rank, self.padded_dim, **factory)
        up = torch.zeros(num_experts, self.padded_dim, max_rank, **factory)
        for i, (a, b) in enumerate(zip(lora_A, lora_B)):
            down[i, :ranks[i], :in_features] = a.detach().to(**factory)
            up[i, :out_features, :ranks[i]] = b.detach().to(**factory)
        self.lora_down = nn.Parameter(down, requires_grad=trainable_experts)
        self.lora_up = nn.Parameter(up, requires_grad=trainable_experts)
        self.register_buffer("expert_scale", torch.tensor([float(s) for s in scalings], dtype=torch.float32,
                                                          device=base.weight.device))
        self.routing_slot = routing_slot
        self.router = None if routing_slot is not None else SelfMoERouter(
            in_features, num_experts, top_k, backend=backend, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        flat = x.reshape(-1, self.in_features)
        if self.router is not None:
            weights, ids = self.router(flat)
        else:
            if self.routing_slot.value is None:
                raise RuntimeError("LoRAMoE: no routing for this call; the shared router fills it when the "
                                   "enclosing decoder layer runs (call the model, not the linear alone)")
            weights, ids = self.routing_slot.value
        if weights.shape[0] != flat.shape[0]:
            raise RuntimeError(f"LoRAMoE: routing covers {weights.shape[0]} tokens but x has {flat.shape[0]}")
        weights = weights * self.expert_scale[ids.long()]
        h = flat.to(self.lora_down.dtype)
        if self.padded_dim != self.in_features:
            h = F.pad(h, (0, self.padded_dim - self.in_features))
        delta = ops.adapter_moe(h, self.lora_down, self.lora_up, weights, ids, activation="identity",
                                backend=self.backend)
        if self.padded_dim != self.out_features:
            delta = delta[:, :self.out_features]
        return out + delta.reshape(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, ranks={self.ranks}")


__all__ = ["LoRAMoE", "SelfMoERouter", "RoutingSlot"]
