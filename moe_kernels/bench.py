"""Benchmark runner behind ``moe-kernels bench``: side-by-side timings of moe_kernels against
transformers' experts paths, loop-over-experts references and the machine's ideal.

One run measures every suite asked for and writes, under ``--out``:

* ``bench.csv``     one row per (suite, shape, tokens, dtype, pass, provider): machine, versions, median
                    and quartiles in ms, ratio to moe_kernels, peak memory and saved-activation bytes,
                    max abs error against the reference oracle;
* ``<suite>.png``   one plot per suite (time of each provider relative to moe_kernels, log scale);
* ``roofline.csv``  minimum FLOPs/bytes of each full-size shape and the H100 time they imply;
* ``summary.md``    the printed side-by-side tables, ready to paste into benchmarks/RESULTS.md.

Suites
  moe      the MoE block (router linear + routing + routed expert MLPs): forward, backward, fwd+bwd.
           Providers: moe_kernels on every built backend that runs on the device ("mk:cpu",
           "mk:reference" = the loop-over-experts oracle, "mk:triton" on GPUs); transformers'
           ``eager``, ``grouped_mm`` and ``batched_mm`` experts paths called on a real experts module
           (MixtralExperts / GptOssExperts) with transformers' router math; "cpu_ideal" (CPU) =
           max(one dense MLP of the same FLOPs, reading every touched expert's weights once at the
           measured copy bandwidth); on GPUs vLLM's fused_moe where installed.
  adapter  PESC adapter-MoE layer: dense FFN + moe_kernels.adapter_moe, vs the dense FFN alone and vs a
           PESC-style per-expert loop.
  lora     Self-MoE LoRA-MoE linear: base linear + routed LoRA experts (adapter_moe, identity), vs the
           base linear alone and vs the MiXSE-style "every expert on every token" sum.
  route    routing alone: moe_kernels.route vs transformers' router math.
  plan     dispatch plan alone: moe_kernels.plan vs the torch.sort + histc + cumsum of transformers.
  roofline printed only: minimum bytes/FLOPs and H100 time for the full-size shapes.

On the CPU, shapes are scaled down: H, I (and adapter rank) and training token counts are divided by
the shape's stated factor; E and k are kept. Timings are wall-clock medians of repeated runs with
``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import moe_kernels
from moe_kernels import reference

# ----------------------------------------------------------------------------------------------- shapes

# Peak numbers assumed for the H100 roofline (SXM, dense, no sparsity).
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12

# Largest gathered-weight tensor batched_mm may build before we skip it (it copies one expert weight per slot).
BATCHED_MM_MAX_BYTES = 768 * 2**20


def _shrink(size: int, factor: int) -> int:
    """size / factor, rounded down to a multiple of 8 (torch's CPU grouped_mm needs 16-byte strides)."""
    return max(8, size // factor // 8 * 8)


@dataclass(frozen=True)
class MoEShape:
    """One model's MoE layer. ``family`` picks the router math and expert layout."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    family: str  # "softmax_renorm" | "softmax" | "deepseek_v3" | "gpt_oss"
    cpu_scale: int  # H, I and training token counts are divided by this on the CPU

    def scaled(self, factor: int) -> "MoEShape":
        return dataclasses.replace(self, hidden=_shrink(self.hidden, factor),
                                   intermediate=_shrink(self.intermediate, factor))


@dataclass(frozen=True)
class AdapterShape:
    """PESC: dense SwiGLU FFN (hidden -> intermediate -> hidden) plus routed bottleneck adapters of ``rank``."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    rank: int
    cpu_scale: int

    def scaled(self, factor: int) -> "AdapterShape":
        # The rank shrinks with H and I so the adapter's share of the FLOPs stays that of the full model.
        return dataclasses.replace(self, hidden=_shrink(self.hidden, factor),
                                   intermediate=_shrink(self.intermediate, factor),
                                   rank=max(1, self.rank // factor))


@dataclass(frozen=True)
class LoRAShape:
    """Self-MoE: a square base linear (hidden -> hidden) plus n routed LoRA experts of ``rank``, top-k."""

    name: str
    hidden: int
    num_experts: int
    top_k: int
    rank: int
    cpu_scale: int

    def scaled(self, factor: int) -> "LoRAShape":
        return dataclasses.replace(self, hidden=_shrink(self.hidden, factor))


MOE_SHAPES = {
    "mixtral_8x7b": MoEShape("mixtral_8x7b", 4096, 14336, 8, 2, "softmax_renorm", 8),
    "qwen3_30b_a3b": MoEShape("qwen3_30b_a3b", 2048, 768, 128, 8, "softmax_renorm", 4),
    "olmoe_1b_7b": MoEShape("olmoe_1b_7b", 2048, 1024, 64, 8, "softmax", 4),
    "deepseek_v3_like": MoEShape("deepseek_v3_like", 7168, 2048, 256, 8, "deepseek_v3", 8),
    "gpt_oss_20b": MoEShape("gpt_oss_20b", 2880, 2880, 32, 4, "gpt_oss", 8),
}
ADAPTER_SHAPES = {
    "pesc_llama2_7b_r64": AdapterShape("pesc_llama2_7b_r64", 4096, 11008, 8, 2, 64, 8),
    "pesc_llama2_7b_r512": AdapterShape("pesc_llama2_7b_r512", 4096, 11008, 8, 2, 512, 8),
}
LORA_SHAPES = {
    "selfmoe_gemma_7b": LoRAShape("selfmoe_gemma_7b", 3072, 4, 1, 8, 4),
}

# Token counts at full size: decode (1-64) and training batches (4k-16k); training counts are divided by
# the shape's cpu_scale on the CPU, decode counts are kept.
DECODE_TOKENS = (1, 16, 64)
TRAIN_TOKENS = (4096, 16384)
QUICK = {
    "moe_shapes": ("olmoe_1b_7b", "qwen3_30b_a3b"),
    "moe_tokens": (1, 4096),
    "adapter_tokens": (4096,),
    "lora_tokens": (4096,),
    "route_tokens": (4096,),
    "dtypes": ("fp32", "bf16"),
    "passes": ("fwd", "fwdbwd"),  # the goals' passes; the full run adds backward alone
    # the forward-vs-ideal goal holds "at every shape, decode included": the other shapes at T=1, forward only
    "decode_shapes": ("mixtral_8x7b", "deepseek_v3_like", "gpt_oss_20b"),
    # the oracle is a reference point, not a contender: forward only in the quick run (it is 5-20x slower)
    "fwd_only_providers": ("mk:reference",),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUITES = ("moe", "adapter", "lora", "route", "plan", "roofline")
PASSES = ("fwd", "bwd", "fwdbwd")

CSV_COLUMNS = ["run_id", "machine", "cpu", "threads", "torch", "transformers", "moe_kernels", "device",
               "suite", "shape", "scale", "hidden", "intermediate", "experts", "top_k", "rank", "tokens",
               "dtype", "pass", "provider", "median_ms", "q1_ms", "q3_ms", "repeats", "ratio_vs_mk",
               "peak_mb", "saved_mb", "max_abs_err", "note"]


# ----------------------------------------------------------------------------------------- machine

def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{os.cpu_count()}-core CPU"
    return {"machine": f"{platform.node()} ({name})", "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "moe_kernels": moe_kernels.__version__, "device": str(device)}


def measure_copy_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the CPU's practical memory bandwidth."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * num_bytes / min(times)


# -------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(run: Callable, setup: Callable | None, device: torch.device) -> float:
    arg = setup() if setup else None
    _sync(device)
    start = time.perf_counter()
    run(arg)
    _sync(device)
    return time.perf_counter() - start


def _timing_of(times: list[float]) -> Timing:
    times_ms = sorted(t * 1e3 for t in times)
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return Timing(statistics.median(times_ms), q1, q3, len(times_ms))


def measure_interleaved(runs: dict, *, device: torch.device = torch.device("cpu"), min_repeats: int = 3,
                        max_repeats: int = 30, budget_s: float = 0.5, warmup: int = 1,
                        slow_s: float | None = None) -> tuple[dict, dict]:
    """Time several providers in interleaved rounds: ``runs`` maps name -> (run, setup); each timed call is
    ``run(setup())`` with setup untimed. Returns ({name: Timing}, {name: exception}).

    Interleaving (one call of each provider per round) makes the providers share whatever load the machine
    is under, so their ratios stay meaningful on a busy machine. Rounds continue until ``min_repeats``
    rounds are done and either ``budget_s`` per provider is spent or ``max_repeats`` rounds ran. A provider
    whose warm-up exceeds the budget lowers the minimum to 3 rounds; one whose warm-up exceeds ``slow_s`` is
    timed by that single call (Timing.repeats == 1) and leaves the rounds: the loop-over-experts references
    are 10-50x slower than the rest and would otherwise dominate the run time.
    """
    timings, errors, active = {}, {}, []
    for name, (run, setup) in runs.items():
        try:
            for _ in range(warmup):
                elapsed = _timed_call(run, setup, device)
        except Exception as exc:  # noqa: BLE001 - reported per provider
            errors[name] = exc
            continue
        if warmup and slow_s is not None and elapsed > slow_s:
            timings[name] = _timing_of([elapsed])
            continue
        if warmup and elapsed > budget_s:
            min_repeats = min(min_repeats, 3)
        active.append(name)
    samples = {name: [] for name in active}
    spent, rounds = 0.0, 0
    while active and (rounds < min_repeats or (spent < budget_s * len(active) and rounds < max_repeats)):
        for name in list(active):
            run, setup = runs[name]
            try:
                elapsed = _timed_call(run, setup, device)
            except Exception as exc:  # noqa: BLE001
                errors[name] = exc
                active.remove(name)
                continue
            samples[name].append(elapsed)
            spent += elapsed
        rounds += 1
    for name in active:
        timings[name] = _timing_of(samples[name])
    return timings, errors


def measure(run: Callable, setup: Callable | None = None, **kwargs) -> Timing:
    """Time one ``run(setup())`` (setup untimed); see :func:`measure_interleaved` for the rules."""
    timings, errors = measure_interleaved({"run": (run, setup)}, **kwargs)
    if errors:
        raise errors["run"]
    return timings["run"]


# -------------------------------------------------------------------------------------------- memory

@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 (the profiler's native start/stop log lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(run: Callable, device: torch.device = torch.device("cpu")) -> int:
    """Peak bytes allocated (above the level at entry) while ``run()`` executes.

    CPU: the profiler's allocator events, which see every allocation of the c10 CPU allocator, including
    scratch buffers inside native ops (tracemalloc cannot see them). CUDA: the caching allocator's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def saved_activation_bytes(forward: Callable, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``forward()``, not counting the
    storages of ``exclude`` (inputs and parameters, which exist anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# ------------------------------------------------------------------------------------------- providers

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


def _fallback_notes(providers: dict, ops: tuple) -> dict:
    notes = {}
    for name in providers:
        if name.startswith("mk:"):
            missing = [op for op in ops if op_backend(name[3:], op) != name[3:]]
            if missing:
                notes[name] = f"{'/'.join(missing)} not in backend '{name[3:]}' yet: ran on reference"
    return notes


def _route_kwargs(shape: MoEShape) -> dict:
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


def _hf_experts_module(shape: MoEShape, dtype: torch.dtype, device: torch.device):
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


def _mk_expert_args(experts, shape: MoEShape) -> tuple:
    """(gate_up [E,2I,H], down [E,H,I], kwargs) for moe_kernels.moe_mlp from an HF experts module."""
    if shape.family == "gpt_oss":
        return (experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2),
                {"activation": "gpt_oss", "interleaved": True, "gate_up_bias": experts.gate_up_proj_bias,
                 "down_bias": experts.down_proj_bias, "swiglu_limit": experts.limit})
    return experts.gate_up_proj, experts.down_proj, {"activation": "silu"}


def expected_touched_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts hit by ``tokens`` uniformly routed tokens."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _dense_mlp(x, w_gate_up, w_down, activation="silu"):
    return F.linear(reference.gated_activation(F.linear(x, w_gate_up), activation), w_down)


def build_moe_case(shape: MoEShape, scale: int, tokens: int, dtype_name: str, device: torch.device,
                   bandwidth: float | None, timing_kwargs: dict, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    s = shape.scaled(scale) if scale > 1 else shape
    experts, config = _hf_experts_module(s, dtype, device)
    x = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
    router_weight = (torch.randn(s.num_experts, s.hidden, device=device) / math.sqrt(s.hidden)).to(dtype)
    router_bias = (torch.randn(s.num_experts, device=device) * 0.1).float() if s.family == "deepseek_v3" else None
    gate_up, down, mk_kwargs = _mk_expert_args(experts, s)
    route_kwargs = _route_kwargs(s)
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
    notes = _fallback_notes(providers, ("route", "moe_mlp"))
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
        _add_gpu_peers(providers, notes, x, router_weight, router_bias, s, experts)

    ideal = None
    if device.type == "cpu" and bandwidth:
        ideal = _cpu_ideal(s, tokens, dtype, device, bandwidth, timing_kwargs,
                           lambda: F.linear(x, router_weight), router_bias, route_kwargs)
    return Case("moe", shape, scale, tokens, dtype_name, params, providers, headline_provider(device),
                "mk:reference", notes, ideal)


def _cpu_ideal(s: MoEShape, tokens: int, dtype, device, bandwidth: float, timing_kwargs: dict, logits_fn,
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
        return F.linear(x_tokens, w_router), _dense_mlp(x_rows, w1, w2)

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


def _add_gpu_peers(providers, notes, x, router_weight, router_bias, s, experts):
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
        return _dense_mlp(x, w_gate_up, w_down)

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
    notes = _fallback_notes(providers, ("route", "adapter_moe"))
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
    notes = _fallback_notes(providers, ("route", "adapter_moe"))
    providers["dense_linear"] = lambda: F.linear(x, base)
    providers["all_experts"] = all_experts
    return Case("lora", shape, scale, tokens, dtype_name, params, providers, headline_provider(device),
                "mk:reference", notes, not_comparable=("dense_linear",))


def build_route_case(shape: MoEShape, tokens: int, device: torch.device, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    logits = torch.randn(tokens, shape.num_experts, device=device)
    bias = torch.randn(shape.num_experts, device=device) * 0.1 if shape.family == "deepseek_v3" else None
    route_kwargs = _route_kwargs(shape)

    def mk_provider(backend):
        backend = op_backend(backend, "route")
        return lambda: moe_kernels.route(logits, shape.top_k, bias=bias, backend=backend, **route_kwargs)[0]

    def hf():
        return hf_router_math(logits, shape, bias)[0]

    providers = {f"mk:{b}": mk_provider(b) for b in mk_backends(device)}
    notes = _fallback_notes(providers, ("route",))
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
    notes = _fallback_notes(providers, ("plan",))
    providers["torch:sort"] = torch_sort
    # Any valid dispatch visits the experts in the same order, whatever order it keeps within an expert.
    flat_ids = ids.reshape(-1)
    return Case("plan", shape, 1, tokens, "int32", [], providers, headline_provider(device), "mk:reference",
                notes, None, differentiable=False, canonical=lambda slots: flat_ids[slots.long()])


# ------------------------------------------------------------------------------------------- running

def _clear_grads(params):
    for p in params:
        p.grad = None


def run_case(case: Case, passes, timing_kwargs: dict, device: torch.device, memory: bool,
             fwd_only: tuple = ()) -> list[dict]:
    """Time every provider of ``case`` on every pass (``fwd_only`` providers: forward only); rows without
    machine columns."""
    rows = []
    leaves = [p for p in case.params if p.is_floating_point()]
    outputs, failed = {}, {}
    with torch.no_grad():
        for name, fn in list(case.providers.items()):
            try:
                out = fn()
            except Exception as exc:  # noqa: BLE001 - one failing provider must not sink the run
                failed[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            outputs[name] = (case.canonical(out) if case.canonical else out).float()
    providers = {name: fn for name, fn in case.providers.items() if name not in failed}
    ref_out = outputs.get(case.reference) if case.reference else None
    grad_out = torch.randn_like(next(iter(outputs.values()))).to(leaves[0].dtype) if leaves else None
    for pass_name in passes if case.differentiable else ("fwd",):
        for name, note in failed.items():
            rows.append({"pass": pass_name, "provider": name, "note": note})
        active = {name: fn for name, fn in providers.items() if pass_name == "fwd" or name not in fwd_only}
        runs = {}
        for name, fn in active.items():
            if pass_name == "fwd":
                def forward(_, fn=fn):
                    with torch.no_grad():
                        fn()
                runs[name] = (forward, None)
            elif pass_name == "fwdbwd":
                runs[name] = (lambda _, fn=fn: fn().backward(grad_out), lambda: _clear_grads(leaves))
            else:
                def setup(fn=fn):
                    _clear_grads(leaves)
                    return fn()
                runs[name] = (lambda out: out.backward(grad_out), setup)
        ideal = case.ideal
        if ideal is not None:  # the ideal's dense chain joins the rounds, so it shares the providers' load
            chain, ideal_leaves, ideal_grads = ideal.dense_chain, ideal.leaves, ideal.grads

            def clear_ideal():
                for leaf in ideal_leaves:
                    leaf.grad = None
                return None

            if pass_name == "fwd":
                def ideal_forward(_):
                    with torch.no_grad():
                        chain()
                runs["cpu_ideal"] = (ideal_forward, None)
            elif pass_name == "fwdbwd":
                runs["cpu_ideal"] = (lambda _: torch.autograd.backward(chain(), ideal_grads), clear_ideal)
            else:
                runs["cpu_ideal"] = (lambda outs: torch.autograd.backward(outs, ideal_grads),
                                     lambda: clear_ideal() or chain())
        for p in leaves:
            p.requires_grad_(pass_name != "fwd")
        try:
            timings, errors = measure_interleaved(runs, device=device, **timing_kwargs)
            ideal_row = None
            if ideal is not None and "cpu_ideal" in timings:
                ms, note = ideal.from_dense_ms(pass_name, timings.pop("cpu_ideal").median_ms)
                ideal_row = {"pass": pass_name, "provider": "cpu_ideal", "median_ms": ms, "q1_ms": ms, "q3_ms": ms,
                             "repeats": 0, "note": note}
            for name, fn in active.items():
                row = {"pass": pass_name, "provider": name, "note": case.notes.get(name, "")}
                rows.append(row)
                if name in errors:
                    exc = errors[name]
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
                timing = timings[name]
                row.update(median_ms=timing.median_ms, q1_ms=timing.q1_ms, q3_ms=timing.q3_ms,
                           repeats=timing.repeats)
                if timing.repeats == 1 < timing_kwargs.get("min_repeats", 1):
                    row["note"] = "; ".join(filter(None, (row["note"], "slow: timed once")))
                if ref_out is not None and name in outputs and name not in case.not_comparable:
                    row["max_abs_err"] = float((outputs[name] - ref_out).abs().max())
                if memory and pass_name == "fwdbwd":
                    try:
                        _clear_grads(leaves)
                        row["peak_mb"] = peak_memory_bytes(lambda fn=fn: fn().backward(grad_out), device) / 2**20
                        row["saved_mb"] = saved_activation_bytes(fn, case.params) / 2**20
                    except Exception as exc:  # noqa: BLE001
                        row["note"] = "; ".join(filter(None, (row["note"], f"memory failed: {type(exc).__name__}")))
            if ideal_row:
                rows.append(ideal_row)
        finally:
            for p in leaves:
                p.requires_grad_(False)
            _clear_grads(leaves)
    for name, note in case.notes.items():
        if name not in case.providers:
            for pass_name in passes if case.differentiable else ("fwd",):
                rows.append({"pass": pass_name, "provider": name, "note": note})
    # ratios against the headline provider, per pass
    baseline = {r["pass"]: r.get("median_ms") for r in rows if r["provider"] == case.baseline}
    for r in rows:
        base = baseline.get(r["pass"])
        if base and r.get("median_ms"):
            r["ratio_vs_mk"] = r["median_ms"] / base
    s = case.shape.scaled(case.scale) if case.scale > 1 else case.shape
    common = {"suite": case.suite, "shape": case.shape.name, "scale": case.scale, "hidden": s.hidden,
              "intermediate": getattr(s, "intermediate", ""), "experts": s.num_experts, "top_k": s.top_k,
              "rank": getattr(s, "rank", ""), "tokens": case.tokens, "dtype": case.dtype}
    return [{**common, **r} for r in rows]


# ------------------------------------------------------------------------------------------- roofline

def roofline_rows(tokens_list=(1, 64, 4096, 16384), bytes_per_elem: int = 2) -> list[dict]:
    """Minimum FLOPs and bytes of each full-size MoE layer (forward), and the H100 time they imply.

    FLOPs = 2 * T * k * 3 * H * I (gate, up, down). Bytes = every expected-touched expert's weights read
    once (uniform routing) + x read + y written, in bf16. Time = max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s).
    """
    rows = []
    for shape in MOE_SHAPES.values():
        for tokens in tokens_list:
            flops = 2 * tokens * shape.top_k * 3 * shape.hidden * shape.intermediate
            touched = expected_touched_experts(shape.num_experts, shape.top_k, tokens)
            num_bytes = (touched * 3 * shape.hidden * shape.intermediate + 2 * tokens * shape.hidden) * bytes_per_elem
            t_flops, t_bytes = flops / H100_BF16_FLOPS, num_bytes / H100_HBM_BYTES_PER_S
            rows.append({"shape": shape.name, "tokens": tokens, "gflops": flops / 1e9, "mbytes": num_bytes / 1e6,
                         "touched_experts": round(touched, 1), "h100_us": max(t_flops, t_bytes) * 1e6,
                         "bound": "compute" if t_flops > t_bytes else "memory",
                         "intensity_flop_per_byte": flops / num_bytes})
    return rows


def format_roofline(rows: list[dict], measured: list[dict] = ()) -> str:
    """The roofline table; with GPU measurements (full-size bf16 forward rows), each provider's time beside it."""
    gpu_rows = [r for r in measured if r["suite"] == "moe" and r["scale"] == 1 and r["dtype"] == "bf16"
                and r["pass"] == "fwd" and r.get("median_ms") and str(r.get("device", "")).startswith("cuda")]
    providers = sorted({r["provider"] for r in gpu_rows})
    lines = [f"Roofline (forward, full-size shapes, bf16; H100 peaks assumed: {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s "
             f"dense bf16, {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s HBM3)", "",
             "| shape | T | GFLOP | MB moved | experts touched | FLOP/byte | H100 min time (us) | bound |"
             + "".join(f" {p} us (x roofline) |" for p in providers),
             "|---|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(providers)]
    for r in rows:
        cells = []
        for p in providers:
            m = next((g for g in gpu_rows if (g["shape"], g["tokens"], g["provider"]) == (r["shape"], r["tokens"], p)),
                     None)
            cells.append(f"{m['median_ms'] * 1e3:.1f} ({m['median_ms'] * 1e3 / r['h100_us']:.2f}x)" if m else "-")
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['gflops']:.2f} | {r['mbytes']:.1f} | {r['touched_experts']} "
                     f"| {r['intensity_flop_per_byte']:.1f} | {r['h100_us']:.1f} | {r['bound']} |"
                     + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- reporting

def format_table(rows: list[dict], suite: str) -> str:
    """Side-by-side table of one suite: the headline provider's time, then every provider's ratio to it."""
    rows = [r for r in rows if r["suite"] == suite]
    if not rows:
        return ""
    providers = []
    for r in rows:
        if r["provider"] not in providers and r.get("median_ms") is not None:
            providers.append(r["provider"])
    headline = next((p for p in providers if p.startswith("mk:") and p != "mk:reference"), providers[0])
    others = [p for p in providers if p != headline]
    keys = []
    for r in rows:
        key = (r["shape"], r["tokens"], r["dtype"], r["pass"])
        if key not in keys:
            keys.append(key)
    head = ["shape (scale)", "T", "dtype", "pass", f"{headline} ms"] + [f"{p} / mk" for p in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (1 + len(others))]
    by_key = {}
    for r in rows:
        by_key[(r["shape"], r["tokens"], r["dtype"], r["pass"], r["provider"])] = r
    for key in keys:
        first = next(r for r in rows if (r["shape"], r["tokens"], r["dtype"], r["pass"]) == key)
        base = by_key.get(key + (headline,), {})
        cells = [f"{key[0]} (/{first['scale']})" if first["scale"] > 1 else key[0], str(key[1]), key[2], key[3],
                 f"{base['median_ms']:.3f}" if base.get("median_ms") else "-"]
        for p in others:
            r = by_key.get(key + (p,), {})
            cells.append(f"{r['ratio_vs_mk']:.2f}x" if r.get("ratio_vs_mk") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOAL_GROUPED_MM_FWD = 1.5  # moe_kernels at least this much faster than transformers' grouped_mm, forward
GOAL_GROUPED_MM_FWDBWD = 2.0  # ... and forward+backward (OLMoE and Qwen3 shapes)
GOAL_IDEAL_FWD = 1.15  # moe_kernels forward within this factor of the CPU ideal, every shape
GOAL_ADAPTER_OVER_DENSE = 1.15  # PESC adapter-MoE layer / dense FFN alone


def format_goals(rows: list[dict]) -> str:
    """The issue's goals, each measured point marked met / short."""
    def median(suite, shape, tokens, dtype, pass_name, provider):
        for r in rows:
            if (r["suite"], r["shape"], r["tokens"], r["dtype"], r["pass"], r["provider"]) == \
                    (suite, shape, tokens, dtype, pass_name, provider) and r.get("median_ms"):
                return r["median_ms"]
        return None

    points = []
    for r in rows:
        key = (r["suite"], r["shape"], r["tokens"], r["dtype"])
        if key not in points:
            points.append(key)
    lines = ["| goal | shape | T | dtype | measured | target | met |", "|---|---|---:|---|---:|---:|---|"]
    for suite, shape, tokens, dtype in points:
        headline = next((r["provider"] for r in rows if r["suite"] == suite and r["provider"].startswith("mk:")), None)
        if headline is None:
            continue
        checks = []
        if suite == "moe":
            if shape in ("olmoe_1b_7b", "qwen3_30b_a3b"):
                for pass_name, target in (("fwd", GOAL_GROUPED_MM_FWD), ("fwdbwd", GOAL_GROUPED_MM_FWDBWD)):
                    mk, hf = (median(suite, shape, tokens, dtype, pass_name, p) for p in (headline, "hf:grouped_mm"))
                    if mk and hf:
                        checks.append((f"grouped_mm {pass_name} / mk (speed-up)", hf / mk, f">= {target}",
                                       hf / mk >= target))
            mk, ideal = (median(suite, shape, tokens, dtype, "fwd", p) for p in (headline, "cpu_ideal"))
            if mk and ideal:
                checks.append(("mk fwd / CPU ideal fwd", mk / ideal, f"<= {GOAL_IDEAL_FWD}", mk / ideal <= GOAL_IDEAL_FWD))
        elif suite == "adapter":
            for pass_name in ("fwd", "fwdbwd"):
                mk, dense = (median(suite, shape, tokens, dtype, pass_name, p) for p in (headline, "dense_ffn"))
                if mk and dense:
                    checks.append((f"adapter layer / dense FFN ({pass_name})", mk / dense,
                                   f"<= {GOAL_ADAPTER_OVER_DENSE}", mk / dense <= GOAL_ADAPTER_OVER_DENSE))
        for goal, value, target, met in checks:
            lines.append(f"| {goal} | {shape} | {tokens} | {dtype} | {value:.2f} | {target} | "
                         f"{'yes' if met else '**no**'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def format_memory(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("peak_mb") is not None and r["pass"] == "fwdbwd"]
    if not rows:
        return ""
    lines = ["| suite | shape | T | dtype | provider | peak fwd+bwd MiB | saved for bwd MiB |",
             "|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['shape']} | {r['tokens']} | {r['dtype']} | {r['provider']} "
                     f"| {r['peak_mb']:.1f} | {r['saved_mb']:.1f} |")
    return "\n".join(lines)


def format_notes(rows: list[dict]) -> str:
    seen = []
    for r in rows:
        if r.get("note") and r.get("median_ms") is None:
            line = f"- {r['suite']} {r['shape']} T={r['tokens']} {r['dtype']}: {r['provider']}: {r['note']}"
            if line not in seen:
                seen.append(line)
    return "\n".join(seen)


def plot_suite(rows: list[dict], suite: str, path: str) -> bool:
    """One panel per shape: each provider's time relative to moe_kernels per (T, dtype, pass), log scale.
    Returns False when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["suite"] == suite and r.get("ratio_vs_mk")]
    if not rows:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("mk:"), p))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    width = 0.8 / max(1, len(providers))
    most_cases = max(len({(r["tokens"], r["dtype"], r["pass"]) for r in rows if r["shape"] == sh}) for sh in shapes)
    fig, axes = plt.subplots(len(shapes), 1, squeeze=False,
                             figsize=(min(28, max(8, 0.45 * most_cases * len(providers) / 3 + 3)), 3.2 * len(shapes)))
    for ax, shape in zip(axes[:, 0], shapes):
        shape_rows = [r for r in rows if r["shape"] == shape]
        cases = list(dict.fromkeys((r["tokens"], r["dtype"], r["pass"]) for r in shape_rows))
        for i, p in enumerate(providers):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = next((r for r in shape_rows if r["provider"] == p and (r["tokens"], r["dtype"], r["pass"]) == case),
                         None)
                if r:
                    xs.append(j + i * width)
                    ys.append(r["ratio_vs_mk"])
            ax.bar(xs, ys, width, label=p, color=colors[p])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{shape} (/{shape_rows[0]['scale']})" if shape_rows[0]["scale"] > 1 else shape, fontsize=9)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"T={t} {d} {p}" for t, d, p in cases], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("time / moe_kernels", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7)
    fig.suptitle(f"moe_kernels bench: {suite} (bars above 1: slower than moe_kernels)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _fmt(r.get(c, "")) for c in CSV_COLUMNS})


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# ------------------------------------------------------------------------------------------------- main

def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="moe-kernels bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="OLMoE and Qwen3 shapes, decode and one training size, all suites at one size "
                             "(under 5 minutes on a 2-core CPU)")
    parser.add_argument("--suite", action="append", choices=SUITES, help="suites to run (repeatable; default all)")
    parser.add_argument("--out", default="bench_out", help="folder for bench.csv, plots and summary.md")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtypes (default fp32 and bf16)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--shape", action="append", help="restrict to these shape names")
    parser.add_argument("--tokens", type=int, action="append",
                        help="token counts (full-size values; training counts are scaled on the CPU)")
    parser.add_argument("--pass", dest="passes", action="append", choices=PASSES, help="passes (default all)")
    parser.add_argument("--repeats", type=int, default=None, help="minimum timed repeats per measurement")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--scale", type=int, default=None, help="override every shape's CPU scale factor")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory / saved-bytes measurement")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--bandwidth-mb", type=int, default=256, help="size of the copy that measures bandwidth")
    args = parser.parse_args(argv)
    known = set(MOE_SHAPES) | set(ADAPTER_SHAPES) | set(LORA_SHAPES)
    unknown = sorted(set(args.shape or ()) - known)
    if unknown:
        parser.exit(2, f"moe-kernels bench: unknown --shape {unknown}; known: {sorted(known)}\n")
    if args.threads < 1:
        parser.exit(2, f"moe-kernels bench: --threads must be >= 1, got {args.threads}\n")
    return args


def cpu_tokens(tokens: int, scale: int) -> int:
    """Decode counts stay; training counts (> 64) shrink with the shape's scale."""
    return tokens if tokens <= 64 else max(1, tokens // scale)


def run_benchmarks(args) -> tuple[list[dict], dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suites = args.suite or list(SUITES)
    dtypes = args.dtype or list(QUICK["dtypes"])
    passes = args.passes or list(QUICK["passes"] if args.quick else PASSES)
    min_repeats, max_repeats, budget = (3, 40, 0.25) if args.quick else (5, 50, 1.0)
    if args.repeats is not None:
        min_repeats = args.repeats
    timing_kwargs = {"min_repeats": min_repeats, "max_repeats": max(min_repeats, max_repeats),
                     "budget_s": budget if args.budget is None else args.budget,
                     "slow_s": 2.0 if args.quick else 30.0}
    on_cpu = device.type == "cpu"
    bandwidth = measure_copy_bandwidth(args.bandwidth_mb * 2**20) if on_cpu else None
    info["bandwidth_gbs"] = bandwidth / 1e9 if bandwidth else None

    def scale_of(shape):
        return (args.scale or shape.cpu_scale) if on_cpu else 1

    def pick(shapes, quick_names=None):
        names = args.shape or (quick_names if args.quick and quick_names else list(shapes))
        return [shapes[n] for n in names if n in shapes]

    def tokens_for(scale, quick_tokens, full_tokens):
        base = args.tokens or (quick_tokens if args.quick else full_tokens)
        return sorted({cpu_tokens(t, scale) if on_cpu else t for t in base})

    csv_path = os.path.join(args.out, "bench.csv")

    class _Rows(list):
        """Rows, stamped with the run's machine columns and flushed to bench.csv after every case, so an
        interrupted run still leaves its measurements."""

        def __iadd__(self, new_rows):
            for r in new_rows:
                r.update(run_id=run_id, **{k: v for k, v in info.items() if k in CSV_COLUMNS})
            self.extend(new_rows)
            write_csv(self, csv_path)
            return self

    rows = _Rows()
    fwd_only = QUICK["fwd_only_providers"] if args.quick else ()

    def progress(msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if "moe" in suites:
        moe_points = [(shape, tokens, passes) for shape in pick(MOE_SHAPES, QUICK["moe_shapes"])
                      for tokens in tokens_for(scale_of(shape), QUICK["moe_tokens"], DECODE_TOKENS + TRAIN_TOKENS)]
        if args.quick and not args.shape and not args.tokens:
            moe_points += [(MOE_SHAPES[name], 1, ("fwd",)) for name in QUICK["decode_shapes"]]
        for shape, tokens, point_passes in moe_points:
            scale = scale_of(shape)
            for dtype in dtypes:
                progress(f"moe {shape.name} /{scale} T={tokens} {dtype}")
                case = build_moe_case(shape, scale, tokens, dtype, device, bandwidth, timing_kwargs)
                rows += run_case(case, point_passes, timing_kwargs, device, memory=not args.no_memory, fwd_only=fwd_only)
                del case
    if "adapter" in suites:
        for shape in pick(ADAPTER_SHAPES):
            scale = scale_of(shape)
            for tokens in tokens_for(scale, QUICK["adapter_tokens"], (64,) + TRAIN_TOKENS):
                for dtype in dtypes:
                    progress(f"adapter {shape.name} /{scale} T={tokens} {dtype}")
                    case = build_adapter_case(shape, scale, tokens, dtype, device)
                    rows += run_case(case, passes, timing_kwargs, device, memory=not args.no_memory, fwd_only=fwd_only)
    if "lora" in suites:
        for shape in pick(LORA_SHAPES):
            scale = scale_of(shape)
            for tokens in tokens_for(scale, QUICK["lora_tokens"], (64,) + TRAIN_TOKENS):
                for dtype in dtypes:
                    progress(f"lora {shape.name} /{scale} T={tokens} {dtype}")
                    case = build_lora_case(shape, scale, tokens, dtype, device)
                    rows += run_case(case, passes, timing_kwargs, device, memory=not args.no_memory, fwd_only=fwd_only)
    if "route" in suites or "plan" in suites:
        for shape in pick(MOE_SHAPES, ("olmoe_1b_7b", "deepseek_v3_like", "gpt_oss_20b")):
            for tokens in (args.tokens or (QUICK["route_tokens"] if args.quick else (64,) + TRAIN_TOKENS)):
                if "route" in suites:
                    progress(f"route {shape.name} T={tokens}")
                    rows += run_case(build_route_case(shape, tokens, device), ("fwd",), timing_kwargs, device, False)
                if "plan" in suites:
                    progress(f"plan {shape.name} T={tokens}")
                    rows += run_case(build_plan_case(shape, tokens, device), ("fwd",), timing_kwargs, device, False)
    return list(rows), info


def headline_name(rows: list[dict]) -> str:
    return next((r["provider"] for r in rows if r["provider"].startswith("mk:") and r["provider"] != "mk:reference"),
                "mk:reference")


def render_summary(rows: list[dict], info: dict, suites, roofline: list[dict]) -> str:
    bw = info.get("bandwidth_gbs")
    parts = [f"Machine: {info['machine']}, {info['cpu']}; device {info['device']}; {info['threads']} threads; "
             f"torch {info['torch']}, transformers {info['transformers']}, moe_kernels {info['moe_kernels']}"
             + (f"; measured copy bandwidth {bw:.1f} GB/s" if bw else "")]
    if info.get("load") and info["load"][0] is not None:
        before, after, seconds = info["load"]
        parts.append(f"Run took {seconds:.0f} s; 1-minute load average {before:.1f} at the start, {after:.1f} at the end "
                     f"(above the thread count means other processes shared the cores: expect noisy timings).")
    titles = {"moe": "MoE block (router + routing + expert MLPs)", "adapter": "PESC adapter-MoE layer",
              "lora": "Self-MoE LoRA-MoE linear", "route": "Routing alone", "plan": "Dispatch plan alone"}
    for suite in SUITES:
        if suite == "roofline" or suite not in suites:
            continue
        table = format_table(rows, suite)
        if table:
            parts += [f"### {titles[suite]}", "Ratios are provider time / moe_kernels time (>1: moe_kernels faster).",
                      table]
    goals = format_goals(rows)
    if goals:
        parts += ["### Goals (issue 8)", f"Measured with {headline_name(rows)} as moe_kernels.", goals]
    memory = format_memory(rows)
    if memory:
        parts += ["### Memory (forward+backward)", memory]
    notes = format_notes(rows)
    if notes:
        parts += ["### Skipped / notes", notes]
    if roofline:
        parts += ["### " + format_roofline(roofline, rows)]
    return "\n\n".join(parts) + "\n"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of ``moe-kernels bench``; returns the exit status."""
    args = _parse_args(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    suites = args.suite or list(SUITES)
    load_before = _load_average()
    rows, info = run_benchmarks(args)
    info["load"] = (load_before, _load_average(), time.perf_counter() - started)
    roofline = roofline_rows() if "roofline" in suites else []
    csv_path = os.path.join(args.out, "bench.csv")
    write_csv(rows, csv_path)
    if roofline:
        with open(os.path.join(args.out, "roofline.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(roofline[0]))
            writer.writeheader()
            writer.writerows(roofline)
    plots = []
    if not args.no_plot:
        for suite in SUITES:
            path = os.path.join(args.out, f"{suite}.png")
            if suite in suites and plot_suite(rows, suite, path):
                plots.append(path)
    summary = render_summary(rows, info, suites, roofline)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    print(f"wrote {csv_path}" + (f", {', '.join(plots)}" if plots else "") +
          f", {os.path.join(args.out, 'summary.md')} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(bench_main())
