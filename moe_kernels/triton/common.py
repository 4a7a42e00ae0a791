"""What every Triton kernel module of the backend shares, defined once:

* host rules: whether kernels run in the interpreter (:func:`interpreting`), the ``tl.dot`` input precision
  (:func:`dot_precision`), a host ``cdiv``, and how the modules register their ops (:func:`register_op`);
* the activations: codes from :data:`moe_kernels.spec.ACTIVATION_CODES` (the kernels' constexpr
  ``ACTIVATION``), elementwise :func:`activation` / :func:`activation_grad`, and the gated forms of the
  expert MLP (:func:`gated_forward` / :func:`gated_backward`) built on them;
* the tile map of the dispatch plan: each expert's run of sorted rows cut into BLOCK_M-row tiles, an
  on-device exclusive scan of tile counts for up to four block sizes in one launch (:func:`tile_maps`), a
  grid bound that needs no host sync (:func:`max_tiles`), the order of a GEMM grid's programs that keeps a group
  of row tiles in L2 (:func:`tile_and_column`), the in-kernel binary search from a tile id to its rows
  (:func:`find_tile`) and a program's rows, by tile or (the decode path, no plan) by expert (:func:`program_rows`);
* the slot combine: per-slot output rows summed per token in a fixed order (:func:`combine_slots`);
* ``tl.dot`` operands (:func:`operand`): fp32 under the interpreter, whose bf16 arithmetic is wrong.

The package's ``__init__`` imports this module lazily (it imports triton).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..spec import ACTIVATION_CODES, GPT_OSS_ALPHA

# ----------------------------------------------------------------------------------------------------
# host rules


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors, the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (``triton.cdiv`` is a constexpr function: about 2 µs a call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for host ints n >= 1 (``triton.next_power_of_2`` costs as ``triton.cdiv``
    does)."""
    return 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of ``tl.dot`` for GEMM inputs of ``dtype``, one rule for every kernel.

    float32 inputs use TF32 only when torch allows it for its own matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), else "ieee"; fp16/bf16 inputs run natively and the value
    is ignored for them ("tf32"). The interpreter ignores the value altogether (it multiplies in numpy), so
    the rule does not depend on :func:`interpreting`.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------------
# kernel launches


# MOE_KERNELS_DIRECT_LAUNCH=1: :func:`launcher` skips Triton's per-launch Python after a kernel's first launch with
# each specialization. Read once, at import (an environment read costs about a microsecond, a launch's whole budget
# here); tests and benchmarks set the attribute. Off by default until a GPU run measures it
# (benchmarks/host_overhead.py).
DIRECT_LAUNCH = os.environ.get("MOE_KERNELS_DIRECT_LAUNCH", "0") == "1"


def launcher(kernel, grid: tuple):
    """``kernel[grid]``: the one way the backend launches a Triton kernel, ``launcher(kernel, grid)(*args, **kw)``.

    With :data:`DIRECT_LAUNCH`, a launch on CUDA tensors whose specialization (Triton's own binder: dtypes, 16-byte
    alignment, integers equal to 1 or divisible by 16, constexprs, launch options) was launched before calls the
    compiled kernel's launcher itself. That skips what ``JITFunction.run`` adds around the binder on every call (its
    option knobs, the cache-key string, the global-value check, the launch-metadata hook): on the 2-core CPU
    machine, driver mocked and the C launcher stubbed, 18.6 µs a launch against 13.1 µs (triton 3.6; 11.7 against
    9.6 with triton 3.9). The first launch of each specialization, and every launch while a Triton launch hook is
    set (a profiler), takes Triton's own path; Triton's debug knobs changed after a kernel's first launch are not
    seen by its direct launches.
    """
    if not DIRECT_LAUNCH:
        return kernel[grid]
    return functools.partial(_direct_launch, kernel, grid)


def _direct_launch(kernel, grid: tuple, *args, **kwargs) -> None:
    if not (args and isinstance(args[0], torch.Tensor) and args[0].is_cuda):  # the interpreter: Triton's path
        kernel[grid](*args, **kwargs)
        return
    device = args[0].get_device()
    # Triton's per-device (cache, key cache, target, backend, binder); an interpreted kernel has none
    caches = getattr(kernel, "device_caches", {}).get(device)
    hooks = triton.knobs.runtime
    # a hook is set: None or an empty HookChain means none (getattr: a plain function in other releases)
    if caches is None or getattr(hooks.launch_enter_hook, "calls", hooks.launch_enter_hook) \
            or getattr(hooks.launch_exit_hook, "calls", hooks.launch_exit_hook):
        kernel[grid](*args, **kwargs)
        return
    bound, specialization, options = caches[-1](*args, **kwargs)
    key = (device, tuple(specialization), tuple(options.items()))
    known = kernel.__dict__.setdefault("_moe_kernels_direct", {})
    compiled = known.get(key)
    if compiled is None:  # Triton's path compiles (or finds) the kernel for this specialization and launches it
        known[key] = kernel[grid](*args, **kwargs)
        return
    grid = tuple(grid) + (1, 1)
    compiled.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *bound.values())


# ----------------------------------------------------------------------------------------------------
# registered ops

_LIBRARY = torch.library.Library("moe_kernels_triton", "FRAGMENT")


def register_op(name: str, impl, fake) -> torch._ops.OpOverload:
    """Register ``moe_kernels_triton::<name>`` with the schema of ``impl``'s annotations, ``impl`` as its CPU (the
    interpreter) and CUDA kernel and ``fake`` for tracing; returns the op. The op has no autograd formula: each
    module wraps its ops in a ``torch.autograd.Function``. Ops defined this way cost a few microseconds a
    call from eager Python, ``torch.library.custom_op`` ops about 20 more at these argument counts, which is
    the whole budget of a decode step."""
    _LIBRARY.define(name + torch.library.infer_schema(impl, mutates_args=()))
    for key in ("CPU", "CUDA"):
        _LIBRARY.impl(name, impl, key)
    # Not differentiable by itself: its outputs never require grad, so backpropagating through the op without the
    # module's Function is an error instead of a silent zero gradient.
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"moe_kernels_triton::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.moe_kernels_triton, name).default


# ----------------------------------------------------------------------------------------------------
# activations (fp32 in, fp32 out; the math of moe_kernels.reference.apply_activation / gated_activation)

_SILU = tl.constexpr(ACTIVATION_CODES["silu"])
_GELU = tl.constexpr(ACTIVATION_CODES["gelu"])
_GELU_TANH = tl.constexpr(ACTIVATION_CODES["gelu_tanh"])
_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
_RELU2 = tl.constexpr(ACTIVATION_CODES["relu2"])
_GPT_OSS = tl.constexpr(ACTIVATION_CODES["gpt_oss"])
_SOFTCAP_SWIGLU = tl.constexpr(ACTIVATION_CODES["softcap_swiglu"])
_ALPHA = tl.constexpr(GPT_OSS_ALPHA)
# 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327, sqrt(2/pi) = 0.7978845608028654 are written
# as literals, each after a tensor operand: under the interpreter a constexpr times a tensor stays a constexpr,
# which tl.sigmoid / tl.erf do not take.


# Each helper has one return statement: triton 3.6 checks every `return` of a jit function for one type,
# even those behind a constexpr branch that is not taken.
@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    """act(z) of an elementwise activation (identity for any code without a branch here)."""
    if ACTIVATION == _SILU:
        out = z * tl.sigmoid(z)
    elif ACTIVATION == _GELU:  # erf form
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == _GELU_TANH:  # tanh(u) = 2 sigmoid(2u) - 1
        out = z * tl.sigmoid((z + 0.044715 * z * z * z) * 1.5957691216057308)  # 2 sqrt(2/pi)
    elif ACTIVATION == _RELU:
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == _RELU2:
        r = tl.maximum(z, 0.0)
        out = r * r
    else:
        out = z
    return out


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz (relu: 1 where z > 0, as torch)."""
    if ACTIVATION == _SILU:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == _GELU:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == _GELU_TANH:
        t = 2.0 * tl.sigmoid((z + 0.044715 * z * z * z) * 1.5957691216057308) - 1.0
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == _RELU:
        out = (z > 0.0).to(tl.float32)
    elif ACTIVATION == _RELU2:
        out = 2.0 * tl.maximum(z, 0.0)
    else:
        out = tl.full(z.shape, 1.0, tl.float32)
    return out


@triton.jit
def _tanh(z):
    """tanh(z) = 2 sigmoid(2z) - 1 (tl has no tanh on every Triton version the package allows)."""
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def gated_forward(gate, up, limit, gate_cap, up_cap, ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr,
                  GATED: tl.constexpr):
    """act(gate) * up, or GPT-OSS's SwiGLU (up + 1) * gate * sigmoid(alpha gate); when HAS_LIMIT, gate <= ``limit``
    and up in [-limit, limit] first, for every activation (reference.gated_activation). Inkling2's soft-capped SwiGLU:
    gate_cap tanh(gate / gate_cap) * sigmoid(gate) * up_cap tanh(up / up_cap). Not GATED (experts without a gate):
    act(gate), ``up`` ignored (reference.apply_activation)."""
    if GATED:
        if HAS_LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        if ACTIVATION == _GPT_OSS:
            out = (up + 1.0) * (gate * tl.sigmoid(gate * _ALPHA))
        elif ACTIVATION == _SOFTCAP_SWIGLU:
            out = (gate_cap * _tanh(gate / gate_cap)) * tl.sigmoid(gate) * (up_cap * _tanh(up / up_cap))
        else:
            out = activation(gate, ACTIVATION) * up
    else:
        out = activation(gate, ACTIVATION)
    return out


@triton.jit
def gated_backward(gate, up, grad, limit, gate_cap, up_cap, ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr,
                   GATED: tl.constexpr):
    """(d gate, d up) of :func:`gated_forward` given d out = ``grad``; a clamp passes the gradient where
    lo <= x <= hi, as torch.clamp does. Not GATED: d up is zero (there is no up)."""
    if GATED:
        if HAS_LIMIT:
            gate_pass = gate <= limit
            up_pass = (up >= -limit) & (up <= limit)
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        if ACTIVATION == _GPT_OSS:
            s = tl.sigmoid(gate * _ALPHA)
            glu = gate * s
            d_gate = grad * (up + 1.0) * (s + glu * (1.0 - s) * _ALPHA)
            d_up = grad * glu
        elif ACTIVATION == _SOFTCAP_SWIGLU:
            tg = _tanh(gate / gate_cap)
            tu = _tanh(up / up_cap)
            s = tl.sigmoid(gate)
            capped_gate = gate_cap * tg
            capped_up = up_cap * tu
            d_gate = grad * capped_up * ((1.0 - tg * tg) * s + capped_gate * s * (1.0 - s))
            d_up = grad * capped_gate * s * (1.0 - tu * tu)
        else:
            d_gate = grad * up * activation_grad(gate, ACTIVATION)
            d_up = grad * activation(gate, ACTIVATION)
        if HAS_LIMIT:
            d_gate = tl.where(gate_pass, d_gate, 0.0)
            d_up = tl.where(up_pass, d_up, 0.0)
    else:
        d_gate = grad * activation_grad(gate, ACTIVATION)
        d_up = grad * 0.0
    return d_gate, d_up


# ----------------------------------------------------------------------------------------------------
# the plan's tile map


TILE_MAPS = 4  # block sizes one launch of _tile_scan_kernel serves
_TILE_SCAN_BLOCK_E = 128


@triton.jit
def _tile_scan_kernel(expert_offsets_ptr, tiles_ptr, num_experts, block_m0, block_m1, block_m2, block_m3,
                      BLOCK_E: tl.constexpr):
    """Tile maps of the plan for four block sizes, one program each: tiles[d, 0] = 0 and
    tiles[d, e+1] = tiles[d, e] + cdiv(rows of expert e, block_m_d).

    expert_offsets_ptr: [E+1] int32 (the plan).  tiles_ptr: [4, E+1] int32 out, contiguous.
    Grid: (4,).  BLOCK_E: experts per loop step (power of two).
    """
    d = tl.program_id(0)
    block_m = tl.where(d == 0, block_m0, tl.where(d == 1, block_m1, tl.where(d == 2, block_m2, block_m3)))
    out = tiles_ptr + d * (num_experts + 1)
    tl.store(out, 0)
    carry = 0
    for start in range(0, num_experts, BLOCK_E):
        experts = start + tl.arange(0, BLOCK_E)
        mask = experts < num_experts
        first = tl.load(expert_offsets_ptr + experts, mask=mask, other=0)
        end = tl.load(expert_offsets_ptr + experts + 1, mask=mask, other=0)
        counts = (end - first + block_m - 1) // block_m
        tl.store(out + experts + 1, tl.cumsum(counts, 0) + carry, mask=mask)
        carry += tl.sum(counts, 0)


def tile_maps(expert_offsets: torch.Tensor, *block_ms: int) -> torch.Tensor:
    """[TILE_MAPS, E+1] int32: row d is the exclusive scan of cdiv(rows of expert e, block_ms[d]) (rows past the
    block sizes given repeat the last). One launch, on the device (no host sync): a launcher computes the maps
    of every kernel it runs at once and a backward reuses the forward's."""
    if not 1 <= len(block_ms) <= TILE_MAPS:
        raise ValueError(f"tile_maps takes 1 to {TILE_MAPS} block sizes, got {len(block_ms)}")
    blocks = block_ms + (block_ms[-1],) * (TILE_MAPS - len(block_ms))
    num_experts = expert_offsets.numel() - 1
    tiles = torch.empty((TILE_MAPS, num_experts + 1), dtype=torch.int32, device=expert_offsets.device)
    launcher(_tile_scan_kernel, (TILE_MAPS,))(expert_offsets, tiles, num_experts, *blocks, BLOCK_E=_TILE_SCAN_BLOCK_E,
                                              num_warps=4, num_stages=1)
    return tiles


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the tile count (the grid, known without a host sync): every non-empty expert wastes
    at most one partial tile."""
    return cdiv(num_rows, block_m) + min(num_experts, num_rows)


@triton.jit
def tile_and_column(GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) in a grid of (row tiles, column tiles).

    The GPU starts programs in launch order, axis 0 fastest: with GROUP_M = 0 the programs of one column tile run
    over every row tile before the next column tile starts, so each row tile's input rows are read again from
    memory for every column tile (12-224 times at the shapes of the benchmark, more than L2 holds at T >= 4096).
    GROUP_M > 0 renumbers the programs so that GROUP_M consecutive row tiles sweep all column tiles together: their
    input rows stay in L2 while each column slice of the expert's weights is read once for the group. A bijection
    of the same grid (the last group may be short), so the host launch is unchanged.
    """
    tile = tl.program_id(0)
    column = tl.program_id(1)
    if GROUP_M > 0:
        num_tiles = tl.num_programs(0)
        launch = column * num_tiles + tile  # the launch order (axis 0 fastest)
        per_group = GROUP_M * tl.num_programs(1)
        first = (launch // per_group) * GROUP_M
        size = tl.minimum(num_tiles - first, GROUP_M)
        tile = first + (launch % per_group) % size
        column = (launch % per_group) // size
    return tile, column


@triton.jit
def find_tile(tile, tile_offsets_ptr, expert_offsets_ptr, num_experts, search_steps, BLOCK_M: tl.constexpr):
    """Map a tile id (:func:`tile_and_column`) to (expert, first sorted row, end of the expert's rows, valid).

    tile_offsets_ptr: [E+1] int32, a row of :func:`tile_maps`; search_steps = E.bit_length(). valid is false
    for tiles past the last one (the grid is the bound of :func:`max_tiles`).
    """
    total = tl.load(tile_offsets_ptr + num_experts)
    lo = 0
    hi = num_experts - 1
    for _ in range(search_steps):  # largest e with tile_offsets[e] <= tile
        mid = (lo + hi + 1) // 2
        go_right = tl.load(tile_offsets_ptr + mid) <= tile
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    expert = lo
    row_start = tl.load(expert_offsets_ptr + expert) + (tile - tl.load(tile_offsets_ptr + expert)) * BLOCK_M
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    return expert, row_start, row_end, tile < total


@triton.jit
def program_rows(tile, tile_offsets_ptr, expert_offsets_ptr, sorted_slots_ptr, num_experts, num_rows, search_steps,
                 BLOCK_M: tl.constexpr, BY_EXPERT: tl.constexpr):
    """This program's expert and rows: returns (expert, rows, row_mask, slots, valid).

    Tiled (BY_EXPERT false): tile ``tile`` (:func:`tile_and_column`), BLOCK_M rows of one expert's run in sorted
    order (:func:`find_tile`); ``rows`` index the sorted order and ``slots = sorted_slots[rows]``.
    By expert (BY_EXPERT, the decode path, no plan): ``tile`` is the expert (program_id(0)) and ``sorted_slots_ptr``
    holds the flat ids [N] (int32 or int64; N = num_rows <= BLOCK_M); the rows are the slots routed to this expert, so
    rows == slots and every [N, .] buffer is indexed by slot. valid is false for an expert without slots.
    """
    if BY_EXPERT:
        expert = tile
        rows = tl.arange(0, BLOCK_M)
        row_ids = tl.load(sorted_slots_ptr + rows, mask=rows < num_rows, other=-1)
        row_mask = row_ids == expert
        slots = rows
        valid = tl.max(row_mask.to(tl.int32), axis=0) > 0
    else:
        expert, row_start, row_end, valid = find_tile(tile, tile_offsets_ptr, expert_offsets_ptr, num_experts,
                                                      search_steps, BLOCK_M)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end  # all false past the last tile (row_start >= row_end there)
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    return expert, rows, row_mask, slots, valid



# ----------------------------------------------------------------------------------------------------
# operands and the slot combine


@triton.jit
def operand(tile, UPCAST: tl.constexpr, dtype: tl.constexpr):
    """A tl.dot operand: fp32 under the interpreter (bf16 is wrong there), else the GEMM input dtype."""
    if UPCAST:
        out = tile.to(tl.float32)
    else:
        out = tile.to(dtype)
    return out


@triton.jit
def _combine_slots_kernel(slot_rows_ptr, out_ptr, T, H, top_k, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, :] = sum_{j < k} slot_rows[t*k + j, :] in fp32, j ascending (deterministic), cast to out's dtype.

    slot_rows [T*k, H] contiguous, in out's dtype. out [T, H] contiguous. Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_N))."""
    t_offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (t_offs < T)[:, None] & (n_offs < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, top_k):
        rows = (t_offs.to(tl.int64) * top_k + j) * H
        acc += tl.load(slot_rows_ptr + rows[:, None] + n_offs[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t_offs.to(tl.int64)[:, None] * H + n_offs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


COMBINE_BLOCK_T, COMBINE_BLOCK_N, COMBINE_OPTIONS = 16, 128, {"num_warps": 4, "num_stages": 1}


def combine_slots(slot_rows: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T*k, H] slot rows -> [T, H] in ``dtype``: the k rows of a token summed in fp32, j ascending, in one pass,
    rounded once. With k = 1 the slot rows are returned as they are.

    The slot rows are in the output's dtype: each slot's product rounds once where it is written, then the sum
    once, as transformers' grouped_mm experts and the cuda backend round theirs. fp32 rows (before 2026-11-28)
    doubled what the expert GEMM's epilogue writes and this pass reads, for no gain a 16-bit output keeps: at
    Qwen3-30B-A3B T=16384 that was 1.07 GB written and read twice per forward (and again for dx), by
    arithmetic about 0.25 ms of copy time each way at the H200's measured 4.18 TB/s."""
    if top_k == 1:
        return slot_rows
    hidden = slot_rows.shape[1]
    out = torch.empty((num_tokens, hidden), dtype=dtype, device=slot_rows.device)
    grid = (cdiv(num_tokens, COMBINE_BLOCK_T), cdiv(hidden, COMBINE_BLOCK_N))
    launcher(_combine_slots_kernel, grid)(slot_rows, out, num_tokens, hidden, top_k, BLOCK_T=COMBINE_BLOCK_T,
                                          BLOCK_N=COMBINE_BLOCK_N, **COMBINE_OPTIONS)
    return out
