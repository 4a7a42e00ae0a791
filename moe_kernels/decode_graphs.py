"""Decode calls replayed from CUDA graphs (opt-in: ``MOE_KERNELS_DECODE_GRAPHS=1``).

At decode (T*k <= 64 slots, no gradient) an expert op's GPU work takes tens of microseconds while issuing it takes
more: on the H200 of run 3 a one-token triton moe_mlp call (two kernel launches) took the host 92-154 microseconds
(benchmarks/RESULTS_GPU.md, host time per call). A CUDA graph replays the same kernels for the price of one launch.
Here each distinct call (op, backend, device, shapes, dtypes, strides, the weights' addresses, every option and
path switch) gets its own graph:

1. its first call runs eagerly (Triton compiles its kernels, caches fill);
2. its second call is captured on copies of the per-call inputs (x, the routing weights and ids), which the graph
   owns, and replayed;
3. later calls copy their inputs into those copies, replay, and return a clone of the graph's output (the graph
   overwrites its output on the next replay; the caller's tensor is its own).

Each capture costs once what torch.cuda.graph does on entry (a device synchronisation, Python's garbage collection,
emptying the allocator's cache): a model's first graphed decode step pays it per layer. The graph reads the expert
weights at the addresses it was captured with: the key holds them, so weights moved or replaced (a new tensor) make
a new graph, and weights changed in place are read as they are. Nothing is captured
under torch.compile (inductor captures whole graphs itself), inside another capture, with a gradient, or off CUDA;
a call whose capture fails runs eagerly from then on, after one warning.

Not on by default: it has not run on a GPU yet (benchmarks/RESULTS_GPU.md says when it has).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from typing import Callable, Sequence

import torch

ENV = "MOE_KERNELS_DECODE_GRAPHS"
MAX_SLOTS = 64  # T*k up to this: triton's decode path, and the sizes where issuing the launches dominates
MAX_GRAPHS = 256  # least recently used graphs beyond this are dropped (each holds its own small memory pool)

_EAGER = "eager"  # a key whose capture failed
# Variables that pick a backend's decode path (triton's one-token GEMVs, the cuda decode op): part of every key, so
# a graph never replays the path a switch turned off.
PATH_SWITCHES = ("MOE_KERNELS_ONE_TOKEN", "MOE_KERNELS_CUDA_DECODE")


class _Graph:
    __slots__ = ("replay", "inputs", "output")

    def __init__(self, replay: Callable[[], None], inputs: list[torch.Tensor], output: torch.Tensor):
        self.replay, self.inputs, self.output = replay, inputs, output


_cache: OrderedDict = OrderedDict()  # key -> 1 (seen once) | _Graph | _EAGER


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def wanted(device: torch.device, slots: int, tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether a call with these properties goes through a graph (cheap: checked on every call)."""
    if torch.compiler.is_compiling():  # first: no guard on the sizes below enters a compiled graph
        return False
    if device.type != "cuda" or slots > MAX_SLOTS or not enabled():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return not torch.cuda.is_current_stream_capturing()


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What a graph fixes of a tensor it reads in place: device, address, shape, strides, dtype."""
    if t is None:
        return None
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def layout_key(t: torch.Tensor) -> tuple:
    """What a graph fixes of a per-call input it copies: device, shape, strides, dtype."""
    return (t.device, tuple(t.shape), t.stride(), t.dtype)


def capture_cuda_graph(fn: Callable, args: Sequence) -> tuple[Callable[[], None], object]:
    """(replay, output) of a CUDA graph of ``fn(*args)``, warmed up on a side stream first (torch.cuda.graph's
    docs ask for it). Each graph gets its own memory pool. benchmarks/gpu_bench.py captures with it too."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*args)
    return graph.replay, output


_capture = capture_cuda_graph  # tests replace it to run the bookkeeping without a GPU


def run(key: tuple, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fn(*inputs)``, through the graph of ``key`` once it has been seen (see the module docstring). ``key``
    must fix everything of the call except the values of ``inputs``."""
    # inference mode too: its tensors (the graph's input copies) take no in-place copy outside it, and the reverse
    key = (key + (torch.is_inference_mode_enabled(),) + tuple(os.environ.get(name) for name in PATH_SWITCHES)
           + tuple(layout_key(t) for t in inputs))
    state = _cache.get(key)
    if state is None or state is _EAGER:
        if state is None:
            _remember(key, 1)
        return fn(*inputs)
    _cache.move_to_end(key)
    # on the inputs' device: a graph is captured and launched on a stream of its own device
    with torch.cuda.device(inputs[0].device) if inputs[0].is_cuda else contextlib.nullcontext():
        if state == 1:
            statics = [t.clone() for t in inputs]
            try:
                replay, output = _capture(fn, statics)
            except Exception as exc:  # noqa: BLE001 - e.g. a host sync in a backend: stay eager for this call
                _cache[key] = _EAGER
                warnings.warn(f"moe_kernels: no CUDA graph for a decode call ({type(exc).__name__}: {exc}); it runs "
                              f"eagerly from now on ({ENV})", RuntimeWarning, stacklevel=3)
                return fn(*inputs)
            state = _cache[key] = _Graph(replay, statics, output)
        else:
            for static, value in zip(state.inputs, inputs):
                static.copy_(value)
        state.replay()
        return state.output.clone()


def _remember(key: tuple, value) -> None:
    _cache[key] = value
    while len(_cache) > MAX_GRAPHS:
        _cache.popitem(last=False)


def clear() -> None:
    """Drops every graph (their memory returns to the caching allocator)."""
    _cache.clear()
