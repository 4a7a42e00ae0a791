"""SparseMoE: a router plus routed expert MLPs, the MoE block on the moe_kernels ops."""

from __future__ import annotations

import torch
from torch import nn

import moe_kernels
from moe_kernels.spec import ELEMENTWISE_ACTIVATIONS, GATED_ACTIVATIONS
from moe_kernels.validation import check_choice, check_hidden, check_int


class SparseMoE(nn.Module):
    """Router (a linear H -> E) + E expert MLPs in the Hugging Face v5 layout: gated (``gate_up_proj`` [E, 2I, H])
    or, with ``gated=False``, without a gate (``up_proj`` [E, I, H], e.g. ``activation="relu2"`` as Nemotron-H).

    forward(x [..., H]) -> y [..., H]. The router's logits and the Switch load-balancing loss of the
    last forward are kept on ``self.router_logits`` / ``self.aux_loss`` for the training loop.

    Routing options are those of :func:`moe_kernels.route` (``scoring``, ``order``, ``renormalize``,
    ``scale``); ``backend`` picks the implementation (None: by device).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 activation: str = "silu", scoring: str = "softmax", order: str = "softmax_then_topk",
                 renormalize: bool = True, scale: float = 1.0, backend: str | None = None, gated: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        # Checked here, not at the first forward: a size of 0 failed in reset_parameters (ZeroDivisionError), a
        # float or bool top_k only when route saw it.
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts)):
            check_int(name, value)
        check_int("top_k", top_k, 1, num_experts)
        check_choice("activation", activation, GATED_ACTIVATIONS if gated else ELEMENTWISE_ACTIVATIONS)
        factory = dict(dtype=dtype, device=device)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.backend, self.gated = activation, backend, bool(gated)
        self.routing = dict(scoring=scoring, order=order, renormalize=renormalize, scale=scale)
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        first = nn.Parameter(torch.empty(num_experts, (2 if gated else 1) * intermediate_size, hidden_size, **factory))
        if self.gated:
            self.gate_up_proj = first
        else:
            self.up_proj = first
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()
        self.router_logits: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    @property
    def first_proj(self) -> nn.Parameter:
        """The first GEMM's weight: ``gate_up_proj``, or ``up_proj`` without a gate."""
        return self.gate_up_proj if self.gated else self.up_proj

    def reset_parameters(self) -> None:
        nn.init.normal_(self.first_proj, std=self.hidden_size ** -0.5)
        nn.init.normal_(self.down_proj, std=self.intermediate_size ** -0.5)
        self.router.reset_parameters()

    def route(self, x2d: torch.Tensor):
        """x2d [T,H] -> (router logits [T,E], weights [T,k] fp32, ids [T,k] int32)."""
        logits = self.router(x2d)
        weights, ids = moe_kernels.route(logits, self.top_k, backend=self.backend, **self.routing)
        return logits, weights, ids

    def experts(self, x2d: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return moe_kernels.moe_mlp(x2d, self.first_proj, self.down_proj, weights, ids,
                                   activation=self.activation, gated=self.gated, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_hidden(x, self.hidden_size)
        x2d = x.reshape(-1, self.hidden_size)
        logits, weights, ids = self.route(x2d)
        self.router_logits = logits
        self.aux_loss = moe_kernels.load_balancing_loss(logits, ids, self.num_experts)
        return self.experts(x2d, weights, ids).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
                f"top_k={self.top_k}, activation={self.activation}, gated={self.gated}, backend={self.backend}")
