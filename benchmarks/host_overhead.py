"""Host time per call of the public ops on the triton path: what the CPU spends validating, choosing a backend
and enqueuing kernels. At decode (one token, a few experts) the GPU work is tens of microseconds, so this time
is the latency unless it is hidden behind earlier work.

    python benchmarks/host_overhead.py [--calls 2000] [--csv FILE]

On a GPU it times each call's wall time without synchronising (the host's cost of issuing it; a sync every 32
calls keeps the launch queue from filling and is not timed). Without a GPU it times the same calls with Triton's
kernel launch replaced by a no-op (``JITFunction.run``), on CPU tensors: the package's own host time, without
Triton's launcher, which needs a GPU. The two kinds of figure are not comparable with each other; each run
prints which one it made. Medians over ``--calls`` calls after a warm-up, in microseconds.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch


def _stub_triton_launches() -> None:
    """No GPU: make every Triton launch a no-op so the host path runs on CPU tensors."""
    os.environ.pop("TRITON_INTERPRET", None)  # kernels must be JITFunctions, not interpreted
    import triton.runtime.jit as jit

    jit.JITFunction.run = lambda self, *args, **kwargs: None
    from moe_kernels.triton import BACKEND

    BACKEND.device_error = lambda device: None  # the backend refuses CPU tensors outside the interpreter
    import moe_kernels.validation

    # Value checks (ids in range, finite logits) always run on CPU tensors and, outside debug mode, never on GPU
    # ones: leave them out, as on a GPU.
    moe_kernels.validation.value_checks_enabled = lambda t: False


def _time_us(fn, calls: int, gpu: bool) -> float:
    for _ in range(min(100, calls)):
        fn()
    if gpu:
        torch.cuda.synchronize()
    samples = []
    for i in range(calls):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
        if gpu and i % 32 == 31:
            torch.cuda.synchronize()
    if gpu:
        torch.cuda.synchronize()
    return statistics.median(samples) / 1000


def _with_switch(module, name: str, value: bool, fn) -> None:
    """``fn()`` with ``module.name`` (a switch read per call) answering ``value``: the effect of its environment
    variable without an environment write per call."""
    switch = getattr(module, name)
    setattr(module, name, lambda: value)
    try:
        fn()
    finally:
        setattr(module, name, switch)


def _with_tiles(fn):
    """``fn`` with the one-token path off (as MOE_KERNELS_ONE_TOKEN=tiles)."""
    from moe_kernels.triton import experts

    _with_switch(experts, "one_token_path_enabled", False, fn)


def _with_decode_graphs(fn):
    """``fn`` with decode calls replayed from CUDA graphs (as MOE_KERNELS_DECODE_GRAPHS=1): the host time of copying
    the inputs in, one replay and the output's copy."""
    from moe_kernels import decode_graphs

    _with_switch(decode_graphs, "enabled", True, fn)


def _with_direct_launch(fn):
    """``fn`` with Triton kernels launched directly after their first launch (as MOE_KERNELS_DIRECT_LAUNCH=1,
    moe_kernels.triton.common.launcher)."""
    from moe_kernels.triton import common

    before, common.DIRECT_LAUNCH = common.DIRECT_LAUNCH, True
    try:
        fn()
    finally:
        common.DIRECT_LAUNCH = before


def _cases(device: torch.device):
    """(name, callable) pairs; shapes of Qwen3-30B-A3B (H 2048, I 768, E 128, k 8) unless named. The routing
    inputs come from the device's default backend (without a GPU the stubbed Triton kernels compute nothing)."""
    import moe_kernels as mk

    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    H, I, E, k = 2048, 768, 128, 8

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype).requires_grad_(grad)

    gate_up = randn(E, 2 * I, H, scale=H ** -0.5)
    down = randn(E, H, I, scale=I ** -0.5)
    cases = []
    for tokens in (1, 4):
        x = randn(tokens, H)
        logits = torch.randn(tokens, E, device=device, generator=g)
        weights, ids = mk.route(logits, k)

        def decode(x=x, weights=weights, ids=ids, backend="triton"):
            with torch.no_grad():
                mk.moe_mlp(x, gate_up, down, weights, ids, backend=backend)

        cases.append((f"moe_mlp decode T={tokens}, backend=triton", decode))
        if tokens == 1:  # the one-token GEMVs (2 launches, the default) against the decode path's tiles (3)
            cases.append(("moe_mlp decode T=1, triton, decode tiles", lambda decode=decode: _with_tiles(decode)))
        if device.type == "cuda":
            cases.append((f"moe_mlp decode T={tokens}, backend=auto",
                          lambda decode=decode: decode(backend="auto")))
            if "cuda" in mk.available_backends():  # the decode op: two C++-issued GEMV launches
                cases.append((f"moe_mlp decode T={tokens}, backend=cuda",
                              lambda decode=decode: decode(backend="cuda")))
            cases.append((f"moe_mlp decode T={tokens}, triton, decode graphs",
                          lambda decode=decode: _with_decode_graphs(decode)))
            cases.append((f"moe_mlp decode T={tokens}, triton, direct launch",
                          lambda decode=decode: _with_direct_launch(decode)))

    logits = torch.randn(1, E, device=device, generator=g)

    def route():
        with torch.no_grad():
            mk.route(logits, k, backend="triton")

    cases.append(("route T=1 (E 128, k 8)", route))
    if device.type == "cuda":
        cases.append(("route T=1 (E 128, k 8), direct launch", lambda: _with_direct_launch(route)))

    # Training at a small width: without a GPU, weight gradients of Qwen3's size (400 MB each) would time the CPU
    # allocator's mmap calls; on a GPU the caching allocator makes the size irrelevant to host time.
    Ht, It, Et = 512, 256, 8
    x_train = randn(16, Ht, grad=True)
    w_train = (randn(Et, 2 * It, Ht, scale=Ht ** -0.5, grad=True), randn(Et, Ht, It, scale=It ** -0.5, grad=True))
    weights16, ids16 = mk.route(torch.randn(16, Et, device=device, generator=g), 2)
    grad16 = randn(16, Ht)

    def train():
        y = mk.moe_mlp(x_train, *w_train, weights16, ids16, backend="triton")
        torch.autograd.grad(y, (x_train, *w_train), grad16)

    cases.append(("moe_mlp forward+backward T=16 (H 512, I 256, E 8, k 2)", train))
    if device.type == "cuda":
        cases.append(("moe_mlp forward+backward T=16, direct launch", lambda: _with_direct_launch(train)))

    # The native backend (cuda on a GPU, else cpu): its op dispatch and C++ autograd (csrc/autograd.cpp). Without
    # a GPU its kernels really run, so the shape is tiny there (the CPU work is a few microseconds of the figure).
    native = "cuda" if device.type == "cuda" else "cpu"
    Hn, In, En = (Ht, It, Et) if device.type == "cuda" else (16, 16, 4)
    x_native = randn(16, Hn, grad=True)
    w_native = (randn(En, 2 * In, Hn, scale=Hn ** -0.5, grad=True), randn(En, Hn, In, scale=In ** -0.5, grad=True))
    logits_native = torch.randn(16, En, device=device, generator=g, requires_grad=True)
    grad_native = randn(16, Hn)

    def native_train():
        weights, ids = mk.route(logits_native, 2, backend=native)
        y = mk.moe_mlp(x_native, *w_native, weights, ids, backend=native)
        torch.autograd.grad(y, (x_native, *w_native, logits_native), grad_native)

    if native in mk.available_backends():  # a GPU machine whose build lacks the CUDA sources skips it
        cases.append((f"route+moe_mlp fwd+bwd T=16, {native} (H {Hn} I {In} E {En} k 2)", native_train))

    r = 16
    adapter_down, adapter_up = randn(16, r, H, scale=H ** -0.5), randn(16, H, r, scale=r ** -0.5)
    h = randn(1, H)
    weights_a, ids_a = mk.route(torch.randn(1, 16, device=device, generator=g), 4)

    def adapter():
        with torch.no_grad():
            mk.adapter_moe(h, adapter_down, adapter_up, weights_a, ids_a, backend="triton")

    cases.append(("adapter_moe decode T=1 (E 16, r 16, k 4)", adapter))
    if device.type == "cuda":
        cases.append(("adapter_moe decode T=1, direct launch", lambda: _with_direct_launch(adapter)))

    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter
    except ImportError:
        return cases
    from moe_kernels.hf.experts import BACKEND_ATTRIBUTE, moe_kernels_experts_forward
    from moe_kernels.hf.routers import qwen_moe_forward

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    experts = Qwen3MoeExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    setattr(experts, BACKEND_ATTRIBUTE, "triton")
    x1 = randn(1, H)
    # what the fused router hands the experts (route writes transformers' dtypes: no conversion in the timed call)
    weights1, ids1 = mk.route(torch.randn(1, E, device=device, generator=g), k, weights_dtype=dtype,
                              ids_dtype=torch.int64)

    def hf_decode():
        with torch.no_grad():
            moe_kernels_experts_forward(experts, x1, ids1, weights1)

    cases.append(("HF Qwen3MoeExperts decode T=1 (int64 ids, bf16 weights)", hf_decode))
    # The fused router forward (route writes transformers' bf16 weights and int64 ids itself), on the device's
    # default backend for route: cuda on a GPU (its own kernel, really run here on the CPU: E 128, one token).
    router = Qwen3MoeTopKRouter(config).to(device=device, dtype=dtype)

    def hf_router():
        with torch.no_grad():
            qwen_moe_forward(router, x1)

    cases.append(("HF Qwen3MoeTopKRouter decode T=1 (fused route, HF dtypes)", hf_router))
    if device.type == "cuda":
        cases.append(("HF Qwen3MoeExperts decode T=1, direct launch", lambda: _with_direct_launch(hf_decode)))
        if "cuda" in mk.available_backends():  # the decode op, reading the router's dtypes as the triton kernels do

            def hf_decode_cuda():
                setattr(experts, BACKEND_ATTRIBUTE, "cuda")
                try:
                    hf_decode()
                finally:
                    setattr(experts, BACKEND_ATTRIBUTE, "triton")

            cases.append(("HF Qwen3MoeExperts decode T=1, backend=cuda", hf_decode_cuda))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per case (median)")
    parser.add_argument("--csv", help="also write the figures to this CSV file")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        _stub_triton_launches()
    device = torch.device("cuda" if gpu else "cpu")
    import triton

    import moe_kernels

    what = (f"GPU {torch.cuda.get_device_name()}: wall time to issue each call, no sync" if gpu else
            "no GPU: CPU tensors, Triton launches stubbed out (the package's host time without Triton's launcher)")
    print(f"host_overhead: {what}")
    print(f"python {platform.python_version()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"moe_kernels {moe_kernels.__version__} | {platform.processor() or platform.machine()}")
    rows = []
    for name, fn in _cases(device):
        us = _time_us(fn, args.calls, gpu)
        rows.append((name, us))
        print(f"  {name:<58} {us:8.1f} us")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "host_us", "mode"])
            writer.writerows((name, f"{us:.2f}", "gpu" if gpu else "cpu-stubbed") for name, us in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
