"""One builder per suite: a :class:`~moe_kernels.bench.providers.Case` of one shape, token count and dtype,
with moe_kernels on every backend that runs on the device and the peers it is compared with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import moe_kernels

from .providers import (Case, add_gpu_peers, cpu_ideal, dense_mlp, fallback_notes, headline_provider,
                        hf_experts_module, hf_router_math, mk_backends, mk_expert_args, op_backend, route_kwargs_of)
from .shapes import BATCHED_MM_MAX_BYTES, DTYPES, AdapterShape, LoRAShape, MoEShape


def build_moe_case(shape: MoEShape, scale: int, tokens: int, dtype_name: str, device: torch.device,
                   bandwidth: float | None, timing_kwargs: dict, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    s = shape.scaled(scale) if scale > 1 else shape
    experts, config = hf_experts_module(s, dtype, device)
    x = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
    router_weight = (torch.randn(s.num_experts, s.hidden, device=device) / math.sqrt(s.hidden)).to(dtype)
    router_bias = (torch.randn(s.num_experts, device=device) * 0.1).float() if s.family == "deepseek_v3" else None
    gate_up, down, mk_kwargs = mk_expert_args(experts, s)
    route_kwargs = route_kwargs_of(s)
    params = [x, router_weight] + list(experts.parameters())

    def mk_provider(backend):
        route_backend, mlp_backend = op_backend(backend, "route"), op_backend(backend, "moe_mlp")

        def run():
            logits = F.linear(x, router_weight)
            weights, ids = moe_kernels.route(logits, s.top_k, bias=router_bias, backend=route_backend, **route_kwargs)
            return moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=mlp_backend, **mk_kwargs)
        return run

    def hf_provider(impl):
        def run():
            logits = F.linear(x, router_weight)
            weights, ids = hf_router_math(logits, s, router_bias)
            config._experts_implementation = impl
            return experts(x, ids, weights)
        return run

    providers = {f"mk:{b}": mk_provider(b) for b in mk_backends(device)}
    notes = fallback_notes(providers, ("route", "moe_mlp"))
    try:  # the user-facing path: transformers' experts module dispatching to moe_kernels
        from moe_kernels.hf.experts import EXPERTS_IMPLEMENTATION, describe_experts

        describe_experts(experts)
        providers["hf:moe_kernels"] = hf_provider(EXPERTS_IMPLEMENTATION)
    except Exception as exc:  # noqa: BLE001 - integration still being written, or this layout unsupported
        notes["hf:moe_kernels"] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    for impl in ("eager", "grouped_mm", "batched_mm"):
        gathered = tokens * s.top_k * 3 * s.hidden * s.intermediate * x.element_size()
        if impl == "batched_mm" and gathered > BATCHED_MM_MAX_BYTES:
            notes[f"hf:{impl}"] = f"skipped: would gather {gathered / 2**30:.1f} GiB of expert weights"
            continue
        providers[f"hf:{impl}"] = hf_provider(impl)
    if device.type == "cuda":
        add_gpu_peers(providers, notes, x, router_weight, router_bias, s, experts)

    ideal = None
    if device.type == "cpu" and bandwidth:
        ideal = cpu_ideal(s, tokens, dtype, device, bandwidth, timing_kwargs,
                           lambda: F.linear(x, router_weight), router_bias, route_kwargs)
    return Case("moe", shape, scale, tokens, dtype_name, params, providers, headline_provider(device),
                "mk:reference", notes, ideal)


def build_adapter_case(shape: AdapterShape, scale: int, tokens: int, dtype_name: str, device: torch.device,
                       seed: int = 0) -> Case:
    torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    s = shape.scaled(scale) if scale > 1 else shape

    def rand(*size, fan_in):
        return (torch.randn(*size, device=device) / math.sqrt(fan_in)).to(dtype)

    x = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
    w_gate_up = rand(2 * s.intermediate, s.hidden, fan_in=s.hidden)
    w_down = rand(s.hidden, s.intermediate, fan_in=s.intermediate)
    router_weight = rand(s.num_experts, s.hidden, fan_in=s.hidden)
    a_down = rand(s.num_experts, s.rank, s.hidden, fan_in=s.hidden)
    a_up = rand(s.num_experts, s.hidden, s.rank, fan_in=s.rank)  # PESC zero-inits Up; random here so it computes
    params = [x, w_gate_up, w_down, router_weight, a_down, a_up]
    route_kwargs = {"order": "topk_then_softmax", "renormalize": False}

    def dense():
        return dense_mlp(x, w_gate_up, w_down)

    def mk_provider(backend):
        route_backend, adapter_backend = op_backend(backend, "route"), op_backend(backend, "adapter_moe")

        def run():
            ffn = dense()
            weights, ids = moe_kernels.route(F.linear(x, router_weight), s.top_k, backend=route_backend,
                                             **route_kwargs)
            return ffn + moe_kernels.adapter_moe(ffn, a_down, a_up, weights, ids, activation="gelu",
                                                 backend=adapter_backend)
        return run

    def pesc_loop():
        """The PESC/Camelidae layout: router top-k on logits, softmax over the kept k, a loop over experts."""
        ffn = dense()
        logits = F.linear(x, router_weight)
        top, ids = torch.topk(logits, s.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=torch.float32).to(ffn.dtype)
        out = ffn.clone()
        for e in range(s.num_experts):
            token_idx, choice = torch.where(ids == e)
            if token_idx.numel() == 0:
                continue
            h = ffn[token_idx]
            y = F.linear(F.gelu(F.linear(h, a_down[e])), a_up[e])
            out.index_add_(0, token_idx, y * weights[token_idx, choice, None])
        return out

    providers = {f"mk:{b}": mk_provider(b) for b in mk_backends(device)}
    notes = fallback_notes(providers, ("route", "adapter_moe"))
    providers["dense_ffn"] = dense
    providers["pesc_loop"] = pesc_loop
    return Case("adapter", shape, scale, tokens, dtype_name, params, providers, headline_provider(device),
                "mk:reference", notes, not_comparable=("dense_ffn",))


def build_lora_case(shape: LoRAShape, scale: int, tokens: int, dtype_name: str, device: torch.device,
                    seed: int = 0) -> Case:
    torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    s = shape.scaled(scale) if scale > 1 else shape
    x = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
    base = (torch.randn(s.hidden, s.hidden, device=device) / math.sqrt(s.hidden)).to(dtype)
    router_weight = (torch.randn(s.num_experts, s.hidden, device=device) / math.sqrt(s.hidden)).to(dtype)
    lora_a = (torch.randn(s.num_experts, s.rank, s.hidden, device=device) / math.sqrt(s.hidden)).to(dtype)
    lora_b = (torch.randn(s.num_experts, s.hidden, s.rank, device=device) / math.sqrt(s.rank)).to(dtype)
    lora_scale = 2.0  # alpha / r with alpha = 16, r = 8
    # Self-MoE: softmax over all n experts, keep top-k, no renormalisation.
    route_kwargs = {"renormalize": False}
    params = [x, base, router_weight, lora_a, lora_b]

    def mk_provider(backend):
        route_backend, adapter_backend = op_backend(backend, "route"), op_backend(backend, "adapter_moe")

        def run():
            weights, ids = moe_kernels.route(F.linear(x, router_weight), s.top_k, backend=route_backend,
                                             **route_kwargs)
            return F.linear(x, base) + moe_kernels.adapter_moe(x, lora_a, lora_b, weights, ids, activation="identity",
                                                               scale=lora_scale, backend=adapter_backend)
        return run

    def all_experts():
        """MiXSE-style: every expert's LoRA on every token, mixed by the sparse (top-k masked) softmax."""
        probs = torch.softmax(F.linear(x, router_weight).float(), dim=-1)
        top, ids = torch.topk(probs, s.top_k, dim=-1)
        alpha = torch.zeros_like(probs).scatter_(1, ids, top).to(dtype)
        per_expert = torch.einsum("ehr,ter->teh", lora_b, torch.einsum("erh,th->ter", lora_a, x))
        return F.linear(x, base) + lora_scale * torch.einsum("te,teh->th", alpha, per_expert)

    providers = {f"mk:{b}": mk_provider(b) for b in mk_backends(device)}
    notes = fallback_notes(providers, ("route", "adapter_moe"))
    providers["dense_linear"] = lambda: F.linear(x, base)
    providers["all_experts"] = all_experts
    return Case("lora", shape, scale, tokens, dtype_name, params, providers, headline_provider(device),
                "mk:reference", notes, not_comparable=("dense_linear",))


def build_route_case(shape: MoEShape, tokens: int, device: torch.device, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    logits = torch.randn(tokens, shape.num_experts, device=device)
    bias = torch.randn(shape.num_experts, device=device) * 0.1 if shape.family == "deepseek_v3" else None
    route_kwargs = route_kwargs_of(shape)

    def mk_provider(backend):
        backend = op_backend(backend, "route")
        return lambda: moe_kernels.route(logits, shape.top_k, bias=bias, backend=backend, **route_kwargs)[0]

    def hf():
        return hf_router_math(logits, shape, bias)[0]

    providers = {f"mk:{b}": mk_provider(b) for b in mk_backends(device)}
    notes = fallback_notes(providers, ("route",))
    providers["hf:router"] = hf
    # DeepSeek's transformers router does not sort its choices: compare the weights as sorted sets.
    return Case("route", shape, 1, tokens, "fp32", [logits], providers, headline_provider(device),
                "mk:reference", notes, None, differentiable=False,
                canonical=lambda w: w.sort(dim=-1, descending=True).values)


def build_plan_case(shape: MoEShape, tokens: int, device: torch.device, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    ids = torch.randint(0, shape.num_experts, (tokens, shape.top_k), dtype=torch.int32, device=device)

    def mk_provider(backend):
        backend = op_backend(backend, "plan")
        return lambda: moe_kernels.plan(ids, shape.num_experts, backend=backend).sorted_slots

    def torch_sort():
        """transformers' grouped_mm dispatch: sort, histc, cumsum, inverse permutation."""
        flat = ids.reshape(-1)
        sorted_ids, perm = torch.sort(flat)  # transformers' call (unstable sort)
        counts = torch.histc(sorted_ids.float(), bins=shape.num_experts, min=0, max=shape.num_experts - 1)
        torch.cumsum(counts, dim=0, dtype=torch.int32)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=device)
        return perm.to(torch.int32)

    providers = {f"mk:{b}": mk_provider(b) for b in mk_backends(device)}
    notes = fallback_notes(providers, ("plan",))
    providers["torch:sort"] = torch_sort
    # Any valid dispatch visits the experts in the same order, whatever order it keeps within an expert.
    flat_ids = ids.reshape(-1)
    return Case("plan", shape, 1, tokens, "int32", [], providers, headline_provider(device), "mk:reference",
                notes, None, differentiable=False, canonical=lambda slots: flat_ids[slots.long()])
