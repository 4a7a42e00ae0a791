"""PESC (Parameter-Efficient Sparsity Crafting, the Camelidae models): a dense FFN turned into a sparse MoE
whose experts share the FFN weights and differ only by small bottleneck adapters.

    F = FFN(x)                                   (computed once for all tokens)
    w, e = top-k over router(x), softmax over the kept k
    y = F + sum_j w_j * scale * Up_{e_j}(act(Down_{e_j}(dropout(F))))

Up is zero-initialised, so a freshly built layer returns exactly F. The adapters run through
:func:`moe_kernels.adapter_moe` (only the routed experts are computed).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..reference import ADAPTER_ACTIVATIONS
from ..ops import MAX_ADAPTER_RANK
from ..validation import check_hidden, check_int


class AdapterMoE(nn.Module):
    """A shared FFN plus routed bottleneck-adapter experts (PESC).

    Args:
        ffn: the shared dense FFN, any module mapping [..., H] -> [..., H] (e.g. a LlamaMLP). It is kept
            as the submodule ``ffn`` and called once per forward.
        hidden_size: H.
        num_experts: number of adapter experts E (4-16 in the PESC paper; any E >= 1 works).
        top_k: experts per token, 1 <= top_k <= E.
        adapter_dim: bottleneck width r, 1..1024 (64 in the PESC code, 512 in the paper).
        scale: multiplies every adapter's output.
        activation: the adapter's activation, one of ``moe_kernels.reference.ADAPTER_ACTIVATIONS``.
        dropout: dropout probability on the adapter input F, applied in training only.
        aux_loss_coef: coefficient of the Switch load-balancing loss; the layer stores the unscaled loss
            of its last forward in ``aux_loss`` and training adds ``aux_loss_coef * aux_loss`` (see
            :func:`moe_kernels.hf.craft.crafted_aux_loss`).
        backend: moe_kernels backend for ``route`` and ``adapter_moe`` (None: chosen by device).
        device, dtype: of the new router and adapter parameters (default: those of ``ffn``'s parameters).

    Parameters: ``router.weight`` [E,H] (no bias), ``adapter_down`` [E,r,H], ``adapter_up`` [E,H,r] (zeros).
    Forward: x [..., H] -> [..., H] in x's dtype. After a forward, ``router_logits`` [T,E], ``router_ids``
    [T,k] and ``aux_loss`` (this layer's Switch loss, fp32 scalar, differentiable w.r.t. the router) hold
    that call's values. A crafted model's training loss uses one Switch loss over the routing of all its
    layers together (see :func:`moe_kernels.models.pesc.modeling_pesc.pesc_load_balancing_loss`).
    """

    def __init__(self, ffn: nn.Module, hidden_size: int, num_experts: int = 8, top_k: int = 2,
                 adapter_dim: int = 64, *, scale: float = 1.0, activation: str = "gelu", dropout: float = 0.1,
                 aux_loss_coef: float = 0.01, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(ffn, nn.Module):
            raise TypeError(f"ffn must be an nn.Module, got {type(ffn).__name__}")
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.num_experts = check_int("num_experts", num_experts)
        self.top_k = check_int("top_k", top_k, 1, num_experts)
        self.adapter_dim = check_int("adapter_dim", adapter_dim, 1, MAX_ADAPTER_RANK)
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ADAPTER_ACTIVATIONS)}, got {activation!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if not isinstance(aux_loss_coef, (int, float)) or not math.isfinite(aux_loss_coef) or aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {aux_loss_coef!r}")
        self.scale = float(scale)
        self.activation = activation
        self.aux_loss_coef = float(aux_loss_coef)
        self.backend = backend

        reference_param = next(ffn.parameters(), None)
        if device is None and reference_param is not None:
            device = reference_param.device
        if dtype is None and reference_param is not None and reference_param.is_floating_point():
            dtype = reference_param.dtype
        factory = {"device": device, "dtype": dtype}

        self.ffn = ffn
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.adapter_down = nn.Parameter(torch.empty(num_experts, adapter_dim, hidden_size, **factory))
        self.adapter_up = nn.Parameter(torch.empty(num_experts, hidden_size, adapter_dim, **factory))
        self.adapter_dropout = nn.Dropout(dropout)
        self.reset_adapter_parameters()
        self.router_logits: torch.Tensor | None = None
        self.router_ids: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Router and Down like nn.Linear's default init (uniform +-1/sqrt(H)); Up zero (layer output = F)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.router.weight.uniform_(-bound, bound)
        self.adapter_down.uniform_(-bound, bound)
        self.adapter_up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_hidden(x, self.hidden_size)
        shared = self.ffn(x)
        flat_x = x.reshape(-1, self.hidden_size)
        adapter_input = self.adapter_dropout(shared).reshape(-1, self.hidden_size)
        logits = self.router(flat_x)
        weights, ids = ops.route(logits, self.top_k, order="topk_then_softmax", renormalize=False,
                                 backend=self.backend)
        self.router_logits = logits
        self.router_ids = ids
        self.aux_loss = ops.load_balancing_loss(logits, ids, self.num_experts)
        delta = ops.adapter_moe(adapter_input, self.adapter_down, self.adapter_up, weights, ids,
                                activation=self.activation, scale=self.scale, backend=self.backend)
        return shared + delta.reshape(shared.shape).to(shared.dtype)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"adapter_dim={self.adapter_dim}, scale={self.scale}, activation={self.activation!r}, "
                f"aux_loss_coef={self.aux_loss_coef}")


__all__ = ["AdapterMoE"]
