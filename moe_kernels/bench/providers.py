"""The pieces every benchmark case is built from: the :class:`Case` record, the moe_kernels backends that
run on a device, transformers' router math and experts modules, the CPU ideal and the GPU peers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import moe_kernels
from moe_kernels import reference

from .shapes import MoEShape
from .timing import measure


@dataclass
class Case:
    """One benchmark point: inputs that may need grads, and differentiable providers over them."""

    suite: str
    shape: object
    scale: int
    tokens: int
    dtype: str
    params: list  # tensors that receive gradients in bwd passes (inputs first)
    providers: dict  # name -> zero-arg callable returning the output tensor
    baseline: str  # provider the ratios are taken against
    reference: str | None  # provider the outputs are compared against
    notes: dict = dataclasses.field(default_factory=dict)  # provider -> why skipped / remark
    ideal: Callable | None = None  # pass -> (ms, note), for the CPU ideal
    differentiable: bool = True
    canonical: Callable | None = None  # output -> form compared across providers (e.g. order-free)
    # providers that compute something else on purpose (the dense layer alone): never compared
    not_comparable: tuple = ()


def mk_backends(device: torch.device) -> list[str]:
    """moe_kernels backends that are built and can run on ``device``, fastest first."""
    from moe_kernels.backends import get_backend

    order = ("triton", "cuda", "cpu", "reference") if device.type == "cuda" else ("cpu", "reference")
    names = []
    for name in order:
        if name in moe_kernels.available_backends() and get_backend(name).device_error(device) is None:
            names.append(name)
    return names


def headline_provider(device: torch.device) -> str:
    return f"mk:{mk_backends(device)[0]}"


def op_backend(backend: str, op: str) -> str:
    """``backend`` if it implements ``op``, else "reference" (a backend still being written may lack some ops;
    the provider's note says so)."""
    from moe_kernels.backends import Backend, get_backend

    implemented = getattr(type(get_backend(backend)), op) is not getattr(Backend, op)
    return backend if implemented else "reference"


def fallback_notes(providers: dict, ops: tuple) -> dict:
    notes = {}
    for name in providers:
        if name.startswith("mk:"):
            missing = [op for op in ops if op_backend(name[3:], op) != name[3:]]
            if missing:
                notes[name] = f"{'/'.join(missing)} not in backend '{name[3:]}' yet: ran on reference"
    return notes


def route_kwargs_of(shape: MoEShape) -> dict:
    if shape.family == "softmax_renorm":
        return {}
    if shape.family == "softmax":
        return {"renormalize": False}
    if shape.family == "gpt_oss":
        return {"order": "topk_then_softmax", "renormalize": False}
    if shape.family == "deepseek_v3":
        return {"scoring": "sigmoid", "renormalize": True, "n_group": 8, "topk_group": 4, "scale": 2.5}
    raise ValueError(f"unknown family {shape.family!r}")


def hf_router_math(logits: torch.Tensor, shape: MoEShape, bias: torch.Tensor | None):
    """transformers' router math for each family (as in the modeling files): (weights, ids)."""
    k = shape.top_k
    if shape.family in ("softmax_renorm", "softmax"):
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        if shape.family == "softmax_renorm":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    if shape.family == "gpt_oss":
        top, ids = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), ids
    if shape.family == "deepseek_v3":
        scores = logits.float().sigmoid()
        choice = scores + bias
        num_tokens = logits.shape[0]
        group_scores = choice.view(num_tokens, 8, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=4, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(num_tokens, 8, shape.num_experts // 8).reshape(num_tokens, -1)
        ids = torch.topk(choice.masked_fill(~score_mask.bool(), 0.0), k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * 2.5, ids
    raise ValueError(f"unknown family {shape.family!r}")


def hf_experts_module(shape: MoEShape, dtype: torch.dtype, device: torch.device):
    """A real transformers experts module with the shape's E/H/I and random weights."""
    if shape.family == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        config = GptOssConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                              num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k)
        experts = GptOssExperts(config)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        config = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                               num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k)
        experts = MixtralExperts(config)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.02)
            else:  # fan-in scaled so activations stay O(1) through both GEMMs
                fan_in = p.shape[-2] if shape.family == "gpt_oss" else p.shape[-1]  # GPT-OSS stores W^T
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
    return experts.to(device=device, dtype=dtype), config


def mk_expert_args(experts, shape: MoEShape) -> tuple:
    """(gate_up [E,2I,H], down [E,H,I], kwargs) for moe_kernels.moe_mlp from an HF experts module."""
    if shape.family == "gpt_oss":
        return (experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2),
                {"activation": "gpt_oss", "interleaved": True, "gate_up_bias": experts.gate_up_proj_bias,
                 "down_bias": experts.down_proj_bias, "swiglu_limit": experts.limit})
    return experts.gate_up_proj, experts.down_proj, {"activation": "silu"}


def dense_mlp(x, w_gate_up, w_down, activation="silu"):
    return F.linear(reference.gated_activation(F.linear(x, w_gate_up), activation), w_down)


def cpu_ideal(s: MoEShape, tokens: int, dtype, device, bandwidth: float, timing_kwargs: dict, logits_fn,
               router_bias, route_kwargs):
    """pass -> (ms, note): the CPU ideal of the MoE block, the larger of

    * the dense chain with the same FLOPs: the router linear on T rows plus one dense gated MLP on T*k rows
      (same H, I), timed here with torch's GEMMs, and
    * reading the router and every touched expert's weights once at the measured copy bandwidth; passes with
      backward also write the whole (dense) gradient of the router and of all E experts, zeros included,
      since a torch parameter's .grad is dense.
    """
    with torch.no_grad():
        _, ids = moe_kernels.route(logits_fn().float(), s.top_k, bias=router_bias, backend="reference",
                                   **route_kwargs)
    touched = int(torch.unique(ids).numel())
    element = torch.finfo(dtype).bits // 8
    expert_bytes = 3 * s.hidden * s.intermediate * element
    router_bytes = s.num_experts * s.hidden * element
    weight_bytes = touched * expert_bytes + router_bytes
    grad_bytes = s.num_experts * expert_bytes + router_bytes
    rows = tokens * s.top_k

    def rand(*size, fan_in):
        return (torch.randn(*size, device=device) / math.sqrt(fan_in)).to(dtype).requires_grad_()

    x_tokens = rand(tokens, s.hidden, fan_in=1)
    x_rows = rand(rows, s.hidden, fan_in=1)
    w_router = rand(s.num_experts, s.hidden, fan_in=s.hidden)
    w1 = rand(2 * s.intermediate, s.hidden, fan_in=s.hidden)
    w2 = rand(s.hidden, s.intermediate, fan_in=s.intermediate)
    leaves = (x_tokens, x_rows, w_router, w1, w2)
    grads = (torch.randn(tokens, s.num_experts, dtype=dtype, device=device),
             torch.randn(rows, s.hidden, dtype=dtype, device=device))
    results = {}

    def dense_chain():
        return F.linear(x_tokens, w_router), dense_mlp(x_rows, w1, w2)

    def dense_fwd(_):
        with torch.no_grad():
            dense_chain()

    def clear():
        for leaf in leaves:
            leaf.grad = None

    def setup_bwd():
        clear()
        return dense_chain()

    def compute(pass_name):
        if pass_name in results:
            return results[pass_name]
        if pass_name == "fwd":
            t = measure(dense_fwd, **timing_kwargs).median_ms
        elif pass_name == "fwdbwd":
            t = measure(lambda _: torch.autograd.backward(dense_chain(), grads), clear, **timing_kwargs).median_ms
        else:
            t = measure(lambda outs: torch.autograd.backward(outs, grads), setup_bwd, **timing_kwargs).median_ms
        results[pass_name] = from_dense_ms(pass_name, t)
        return results[pass_name]

    def from_dense_ms(pass_name, t):
        """(ideal ms, note) given the dense chain's measured time ``t`` for ``pass_name``."""
        weight_ms = (weight_bytes if pass_name == "fwd" else weight_bytes + grad_bytes) / bandwidth * 1e3
        bound = "bandwidth" if weight_ms > t else "dense GEMM"
        moved = f"{touched} experts' weights" + ("" if pass_name == "fwd" else f" + all {s.num_experts} grads")
        return max(t, weight_ms), (f"{bound}-bound: dense chain {t:.3f} ms, {moved} at {bandwidth / 1e9:.1f} GB/s "
                                   f"{weight_ms:.3f} ms")

    # for the pytest-benchmark suites, which time the dense chain themselves
    compute.dense_chain, compute.leaves, compute.grads = dense_chain, leaves, grads
    compute.from_dense_ms = from_dense_ms
    with_grads_ms = (weight_bytes + grad_bytes) / bandwidth * 1e3
    compute.bandwidth_floor_ms = {"fwd": weight_bytes / bandwidth * 1e3, "bwd": with_grads_ms, "fwdbwd": with_grads_ms}
    return compute


def add_gpu_peers(providers, notes, x, router_weight, router_bias, s, experts):
    """GPU peers where installed; each missing one gets a note instead of a row."""
    if s.family == "gpt_oss":
        notes["vllm:fused_moe"] = "skipped: GPT-OSS layout (biases, clamped SwiGLU) not wired for vLLM here"
    else:
        try:
            from vllm.model_executor.layers.fused_moe import fused_experts

            def run_vllm():
                weights, ids = hf_router_math(F.linear(x, router_weight), s, router_bias)
                return fused_experts(x, experts.gate_up_proj, experts.down_proj, weights.float(), ids)
            providers["vllm:fused_moe"] = run_vllm
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            notes["vllm:fused_moe"] = f"skipped: not installed ({type(exc).__name__})"
    for module, label in (("scattermoe", "scattermoe"), ("megablocks", "megablocks")):
        try:
            __import__(module)
            notes[label] = "installed, but no adapter written in this runner yet"
        except Exception:  # noqa: BLE001
            notes[label] = "skipped: not installed"
    # transformers' grouped_mm path on CUDA *is* torch._grouped_mm; recorded under hf:grouped_mm.
    notes["torch._grouped_mm"] = "measured as hf:grouped_mm (transformers calls it on CUDA)"
