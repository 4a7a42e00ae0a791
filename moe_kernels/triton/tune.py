"""Tune the expert-MLP Triton configs for the local GPU: ``moe-kernels tune --triton``.

The shipped ``configs.json`` holds one set of tiles per rows-per-expert class, chosen without a GPU. This
command times candidate tiles of each expert-MLP kernel on the local GPU, at the shapes of the models asked for,
and writes the winners to the user's per-GPU table (:func:`moe_kernels.triton.configs.user_configs_path`),
which every later process reads for that GPU model -- the way vLLM ships fused-MoE configs per GPU.

It tunes the ``mlp`` family (the planned forward and the backward, per rows-per-expert class), the ``mlp_decode``
family (the forward without a plan for a few slots, timed at T = 1 and 8) and the ``mlp_one_token`` family (the
one-token GEMVs of batch-1 decode). What it does, per model shape
(H, I, E, k) and rows-per-expert class of ``configs.json``:

1. **Candidates**: the entry in force plus :data:`CANDIDATES` of its class, one kernel at a time; from the second
   rows class on, first the entry in force's tile in the other program orders (:func:`order_variants`: GROUP_M,
   the order a launch's programs run in, which the shipped tiles take by default and no run has timed yet).
2. **Compile first, in parallel**: ``--jobs`` spawned processes run every candidate once at the real weight
   shapes with a few tokens (the same Triton specialisation), so the kernels are in Triton's disk cache before
   any timing; compiling serially would take most of the budget.
3. **Coordinate descent**: ``up`` and ``down`` are chosen by the time of a forward (the planned one that
   training runs; inference runs the same tiles), then ``down_bwd``, ``dx`` and ``dw`` by the time of a backward
   (``autograd.grad`` with a kept graph). CUDA events, median of ``--repeats`` after a warm-up. Each rows class
   is timed at two token counts, near both ends of the class (:func:`timing_rows`), and a candidate's score is
   the sum of its times relative to the entry in force's at each: the tiles must win across the class, not at
   one point of it. A candidate whose outputs or gradients differ from the entry in
   force (norm-wise relative error above :data:`AGREEMENT`) or that fails to compile is left out and reported.
4. **The decode path**: the same descent over its two kernels' tiles (BLOCK_M, the slots that take the path, is
   kept), by the summed time of no-gradient forwards at :data:`DECODE_TOKENS` on the decode tiles (one token
   included, where users' calls take the one-token GEMVs), each replayed from a CUDA graph of 16 calls: timed
   eagerly, a decode call's CUDA events measure the host's time to issue it, not these tiles.
   The one-token GEMVs (``mlp_one_token``, batch-1 decode where the width takes them) likewise, at T = 1, over
   :data:`ONE_TOKEN_CANDIDATES`, replayed from CUDA graphs.
5. **The table**: one ``mlp`` entry per (width class, rows class), one ``mlp_decode`` entry per width class and
   one ``mlp_one_token`` entry per width class the GEMVs run at,
   with ``min_*``/``max_*`` bounds, the shape it was tuned at and the before/after times, merged into the
   existing table of the GPU model (other width classes are kept). The width class is the intermediate size I (:data:`INTER_CLASSES`): tiles that suit
   Qwen3-30B-A3B's I=768 are not those of Mixtral's I=14336.

``--dry-run`` (no GPU: CI) runs the same steps under the Triton interpreter on a tiny shape, for the two smaller
rows classes, with two candidates per kernel and wall-clock timing; its table is marked ``"measured": false`` and is written only where
``--out`` says, never to the user's cache.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from ..bench.timing import median_call_ms, replayed_median_ms
from . import configs
from .experts import configured_group_m

# Model shapes (hidden H, intermediate I, experts E, top-k) tunable by name.
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "deepseek-v3-scaled": (2048, 512, 256, 8),  # E and k of DeepSeek-V3 at gpu_bench.py's scaled width
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
DEFAULT_SHAPES = ("qwen3-30b-a3b", "mixtral-8x7b")
# Width classes of the tuned entries, by intermediate size I: (min, max), None = unbounded.
INTER_CLASSES = ((None, 1024), (1025, 4096), (4097, None))
FORWARD_KERNELS = ("up", "down")
BACKWARD_KERNELS = ("down_bwd", "dx", "dw")
AGREEMENT = 2e-2  # largest norm-wise relative difference from the entry in force (bf16 rounding: ~3e-3)


def _gemm(m, n, k, warps, stages):
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}


def _split(n, k, warps, stages):
    """The G GEMM tile of the split down backward (its rows: the down_bwd tile's BLOCK_M)."""
    return {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}


def _outer(i, j, p, warps, stages):
    return {"BLOCK_I": i, "BLOCK_J": j, "BLOCK_P": p, "num_warps": warps, "num_stages": stages}


# Candidate tiles per rows-per-expert class of configs.json's 'mlp' family (index 0: the fewest rows). "gemm"
# serves down and dx; "up" (BLOCK_N intermediate columns, two accumulators) and "down_bwd" (the activation's
# backward in its epilogue; with a 'split' tile, that backward's split form instead: G as a plain GEMM with that
# tile, then an elementwise pass) hold more per thread and have lists of their own; 'dw' is the per-expert
# weight-gradient kernel (BLOCK_P rows per step). Few rows per expert: the weights are read once per row tile, so
# narrow M and wide K/N; many rows: the large tiles of a compute-bound GEMM. Every candidate compiles for sm_80 and
# sm_90 without spills (the larger tiles of 'up' and 'down_bwd' that spilled were dropped), so a tuned table can
# ship under the compile check.
# The class of the fewest rows runs in launch order (GROUP_M 0), as its configs.json entry does.
_SMALL_ROWS = [dict(tile, GROUP_M=0) for tile in (
    _gemm(16, 64, 64, 4, 3), _gemm(16, 32, 128, 4, 4), _gemm(16, 64, 128, 4, 3), _gemm(16, 128, 64, 4, 3),
    _gemm(16, 64, 256, 4, 3), _gemm(16, 128, 128, 8, 3), _gemm(32, 64, 64, 4, 3), _gemm(16, 32, 64, 4, 4))]
CANDIDATES = (
    # down_bwd without its 16x128x128 tile: ptxas spilled 8 bytes in the ungated (relu2) variant on sm_90
    {"gemm": _SMALL_ROWS, "up": _SMALL_ROWS,
     "down_bwd": [tile for tile in _SMALL_ROWS if (tile["BLOCK_N"], tile["BLOCK_K"]) != (128, 128)],
     "dw": [_outer(64, 64, 32, 4, 3), _outer(64, 64, 16, 4, 3), _outer(128, 64, 16, 4, 3), _outer(64, 128, 16, 4, 3),
            _outer(128, 128, 16, 8, 3), _outer(32, 64, 16, 4, 3)]},
    {"gemm": [_gemm(64, 64, 64, 8, 3), _gemm(64, 128, 64, 8, 3), _gemm(64, 64, 64, 4, 3), _gemm(64, 128, 64, 4, 4),
              _gemm(32, 64, 64, 4, 3), _gemm(64, 64, 128, 4, 3), _gemm(128, 64, 64, 8, 3), _gemm(128, 128, 64, 8, 3)],
     "up": [_gemm(64, 64, 64, 8, 3), _gemm(64, 128, 64, 8, 3), _gemm(64, 64, 32, 4, 3), _gemm(32, 64, 64, 4, 3),
            _gemm(32, 64, 128, 4, 3), _gemm(128, 64, 64, 8, 3), _gemm(64, 32, 64, 4, 4), _gemm(128, 32, 64, 8, 3)],
     "down_bwd": [_gemm(64, 64, 64, 8, 3), _gemm(32, 64, 64, 4, 3), _gemm(64, 32, 64, 4, 3), _gemm(64, 32, 64, 8, 3),
                  _gemm(32, 32, 64, 4, 3), _gemm(64, 64, 32, 8, 3), _gemm(128, 32, 64, 8, 3), _gemm(32, 64, 128, 4, 3),
                  # the split form (experts.split_down_backward_tile), not shipped at this class
                  dict(_gemm(64, 64, 64, 8, 3), split=_split(128, 64, 8, 3)),
                  dict(_gemm(64, 64, 64, 8, 3), split=_split(128, 64, 4, 3))],
     "dw": [_outer(64, 64, 32, 4, 3), _outer(128, 128, 32, 8, 3), _outer(128, 64, 32, 4, 3), _outer(64, 128, 32, 4, 3),
            _outer(128, 128, 64, 8, 3), _outer(64, 64, 64, 4, 3)]},
    {"gemm": [_gemm(128, 64, 64, 8, 3), _gemm(128, 128, 64, 8, 3), _gemm(128, 128, 64, 8, 4),
              _gemm(64, 256, 64, 8, 3), _gemm(64, 128, 64, 4, 3), _gemm(128, 64, 64, 4, 4),
              _gemm(128, 128, 32, 8, 4), _gemm(128, 128, 32, 8, 3)],
     "up": [_gemm(128, 64, 64, 8, 3), _gemm(128, 64, 64, 8, 4), _gemm(128, 32, 64, 8, 3), _gemm(64, 64, 64, 8, 3),
            _gemm(64, 128, 64, 8, 3), _gemm(128, 64, 32, 8, 4), _gemm(128, 64, 32, 8, 3), _gemm(128, 32, 128, 8, 3)],
     "down_bwd": [_gemm(128, 32, 64, 8, 3), _gemm(128, 32, 64, 8, 4), _gemm(64, 64, 64, 8, 3), _gemm(64, 32, 64, 4, 3),
                  _gemm(128, 32, 128, 8, 3), _gemm(64, 64, 32, 8, 4), _gemm(128, 16, 64, 8, 3), _gemm(64, 32, 128, 4, 3),
                  # the split form (experts.split_down_backward_tile; the shipped one of this class): G's tile
                  dict(_gemm(128, 32, 64, 8, 3), split=_split(128, 64, 8, 4)),
                  dict(_gemm(128, 32, 64, 8, 3), split=_split(256, 64, 8, 3)),
                  dict(_gemm(64, 64, 64, 8, 3), split=_split(128, 64, 4, 3)),
                  dict(_gemm(128, 32, 64, 8, 3), split=_split(64, 64, 8, 3))],
     "dw": [_outer(128, 128, 32, 8, 3), _outer(128, 128, 64, 8, 3), _outer(128, 128, 64, 8, 4),
            _outer(128, 128, 32, 8, 4), _outer(256, 128, 32, 8, 3), _outer(64, 128, 32, 4, 3)]},
)
def _decode(n, k, warps, stages):
    return {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}


# The decode path's two kernels ('mlp_decode': one program per expert and column tile, every slot of the expert in
# BLOCK_M rows, which stays fixed): a GEMV-like read of the touched experts' weights, so the candidates trade
# column tile (programs) against the K step (bytes in flight per program).
DECODE_CANDIDATES = [_decode(32, 128, 4, 4), _decode(16, 128, 4, 4), _decode(64, 128, 4, 3), _decode(32, 256, 4, 3),
                     _decode(64, 64, 4, 4), _decode(16, 256, 4, 4), _decode(32, 128, 8, 4), _decode(32, 64, 4, 5)]
DECODE_TOKENS = (1, 8)  # the decode path is timed at these token counts (summed) where T*k fits BLOCK_M
# --dry-run: the interpreter is slow, so two small candidates per kernel.
DRY_RUN_CANDIDATES = {"gemm": [_gemm(16, 32, 32, 4, 2), _gemm(32, 16, 16, 4, 2)],
                      "dw": [_outer(32, 32, 16, 4, 2), _outer(16, 16, 16, 4, 2)]}
DRY_RUN_DECODE_CANDIDATES = [_decode(16, 32, 4, 2), _decode(32, 16, 4, 2)]
# The one-token GEMVs ('mlp_one_token': gate/up one program per (slot, BLOCK_N columns), down one per BLOCK_N output
# columns over the k slots), timed at T = 1 where configs.json's entries let them run (I <= 4096): the column tile
# sets the programs (I/BLOCK_N per slot, H/BLOCK_N), the K step and the warps the bytes each keeps in flight. Each
# holds BLOCK_N*BLOCK_K fp32 products per kernel (two in gate/up) over its threads, so the tiles stay at or under
# 4096 elements per 128 threads.
ONE_TOKEN_CANDIDATES = [_decode(16, 256, 4, 3), _decode(8, 256, 4, 3), _decode(8, 512, 4, 3), _decode(16, 128, 4, 3),
                        _decode(32, 128, 4, 3), _decode(16, 512, 8, 3), _decode(32, 256, 8, 3), _decode(16, 256, 8, 2)]
DRY_RUN_ONE_TOKEN_CANDIDATES = [_decode(8, 32, 4, 2)]
DRY_RUN_SHAPE = (64, 48, 5, 2)
# The program orders (GROUP_M, common.tile_and_column) tried beside the entry in force's tile in every rows class
# above the first (which keeps the launch order: about one row tile per expert there), for the kernels whose
# launches take one: 0 = launch order, 8 = the default, 16 = longer sweeps.
ORDER_KERNELS = ("up", "down", "down_bwd", "dx")
GROUP_ORDERS = (0, 8, 16)


def order_variants(kernel: str, cfg: dict, dry_run: bool = False) -> list[dict]:
    """``cfg`` in each program order of :data:`GROUP_ORDERS` other than its own (none for a kernel without one):
    the tile stays, so the descent tells whether the order pays at this class on this GPU. --dry-run: one."""
    if kernel not in ORDER_KERNELS:
        return []
    variants = [dict(cfg, GROUP_M=order) for order in GROUP_ORDERS if order != configured_group_m(cfg)]
    return variants[:1] if dry_run else variants


def candidate_entries() -> list[dict]:
    """Every candidate tile as 'mlp' entries (the i-th entry holds each kernel's i-th candidate of its class), for
    ``moe-kernels compile-check --tune-candidates``, which checks that each compiles without spills."""
    found = []
    for table in CANDIDATES:
        for i in range(max(len(configs_of) for configs_of in table.values())):
            def pick(kernel):
                configs_of = table.get(kernel, table["gemm"])
                return dict(configs_of[i % len(configs_of)])
            found.append({kernel: pick(kernel) for kernel in (*FORWARD_KERNELS, *BACKWARD_KERNELS)})
    for entry in configs.load_table()["mlp"][1:]:  # the shipped tiles in every program order (order_variants)
        for order in GROUP_ORDERS:
            found.append({kernel: dict(entry[kernel], **({"GROUP_M": order} if kernel in ORDER_KERNELS else {}))
                          for kernel in (*FORWARD_KERNELS, *BACKWARD_KERNELS)})
    return found


def one_token_candidate_entries() -> list[dict]:
    """Every one-token candidate as an 'mlp_one_token' entry (both kernels), for ``compile-check --tune-candidates``."""
    return [{"up": dict(cfg), "down": dict(cfg)} for cfg in ONE_TOKEN_CANDIDATES]


def decode_candidate_entries() -> list[dict]:
    """Every decode candidate as an 'mlp_decode' entry (both kernels), for ``compile-check --tune-candidates``."""
    block_m = configs.load_table()["mlp_decode"][0]["BLOCK_M"]
    return [{"BLOCK_M": block_m, "up": dict(cfg), "down": dict(cfg)} for cfg in DECODE_CANDIDATES]


def rows_classes() -> list[tuple[int | None, int | None]]:
    """(min, max) rows per expert of each class of configs.json's 'mlp' family (timed at :func:`timing_rows`)."""
    classes, low = [], None
    for entry in configs.load_table()["mlp"]:
        high = entry.get("max_rows_per_expert")
        classes.append((low, high))
        if high is None:
            break
        low = high + 1
    return classes


def timing_rows(low: int | None, high: int | None) -> tuple[int, ...]:
    """Rows per expert at which a rows class is timed: one near each end, so that tiles that win only at one end
    of the class do not ship (the H200 run 3 tuned at the upper end alone, and its tiles lost at the lower one).
    The class of the fewest rows: a quarter of its top and its top; a bounded one: twice its bottom and its top;
    the unbounded top class: twice and four times its bottom."""
    if low is None:
        return (max(1, (high or 16) // 4), high or 16)
    if high is not None:
        return (min(2 * (low - 1), high), high) if low > 1 else (low, high)
    return (2 * (low - 1), 4 * (low - 1))


def inter_class(inter: int) -> tuple[int | None, int | None]:
    for low, high in INTER_CLASSES:
        if (low is None or inter >= low) and (high is None or inter <= high):
            return low, high
    raise AssertionError("unreachable")


def candidates_for(kernel: str, class_index: int, dry_run: bool) -> list[dict]:
    table = DRY_RUN_CANDIDATES if dry_run else CANDIDATES[min(class_index, len(CANDIDATES) - 1)]
    return [dict(cfg) for cfg in table.get(kernel, table["gemm"])]


def _label(cfg: dict) -> str:
    blocks = "x".join(str(value) for key, value in cfg.items() if key.startswith("BLOCK"))
    order = f" g{cfg['GROUP_M']}" if "GROUP_M" in cfg else ""
    split = cfg.get("split")  # down_bwd's split form: G's tile
    form = (f" split {split['BLOCK_N']}x{split['BLOCK_K']} w{split['num_warps']} s{split['num_stages']}" if split
            else "")
    return f"{blocks} w{cfg['num_warps']} s{cfg['num_stages']}{order}{form}"


def _kernel_entry(entry: dict) -> dict:
    return {name: dict(entry[name]) for name in (*FORWARD_KERNELS, *BACKWARD_KERNELS)}


# ---- one case: inputs, runs, agreement ------------------------------------------------------------------


@contextlib.contextmanager
def _one_token_path(choice: str):
    """MOE_KERNELS_ONE_TOKEN=``choice`` (gemv or tiles) within the block (experts.one_token_path_enabled reads it
    per call): each tuned family times the kernels its entries drive, whatever the user's variable says."""
    previous = os.environ.get("MOE_KERNELS_ONE_TOKEN")
    os.environ["MOE_KERNELS_ONE_TOKEN"] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MOE_KERNELS_ONE_TOKEN")
        else:
            os.environ["MOE_KERNELS_ONE_TOKEN"] = previous


class Case:
    """The inputs of one (shape, tokens) case and its forward / backward runs on the triton backend."""

    def __init__(self, hidden, inter, experts, top_k, tokens, device, dtype, values=True, seed=0):
        import moe_kernels

        self.mk = moe_kernels
        g = torch.Generator(device="cpu").manual_seed(seed)
        g_device = torch.Generator(device=device).manual_seed(seed)  # weights of GBs: drawn where they live

        def tensor(*shape, scale=1.0):
            if not values:  # compile warm-up: the values do not matter
                return torch.empty(shape, dtype=dtype, device=device)
            return (torch.randn(shape, generator=g_device, device=device) * scale).to(dtype)

        self.x = tensor(tokens, hidden).requires_grad_()
        self.w1 = tensor(experts, 2 * inter, hidden, scale=hidden ** -0.5).requires_grad_()
        self.w2 = tensor(experts, hidden, inter, scale=inter ** -0.5).requires_grad_()
        logits = torch.randn(tokens, experts, generator=g)
        weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        self.weights, self.ids = weights.to(device), ids.to(device=device, dtype=torch.int32)
        self.grad = tensor(tokens, hidden)
        self.leaves = (self.x, self.w1, self.w2)
        self._graph = None

    def _run(self):
        return self.mk.moe_mlp(self.x, self.w1, self.w2, self.weights, self.ids, backend="triton")

    def forward(self):
        # With gradients on: the planned forward (without them, a few slots take the decode path, which
        # these configs do not drive); the training forward's kernels, which inference shares.
        with torch.enable_grad():
            return self._run().detach()

    def decode(self):
        # a few slots without gradients: the decode path's tiles ('mlp_decode'), one token included (where the
        # one-token GEMVs would run instead, they time nothing these configs drive)
        with torch.no_grad(), _one_token_path("tiles"):
            return self._run()

    def one_token(self):
        # one token without gradients on the one-token GEMVs ('mlp_one_token')
        with torch.no_grad(), _one_token_path("gemv"):
            return self._run()

    def prepare_backward(self):
        self._graph = self._run()

    def backward(self):
        return torch.autograd.grad(self._graph, self.leaves, self.grad, retain_graph=True)

    def release(self):
        self._graph = None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


# ---- compile warm-up in worker processes ------------------------------------------------------------------


def warm_tokens(tokens: int, top_k: int) -> int:
    """A small token count whose routed rows T*k have the same divisibility by 16 as ``tokens``' (the
    specialisation Triton's JIT compiles for), so a warm-up compiles the kernels the timed run uses."""
    if tokens <= 64:
        return tokens
    want = (tokens * top_k) % 16 == 0
    for small in range(17, 65):
        if ((small * top_k) % 16 == 0) == want:
            return small
    return tokens


_worker_cases: dict = {}  # (H, I, E, k, T) -> Case, per worker process
_worker_device = ["cuda"]  # set by _worker_init


def _warm_one(job) -> str | None:
    """Worker: run one candidate entry of ``family`` once in ``mode`` (forward, backward, decode or one_token); an error
    message or None."""
    shape, family, entry, mode = job
    try:
        device = torch.device(_worker_device[0])
        case = _worker_cases.get(shape)
        if case is None:
            _worker_cases.clear()  # one shape's tensors at a time
            case = _worker_cases[shape] = Case(*shape, device, torch.bfloat16, values=device.type == "cpu")
        with configs.override(family, entry):
            if mode == "backward":
                case.prepare_backward()
                case.backward()
                case.release()
            elif mode == "decode":
                case.decode()
            elif mode == "one_token":
                case.one_token()
            else:
                case.forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - reported per candidate
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _worker_init(device_type: str):
    # A GPU worker compiles (no interpreter); a CPU one (the tests of this pool) keeps the interpreter.
    if device_type == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    _worker_device[0] = device_type
    import moe_kernels  # noqa: F401 - import once per worker


def warm_compile(jobs: list, processes: int, log=print, device_type: str = "cuda") -> dict:
    """Run every job once in ``processes`` spawned workers, so that their kernels are compiled into Triton's disk
    cache; {job index: error} of the jobs that failed. A pool that breaks (a worker crash) is reported and the
    tuning goes on: the timing compiles what is missing, one kernel at a time."""
    if not jobs:
        return {}
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    started = time.monotonic()
    failures = {}
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(device_type,)) as pool:
            for index, error in enumerate(pool.map(_warm_one, jobs)):
                if error is not None:
                    failures[index] = error
    except (BrokenProcessPool, OSError) as exc:
        log(f"  WARNING: the compile warm-up stopped ({type(exc).__name__}: {exc}); the timing compiles the rest")
    log(f"  compiled {len(jobs)} candidate runs in {processes} processes: {time.monotonic() - started:.0f} s, "
        f"{len(failures)} failed")
    return failures


# ---- timing and the descent ---------------------------------------------------------------------------------


def descend(base: dict, candidates: dict, measure, deadline: float | None = None, log=print, unit: str = "ms") -> dict:
    """Coordinate descent over kernels: for each kernel in ``candidates`` ({kernel: [config]}, in order), every
    candidate replaces that kernel's config in the best entry so far and ``measure(entry, kernel)`` gives
    (ms, outputs); the fastest whose outputs agree with ``base``'s (:data:`AGREEMENT`) is kept.

    Returns {"entry": the tuned entry, "times": {kernel: {label: ms}}, "rejected": {kernel: {label: why}},
    "complete": False when the deadline stopped it (the kernels left keep the config in force)}."""
    best = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    times, rejected, reference, complete = {}, {}, {}, True
    for kernel, configs_of_kernel in candidates.items():
        if deadline is not None and time.monotonic() > deadline:
            complete = False
            log(f"    {kernel}: budget spent, kept {_label(best[kernel])}")
            continue
        times[kernel], rejected[kernel] = {}, {}
        chosen, chosen_ms = best[kernel], None
        seen = set()
        for cfg in [best[kernel], *configs_of_kernel]:
            label = _label(cfg)
            if label in seen:
                continue
            seen.add(label)
            entry = dict(best, **{kernel: cfg})
            try:
                ms, outputs = measure(entry, kernel)
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported and skipped
                rejected[kernel][label] = f"{type(exc).__name__}: {str(exc)[:160]}"
                continue
            mode = "backward" if kernel in BACKWARD_KERNELS else "forward"
            if mode not in reference:  # the first run of each mode is the entry in force: the reference
                reference[mode] = outputs
            worst = max(relative_error(got, want) for got, want in zip(outputs, reference[mode]))
            if not worst <= AGREEMENT:
                rejected[kernel][label] = f"disagrees with the entry in force (relative error {worst:.2e})"
                continue
            times[kernel][label] = ms
            if chosen_ms is None or ms < chosen_ms:
                chosen, chosen_ms = cfg, ms
        best[kernel] = dict(chosen)
        if not times[kernel]:
            log(f"    {kernel}: WARNING: no candidate ran, the config in force is kept: "
                + "; ".join(f"{label}: {why}" for label, why in list(rejected[kernel].items())[:2]))
        log(f"    {kernel}: {_label(chosen)} {chosen_ms if chosen_ms is None else round(chosen_ms, 4)} {unit} "
            f"({len(times[kernel])} timed, {len(rejected[kernel])} left out)")
    return {"entry": best, "times": times, "rejected": rejected, "complete": complete}


def compile_processes(shape, device, limit: int) -> int:
    """How many warm-up processes fit: each holds the shape's weights and their gradients (bf16) plus about 1 GiB,
    within half the free GPU memory."""
    hidden, inter, experts, _ = shape
    free, _ = torch.cuda.mem_get_info(device)
    per_process = 2 * 3 * inter * hidden * experts * 2 + 2 ** 30
    return max(1, min(limit, int(0.5 * free // per_process)))


def _summary(base: dict, result: dict, unit: str = "ms") -> dict:
    """The times of the entry in force and of the tuned one per kernel (under ``unit``: "ms", or "relative" for the
    'mlp' classes, where 1.0 per timing point is the entry in force), and what the descent left out."""
    times = result["times"]
    return {unit: {"before": {k: times[k].get(_label(base[k])) for k in times},
                   "after": {k: times[k].get(_label(result["entry"][k])) for k in times}},
            "complete": result["complete"], "rejected": {k: v for k, v in result["rejected"].items() if v}}


def _class_measure(cases: list, repeats: int, gpu: bool):
    """measure(entry, kernel) for :func:`descend` over one rows class timed at several token counts (``cases``):
    (the sum over the cases of each one's median time relative to the first entry timed there in the same mode,
    which is the entry in force, so every timing point counts alike; the outputs of every case)."""
    first: dict = {}

    def measure(entry, kernel):
        mode = "forward" if kernel in FORWARD_KERNELS else "backward"
        score, outputs = 0.0, []
        with configs.override("mlp", entry):
            for index, case in enumerate(cases):
                if mode == "forward":
                    ms, y = median_call_ms(case.forward, repeats, gpu)
                    outputs.append(y)
                else:
                    case.prepare_backward()
                    try:
                        ms, grads = median_call_ms(case.backward, repeats, gpu)
                    finally:
                        case.release()
                    outputs.extend(grads)
                score += ms / first.setdefault((mode, index), ms)
        return score, tuple(outputs)

    return measure


def tune_shape(shape, device, *, dry_run=False, repeats=7, jobs=1, budget_s=None, log=print) -> dict:
    """{"mlp": one tuned entry per rows class, "mlp_decode": one entry, "mlp_one_token": one entry where this width
    runs the one-token GEMVs, else none} of one model shape (H, I, E, k);
    ``budget_s`` seconds of timing (the compile warm-up comes first and is not counted)."""
    hidden, inter, experts, top_k = shape
    gpu = device.type == "cuda"
    dtype = torch.bfloat16  # the tuned families (float32 inputs take the '_fp32' ones, which are not tuned)
    low_i, high_i = inter_class(inter)
    plans = []
    classes = rows_classes()
    for index, (low_r, high_r) in enumerate(classes[:2] if dry_run else classes):
        # the interpreter (dry run): the two smaller classes, each at its fewest rows only
        rows = (low_r or 1,) if dry_run else timing_rows(low_r, high_r)
        # rounded down: ceil(T*k/E), the rows the lookup sees, stays within the class
        tokens = tuple(sorted({max(1, r * experts // top_k) for r in rows}))
        base = configs.mlp_config(tokens[0] * top_k, experts, inter, device=device)
        # the tiles of the class, and from the second class on the entry in force's tile in the other orders
        candidates = {kernel: (order_variants(kernel, base[kernel], dry_run) if index else [])
                      + candidates_for(kernel, index, dry_run) for kernel in (*FORWARD_KERNELS, *BACKWARD_KERNELS)}
        plans.append((index, low_r, high_r, tokens, base, candidates))
    decode_base = configs.decode_config(1, False, inter, device)
    decode_tokens = [t for t in ((1, 2) if dry_run else DECODE_TOKENS) if t * top_k <= decode_base["BLOCK_M"]]
    decode_candidates = DRY_RUN_DECODE_CANDIDATES if dry_run else DECODE_CANDIDATES
    # the one-token GEMVs, where this width takes them (None: the decode tiles run one token too)
    one_token_base = configs.one_token_config(False, inter, device)
    one_token_candidates = DRY_RUN_ONE_TOKEN_CANDIDATES if dry_run else ONE_TOKEN_CANDIDATES
    processes = compile_processes(shape, device, jobs) if gpu and jobs > 1 else 1
    if processes > 1:  # compile every candidate before timing any (workers share Triton's disk cache)
        warm_jobs = []
        for index, low_r, high_r, tokens, base, candidates in plans:
            for small in sorted({warm_tokens(t, top_k) for t in tokens}):
                for kernel, cfgs in candidates.items():
                    for cfg in cfgs:
                        warm_jobs.append(((hidden, inter, experts, top_k, small), "mlp",
                                          dict(_kernel_entry(base), **{kernel: cfg}),
                                          "backward" if kernel in BACKWARD_KERNELS else "forward"))
        for tokens in decode_tokens:
            for kernel in ("up", "down"):
                for cfg in decode_candidates:
                    warm_jobs.append(((hidden, inter, experts, top_k, tokens), "mlp_decode",
                                      dict(decode_base, **{kernel: cfg}), "decode"))
        for kernel in ("up", "down") if one_token_base is not None else ():
            for cfg in one_token_candidates:
                warm_jobs.append(((hidden, inter, experts, top_k, 1), "mlp_one_token",
                                  dict(one_token_base, **{kernel: cfg}), "one_token"))
        warm_compile(warm_jobs, processes, log)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    tuned = {"mlp": [], "mlp_decode": [], "mlp_one_token": []}
    for index, low_r, high_r, tokens, base, candidates in plans:
        log(f"  H={hidden} I={inter} E={experts} k={top_k}, T={'+'.join(map(str, tokens))} "
            f"(rows per expert {low_r or 1}..{high_r or 'inf'}):")
        cases = [Case(hidden, inter, experts, top_k, t, device, dtype) for t in tokens]
        measure = _class_measure(cases, repeats, gpu)
        result = descend(base, candidates, measure, deadline, log, unit="relative")
        tuned["mlp"].append(dict(
            {"min_inter": low_i, "max_inter": high_i, "min_rows_per_expert": low_r, "max_rows_per_expert": high_r},
            **_kernel_entry(result["entry"]),
            tuned_at={"H": hidden, "I": inter, "E": experts, "k": top_k, "T": list(tokens)},
            **_summary(base, result, "relative")))
        del cases, measure
        if gpu:
            torch.cuda.empty_cache()
    if decode_tokens:
        log(f"  H={hidden} I={inter} E={experts} k={top_k}, decode at T={'+'.join(map(str, decode_tokens))}:")
        cases = [Case(hidden, inter, experts, top_k, tokens, device, dtype) for tokens in decode_tokens]

        def measure_decode(entry, kernel):
            total, outputs = 0.0, []
            with configs.override("mlp_decode", entry):
                for case in cases:
                    # replayed from a CUDA graph: eager decode calls are bound by the host's time to issue them
                    ms, y = replayed_median_ms(case.decode, repeats, gpu)
                    total += ms
                    outputs.append(y)
            return total, tuple(outputs)

        candidates = {kernel: decode_candidates for kernel in ("up", "down")}
        result = descend(decode_base, candidates, measure_decode, deadline, log)
        tuned["mlp_decode"].append(dict(
            {"min_inter": low_i, "max_inter": high_i, "BLOCK_M": decode_base["BLOCK_M"]},
            up=result["entry"]["up"], down=result["entry"]["down"],
            tuned_at={"H": hidden, "I": inter, "E": experts, "k": top_k, "T": decode_tokens},
            **_summary(decode_base, result)))
    if one_token_base is not None:
        log(f"  H={hidden} I={inter} E={experts} k={top_k}, one token on the GEMVs:")
        case = Case(hidden, inter, experts, top_k, 1, device, dtype)

        def measure_one_token(entry, kernel):
            with configs.override("mlp_one_token", entry):
                ms, y = replayed_median_ms(case.one_token, repeats, gpu)  # a launch costs more than the kernel
            return ms, (y,)

        candidates = {kernel: one_token_candidates for kernel in ("up", "down")}
        result = descend(one_token_base, candidates, measure_one_token, deadline, log)
        tuned["mlp_one_token"].append(dict(
            {"min_inter": low_i, "max_inter": high_i}, up=result["entry"]["up"], down=result["entry"]["down"],
            tuned_at={"H": hidden, "I": inter, "E": experts, "k": top_k, "T": [1]},
            **_summary(one_token_base, result)))
    return tuned


def merge(existing: dict | None, tuned: dict, device_name: str, how: dict) -> dict:
    """The per-GPU table: per family of ``tuned`` ({family: [entry]}), ``existing``'s entries of the width classes
    not tuned now, then the new ones, sorted by width class and rows class (lookups take the first entry whose
    bounds hold)."""
    table = {"device": device_name, "how": how}

    def order(entry):
        return (entry.get("min_inter") or 0, entry.get("min_rows_per_expert") or 0)

    for family in configs.TUNED_FAMILIES:
        new = tuned.get(family, [])
        fresh = {(entry["min_inter"], entry["max_inter"]) for entry in new}
        kept = [entry for entry in (existing or {}).get(family, [])
                if (entry.get("min_inter"), entry.get("max_inter")) not in fresh]
        if kept or new:
            table[family] = sorted([*kept, *new], key=order)
    return table


def _shape_list(names: str, custom: list[str]) -> list[tuple[int, int, int, int]]:
    shapes = []
    for name in filter(None, (item.strip() for item in names.split(","))):
        if name not in SHAPES:
            raise SystemExit(f"moe-kernels tune --triton: unknown shape {name!r}; known: {', '.join(SHAPES)} "
                             "(or --shape H,I,E,k)")
        shapes.append(SHAPES[name])
    for text in custom:
        try:
            hidden, inter, experts, top_k = (int(v) for v in text.split(","))
        except ValueError:
            raise SystemExit(f"moe-kernels tune --triton: --shape takes H,I,E,k (four integers), not {text!r}")
        if min(hidden, inter, experts, top_k) < 1 or top_k > experts:
            raise SystemExit(f"moe-kernels tune --triton: --shape {text}: sizes must be >= 1 and k <= E")
        shapes.append((hidden, inter, experts, top_k))
    classes = [inter_class(shape[1]) for shape in shapes]
    if len(set(classes)) != len(classes):
        raise SystemExit("moe-kernels tune --triton: two shapes in one width class "
                         f"(classes of I: {INTER_CLASSES}); tune one shape per class")
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="moe-kernels tune --triton",
        description="Time candidate tiles of the expert-MLP Triton kernels on the local GPU and write the fastest "
                    "to this GPU model's table in your cache, which later processes read automatically.")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated model shapes, one per width class (known: {', '.join(SHAPES)})")
    parser.add_argument("--shape", action="append", default=[], metavar="H,I,E,k", help="a model shape by size")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds of timing (after compiling) before the rest keeps the configs in force")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling the candidates before timing (GPU memory permitting)")
    parser.add_argument("--out", default=None, help="table file to write (default: your cache's file for this GPU)")
    parser.add_argument("--copy-to", default=None, help="also write a copy of the table into this folder")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: a tiny shape under the Triton interpreter, two candidates per kernel (needs "
                             "--out; nothing is written to the cache)")
    args = parser.parse_args(argv)
    log = print
    if args.dry_run:
        if not args.out:
            parser.error("--dry-run writes only where --out says")
        if os.environ.get("TRITON_INTERPRET") != "1":  # kernels are made interpreted when their module loads
            import subprocess

            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.call([sys.executable, "-m", "moe_kernels.triton.tune", *(argv if argv is not None else sys.argv[1:])],
                                   env=env)
        device, device_name, shapes = torch.device("cpu"), "dry-run (CPU, Triton interpreter)", [DRY_RUN_SHAPE]
    else:
        if not torch.cuda.is_available():
            print("moe-kernels tune --triton: no CUDA GPU here (use --dry-run to check the command)", file=sys.stderr)
            return 2
        if "MOE_KERNELS_TRITON_CONFIGS" in os.environ:
            print("moe-kernels tune --triton: MOE_KERNELS_TRITON_CONFIGS replaces every table (per-GPU ones too); "
                  "unset it to tune", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
        shapes = _shape_list(args.shapes, args.shape)
    path = args.out or str(configs.user_configs_path(device_name))
    existing = None
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if not args.dry_run and existing.get("device") not in (None, device_name):
            print(f"moe-kernels tune --triton: {path} holds the table of {existing.get('device')!r}, not of this GPU "
                  f"({device_name!r})", file=sys.stderr)
            return 2
    log(f"tune --triton on {device_name}: shapes {shapes}, up to {args.jobs} compile processes, "
        f"budget {args.budget:.0f} s of timing")
    started = time.monotonic()
    tuned = {family: [] for family in configs.TUNED_FAMILIES}
    for shape in shapes:  # the budget is shared equally; it counts timing, not each shape's compile warm-up
        for family, found in tune_shape(shape, device, dry_run=args.dry_run, repeats=1 if args.dry_run else
                                        args.repeats, jobs=args.jobs, budget_s=args.budget / len(shapes),
                                        log=log).items():
            tuned[family].extend(found)
    how = {"command": "moe-kernels tune --triton " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "measured": not args.dry_run, "torch": torch.__version__,
           "triton": _triton_version(), "seconds": round(time.monotonic() - started)}
    table = merge(existing, tuned, device_name, how)
    _write(path, table)
    counts = ", ".join(f"{len(tuned[family])} '{family}'" for family in configs.TUNED_FAMILIES)
    log(f"wrote tuned entries ({counts}) for {device_name} to {path}")
    if args.copy_to:
        os.makedirs(args.copy_to, exist_ok=True)
        copy = os.path.join(args.copy_to, configs.device_file_name(device_name))
        _write(copy, table)
        log(f"copy: {copy} (ship it as moe_kernels/triton/configs/{os.path.basename(copy)})")
    configs.clear_cache()
    failed = 0
    for family in configs.TUNED_FAMILIES:
        for entry in tuned[family]:
            unit = "relative" if "relative" in entry else "ms"
            before, after = entry[unit]["before"], entry[unit]["after"]
            failed += sum(ms is None for ms in after.values())
            changed = [k for k in after if None not in (before.get(k), after[k]) and before[k] != after[k]]
            where = (f"{family}, I {entry['min_inter'] or 1}..{entry['max_inter'] or 'inf'}"
                     + (f", rows/expert {entry['min_rows_per_expert'] or 1}..{entry['max_rows_per_expert'] or 'inf'}"
                        if family == "mlp" else f", T {'+'.join(map(str, entry['tuned_at']['T']))}"))
            log(f"  {where}: " + (", ".join(f"{k} {before[k]:.4g} -> {after[k]:.4g} {unit}" for k in changed)
                                  or "the configs in force were fastest"))
    if failed:
        log(f"tune --triton: {failed} kernel(s) ran no candidate at all (see the warnings above)")
    return 1 if failed else 0


def _triton_version() -> str:
    with contextlib.suppress(ImportError):
        import triton
        return triton.__version__
    return "absent"


def _write(path: str, table: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
