"""The public ops of moe_kernels: validate, normalise, pick a backend, run.

Each function checks its arguments (see :mod:`moe_kernels.validation`), normalises ``ids`` to int32
and ``weights`` to float32 (both contiguous; the one conversion on every path), handles the empty batch, and
hands the rest, by keyword, to the backend chosen by :func:`moe_kernels.backends.resolve_backend`. Backends
take the arguments as they are: they neither convert nor re-check them. ``moe_mlp`` is the one exception:
its routing reaches the backend in the caller's dtypes, and the backend converts only where its kernels need
it (:class:`moe_kernels.backends.Backend`); ``route`` writes its outputs in the dtypes the caller asks for (a Hugging
Face router's model-dtype weights and int64 ids), so neither side of the experts costs a conversion launch. The math
of each op is defined by :mod:`moe_kernels.reference`.
"""

from __future__ import annotations

import torch

from . import decode_graphs, reference
from .backends import Plan, fp32_int32_routing, resolve_backend
from .spec import (ADAPTER_ACTIVATIONS, ELEMENTWISE_ACTIVATIONS, GATED_ACTIVATIONS, MAX_ADAPTER_RANK, ROUTE_ORDERS,
                   ROUTE_SCORINGS, SOFTCAP_ACTIVATIONS)
from .validation import (check_choice, check_dim, check_finite_logits, check_flag, check_ids_in_range, check_int,
                         check_number, check_routing, check_same_device, check_tensor, check_top_k, finite_or_traced)

SCORINGS, ORDERS = ROUTE_SCORINGS, ROUTE_ORDERS  # the routing variants, defined in spec.py


def _shape(x: torch.Tensor, num_experts: int, *tensors) -> dict:
    """What the ``auto`` backend choice looks at (moe_kernels.backend_table): dtype, experts, width, tokens,
    and whether a gradient is needed."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return dict(dtype=x.dtype, experts=num_experts, width=x.shape[1], tokens=x.shape[0], grad=grad)


def _empty_in_graph(out: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """A result without tokens, joined in the autograd graph to every input that requires grad: a backward through
    it gives them zero gradients (as an expert without tokens gets), where an empty result joined to x alone left
    the expert weights' gradients None and ``out.sum().backward()`` failed when x needed no grad."""
    for tensor in inputs:
        if tensor is not None and tensor.requires_grad:
            out = out + tensor.sum() * 0  # a 0-dim term: broadcast into the empty result, out's dtype kept
    return out


def _contiguous_routing(weights: torch.Tensor, ids: torch.Tensor):
    """moe_mlp's routing for its backends: the caller's dtypes (checked: weights float32 or x's dtype, ids int32
    or int64), made contiguous; each backend converts where its kernels need it (backends.Backend)."""
    if not weights.is_contiguous():
        weights = weights.contiguous()
    if not ids.is_contiguous():
        ids = ids.contiguous()
    return weights, ids


def _ids_int32(ids: torch.Tensor) -> torch.Tensor:
    """ids as int32, contiguous (ids itself when it already is)."""
    if ids.dtype is torch.int32 and ids.is_contiguous():
        return ids
    return ids.to(torch.int32).contiguous()


def _check_expert_weights(x_name: str, x, in_name: str, w_in, out_name: str, w_out) -> tuple[int, int, int, int]:
    """Checks shared by the routed expert ops: x [T,H], w_in [E,N,H] (the first projection, whose last dim is H),
    w_out 3-D, both in x's dtype. Returns (T, H, E, N)."""
    check_tensor(x_name, x, 2)
    check_tensor(in_name, w_in, 3)
    check_tensor(out_name, w_out, 3)
    num_tokens, hidden = x.shape
    num_experts, width, h_in = w_in.shape
    if h_in != hidden:  # (the message is only formatted when it is needed)
        check_dim(in_name, h_in, hidden, f"hidden size (last dim, = {x_name}.shape[1])")
    dtype = x.dtype
    if w_in.dtype != dtype:
        raise TypeError(f"{in_name} has dtype {w_in.dtype} but {x_name} has {dtype}; they must match")
    if w_out.dtype != dtype:
        raise TypeError(f"{out_name} has dtype {w_out.dtype} but {x_name} has {dtype}; they must match")
    return num_tokens, hidden, num_experts, width


def route(logits: torch.Tensor, k: int, *, scoring: str = "softmax", order: str = "softmax_then_topk",
          renormalize: bool = True, bias: torch.Tensor | None = None, n_group: int | None = None,
          topk_group: int | None = None, scale: float = 1.0, weights_dtype: torch.dtype | None = None,
          ids_dtype: torch.dtype | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k routing: logits [T,E] -> (weights [T,k], ids [T,k]), float32 and int32 by default.

    Variants (each Hugging Face family is one combination, see README):
      scoring      "softmax" | "sigmoid" -- how logits become scores.
      order        "softmax_then_topk": choose among scores, weights are the chosen scores;
                   "topk_then_softmax": choose among raw logits, weights = scoring(chosen logits).
      renormalize  divide the k weights by their sum.
      bias         [E], added to the scores only to *choose* experts (DeepSeek-V3's correction bias);
                   never part of the returned weights, never receives a gradient.
      n_group, topk_group  group-limited choice (DeepSeek-V3): E splits into n_group groups, a group
                   scores the sum of its best two, only the best topk_group groups are eligible.
      scale        multiplies the final weights (routed_scaling_factor).
    ``weights_dtype`` (float32, float16 or bfloat16) and ``ids_dtype`` (int32 or int64) are the output dtypes, written
    by the kernel itself: the weights are computed in float32 and rounded once, as ``.to(weights_dtype)`` after a
    float32 route would, so a Hugging Face router's model-dtype weights and int64 ids cost no extra launches.
    Choices are ordered by descending score, ties to the lower expert index. Differentiable w.r.t.
    ``logits``. NaN or +inf logits (or bias), and a row of logits that is -inf in every column, raise ValueError
    (checked on CPU always, on GPUs in debug mode).
    """
    check_tensor("logits", logits, 2)
    num_tokens, num_experts = logits.shape
    if num_experts < 1:
        raise ValueError("logits must have at least one expert column, got shape "
                         f"{tuple(logits.shape)}")
    check_top_k(k, num_experts)
    check_choice("scoring", scoring, SCORINGS)
    check_choice("order", order, ORDERS)
    check_flag("renormalize", renormalize)
    check_number("scale", scale)
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_dim("bias", bias.shape[0], num_experts, "number of experts (columns of logits)")
        check_same_device(logits=logits, bias=bias)
        check_finite_logits(bias, "bias")  # a NaN bias orders experts differently per backend
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group must be given together, got "
                         f"n_group={n_group!r}, topk_group={topk_group!r}")
    if n_group is not None:
        if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group must be a positive divisor of num_experts = {num_experts}, got {n_group!r}")
        if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must satisfy 1 <= topk_group <= n_group = {n_group}, got {topk_group!r}")
        eligible = topk_group * (num_experts // n_group)
        if k > eligible:
            raise ValueError(f"k = {k} exceeds the {eligible} experts eligible in topk_group = {topk_group} "
                             f"of n_group = {n_group} groups")
        if n_group == 1:
            n_group = topk_group = None  # one group: no restriction
    weights_dtype = _out_dtype("weights_dtype", weights_dtype, ROUTE_WEIGHT_DTYPES)
    ids_dtype = _out_dtype("ids_dtype", ids_dtype, ROUTE_ID_DTYPES)
    check_finite_logits(logits)
    if num_tokens == 0:
        return (_empty_in_graph(logits.new_zeros((0, k), dtype=weights_dtype), logits),
                torch.zeros((0, k), dtype=ids_dtype, device=logits.device))
    impl = resolve_backend(backend, logits.device, "route")
    return impl.route(logits=logits, k=k, scoring=scoring, order=order, renormalize=renormalize, bias=bias,
                      n_group=n_group, topk_group=topk_group, scale=float(scale), weights_dtype=weights_dtype,
                      ids_dtype=ids_dtype)


ROUTE_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the first is the default
ROUTE_ID_DTYPES = (torch.int32, torch.int64)


def _out_dtype(name: str, dtype, allowed: tuple) -> torch.dtype:
    """route's output dtype ``dtype`` (None: the first allowed), checked."""
    if dtype is None:
        return allowed[0]
    if dtype not in allowed:
        raise TypeError(f"{name} must be one of {', '.join(str(d) for d in allowed)} (or None), got {dtype!r}")
    return dtype


def plan(ids: torch.Tensor, num_experts: int, *, backend: str | None = None) -> Plan:
    """Dispatch plan: a stable counting sort of the T*k slots by expert (no padding).

    Returns :class:`moe_kernels.backends.Plan` (expert_offsets [E+1], sorted_slots [T*k],
    slot_positions [T*k], all int32).
    """
    check_tensor("ids", ids, 2, dtypes=(torch.int32, torch.int64))
    check_int("num_experts", num_experts)
    check_ids_in_range(ids, num_experts)
    ids = _ids_int32(ids)
    if ids.numel() == 0:
        return reference.plan(ids, num_experts)
    return resolve_backend(backend, ids.device).plan(ids=ids, num_experts=num_experts)


def moe_mlp(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
            ids: torch.Tensor, *, activation: str = "silu", gate_up_bias: torch.Tensor | None = None,
            down_bias: torch.Tensor | None = None, interleaved: bool = False,
            swiglu_limit: float | None = None, gated: bool = True, softcaps: tuple[float, float] | None = None,
            backend: str | None = None) -> torch.Tensor:
    """Routed expert MLPs: y[t] = sum_j weights[t,j] * down_e(act(gate_e x_t) * up_e x_t), e = ids[t,j].

    Shapes (Hugging Face v5 layout): x [T,H], gate_up_proj [E,2I,H] (gate rows then up rows, or
    interleaved gate/up rows when ``interleaved``), down_proj [E,H,I], weights [T,k] (float32 or x's
    dtype), ids [T,k] (int32 or int64). Optional biases gate_up_bias [E,2I], down_bias [E,H].
    activation: "silu" (SwiGLU), "gelu", "gelu_tanh", "relu" (gated), or "gpt_oss" (GPT-OSS's SwiGLU,
    (up + 1) * gate * sigmoid(1.702 gate)). ``swiglu_limit``: gate is clamped to <= limit and up to
    [-limit, limit] before the activation, for every activation (GPT-OSS, DeepSeek-V4).
    "softcap_swiglu" (Inkling2) takes ``softcaps = (cg, cu)``, both > 0: cg tanh(gate / cg) * sigmoid(gate) *
    cu tanh(up / cu).

    ``gated=False``: experts without a gate (Nemotron-H), y[t] = sum_j weights[t,j] * down_e(act(up_e x_t)):
    gate_up_proj is the up projection [E,I,H] (bias [E,I]), activation one of ``spec.ELEMENTWISE_ACTIVATIONS``
    ("relu2" is Nemotron-H's ReLU^2), no ``interleaved`` or ``swiglu_limit``.

    Weights may be non-contiguous views (e.g. a transpose of GPT-OSS's [E,H,2I] storage). Returns [T,H] in x's
    dtype; differentiable w.r.t. x, both weight tensors, the biases and weights.
    """
    num_tokens, hidden, num_experts, width = _check_expert_weights("x", x, "gate_up_proj", gate_up_proj,
                                                                   "down_proj", down_proj)
    check_flag("gated", gated)
    check_flag("interleaved", interleaved)
    if gated and width % 2:
        raise ValueError(f"gate_up_proj: dim 1 must be 2*intermediate (even), got {width}")
    inter = width // 2 if gated else width
    down_experts, down_hidden, down_inner = down_proj.shape  # 3-D (checked above)
    check_dim("down_proj", down_experts, num_experts, "number of experts (= gate_up_proj.shape[0])")
    check_dim("down_proj", down_hidden, hidden, "hidden size (dim 1, = x.shape[1])")
    check_dim("down_proj", down_inner, inter, "intermediate size (dim 2, = gate_up_proj.shape[1]"
              + (" / 2)" if gated else ", gated=False)"))
    if gate_up_bias is not None:
        check_tensor("gate_up_bias", gate_up_bias, 2)
        if tuple(gate_up_bias.shape) != (num_experts, width):
            raise ValueError(f"gate_up_bias must have shape {(num_experts, width)}, got {tuple(gate_up_bias.shape)}")
    if down_bias is not None:
        check_tensor("down_bias", down_bias, 2)
        if tuple(down_bias.shape) != (num_experts, hidden):
            raise ValueError(f"down_bias must have shape {(num_experts, hidden)}, got {tuple(down_bias.shape)}")
    if gated:
        check_choice("activation", activation, GATED_ACTIVATIONS)
    else:
        check_choice("activation (gated=False)", activation, ELEMENTWISE_ACTIVATIONS)
        if interleaved:
            raise ValueError("interleaved=True needs gated=True (it lays out gate and up rows)")
        if swiglu_limit is not None:
            raise ValueError("swiglu_limit needs gated=True (it clamps gate and up)")
    softcaps = _check_softcaps(activation, softcaps)
    if softcaps is not None and swiglu_limit is not None:
        raise ValueError("swiglu_limit does not apply to softcap_swiglu (its soft caps bound gate and up)")
    if swiglu_limit is not None:
        if isinstance(swiglu_limit, bool) or not isinstance(swiglu_limit, (int, float)) \
                or not finite_or_traced(swiglu_limit) or swiglu_limit <= 0:
            raise ValueError(f"swiglu_limit must be None or a finite number > 0, got {swiglu_limit!r}")
        swiglu_limit = float(swiglu_limit)
    check_routing(weights, ids, num_tokens, num_experts, x.dtype)
    device = check_same_device(x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, weights=weights, ids=ids,
                               gate_up_bias=gate_up_bias, down_bias=down_bias)
    if num_tokens == 0:
        return _empty_in_graph(x * 0, gate_up_proj, down_proj, gate_up_bias, down_bias, weights)
    # The shape dict is built only if auto chooses by it (on CUDA): resolve_backend calls the lambda then.
    impl = resolve_backend(backend, device, "moe_mlp",
                           lambda: _shape(x, num_experts, x, gate_up_proj, down_proj, gate_up_bias, down_bias,
                                          weights))

    def call(x, weights, ids):  # inside: a decode graph holds any conversion too
        weights, ids = _contiguous_routing(weights, ids)
        return impl.moe_mlp(x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, weights=weights, ids=ids,
                            activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias,
                            interleaved=interleaved, swiglu_limit=swiglu_limit, gated=gated, softcaps=softcaps)

    if decode_graphs.wanted(device, ids.numel(), (x, gate_up_proj, down_proj, gate_up_bias, down_bias, weights)):
        key = ("moe_mlp", impl.name, decode_graphs.tensor_key(gate_up_proj), decode_graphs.tensor_key(down_proj),
               decode_graphs.tensor_key(gate_up_bias), decode_graphs.tensor_key(down_bias), activation,
               interleaved, swiglu_limit, gated, softcaps)
        return decode_graphs.run(key, call, (x, weights, ids))
    return call(x, weights, ids)


def _check_softcaps(activation: str, softcaps):
    """softcaps as a (float, float) pair, given exactly when the activation takes them."""
    if activation not in SOFTCAP_ACTIVATIONS:
        if softcaps is not None:
            raise ValueError(f"softcaps apply to {', '.join(SOFTCAP_ACTIVATIONS)} only, not activation={activation!r}")
        return None
    if softcaps is None:
        raise ValueError(f"activation={activation!r} needs softcaps=(gate_cap, up_cap)")
    try:
        gate_cap, up_cap = softcaps
    except (TypeError, ValueError):
        raise ValueError(f"softcaps must be a pair (gate_cap, up_cap), got {softcaps!r}") from None
    caps = []
    for cap in (gate_cap, up_cap):
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not finite_or_traced(cap) or cap <= 0:
            raise ValueError(f"softcaps must be finite numbers > 0, got {softcaps!r}")
        caps.append(float(cap))
    return tuple(caps)


def adapter_moe(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                *, activation: str = "gelu", scale: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Routed bottleneck adapters / LoRA experts: y[t] = sum_j weights[t,j] * scale * up_e(act(down_e h_t)).

    Shapes: h [T,H], down [E,r,H], up [E,H,r] with 1 <= r <= 1024, weights/ids [T,k].
    activation: "gelu" (PESC), "gelu_tanh", "silu", "relu", "relu2", or "identity" (routed LoRA: B_e A_e h).
    Returns [T,H] in h's dtype; differentiable w.r.t. h, down, up and weights.
    """
    num_tokens, hidden, num_experts, rank = _check_expert_weights("h", h, "down", down, "up", up)
    if not 1 <= rank <= MAX_ADAPTER_RANK:
        raise ValueError(f"down: adapter rank (dim 1) must be in [1, {MAX_ADAPTER_RANK}], got {rank}")
    if tuple(up.shape) != (num_experts, hidden, rank):
        raise ValueError(f"up must have shape [E, H, r] = {(num_experts, hidden, rank)}, got {tuple(up.shape)}")
    check_choice("activation", activation, ADAPTER_ACTIVATIONS)
    check_number("scale", scale)
    check_routing(weights, ids, num_tokens, num_experts, h.dtype)
    device = check_same_device(h=h, down=down, up=up, weights=weights, ids=ids)
    if num_tokens == 0:
        return _empty_in_graph(h * 0, down, up, weights)
    impl = resolve_backend(backend, device, "adapter_moe", lambda: _shape(h, num_experts, h, down, up, weights))

    def call(h, weights, ids):
        weights, ids = fp32_int32_routing(weights, ids)  # adapter_moe's backends take it normalised
        return impl.adapter_moe(h=h, down=down, up=up, weights=weights, ids=ids, activation=activation,
                                scale=float(scale))

    if decode_graphs.wanted(device, ids.numel(), (h, down, up, weights)):
        key = ("adapter_moe", impl.name, decode_graphs.tensor_key(down), decode_graphs.tensor_key(up), activation,
               float(scale))
        return decode_graphs.run(key, call, (h, weights, ids))
    return call(h, weights, ids)


LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_balancing_loss(logits: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, E * sum_e f_e * P_e (see :func:`moe_kernels.reference.load_balancing_loss`).

    logits [T,E] (the router's raw logits), ids [T,k] (the chosen experts). Equal to transformers'
    ``load_balancing_loss_func`` without an attention mask; differentiable w.r.t. logits. Computed in
    float32 (float64 for float64 logits).
    """
    check_tensor("logits", logits, 2, dtypes=LOSS_DTYPES)
    check_int("num_experts", num_experts)
    check_dim("logits", logits.shape[1], num_experts, "num_experts (columns)")
    check_tensor("ids", ids, 2, dtypes=(torch.int32, torch.int64))
    check_dim("ids", ids.shape[0], logits.shape[0], "number of tokens (rows of logits)")
    check_same_device(logits=logits, ids=ids)
    check_ids_in_range(ids, num_experts)
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return reference.load_balancing_loss(logits, ids, num_experts)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean_t logsumexp(logits_t)^2, differentiable w.r.t. logits."""
    check_tensor("logits", logits, 2, dtypes=LOSS_DTYPES)
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return reference.z_loss(logits)
