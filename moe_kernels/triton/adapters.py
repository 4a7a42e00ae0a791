"""Routed adapter experts in Triton: PESC bottleneck adapters and routed LoRA, forward and backward.

    y[t] = sum_j weights[t,j] * scale * up_e(act(down_e h_t)),   e = ids[t,j]
    h [T,H], down [E,r,H], up [E,H,r], weights [T,k] fp32, ids [T,k] int32, 1 <= r <= 1024.

Data flow (slot s = t*k + j; the dispatch plan orders slots by expert, stably):

* Rows are processed per expert segment of the plan in tiles of BLOCK_M sorted positions; a small
  tile map computed on the device (cumulative tile counts per expert, and each tile's expert by
  ``torch.searchsorted``) tells each program its expert and rows: no host sync, no E-sized registers.
  Token rows are gathered by ``sorted_slots // k`` inside the loads: no permuted copy of ``h`` (or of
  the incoming gradient) is ever made.
* forward, *fused* path (whole padded rank in one tile, r <= 128): one program computes
  z = h_rows @ down_e^T over H, a = act(z) in registers, then sweeps the H output tiles with
  a @ up_e^T, scaling rows by scale * weight in the fp32 epilogue.
* forward, *split* path (any r; used for large r and for small T, where it exposes more programs):
  a shrink kernel writes a = act(z) [N, r] (N = T*k, small), an expand kernel reads it over r tiles.
* Output rows are written per slot in fp32 and summed per token in a fixed order by a combine
  kernel (deterministic, no atomics); with k = 1 the expand writes token rows directly.
* backward (fused for padded rank 16, split beyond) recomputes z in the same H sweep that forms u = up_e^T dy_t (two dots per step, one read
  of the rows), so the forward saves nothing but its inputs and the plan:
      d(weights)_s = scale * <u_s, a_s>,   dz_s = scale * w_s * u_s * act'(z_s)
      d(h)_t      = sum_j down_e^T dz_s                 (expand of dz, then the combine)
      d(up)_e     = sum_s (scale w_s dy_t) a_s^T        (per-expert grouped GEMM over its rows)
      d(down)_e   = sum_s dz_s h_t^T                    (per-expert grouped GEMM over its rows)
* Ranks below 16: ``tl.dot`` needs tiles of 16, so the rank dimension is padded to 16 in registers
  by masked loads (zeros). Those shapes are memory-bound (the h/dy/out rows dominate the traffic),
  so the padded tensor-core work costs nothing measurable against an FMA path.
* Large r tiles over the rank (BLOCK_R <= 128) in the split path and in the weight-gradient kernel.

Numerics: on GPUs the dots run on tensor cores in the input dtype with fp32 accumulation (fp32 inputs
use TF32 only if ``torch.backends.cuda.matmul.allow_tf32``); the [N, r] intermediates are kept in the
input dtype there. Under ``TRITON_INTERPRET=1`` (CPU tests) every tile is upcast to fp32 after loading
because the interpreter computes bf16 arithmetic wrongly.

Public entry point: :func:`adapter_moe_triton` (torch.library custom ops with fake kernels and
autograd). Configs: :data:`ADAPTER_CONFIGS`; AOT compile list: :data:`COMPILE_SPECS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..spec import MAX_ADAPTER_RANK as MAX_RANK
from .common import ADAPTER_ACTIVATION_CODES as ACTIVATION_CODES  # the kernels branch on these codes
from .common import dot_precision, interpreting
from .plan import dispatch_plan

# ----------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) for fp32 z; codes as in ACTIVATION_CODES."""
    if ACTIVATION == 1:  # gelu (erf)
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (2.0 * tl.sigmoid(2.0 * inner))
    elif ACTIVATION == 3:  # silu
        return z * tl.sigmoid(z)
    elif ACTIVATION == 4:  # relu
        return tl.maximum(z, 0.0)
    else:
        return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz at fp32 z (relu: 1 where z > 0, as torch)."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == 3:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 4:
        return (z > 0.0).to(tl.float32)
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _locate_tile(pid, tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, BLOCK_M: tl.constexpr):
    """Tile ``pid`` of the per-expert tiling -> (expert, sorted positions [BLOCK_M] int32, row mask).

    tile_experts [grid] int32: the expert of each tile, E past the last tile (the caller returns early
    for those); tile_ends [E] int32: cumulative count of BLOCK_M-row tiles per expert."""
    expert = tl.load(tile_experts_ptr + pid)
    tiles_before = tl.load(tile_ends_ptr + expert - 1, mask=expert > 0, other=0)
    segment_begin = tl.load(expert_offsets_ptr + expert)
    segment_end = tl.load(expert_offsets_ptr + expert + 1)
    positions = segment_begin + (pid - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
    return expert, positions, positions < segment_end


@triton.jit
def _shrink_accumulate(acc, x_ptr, x_rows, row_mask, w_ptr, stride_wk, stride_wr, r_offs, r_mask, H,
                       BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[BLOCK_M, BLOCK_R] += x[x_rows, :H] @ W where W[kk, rr] = w_ptr[kk*stride_wk + rr*stride_wr].

    x is a row-major [*, H] tensor gathered by ``x_rows`` (int64 element offsets of the row starts)."""
    for k0 in range(0, H, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < H
        x = tl.load(x_ptr + x_rows[:, None] + k_offs[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + k_offs[:, None] * stride_wk + r_offs[None, :] * stride_wr,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _store_rows(out_ptr, out_rows, row_mask, n_offs, n_mask, values):
    tl.store(out_ptr + out_rows[:, None] + n_offs[None, :], values.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _adapter_fused_kernel(
    h_ptr, dy_ptr, down_ptr, up_ptr, weights_ptr,
    tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, sorted_slots_ptr,
    out_ptr, act_out_ptr, dz_out_ptr, dweights_ptr,
    top_k, H, R, num_experts, scale,
    ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, OUT_BY_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Shrink -> activation -> expand for one BLOCK_M-row tile of one expert, whole rank in one tile.

    h, dy: [T, H] row-major; down [E, R, H], up [E, H, R] contiguous; weights [T*k] fp32 by slot.
    R <= BLOCK_R. Grid: (upper bound on the number of row tiles,).
    forward  (BACKWARD=0): out rows = scale * w_s * up_e(act(down_e h_t)).
    backward (BACKWARD=1): recomputes z = down_e h_t, forms u = up_e^T dy_t in the same H sweep;
        stores dweights[s] = scale <u, act(z)>, act(z) -> act_out [N, R], dz -> dz_out [N, R]
        (both by sorted position), and out rows = down_e^T dz (the per-slot d(h)).
    out: [T, H] in the output dtype when OUT_BY_TOKEN (k = 1), else [T*k, H] fp32 by slot.
    """
    pid = tl.program_id(0)
    if tl.load(tile_experts_ptr + pid) >= num_experts:
        return
    expert, positions, row_mask = _locate_tile(pid, tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + positions, mask=row_mask, other=0)
    token_rows = (slots // top_k).to(tl.int64) * H
    r_offs = tl.arange(0, BLOCK_R)
    r_mask = r_offs < R
    down_e = down_ptr + expert.to(tl.int64) * R * H
    up_e = up_ptr + expert.to(tl.int64) * H * R

    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    z = _shrink_accumulate(z, h_ptr, token_rows, row_mask, down_e, 1, H, r_offs, r_mask, H,
                           BLOCK_K, UPCAST, DOT_PRECISION)
    routing = tl.load(weights_ptr + slots, mask=row_mask, other=0.0) * scale
    activated = _activation(z, ACTIVATION)
    if BACKWARD:
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        u = _shrink_accumulate(u, dy_ptr, token_rows, row_mask, up_e, R, 1, r_offs, r_mask, H,
                               BLOCK_K, UPCAST, DOT_PRECISION)
        tl.store(dweights_ptr + slots, scale * tl.sum(u * activated, axis=1), mask=row_mask)
        middle = u * _activation_grad(z, ACTIVATION) * routing[:, None]
        mid_rows = positions.to(tl.int64) * R
        _store_rows(act_out_ptr, mid_rows, row_mask, r_offs, r_mask, activated)
        _store_rows(dz_out_ptr, mid_rows, row_mask, r_offs, r_mask, middle)
        # expand with down_e: W2[rr, n] = down[e, rr, n]
        w2_e, stride_w2r, stride_w2n = down_e, H, 1
        row_scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    else:
        middle = activated
        w2_e, stride_w2r, stride_w2n = up_e, 1, R
        row_scale = routing
    if UPCAST:
        middle_op = middle
    else:
        middle_op = middle.to(down_ptr.dtype.element_ty)
    if OUT_BY_TOKEN:
        out_rows = token_rows
    else:
        out_rows = slots.to(tl.int64) * H
    for n0 in range(0, H, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = n_offs < H
        w2 = tl.load(w2_e + r_offs[:, None] * stride_w2r + n_offs[None, :] * stride_w2n,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            w2 = w2.to(tl.float32)
        acc = tl.dot(middle_op, w2, input_precision=DOT_PRECISION) * row_scale[:, None]
        _store_rows(out_ptr, out_rows, row_mask, n_offs, n_mask, acc)


@triton.jit
def _adapter_shrink_kernel(
    h_ptr, dy_ptr, down_ptr, up_ptr, weights_ptr,
    tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, sorted_slots_ptr,
    act_out_ptr, dz_out_ptr, dweights_partial_ptr,
    top_k, H, R, num_experts, scale,
    ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split path, shrink half: one (row tile, rank tile) per program. Grid: (row tiles bound, cdiv(R, BLOCK_R)).

    forward:  act_out[pos, r] = act(down_e h_t)  ([N, R] by sorted position).
    backward: also u = up_e^T dy_t; act_out = act(z), dz_out = scale w_s u act'(z), and
              dweights_partial[s, rank_tile] = scale <u, act(z)> over this rank tile ([N, cdiv(R, BLOCK_R)] fp32).
    """
    pid = tl.program_id(0)
    rank_tile = tl.program_id(1)
    if tl.load(tile_experts_ptr + pid) >= num_experts:
        return
    expert, positions, row_mask = _locate_tile(pid, tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + positions, mask=row_mask, other=0)
    token_rows = (slots // top_k).to(tl.int64) * H
    r_offs = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r_offs < R
    down_e = down_ptr + expert.to(tl.int64) * R * H
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    z = _shrink_accumulate(z, h_ptr, token_rows, row_mask, down_e, 1, H, r_offs, r_mask, H,
                           BLOCK_K, UPCAST, DOT_PRECISION)
    activated = _activation(z, ACTIVATION)
    mid_rows = positions.to(tl.int64) * R
    _store_rows(act_out_ptr, mid_rows, row_mask, r_offs, r_mask, activated)
    if BACKWARD:
        up_e = up_ptr + expert.to(tl.int64) * H * R
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        u = _shrink_accumulate(u, dy_ptr, token_rows, row_mask, up_e, R, 1, r_offs, r_mask, H,
                               BLOCK_K, UPCAST, DOT_PRECISION)
        routing = tl.load(weights_ptr + slots, mask=row_mask, other=0.0) * scale
        num_rank_tiles = tl.num_programs(1)
        tl.store(dweights_partial_ptr + slots * num_rank_tiles + rank_tile,
                 scale * tl.sum(u * activated, axis=1), mask=row_mask)
        middle = u * _activation_grad(z, ACTIVATION) * routing[:, None]
        _store_rows(dz_out_ptr, mid_rows, row_mask, r_offs, r_mask, middle)


@triton.jit
def _adapter_expand_kernel(
    mid_ptr, w2_ptr, weights_ptr,
    tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, sorted_slots_ptr, out_ptr,
    top_k, H, R, num_experts, scale,
    BACKWARD: tl.constexpr, OUT_BY_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split path, expand half: out rows [BLOCK_M, BLOCK_N] = mid[pos, :R] @ W2_e, over rank tiles.

    mid [N, R] by sorted position. forward: W2 = up [E, H, R], rows scaled by scale * weights[s];
    backward: W2 = down [E, R, H] (mid = dz already carries the routing weight).
    Grid: (row tiles bound, cdiv(H, BLOCK_N)). out as in the fused kernel.
    """
    pid = tl.program_id(0)
    n_tile = tl.program_id(1)
    if tl.load(tile_experts_ptr + pid) >= num_experts:
        return
    expert, positions, row_mask = _locate_tile(pid, tile_experts_ptr, tile_ends_ptr, expert_offsets_ptr, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + positions, mask=row_mask, other=0)
    n_offs = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < H
    w2_e = w2_ptr + expert.to(tl.int64) * H * R
    if BACKWARD:
        stride_w2r, stride_w2n = H, 1
    else:
        stride_w2r, stride_w2n = 1, R
    mid_rows = positions.to(tl.int64) * R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        r_mask = r_offs < R
        mid = tl.load(mid_ptr + mid_rows[:, None] + r_offs[None, :], mask=row_mask[:, None] & r_mask[None, :],
                      other=0.0)
        w2 = tl.load(w2_e + r_offs[:, None] * stride_w2r + n_offs[None, :] * stride_w2n,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            mid = mid.to(tl.float32)
            w2 = w2.to(tl.float32)
        else:
            mid = mid.to(w2_ptr.dtype.element_ty)
        acc = tl.dot(mid, w2, acc, input_precision=DOT_PRECISION)
    if not BACKWARD:
        acc = acc * (tl.load(weights_ptr + slots, mask=row_mask, other=0.0) * scale)[:, None]
    if OUT_BY_TOKEN:
        out_rows = (slots // top_k).to(tl.int64) * H
    else:
        out_rows = slots.to(tl.int64) * H
    _store_rows(out_ptr, out_rows, row_mask, n_offs, n_mask, acc)


@triton.jit
def _adapter_weight_grad_kernel(
    left_ptr, right_ptr, weights_ptr, expert_offsets_ptr, sorted_slots_ptr, out_ptr,
    top_k, H, R, scale,
    D_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per-expert grouped weight gradient: out[e] [P, Q] = sum over e's rows i of left_i^T right_i.

    A row i is a sorted position of expert e; [T, H] operands are read at token row sorted_slots[i] // k,
    [N, R] operands at row i. Grid: (E, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q)).
    D_UP:     left = dy [T, H] with rows scaled by scale * weights[s], right = act(z) [N, R]
              -> out = d(up) [E, H, R]  (P = H, Q = R).
    not D_UP: left = dz [N, R], right = h [T, H] -> out = d(down) [E, R, H]  (P = R, Q = H).
    Each expert reduces its own rows in order (deterministic; an expert with no rows gets zeros).
    """
    if D_UP:
        P, Q, LEFT_BY_TOKEN, stride_left, stride_right = H, R, True, H, R
    else:
        P, Q, LEFT_BY_TOKEN, stride_left, stride_right = R, H, False, R, H
    expert = tl.program_id(0)
    p_offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_offs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = p_offs < P
    q_mask = q_offs < Q
    segment_begin = tl.load(expert_offsets_ptr + expert)
    segment_end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(segment_begin, segment_end, BLOCK_M):
        positions = m0 + tl.arange(0, BLOCK_M)
        row_mask = positions < segment_end
        slots = tl.load(sorted_slots_ptr + positions, mask=row_mask, other=0)
        if LEFT_BY_TOKEN:
            left_rows = (slots // top_k).to(tl.int64) * stride_left
        else:
            left_rows = positions.to(tl.int64) * stride_left
        if not LEFT_BY_TOKEN:
            right_rows = (slots // top_k).to(tl.int64) * stride_right
        else:
            right_rows = positions.to(tl.int64) * stride_right
        left = tl.load(left_ptr + left_rows[:, None] + p_offs[None, :], mask=row_mask[:, None] & p_mask[None, :],
                       other=0.0)
        right = tl.load(right_ptr + right_rows[:, None] + q_offs[None, :], mask=row_mask[:, None] & q_mask[None, :],
                        other=0.0)
        if D_UP:
            routing = tl.load(weights_ptr + slots, mask=row_mask, other=0.0) * scale
            left = left.to(tl.float32) * routing[:, None]
        if UPCAST:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        else:
            left = left.to(out_ptr.dtype.element_ty)
            right = right.to(out_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(left), right, acc, input_precision=DOT_PRECISION)
    out_e = out_ptr + expert.to(tl.int64) * H * R
    tl.store(out_e + p_offs[:, None] * Q + q_offs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=p_mask[:, None] & q_mask[None, :])


@triton.jit
def _combine_slots_kernel(slot_rows_ptr, out_ptr, T, H, top_k,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t, :] = sum_{j < k} slot_rows[t*k + j, :] in fp32, j ascending (deterministic), cast to out's dtype.

    slot_rows [T*k, H] fp32, out [T, H]. Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_N))."""
    t_offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (t_offs < T)[:, None] & (n_offs < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, top_k):
        rows = (t_offs.to(tl.int64) * top_k + j) * H
        acc += tl.load(slot_rows_ptr + rows[:, None] + n_offs[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + t_offs.to(tl.int64)[:, None] * H + n_offs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class AdapterConfig:
    """Launch parameters of the adapter kernels for one shape class.

    fused: forward/backward-data in one kernel (requires padded rank <= block_r);
    block_m: sorted rows per tile; block_k: H step of the shrink reduction; block_n: H tile of the
    expand output; block_r: rank tile (>= 16, the tl.dot minimum; smaller ranks are masked);
    wgrad_block_*: the per-expert weight-gradient kernel's row step and output tile;
    wgrad_num_stages: its pipeline depth (None: num_stages)."""

    fused: bool
    block_m: int
    block_k: int
    block_n: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 3
    wgrad_block_m: int = 64
    wgrad_block_h: int = 64
    wgrad_block_r: int = 64
    wgrad_num_stages: int | None = None

    @property
    def wgrad_stages(self) -> int:
        return self.num_stages if self.wgrad_num_stages is None else self.wgrad_num_stages


# Shape classes: rank class x token class. Rank: "r16" (r <= 16), "r64" (<= 64), "r128" (<= 128),
# "rbig" (> 128, split path tiled over r). Tokens (N = T*k routed slots): "decode" (N <= 256: few rows,
# the split path spreads work over rank and H tiles), "medium" (N <= 8192), "large" (more: the fused path
# keeps the [N, r] intermediate in registers). Block sizes are first guesses sized for sm_80/sm_90
# (no GPU was available to tune them); every entry is AOT-compiled spill-free (see COMPILE_SPECS).
# r16-large takes 8 warps (at 4 the relu fused backward with k = 1 spilled on sm_80); decode ranks
# > 16 step H by 64 (128 put the split backward shrink at 255 registers on sm_80).
ADAPTER_CONFIGS: dict[tuple[str, str], AdapterConfig] = {
    ("r16", "decode"): AdapterConfig(False, 16, 128, 64, 16, 4, 2, 32, 64, 16),
    ("r16", "medium"): AdapterConfig(True, 64, 64, 64, 16, 4, 3, 64, 64, 16),
    ("r16", "large"): AdapterConfig(True, 128, 64, 64, 16, 8, 3, 64, 128, 16),
    ("r64", "decode"): AdapterConfig(False, 16, 64, 64, 64, 4, 2, 32, 64, 64),
    ("r64", "medium"): AdapterConfig(False, 64, 64, 128, 64, 8, 3, 64, 64, 64),
    ("r64", "large"): AdapterConfig(True, 64, 64, 64, 64, 8, 3, 64, 64, 64),
    ("r128", "decode"): AdapterConfig(False, 16, 64, 64, 64, 4, 2, 32, 64, 64),
    ("r128", "medium"): AdapterConfig(False, 64, 64, 128, 64, 8, 3, 64, 64, 64),
    ("r128", "large"): AdapterConfig(True, 64, 64, 64, 128, 8, 3, 64, 64, 64),
    ("rbig", "decode"): AdapterConfig(False, 16, 64, 64, 64, 4, 2, 32, 64, 64),
    ("rbig", "medium"): AdapterConfig(False, 64, 64, 128, 64, 8, 3, 64, 64, 64),
    ("rbig", "large"): AdapterConfig(False, 64, 64, 128, 64, 8, 3, 64, 64, 64),
}

# Launches whose H is not a multiple of 16 or whose tensors are not 16-byte aligned get no vectorised
# loads (Triton specialises on both), so every element carries its own address and mask: small tiles.
UNALIGNED_CONFIG = AdapterConfig(False, 16, 16, 32, 32, 4, 2, 16, 32, 32)

# Under the interpreter cost grows with programs x loop steps: one wide tile for the small test shapes.
_INTERPRETER_BLOCK = 64

_COMBINE_BLOCK_T, _COMBINE_BLOCK_N = 16, 128
_COMBINE_OPTIONS = {"num_warps": 4, "num_stages": 1}  # a streaming sum: nothing to pipeline

_forced_config: AdapterConfig | None = None


@contextlib.contextmanager
def forced_config(config: AdapterConfig):
    """Run adapter_moe_triton with ``config`` instead of the table's choice (tests, benchmarks)."""
    global _forced_config
    previous, _forced_config = _forced_config, config
    try:
        yield
    finally:
        _forced_config = previous


def shape_class(num_slots: int, rank: int) -> tuple[str, str]:
    rank_class = "r16" if rank <= 16 else "r64" if rank <= 64 else "r128" if rank <= 128 else "rbig"
    token_class = "decode" if num_slots <= 256 else "medium" if num_slots <= 8192 else "large"
    return rank_class, token_class


# The fused backward holds two [BLOCK_M, BLOCK_R] fp32 accumulators (z and u) through the expand
# sweep; beyond this rank tile it spills, so larger ranks take the split backward.
FUSED_BACKWARD_MAX_RANK_TILE = 16
# Likewise the split backward's shrink (z and u accumulators) tiles the rank by at most 64.
SPLIT_BACKWARD_MAX_BLOCK_R = 64


def for_dtype(config: AdapterConfig, dtype: torch.dtype) -> AdapterConfig:
    """fp32 inputs: tl.dot runs as exact fp32 FMA (unless TF32 is allowed) and its operands take twice
    the registers, so tiles shrink (the table's sizes are for fp16/bf16). The weight-gradient kernel is not
    pipelined in fp32: with two stages it took up to 255 registers on sm_80 and spilled on sm_90 (r = 16)."""
    if dtype != torch.float32:
        return config
    return dataclasses.replace(
        config, block_m=min(config.block_m, 32), block_k=min(config.block_k, 32), block_n=min(config.block_n, 64),
        block_r=min(config.block_r, 32), num_stages=min(config.num_stages, 2),
        wgrad_block_m=min(config.wgrad_block_m, 32), wgrad_block_h=min(config.wgrad_block_h, 64),
        wgrad_block_r=min(config.wgrad_block_r, 32), wgrad_num_stages=1)


def select_config(num_slots: int, rank: int, dtype: torch.dtype = torch.bfloat16) -> AdapterConfig:
    """The table's config for this shape and dtype (a fused config whose block_r is below the padded rank
    falls back to the split path)."""
    config = _forced_config or for_dtype(ADAPTER_CONFIGS[shape_class(num_slots, rank)], dtype)
    if config.fused and _rank_tile(rank) > config.block_r:
        config = dataclasses.replace(config, fused=False)
    return config


def _rank_tile(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


# ----------------------------------------------------------------------------------------------------
# launchers


def _aligned(H, *tensors) -> bool:
    return H % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def _launch_params(h, down, up, weights, expert_offsets, sorted_slots, grad=None):
    T, H = h.shape
    E, R, _ = down.shape
    k = weights.shape[1]
    N = T * k
    config = select_config(N, R, h.dtype)
    # table configs are compiled (and checked spill-free) for the JIT's aligned specialisation only
    inputs = (h, down, up, weights, expert_offsets, sorted_slots, *([grad] if grad is not None else []))
    if _forced_config is None and not _aligned(H, *inputs):
        config = UNALIGNED_CONFIG
    interp = interpreting()
    if interp:  # fewer, wider tiles: the interpreter's cost is per program and loop step
        config = dataclasses.replace(config, block_k=_INTERPRETER_BLOCK, block_n=_INTERPRETER_BLOCK,
                                     wgrad_block_h=_INTERPRETER_BLOCK, num_stages=1)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    tile_ends = torch.cumsum(torch.div(counts + (config.block_m - 1), config.block_m, rounding_mode="floor"),
                             0).to(torch.int32)
    row_tiles = min(N, triton.cdiv(N, config.block_m) + E)
    # expert of each tile (E past the last one): a device-side search, no host sync
    tile_experts = torch.searchsorted(tile_ends, torch.arange(row_tiles, dtype=torch.int32, device=h.device),
                                      right=True).to(torch.int32)
    return dict(T=T, H=H, E=E, R=R, k=k, N=N, config=config, tile_ends=tile_ends, tile_experts=tile_experts,
                row_tiles=row_tiles,
                upcast=interp, precision=dot_precision(h.dtype))


def _mid_dtype(h):
    # [N, r] intermediates: input dtype on GPUs (tensor-core operand), fp32 under the interpreter
    return torch.float32 if interpreting() else h.dtype


def _combine(slot_rows, T, H, k, out_dtype):
    out = torch.empty((T, H), dtype=out_dtype, device=slot_rows.device)
    block_t, block_n = _COMBINE_BLOCK_T, _COMBINE_BLOCK_N if not interpreting() else _INTERPRETER_BLOCK
    _combine_slots_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_n))](
        slot_rows, out, T, H, k, BLOCK_T=block_t, BLOCK_N=block_n, **_COMBINE_OPTIONS)
    return out


def _forward_impl(h, down, up, weights, expert_offsets, sorted_slots, activation, scale):
    p = _launch_params(h, down, up, weights, expert_offsets, sorted_slots)
    T, H, E, R, k, N, cfg = p["T"], p["H"], p["E"], p["R"], p["k"], p["N"], p["config"]
    by_token = k == 1
    out = torch.empty((T, H) if by_token else (N, H), dtype=h.dtype if by_token else torch.float32, device=h.device)
    act = ACTIVATION_CODES[activation]
    common = dict(BLOCK_M=cfg.block_m, UPCAST=p["upcast"], DOT_PRECISION=p["precision"],
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.fused:
        _adapter_fused_kernel[(p["row_tiles"],)](
            h, h, down, up, weights, p["tile_experts"], p["tile_ends"], expert_offsets, sorted_slots,
            out, out, out, weights, k, H, R, E, scale,
            ACTIVATION=act, BACKWARD=False, OUT_BY_TOKEN=by_token, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            BLOCK_R=_rank_tile(R), **common)
    else:
        block_r = min(cfg.block_r, _rank_tile(R))
        activated = torch.empty((N, R), dtype=_mid_dtype(h), device=h.device)
        _adapter_shrink_kernel[(p["row_tiles"], triton.cdiv(R, block_r))](
            h, h, down, up, weights, p["tile_experts"], p["tile_ends"], expert_offsets, sorted_slots,
            activated, activated, weights, k, H, R, E, scale,
            ACTIVATION=act, BACKWARD=False, BLOCK_K=cfg.block_k, BLOCK_R=block_r, **common)
        _adapter_expand_kernel[(p["row_tiles"], triton.cdiv(H, cfg.block_n))](
            activated, up, weights, p["tile_experts"], p["tile_ends"], expert_offsets, sorted_slots, out,
            k, H, R, E, scale, BACKWARD=False, OUT_BY_TOKEN=by_token, BLOCK_N=cfg.block_n, BLOCK_R=block_r, **common)
    return out if by_token else _combine(out, T, H, k, h.dtype)


def _backward_impl(grad, h, down, up, weights, expert_offsets, sorted_slots, activation, scale,
                   weight_grads):
    grad = grad.contiguous()
    p = _launch_params(h, down, up, weights, expert_offsets, sorted_slots, grad)
    T, H, E, R, k, N, cfg = p["T"], p["H"], p["E"], p["R"], p["k"], p["N"], p["config"]
    by_token = k == 1
    act = ACTIVATION_CODES[activation]
    common = dict(BLOCK_M=cfg.block_m, UPCAST=p["upcast"], DOT_PRECISION=p["precision"],
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    activated = torch.empty((N, R), dtype=_mid_dtype(h), device=h.device)
    dz = torch.empty((N, R), dtype=_mid_dtype(h), device=h.device)
    dh_rows = torch.empty((T, H) if by_token else (N, H), dtype=h.dtype if by_token else torch.float32,
                          device=h.device)
    if cfg.fused and (_rank_tile(R) <= FUSED_BACKWARD_MAX_RANK_TILE or _forced_config is not None):
        dweights = torch.empty((N,), dtype=torch.float32, device=h.device)
        _adapter_fused_kernel[(p["row_tiles"],)](
            h, grad, down, up, weights, p["tile_experts"], p["tile_ends"], expert_offsets, sorted_slots,
            dh_rows, activated, dz, dweights, k, H, R, E, scale,
            ACTIVATION=act, BACKWARD=True, OUT_BY_TOKEN=by_token, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            BLOCK_R=_rank_tile(R), **common)
    else:
        block_r = min(cfg.block_r, SPLIT_BACKWARD_MAX_BLOCK_R, _rank_tile(R))
        rank_tiles = triton.cdiv(R, block_r)
        partial = torch.empty((N, rank_tiles), dtype=torch.float32, device=h.device)
        _adapter_shrink_kernel[(p["row_tiles"], rank_tiles)](
            h, grad, down, up, weights, p["tile_experts"], p["tile_ends"], expert_offsets, sorted_slots,
            activated, dz, partial, k, H, R, E, scale,
            ACTIVATION=act, BACKWARD=True, BLOCK_K=cfg.block_k, BLOCK_R=block_r, **common)
        dweights = partial.sum(dim=1) if rank_tiles > 1 else partial.view(N)
        _adapter_expand_kernel[(p["row_tiles"], triton.cdiv(H, cfg.block_n))](
            dz, down, weights, p["tile_experts"], p["tile_ends"], expert_offsets, sorted_slots, dh_rows,
            k, H, R, E, scale, BACKWARD=True, OUT_BY_TOKEN=by_token, BLOCK_N=cfg.block_n, BLOCK_R=block_r, **common)
    dh = dh_rows if by_token else _combine(dh_rows, T, H, k, h.dtype)
    if not weight_grads:
        return dh, None, None, dweights.view(T, k)
    d_up = torch.empty_like(up)
    d_down = torch.empty_like(down)
    wgrad = dict(UPCAST=p["upcast"], DOT_PRECISION=p["precision"], BLOCK_M=cfg.wgrad_block_m,
                 num_warps=cfg.num_warps, num_stages=cfg.wgrad_stages)
    block_h = cfg.wgrad_block_h
    block_r = min(cfg.wgrad_block_r, _rank_tile(R))
    # d(up)[e] [H, R] = sum (scale w dy_t)^T act(z)
    _adapter_weight_grad_kernel[(E, triton.cdiv(H, block_h), triton.cdiv(R, block_r))](
        grad, activated, weights, expert_offsets, sorted_slots, d_up,
        k, H, R, scale, D_UP=True,
        BLOCK_P=block_h, BLOCK_Q=block_r, **wgrad)
    # d(down)[e] [R, H] = sum dz^T h_t
    _adapter_weight_grad_kernel[(E, triton.cdiv(R, block_r), triton.cdiv(H, block_h))](
        dz, h, weights, expert_offsets, sorted_slots, d_down,
        k, H, R, scale, D_UP=False,
        BLOCK_P=block_r, BLOCK_Q=block_h, **wgrad)
    return dh, d_down, d_up, dweights.view(T, k)


# ----------------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("moe_kernels::triton_adapter_moe", mutates_args=())
def _adapter_moe_op(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor,
                    expert_offsets: torch.Tensor, sorted_slots: torch.Tensor, activation: str,
                    scale: float) -> torch.Tensor:
    """Forward on a precomputed plan: h [T,H], down [E,r,H], up [E,H,r], weights [T,k] fp32 (all
    contiguous), expert_offsets [E+1] / sorted_slots [T*k] int32 -> y [T,H] in h's dtype."""
    return _forward_impl(h, down, up, weights, expert_offsets, sorted_slots, activation, scale)


@_adapter_moe_op.register_fake
def _(h, down, up, weights, expert_offsets, sorted_slots, activation, scale):
    return torch.empty_like(h)


@torch.library.custom_op("moe_kernels::triton_adapter_moe_backward", mutates_args=())
def _adapter_moe_backward_op(grad: torch.Tensor, h: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                             weights: torch.Tensor, expert_offsets: torch.Tensor, sorted_slots: torch.Tensor,
                             activation: str, scale: float, weight_grads: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h [T,H], d down [E,r,H], d up [E,H,r], d weights [T,k] fp32). Without ``weight_grads`` the
    expert-weight gradients are skipped and returned as empty tensors (frozen experts)."""
    dh, d_down, d_up, dweights = _backward_impl(grad, h, down, up, weights, expert_offsets, sorted_slots,
                                                activation, scale, weight_grads)
    if not weight_grads:
        d_down, d_up = down.new_empty(0), up.new_empty(0)
    return dh, d_down, d_up, dweights


@_adapter_moe_backward_op.register_fake
def _(grad, h, down, up, weights, expert_offsets, sorted_slots, activation, scale, weight_grads):
    if weight_grads:
        return torch.empty_like(h), torch.empty_like(down), torch.empty_like(up), torch.empty_like(weights)
    return torch.empty_like(h), down.new_empty(0), up.new_empty(0), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    h, down, up, weights, expert_offsets, sorted_slots, activation, scale = inputs
    ctx.save_for_backward(h, down, up, weights, expert_offsets, sorted_slots)
    ctx.activation, ctx.scale = activation, scale


def _backward(ctx, grad):
    h, down, up, weights, expert_offsets, sorted_slots = ctx.saved_tensors
    need = ctx.needs_input_grad
    weight_grads = bool(need[1] or need[2])
    dh, d_down, d_up, dweights = _adapter_moe_backward_op(grad, h, down, up, weights, expert_offsets, sorted_slots,
                                                          ctx.activation, ctx.scale, weight_grads)
    return (dh if need[0] else None, d_down if need[1] else None, d_up if need[2] else None,
            dweights if need[3] else None, None, None, None, None)


_adapter_moe_op.register_autograd(_backward, setup_context=_setup_context)


def adapter_moe_triton(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, activation: str = "gelu", scale: float = 1.0) -> torch.Tensor:
    """Routed adapter experts: y[t] = sum_j weights[t,j] * scale * up_e(act(down_e h_t)), e = ids[t,j].

    h [T,H]; down [E,r,H]; up [E,H,r] (h's dtype, 1 <= r <= 1024); weights [T,k] float32; ids [T,k]
    int32 in [0, E) (validated by ``moe_kernels.ops.adapter_moe``); activation in
    ``moe_kernels.spec.ADAPTER_ACTIVATIONS`` ("identity" = routed LoRA B_e A_e h). Returns [T,H] in h's dtype,
    differentiable w.r.t. h, down, up and weights. Same math as :func:`moe_kernels.reference.adapter_moe`.
    """
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}")
    if not 1 <= down.shape[1] <= MAX_RANK:
        raise ValueError(f"down: adapter rank (dim 1) must be in [1, {MAX_RANK}], got {down.shape[1]}")
    plan = dispatch_plan(ids, down.shape[0])
    return _adapter_moe_op(h.contiguous(), down.contiguous(), up.contiguous(),
                           weights.to(torch.float32).contiguous(), plan.expert_offsets.to(torch.int32),
                           plan.sorted_slots.to(torch.int32), activation, float(scale))


# ----------------------------------------------------------------------------------------------------
# ahead-of-time compile list (for ``moe-kernels compile-check``)

_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Per config: the largest rank tile it launches (its worst case), every activation (each is its own
# compiled kernel; their register needs differ by tens of registers, no single one is the worst).
_COMPILE_DTYPES = (torch.bfloat16, torch.float32)
# (dtype, tl.dot precision) pairs that launch: fp32 runs TF32 when torch.backends.cuda.matmul.allow_tf32
# (different code: mma instead of FMA); fp16 compiles as bf16 does.
_COMPILE_VARIANTS = ((torch.bfloat16, "tf32"), (torch.float32, "ieee"), (torch.float32, "tf32"))


def _signature(names, pointers, dtype, constexprs):
    types = {}
    for name in names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = pointers[name]
        elif name == "scale":
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


# Integer arguments that are multiples of 16 at every launch of a table config: the launcher takes
# UNALIGNED_CONFIG unless H % 16 == 0 (and the tensors are 16-byte aligned), and Triton's JIT marks such
# arguments tt.divisibility=16, which is what lets it vectorise the row loads. The compile check gives
# the same hints (pointers are taken 16-byte aligned), so it compiles the variant that really runs.
_TABLE_DIVISIBLE = ("H",)


def _compile_specs():
    """``(kernel, signature, constexprs, options, divisible)`` for every kernel at every shipped config
    (and the unaligned fallback), in the compile check's format (see
    :func:`moe_kernels.triton.compile_check.collect_specs`); identical specialisations are listed once."""
    specs, seen = [], set()

    def add(kernel, pointers, dtype, constexprs, config, aligned=None):
        names = kernel.arg_names
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if aligned is None:
            aligned = config is not UNALIGNED_CONFIG
        constexprs = dict(constexprs)
        if constexprs.get("OUT_BY_TOKEN"):
            constexprs["top_k"] = 1  # by-token output is the k = 1 launch, which the JIT specialises to a constant
        base = _TABLE_DIVISIBLE if aligned else ()
        # the rank R is a multiple of 16 (16, 32, 64, ...) or not (1-15, 24, 100, ...): both specialisations run
        for divisible in (base, base + ("R",)) if "R" in names else (base,):
            key = (kernel.__name__, tuple(sorted(pointers.items())), tuple(sorted(constexprs.items())),
                   tuple(sorted(options.items())), divisible)
            if key not in seen:
                seen.add(key)
                signature = _signature(names, pointers, dtype, constexprs)
                specs.append((kernel, signature, constexprs, options, divisible))

    for table_config in (*ADAPTER_CONFIGS.values(), UNALIGNED_CONFIG):
        for dtype, precision in _COMPILE_VARIANTS:
            config = table_config if table_config is UNALIGNED_CONFIG else for_dtype(table_config, dtype)
            data = _POINTER[dtype]
            mid = data  # [N, r] intermediates are kept in the input dtype on GPUs
            base = dict(BLOCK_M=config.block_m, UPCAST=False, DOT_PRECISION=precision)
            routed = {"h_ptr": data, "dy_ptr": data, "down_ptr": data, "up_ptr": data, "weights_ptr": "*fp32",
                      "tile_experts_ptr": "*i32", "tile_ends_ptr": "*i32", "expert_offsets_ptr": "*i32",
                      "sorted_slots_ptr": "*i32"}
            for backward in (False, True):
                if config.fused and not (backward and config.block_r > FUSED_BACKWARD_MAX_RANK_TILE):
                    for activation, by_token in itertools.product(ACTIVATION_CODES.values(), (False, True)):
                        out = data if by_token else "*fp32"
                        add(_adapter_fused_kernel,
                            dict(routed, out_ptr=out, act_out_ptr=mid, dz_out_ptr=mid, dweights_ptr="*fp32"),
                            dtype, dict(base, ACTIVATION=activation, BACKWARD=backward, OUT_BY_TOKEN=by_token,
                                        BLOCK_K=config.block_k, BLOCK_N=config.block_n, BLOCK_R=config.block_r),
                            config)
                else:
                    block_r = min(config.block_r, SPLIT_BACKWARD_MAX_BLOCK_R) if backward else config.block_r
                    for activation in ACTIVATION_CODES.values():
                        add(_adapter_shrink_kernel,
                            dict(routed, act_out_ptr=mid, dz_out_ptr=mid, dweights_partial_ptr="*fp32"), dtype,
                            dict(base, ACTIVATION=activation, BACKWARD=backward, BLOCK_K=config.block_k,
                                 BLOCK_R=block_r), config)
                    for by_token in (False, True):
                        add(_adapter_expand_kernel,
                            {"mid_ptr": mid, "w2_ptr": data, "weights_ptr": "*fp32", "tile_experts_ptr": "*i32",
                             "tile_ends_ptr": "*i32",
                             "expert_offsets_ptr": "*i32", "sorted_slots_ptr": "*i32",
                             "out_ptr": data if by_token else "*fp32"},
                            dtype, dict(base, BACKWARD=backward, OUT_BY_TOKEN=by_token,
                                        BLOCK_N=config.block_n, BLOCK_R=block_r), config)
            wgrad_pointers = {"left_ptr": data, "right_ptr": data, "weights_ptr": "*fp32",
                              "expert_offsets_ptr": "*i32", "sorted_slots_ptr": "*i32", "out_ptr": data}
            wgrad = dict(BLOCK_M=config.wgrad_block_m, UPCAST=False, DOT_PRECISION=precision)
            wgrad_config = dataclasses.replace(config, num_stages=config.wgrad_stages)
            aligned = table_config is not UNALIGNED_CONFIG
            add(_adapter_weight_grad_kernel, wgrad_pointers, dtype,
                dict(wgrad, D_UP=True, BLOCK_P=config.wgrad_block_h, BLOCK_Q=config.wgrad_block_r), wgrad_config,
                aligned)
            add(_adapter_weight_grad_kernel, wgrad_pointers, dtype,
                dict(wgrad, D_UP=False, BLOCK_P=config.wgrad_block_r, BLOCK_Q=config.wgrad_block_h), wgrad_config,
                aligned)
    combine = AdapterConfig(False, 16, 16, 16, 16, **_COMBINE_OPTIONS)  # only its warps and stages count
    for dtype in _COMPILE_DTYPES:
        for aligned in (True, False):
            add(_combine_slots_kernel, {"slot_rows_ptr": "*fp32", "out_ptr": _POINTER[dtype]}, dtype,
                dict(BLOCK_T=_COMBINE_BLOCK_T, BLOCK_N=_COMBINE_BLOCK_N), combine, aligned)
    return specs


COMPILE_SPECS = _compile_specs()


__all__ = ["adapter_moe_triton", "AdapterConfig", "ADAPTER_CONFIGS", "COMPILE_SPECS", "forced_config",
           "select_config", "shape_class"]
