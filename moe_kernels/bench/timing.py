"""What the benchmark measures besides the layers: the machine, wall-clock timings of interleaved providers,
peak memory and the bytes autograd saves for backward."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import moe_kernels

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


def median_call_ms(fn: Callable, repeats: int, gpu: bool):
    """(median ms of ``repeats`` calls of ``fn`` after one warm-up call, the last call's result): CUDA events
    around each call on a GPU, the wall clock otherwise. The tuners' timer (backend table, Triton tiles)."""
    result = fn()  # warm-up: compiles, or loads the compiled kernels from the cache
    samples = []
    for _ in range(repeats):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            result = fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples), result


def replayed_median_ms(fn: Callable, repeats: int, gpu: bool, calls: int = 16):
    """(median ms per call, the last call's result) of ``fn`` replayed from one CUDA graph of ``calls`` calls, CUDA
    events around each of ``repeats`` replays; without a GPU, :func:`median_call_ms`. For calls whose GPU work is
    shorter than the host's time to issue them (a decode step): events around an eager call time the host there,
    and a tuner timing that way picks by noise (the H200's run 3 saw 9-28% between identical decode calls)."""
    if not gpu:
        return median_call_ms(fn, repeats, gpu)
    from ..decode_graphs import capture_cuda_graph

    fn()  # compiles outside the capture

    def many():
        result = None
        for _ in range(calls):
            result = fn()
        return result

    replay, result = capture_cuda_graph(many, ())
    replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples), result


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


# ------------------------------------------------------------------------------------------- kernels


def kernel_times(call: Callable, iters: int, device: torch.device) -> dict:
    """Where the time of ``call(i)`` goes, profiled over ``iters`` calls after two warm-ups: ``wall_ms`` per call
    (median; CUDA events on a GPU), ``kernel_ms`` (the sum of its kernels' times) and ``launches`` per call,
    ``gpu_idle`` (1 - kernel_ms / wall_ms: the share of the call the GPU ran none of its kernels, i.e. waited for
    the host; None without a GPU) and ``kernels``: name -> (launches, ms) per call. Without a GPU the events are
    CPU operators with their own time (nested operators are not counted twice)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    for i in range(2):
        call(i)
    _sync(device)
    walls = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with _quiet_native_stderr(), profile(activities=activities) as prof:
        for i in range(iters):
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(i)
                end.record()
                end.synchronize()
                walls.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                call(i)
                walls.append(1e3 * (time.perf_counter() - begin))
    totals: dict[str, list] = {}
    for event in prof.events():
        if gpu and event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.time_range.elapsed_us()
        elif not gpu and event.device_type == torch.autograd.DeviceType.CPU:
            us = event.self_cpu_time_total
        else:
            continue
        entry = totals.setdefault(" ".join(event.name.split()), [0, 0.0])  # kernel names span lines
        entry[0] += 1
        entry[1] += us / 1e3
    kernels = {name: (count / iters, ms / iters) for name, (count, ms) in totals.items()}
    kernel_ms = sum(ms for _, ms in kernels.values())
    wall = statistics.median(walls)
    return {"wall_ms": wall, "kernel_ms": kernel_ms, "launches": sum(count for count, _ in kernels.values()),
            "gpu_idle": max(0.0, 1.0 - kernel_ms / wall) if gpu and wall > 0 else None, "kernels": kernels}


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
