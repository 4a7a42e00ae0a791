"""Routed adapter experts in Triton: PESC bottleneck adapters and routed LoRA, forward and backward.

    y[t] = sum_j weights[t,j] * scale * up_e(act(down_e h_t)),   e = ids[t,j]
    h [T,H] (made contiguous), down [E,r,H] and up [E,H,r] (any strides), weights [T,k] fp32, ids [T,k] int32,
    1 <= r <= 1024. Semantics: :func:`moe_kernels.reference.adapter_moe`.

Data flow (slot s = t*k + j; the dispatch plan, made inside the forward op, orders slots by expert, stably):

* Rows are processed per expert run of the plan in tiles of BLOCK_M sorted positions; the tile map of
  :mod:`moe_kernels.triton.common` (an on-device scan of tile counts, a binary search per program) tells
  each program its expert and rows: no host sync. Token rows are gathered by ``sorted_slots // k`` inside
  the loads: no permuted copy of ``h`` (or of the incoming gradient) is ever made.
* forward, *fused* path (whole padded rank in one tile, r <= 128): one program computes
  z = h_rows @ down_e^T over H, a = act(z) in registers, then sweeps the H output tiles with
  a @ up_e^T, scaling rows by scale * weight in the fp32 epilogue.
* forward, *split* path (any r; used for large r and for small T, where it exposes more programs):
  a shrink kernel writes a = act(z) [N, r] (N = T*k, small), an expand kernel reads it over r tiles.
* forward, *decode* path (at most 16 slots, no gradient, an aligned launch; ``adapter_decode`` in
  ``configs.json``): no plan; the fused kernel runs one program per expert over the slots routed to it
  (``common.program_rows``), then the slot combine: two launches.
* Output rows are written per slot in the output dtype and summed per token in fp32, in a fixed order, by the
  slot combine (deterministic, no atomics); with k = 1 the expand writes token rows directly.
* backward (fused for padded rank 16, split beyond) recomputes z in the same H sweep that forms
  u = up_e^T dy_t (two dots per step, one read of the rows), so the forward saves nothing but its inputs
  and the plan:
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

Layout of this module: kernels, configs (the 'adapter' families of ``configs.json``), launchers, the
registered ops ``moe_kernels_triton::adapter_moe_forward`` / ``adapter_moe_decode`` / ``adapter_moe_backward``
with fakes, the autograd Function pairing forward and backward, the backend entry point
:func:`adapter_moe_triton`, and the AOT compile list :data:`COMPILE_SPECS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..first_order import first_order_only
from ..spec import ACTIVATION_CODES, ADAPTER_ACTIVATIONS
from ..validation import check_finite_scalars
from . import configs
from .common import (COMBINE_BLOCK_N, COMBINE_BLOCK_T, COMBINE_OPTIONS, _combine_slots_kernel, activation,
                     activation_grad, cdiv, combine_slots, dot_precision, interpreting, launcher, max_tiles,
                     next_power_of_2, program_rows, register_op, tile_maps)
from .plan import dispatch_plan

# ----------------------------------------------------------------------------------------------------
# Triton helpers


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
    h_ptr, dy_ptr, down_ptr, stride_de, stride_dr, stride_dh, up_ptr, stride_ue, stride_uh, stride_ur, weights_ptr,
    tile_offsets_ptr, expert_offsets_ptr, sorted_slots_ptr,
    out_ptr, act_out_ptr, dz_out_ptr, dweights_ptr,
    top_k, H, R, num_experts, num_slots, search_steps, scale,
    ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, OUT_BY_TOKEN: tl.constexpr, BY_EXPERT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Shrink -> activation -> expand for one BLOCK_M-row tile of one expert, whole rank in one tile.

    h, dy: [T, H] contiguous; down [E, R, H] strides (de, dr, dh); up [E, H, R] strides (ue, uh, ur);
    weights [T*k] fp32 by slot; tile_offsets / expert_offsets [E+1], sorted_slots [N] int32: the plan and its
    tile map. R <= BLOCK_R. Grid: (max_tiles,). BY_EXPERT (forward only; the decode path, no plan): grid (E,),
    the three plan pointers hold the flat ids [N] (N = num_slots <= BLOCK_M) and each program takes every slot
    of its expert (``common.program_rows``).
    forward  (BACKWARD=0): out rows = scale * w_s * up_e(act(down_e h_t)).
    backward (BACKWARD=1): recomputes z = down_e h_t, forms u = up_e^T dy_t in the same H sweep;
        stores dweights[s] = scale <u, act(z)>, act(z) -> act_out [N, R], dz -> dz_out [N, R]
        (both by sorted position), and out rows = down_e^T dz (the per-slot d(h)).
    out: [T, H] when OUT_BY_TOKEN (k = 1), else [T*k, H] by slot; in the output dtype.
    """
    expert, positions, row_mask, slots, valid = program_rows(tl.program_id(0), tile_offsets_ptr, expert_offsets_ptr,
                                                             sorted_slots_ptr, num_experts, num_slots, search_steps,
                                                             BLOCK_M, BY_EXPERT)
    if valid:
        token_rows = (slots // top_k).to(tl.int64) * H
        r_offs = tl.arange(0, BLOCK_R)
        r_mask = r_offs < R
        down_e = down_ptr + expert.to(tl.int64) * stride_de
        up_e = up_ptr + expert.to(tl.int64) * stride_ue

        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        z = _shrink_accumulate(z, h_ptr, token_rows, row_mask, down_e, stride_dh, stride_dr, r_offs, r_mask, H,
                               BLOCK_K, UPCAST, DOT_PRECISION)
        routing = tl.load(weights_ptr + slots, mask=row_mask, other=0.0) * scale
        activated = activation(z, ACTIVATION)
        if BACKWARD:
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            u = _shrink_accumulate(u, dy_ptr, token_rows, row_mask, up_e, stride_uh, stride_ur, r_offs, r_mask, H,
                                   BLOCK_K, UPCAST, DOT_PRECISION)
            tl.store(dweights_ptr + slots, scale * tl.sum(u * activated, axis=1), mask=row_mask)
            middle = u * activation_grad(z, ACTIVATION) * routing[:, None]
            mid_rows = positions.to(tl.int64) * R
            _store_rows(act_out_ptr, mid_rows, row_mask, r_offs, r_mask, activated)
            _store_rows(dz_out_ptr, mid_rows, row_mask, r_offs, r_mask, middle)
            # expand with down_e: W2[rr, n] = down[e, rr, n]
            w2_e, stride_w2r, stride_w2n = down_e, stride_dr, stride_dh
            row_scale = tl.full((BLOCK_M,), 1.0, tl.float32)
        else:
            middle = activated
            w2_e, stride_w2r, stride_w2n = up_e, stride_ur, stride_uh
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
    h_ptr, dy_ptr, down_ptr, stride_de, stride_dr, stride_dh, up_ptr, stride_ue, stride_uh, stride_ur, weights_ptr,
    tile_offsets_ptr, expert_offsets_ptr, sorted_slots_ptr,
    act_out_ptr, dz_out_ptr, dweights_partial_ptr,
    top_k, H, R, num_experts, search_steps, scale,
    ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split path, shrink half: one (row tile, rank tile) per program. Grid: (max_tiles, cdiv(R, BLOCK_R)).
    Arguments as in the fused kernel.

    forward:  act_out[pos, r] = act(down_e h_t)  ([N, R] by sorted position).
    backward: also u = up_e^T dy_t; act_out = act(z), dz_out = scale w_s u act'(z), and
              dweights_partial[s, rank_tile] = scale <u, act(z)> over this rank tile ([N, cdiv(R, BLOCK_R)] fp32).
    """
    expert, positions, row_mask, slots, valid = program_rows(tl.program_id(0), tile_offsets_ptr, expert_offsets_ptr,
                                                             sorted_slots_ptr, num_experts, 0, search_steps, BLOCK_M,
                                                             False)
    if valid:
        rank_tile = tl.program_id(1)
        token_rows = (slots // top_k).to(tl.int64) * H
        r_offs = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r_offs < R
        down_e = down_ptr + expert.to(tl.int64) * stride_de
        z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        z = _shrink_accumulate(z, h_ptr, token_rows, row_mask, down_e, stride_dh, stride_dr, r_offs, r_mask, H,
                               BLOCK_K, UPCAST, DOT_PRECISION)
        activated = activation(z, ACTIVATION)
        mid_rows = positions.to(tl.int64) * R
        _store_rows(act_out_ptr, mid_rows, row_mask, r_offs, r_mask, activated)
        if BACKWARD:
            up_e = up_ptr + expert.to(tl.int64) * stride_ue
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            u = _shrink_accumulate(u, dy_ptr, token_rows, row_mask, up_e, stride_uh, stride_ur, r_offs, r_mask, H,
                                   BLOCK_K, UPCAST, DOT_PRECISION)
            routing = tl.load(weights_ptr + slots, mask=row_mask, other=0.0) * scale
            num_rank_tiles = tl.num_programs(1)
            tl.store(dweights_partial_ptr + slots * num_rank_tiles + rank_tile,
                     scale * tl.sum(u * activated, axis=1), mask=row_mask)
            middle = u * activation_grad(z, ACTIVATION) * routing[:, None]
            _store_rows(dz_out_ptr, mid_rows, row_mask, r_offs, r_mask, middle)


@triton.jit
def _adapter_expand_kernel(
    mid_ptr, w2_ptr, stride_w2e, stride_w2r, stride_w2n, weights_ptr,
    tile_offsets_ptr, expert_offsets_ptr, sorted_slots_ptr, out_ptr,
    top_k, H, R, num_experts, search_steps, scale,
    BACKWARD: tl.constexpr, OUT_BY_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split path, expand half: out rows [BLOCK_M, BLOCK_N] = mid[pos, :R] @ W2_e, over rank tiles.

    mid [N, R] contiguous, by sorted position. W2_e[rr, n] = w2[e*stride_w2e + rr*stride_w2r + n*stride_w2n]:
    forward W2 = up [E, H, R] as (ue, ur, uh), rows scaled by scale * weights[s]; backward W2 = down [E, R, H]
    as (de, dr, dh) (mid = dz already carries the routing weight).
    Grid: (max_tiles, cdiv(H, BLOCK_N)). out as in the fused kernel.
    """
    expert, positions, row_mask, slots, valid = program_rows(tl.program_id(0), tile_offsets_ptr, expert_offsets_ptr,
                                                             sorted_slots_ptr, num_experts, 0, search_steps, BLOCK_M,
                                                             False)
    if valid:
        n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n_offs < H
        w2_e = w2_ptr + expert.to(tl.int64) * stride_w2e
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


# ----------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class AdapterConfig:
    """Launch parameters of the adapter kernels for one shape class (an entry of the 'adapter' families
    of ``configs.json``; the fields are described there).

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

    @classmethod
    def from_entry(cls, entry: dict) -> "AdapterConfig":
        return cls(**{f.name: entry[f.name] for f in dataclasses.fields(cls) if f.name in entry})

    @property
    def wgrad_stages(self) -> int:
        return self.num_stages if self.wgrad_num_stages is None else self.wgrad_num_stages


def table_configs() -> list[AdapterConfig]:
    """Every config the table ships (the 'adapter' family, then 'adapter_unaligned'), for the compile check."""
    return [AdapterConfig.from_entry(entry) for entry in (*configs.entries("adapter"),
                                                          *configs.entries("adapter_unaligned"))]


def unaligned_config() -> AdapterConfig:
    return AdapterConfig.from_entry(configs.adapter_config(0, 0, aligned=False))


# Under the interpreter cost grows with programs x loop steps: one wide tile for the small test shapes.
_INTERPRETER_BLOCK = 64

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


# The fused backward holds two [BLOCK_M, BLOCK_R] fp32 accumulators (z and u) through the expand
# sweep; beyond this rank tile it spills, so larger ranks take the split backward.
FUSED_BACKWARD_MAX_RANK_TILE = 16
# Likewise the split backward's shrink (z and u accumulators) tiles the rank by at most 64.
SPLIT_BACKWARD_MAX_BLOCK_R = 64


def for_dtype(config: AdapterConfig, dtype: torch.dtype) -> AdapterConfig:
    """fp32 inputs: tl.dot runs as exact fp32 FMA (unless TF32 is allowed) and its operands take twice
    the registers, so tiles shrink (the table's sizes are for fp16/bf16). The weight-gradient kernel is not
    pipelined in fp32: with two stages it took up to 255 registers on sm_80 and spilled on sm_90 (r = 16).
    Rows per tile at most 16 and at most 4 warps: with the weights read through their strides, 32-row tiles
    spilled 8-40 bytes on sm_80 or sm_90 in some variant at every warp count and pipeline depth tried (at 56-255
    registers; ptxas' choice more than register pressure), 16-row tiles at 4 warps and 2 stages in none."""
    if dtype != torch.float32:
        return config
    return dataclasses.replace(
        config, block_m=min(config.block_m, 16), block_k=min(config.block_k, 32), block_n=min(config.block_n, 64),
        block_r=min(config.block_r, 32), num_warps=min(config.num_warps, 4), num_stages=min(config.num_stages, 2),
        wgrad_block_m=min(config.wgrad_block_m, 32), wgrad_block_h=min(config.wgrad_block_h, 64),
        wgrad_block_r=min(config.wgrad_block_r, 32), wgrad_num_stages=1)


def select_config(num_slots: int, rank: int, dtype: torch.dtype = torch.bfloat16, aligned: bool = True
                  ) -> AdapterConfig:
    """The table's config for this shape and dtype (a fused config whose block_r is below the padded rank
    falls back to the split path). ``aligned`` (:func:`_aligned`) false: the unaligned entry, as it is."""
    if _forced_config is not None:
        return _forced_config
    if not aligned:
        return unaligned_config()
    config = for_dtype(AdapterConfig.from_entry(configs.adapter_config(num_slots, rank)), dtype)
    if config.fused and _rank_tile(rank) > config.block_r:
        config = dataclasses.replace(config, fused=False)
    return config


def _rank_tile(rank: int) -> int:
    return max(16, next_power_of_2(rank))


def decode_config(num_slots: int, rank: int, dtype: torch.dtype) -> AdapterConfig | None:
    """The config of the forward without a plan (``adapter_decode`` in ``configs.json``, fp32-capped like every
    config), or None when ``num_slots`` do not fit its block_m rows or the padded rank its block_r."""
    config = for_dtype(AdapterConfig.from_entry(configs.adapter_decode_entry()), dtype)
    if num_slots > config.block_m or _rank_tile(rank) > config.block_r:
        return None
    return config


# ----------------------------------------------------------------------------------------------------
# launchers


def _aligned(h, down, up, *tensors) -> bool:
    """Whether a launch is the specialisation the table's configs are compiled (and checked spill-free)
    for: H a multiple of 16, 16-byte aligned tensors, weights row-major (unit last stride, as the JIT
    specialises it)."""
    return (h.shape[1] % 16 == 0 and down.stride(2) == 1 and up.stride(2) == 1
            and all(t.data_ptr() % 16 == 0 for t in (h, down, up, *tensors)))


def _launch_params(h, down, up, weights, expert_offsets, sorted_slots, grad=None):
    T, H = h.shape
    E, R, _ = down.shape
    k = weights.shape[1]
    N = T * k
    extra = (weights, expert_offsets, sorted_slots, *([grad] if grad is not None else []))
    config = select_config(N, R, h.dtype, _aligned(h, down, up, *extra))
    interp = interpreting()
    if interp:  # fewer, wider tiles: the interpreter's cost is per program and loop step
        config = dataclasses.replace(config, block_k=_INTERPRETER_BLOCK, block_n=_INTERPRETER_BLOCK,
                                     wgrad_block_h=_INTERPRETER_BLOCK, num_stages=1)
    tiles = dict(tile_offsets_ptr=tile_maps(expert_offsets, config.block_m)[0], expert_offsets_ptr=expert_offsets,
                 sorted_slots_ptr=sorted_slots)
    return dict(T=T, H=H, E=E, R=R, k=k, N=N, config=config, tiles=tiles, row_tiles=max_tiles(N, E, config.block_m),
                upcast=interp, precision=dot_precision(h.dtype), steps=E.bit_length())


def _mid_dtype(h):
    # [N, r] intermediates: input dtype on GPUs (tensor-core operand), fp32 under the interpreter
    return torch.float32 if interpreting() else h.dtype


def _weights(down, up):
    """The adapter weights with their strides, as the shrink kernels take them."""
    return (down, *down.stride(), up, *up.stride())


def _forward_impl(h, down, up, weights, expert_offsets, sorted_slots, activation, scale):
    p = _launch_params(h, down, up, weights, expert_offsets, sorted_slots)
    T, H, E, R, k, N, cfg = p["T"], p["H"], p["E"], p["R"], p["k"], p["N"], p["config"]
    out = torch.empty((N, H), dtype=h.dtype, device=h.device)  # by token when k = 1
    act = ACTIVATION_CODES[activation]
    common = dict(BLOCK_M=cfg.block_m, UPCAST=p["upcast"], DOT_PRECISION=p["precision"],
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **p["tiles"])
    if cfg.fused:
        launcher(_adapter_fused_kernel, (p["row_tiles"],))(
            h, h, *_weights(down, up), weights, out_ptr=out, act_out_ptr=out, dz_out_ptr=out, dweights_ptr=weights,
            top_k=k, H=H, R=R, num_experts=E, num_slots=N, search_steps=p["steps"], scale=scale,
            ACTIVATION=act, BACKWARD=False, OUT_BY_TOKEN=k == 1, BY_EXPERT=False, BLOCK_K=cfg.block_k,
            BLOCK_N=cfg.block_n, BLOCK_R=_rank_tile(R), **common)
    else:
        block_r = min(cfg.block_r, _rank_tile(R))
        activated = torch.empty((N, R), dtype=_mid_dtype(h), device=h.device)
        launcher(_adapter_shrink_kernel, (p["row_tiles"], cdiv(R, block_r)))(
            h, h, *_weights(down, up), weights, act_out_ptr=activated, dz_out_ptr=activated,
            dweights_partial_ptr=weights, top_k=k, H=H, R=R, num_experts=E, search_steps=p["steps"], scale=scale,
            ACTIVATION=act, BACKWARD=False, BLOCK_K=cfg.block_k, BLOCK_R=block_r, **common)
        launcher(_adapter_expand_kernel, (p["row_tiles"], cdiv(H, cfg.block_n)))(
            activated, up, up.stride(0), up.stride(2), up.stride(1), weights, out_ptr=out,
            top_k=k, H=H, R=R, num_experts=E, search_steps=p["steps"], scale=scale, BACKWARD=False,
            OUT_BY_TOKEN=k == 1, BLOCK_N=cfg.block_n, BLOCK_R=block_r, **common)
    return combine_slots(out, T, k, h.dtype)


def _decode_forward(h, down, up, weights, ids, activation, scale, cfg):
    """Forward without a plan for a few routed slots (decode): the fused kernel in BY_EXPERT mode, one program
    per expert taking every slot routed to it, then the slot combine. Two launches (one for k = 1)."""
    T, H = h.shape
    E, R, _ = down.shape
    k = ids.shape[1]
    N = T * k
    if interpreting():  # fewer, wider steps (see _launch_params)
        cfg = dataclasses.replace(cfg, block_k=_INTERPRETER_BLOCK, block_n=_INTERPRETER_BLOCK, num_stages=1)
    out = torch.empty((N, H), dtype=h.dtype, device=h.device)  # by token when k = 1
    flat = ids.reshape(-1)
    launcher(_adapter_fused_kernel, (E,))(
        h, h, *_weights(down, up), weights, tile_offsets_ptr=flat, expert_offsets_ptr=flat, sorted_slots_ptr=flat,
        out_ptr=out, act_out_ptr=out, dz_out_ptr=out, dweights_ptr=weights, top_k=k, H=H, R=R, num_experts=E,
        num_slots=N, search_steps=0, scale=scale, ACTIVATION=ACTIVATION_CODES[activation], BACKWARD=False,
        OUT_BY_TOKEN=k == 1, BY_EXPERT=True, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
        BLOCK_R=_rank_tile(R), UPCAST=interpreting(), DOT_PRECISION=dot_precision(h.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return combine_slots(out, T, k, h.dtype)


def _backward_impl(grad, h, down, up, weights, expert_offsets, sorted_slots, activation, scale,
                   weight_grads):
    p = _launch_params(h, down, up, weights, expert_offsets, sorted_slots, grad)
    T, H, E, R, k, N, cfg = p["T"], p["H"], p["E"], p["R"], p["k"], p["N"], p["config"]
    act = ACTIVATION_CODES[activation]
    common = dict(BLOCK_M=cfg.block_m, UPCAST=p["upcast"], DOT_PRECISION=p["precision"],
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **p["tiles"])
    sizes = dict(top_k=k, H=H, R=R, num_experts=E, search_steps=p["steps"], scale=scale)
    activated = torch.empty((N, R), dtype=_mid_dtype(h), device=h.device)
    dz = torch.empty((N, R), dtype=_mid_dtype(h), device=h.device)
    dh_rows = torch.empty((N, H), dtype=h.dtype, device=h.device)  # by token when k = 1
    if cfg.fused and (_rank_tile(R) <= FUSED_BACKWARD_MAX_RANK_TILE or _forced_config is not None):
        dweights = torch.empty((N,), dtype=torch.float32, device=h.device)
        launcher(_adapter_fused_kernel, (p["row_tiles"],))(
            h, grad, *_weights(down, up), weights, out_ptr=dh_rows, act_out_ptr=activated, dz_out_ptr=dz,
            dweights_ptr=dweights, **sizes, num_slots=N, ACTIVATION=act, BACKWARD=True, OUT_BY_TOKEN=k == 1,
            BY_EXPERT=False, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_R=_rank_tile(R), **common)
    else:
        block_r = min(cfg.block_r, SPLIT_BACKWARD_MAX_BLOCK_R, _rank_tile(R))
        rank_tiles = cdiv(R, block_r)
        partial = torch.empty((N, rank_tiles), dtype=torch.float32, device=h.device)
        launcher(_adapter_shrink_kernel, (p["row_tiles"], rank_tiles))(
            h, grad, *_weights(down, up), weights, act_out_ptr=activated, dz_out_ptr=dz,
            dweights_partial_ptr=partial, **sizes, ACTIVATION=act, BACKWARD=True, BLOCK_K=cfg.block_k,
            BLOCK_R=block_r, **common)
        dweights = partial.sum(dim=1) if rank_tiles > 1 else partial.view(N)
        launcher(_adapter_expand_kernel, (p["row_tiles"], cdiv(H, cfg.block_n)))(
            dz, down, *down.stride(), weights, out_ptr=dh_rows, **sizes, BACKWARD=True, OUT_BY_TOKEN=k == 1,
            BLOCK_N=cfg.block_n, BLOCK_R=block_r, **common)
    dh = combine_slots(dh_rows, T, k, h.dtype)
    if not weight_grads:
        return dh, None, None, dweights.view(T, k)
    # contiguous [E, H, r] / [E, r, H] (the kernel writes row-major; empty_like would keep a view's strides)
    d_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    d_down = torch.empty(down.shape, dtype=down.dtype, device=down.device)
    wgrad = dict(UPCAST=p["upcast"], DOT_PRECISION=p["precision"], BLOCK_M=cfg.wgrad_block_m,
                 num_warps=cfg.num_warps, num_stages=cfg.wgrad_stages)
    block_h = cfg.wgrad_block_h
    block_r = min(cfg.wgrad_block_r, _rank_tile(R))
    # d(up)[e] [H, R] = sum (scale w dy_t)^T act(z)
    launcher(_adapter_weight_grad_kernel, (E, cdiv(H, block_h), cdiv(R, block_r)))(
        grad, activated, weights, expert_offsets, sorted_slots, d_up,
        k, H, R, scale, D_UP=True,
        BLOCK_P=block_h, BLOCK_Q=block_r, **wgrad)
    # d(down)[e] [R, H] = sum dz^T h_t
    launcher(_adapter_weight_grad_kernel, (E, cdiv(R, block_r), cdiv(H, block_h)))(
        dz, h, weights, expert_offsets, sorted_slots, d_down,
        k, H, R, scale, D_UP=False,
        BLOCK_P=block_r, BLOCK_Q=block_h, **wgrad)
    return dh, d_down, d_up, dweights.view(T, k)


# ----------------------------------------------------------------------------------------------------
# registered ops (moe_kernels_triton::adapter_moe_forward / adapter_moe_backward) and autograd


def _forward_op_impl(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     activation: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T,H] contiguous, down [E,r,H], up [E,H,r] (any strides), weights [T,k] fp32 contiguous, ids [T,k]
    int32 -> (y [T,H] in h's dtype, expert_offsets [E+1], sorted_slots [T*k]): the output and the plan the
    backward reuses."""
    check_finite_scalars(scale=scale)  # a traced float reaches the op unchecked (validation.finite_or_traced)
    plan = dispatch_plan(ids, down.shape[0])
    y = _forward_impl(h, down, up, weights, plan.expert_offsets, plan.sorted_slots, activation, scale)
    return y, plan.expert_offsets, plan.sorted_slots


def _forward_op_fake(h, down, up, weights, ids, activation, scale):
    return (torch.empty_like(h), ids.new_empty((down.shape[0] + 1,), dtype=torch.int32),
            ids.new_empty((ids.numel(),), dtype=torch.int32))


def _inference_op_impl(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       activation: str, scale: float) -> torch.Tensor:
    """y [T,H] of a forward that needs no gradient: the decode path for launches :func:`decode_config` takes (and
    aligned ones, without a forced config, which is for the planned kernels), else the planned forward. The choice
    is made inside the op so that torch.compile traces one opaque call, never the config table or data pointers."""
    check_finite_scalars(scale=scale)  # a traced float reaches the op unchecked (validation.finite_or_traced)
    cfg = decode_config(ids.numel(), down.shape[1], h.dtype)
    if _forced_config is None and cfg is not None and _aligned(h, down, up, weights, ids):
        return _decode_forward(h, down, up, weights, ids, activation, scale, cfg)
    return _forward_op_impl(h, down, up, weights, ids, activation, scale)[0]


def _inference_op_fake(h, down, up, weights, ids, activation, scale):
    return torch.empty_like(h)


def _backward_op_impl(grad: torch.Tensor, h: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                      weights: torch.Tensor, expert_offsets: torch.Tensor, sorted_slots: torch.Tensor,
                      activation: str, scale: float, weight_grads: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h [T,H], d down [E,r,H], d up [E,H,r] (contiguous), d weights [T,k] fp32). Without ``weight_grads``
    the expert-weight gradients are skipped and returned as empty tensors (frozen experts)."""
    dh, d_down, d_up, dweights = _backward_impl(grad, h, down, up, weights, expert_offsets, sorted_slots,
                                                activation, scale, weight_grads)
    if not weight_grads:
        d_down, d_up = down.new_empty(0), up.new_empty(0)
    return dh, d_down, d_up, dweights


def _backward_op_fake(grad, h, down, up, weights, expert_offsets, sorted_slots, activation, scale, weight_grads):
    if weight_grads:
        return torch.empty_like(h), down.new_empty(down.shape), up.new_empty(up.shape), torch.empty_like(weights)
    return torch.empty_like(h), down.new_empty(0), up.new_empty(0), torch.empty_like(weights)


adapter_moe_forward_op = register_op("adapter_moe_forward", _forward_op_impl, _forward_op_fake)
adapter_moe_inference_op = register_op("adapter_moe_inference", _inference_op_impl, _inference_op_fake)
adapter_moe_backward_op = register_op("adapter_moe_backward", _backward_op_impl, _backward_op_fake)


class AdapterMoEFunction(torch.autograd.Function):
    """Routed adapter experts with their backward: the forward op's plan is kept for the backward op."""

    @staticmethod
    def forward(ctx, h, down, up, weights, ids, activation, scale):
        y, expert_offsets, sorted_slots = adapter_moe_forward_op(h, down, up, weights, ids, activation, scale)
        ctx.save_for_backward(h, down, up, weights, expert_offsets, sorted_slots)
        ctx.activation, ctx.scale = activation, scale
        return y

    @staticmethod
    @first_order_only("adapter_moe (triton)")
    def backward(ctx, grad):
        h, down, up, weights, expert_offsets, sorted_slots = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight_grads = bool(need[1] or need[2])
        dh, d_down, d_up, dweights = adapter_moe_backward_op(grad.contiguous(), h, down, up, weights, expert_offsets,
                                                             sorted_slots, ctx.activation, ctx.scale, weight_grads)
        return (dh if need[0] else None, d_down if need[1] else None, d_up if need[2] else None,
                dweights if need[3] else None, None, None, None)


def adapter_moe_triton(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, activation: str = "gelu", scale: float = 1.0) -> torch.Tensor:
    """Backend entry point (arguments validated and normalised by :func:`moe_kernels.ops.adapter_moe`: weights
    [T,k] float32, ids [T,k] int32 contiguous in [0, E), activation in ``spec.ADAPTER_ACTIVATIONS``, 1 <= r <=
    1024): y [T,H] in h's dtype, differentiable w.r.t. h, down, up and weights."""
    h = h.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (h, down, up, weights)):
        return AdapterMoEFunction.apply(h, down, up, weights, ids, activation, float(scale))
    return adapter_moe_inference_op(h, down, up, weights, ids, activation, float(scale))


# ----------------------------------------------------------------------------------------------------
# ahead-of-time compile list (for ``moe-kernels compile-check``)

_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Per config: the largest rank tile it launches (its worst case), every activation (each is its own
# compiled kernel; their register needs differ by tens of registers, no single one is the worst).
_COMPILE_DTYPES = (torch.bfloat16, torch.float32)
_ADAPTER_CODES = tuple(ACTIVATION_CODES[name] for name in ADAPTER_ACTIVATIONS)
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
# unaligned config unless H % 16 == 0 (and the tensors are 16-byte aligned), and Triton's JIT marks such
# arguments tt.divisibility=16, which is what lets it vectorise the row loads. The compile check gives
# the same hints (pointers are taken 16-byte aligned), so it compiles the variant that really runs.
# The weights' element strides that are multiples of H (row-major [E, r, H] / [E, H, r]) are too; those that
# are multiples of R go with the R specialisation below, and the unit strides are constexprs (the JIT
# specialises an integer 1).
_TABLE_DIVISIBLE = ("H", "stride_de", "stride_dr", "stride_ue")
_RANK_DIVISIBLE = ("R", "stride_uh")
_UNIT_STRIDES = ("stride_dh", "stride_ur")


def _compile_specs():
    """``(kernel, signature, constexprs, options, divisible)`` for every kernel at every shipped config
    (and the unaligned fallback), in the compile check's format (see
    :func:`moe_kernels.triton.compile_check.collect_specs`); identical specialisations are listed once."""
    specs, seen = [], set()

    def add(kernel, pointers, dtype, constexprs, config, aligned=None):
        names = kernel.arg_names
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if aligned is None:
            aligned = config != unaligned
        constexprs = dict(constexprs, **{name: 1 for name in _UNIT_STRIDES if name in names})
        if constexprs.get("OUT_BY_TOKEN"):
            constexprs["top_k"] = 1  # by-token output is the k = 1 launch, which the JIT specialises to a constant
        if kernel is _adapter_expand_kernel:  # W2 is up (forward) or down (backward), as the launcher passes it
            if constexprs["BACKWARD"]:
                constexprs["stride_w2n"] = 1
                table_divisible, rank_divisible = ("H", "stride_w2e", "stride_w2r"), ("R",)
            else:
                constexprs["stride_w2r"] = 1
                table_divisible, rank_divisible = ("H", "stride_w2e"), ("R", "stride_w2n")
        else:
            table_divisible, rank_divisible = _TABLE_DIVISIBLE, _RANK_DIVISIBLE
        base = tuple(n for n in table_divisible if n in names) if aligned else ()
        extra = tuple(n for n in rank_divisible if n in names)
        # the rank R is a multiple of 16 (16, 32, 64, ...) or not (1-15, 24, 100, ...): both specialisations run
        for divisible in (base, base + extra) if extra else (base,):
            key = (kernel.__name__, tuple(sorted(pointers.items())), tuple(sorted(constexprs.items())),
                   tuple(sorted(options.items())), divisible)
            if key not in seen:
                seen.add(key)
                signature = _signature(names, pointers, dtype, constexprs)
                specs.append((kernel, signature, constexprs, options, divisible))

    unaligned = unaligned_config()
    for table_config in table_configs():
        for dtype, precision in _COMPILE_VARIANTS:
            config = table_config if table_config == unaligned else for_dtype(table_config, dtype)
            data = _POINTER[dtype]
            mid = data  # [N, r] intermediates are kept in the input dtype on GPUs
            base = dict(BLOCK_M=config.block_m, UPCAST=False, DOT_PRECISION=precision)
            tile_map = {"tile_offsets_ptr": "*i32", "expert_offsets_ptr": "*i32", "sorted_slots_ptr": "*i32"}
            routed = dict(tile_map, h_ptr=data, dy_ptr=data, down_ptr=data, up_ptr=data, weights_ptr="*fp32")
            for backward in (False, True):
                if config.fused and not (backward and config.block_r > FUSED_BACKWARD_MAX_RANK_TILE):
                    for code, by_token in itertools.product(_ADAPTER_CODES, (False, True)):
                        add(_adapter_fused_kernel,
                            dict(routed, out_ptr=data, act_out_ptr=mid, dz_out_ptr=mid, dweights_ptr="*fp32"),
                            dtype, dict(base, ACTIVATION=code, BACKWARD=backward, OUT_BY_TOKEN=by_token,
                                        BY_EXPERT=False, BLOCK_K=config.block_k, BLOCK_N=config.block_n,
                                        BLOCK_R=config.block_r),
                            config)
                else:
                    block_r = min(config.block_r, SPLIT_BACKWARD_MAX_BLOCK_R) if backward else config.block_r
                    for code in _ADAPTER_CODES:
                        add(_adapter_shrink_kernel,
                            dict(routed, act_out_ptr=mid, dz_out_ptr=mid, dweights_partial_ptr="*fp32"), dtype,
                            dict(base, ACTIVATION=code, BACKWARD=backward, BLOCK_K=config.block_k,
                                 BLOCK_R=block_r), config)
                    for by_token in (False, True):
                        add(_adapter_expand_kernel,
                            dict(tile_map, mid_ptr=mid, w2_ptr=data, weights_ptr="*fp32",
                                 out_ptr=data),
                            dtype, dict(base, BACKWARD=backward, OUT_BY_TOKEN=by_token,
                                        BLOCK_N=config.block_n, BLOCK_R=block_r), config)
            wgrad_pointers = {"left_ptr": data, "right_ptr": data, "weights_ptr": "*fp32",
                              "expert_offsets_ptr": "*i32", "sorted_slots_ptr": "*i32", "out_ptr": data}
            wgrad = dict(BLOCK_M=config.wgrad_block_m, UPCAST=False, DOT_PRECISION=precision)
            wgrad_config = dataclasses.replace(config, num_stages=config.wgrad_stages)
            aligned = table_config != unaligned
            add(_adapter_weight_grad_kernel, wgrad_pointers, dtype,
                dict(wgrad, D_UP=True, BLOCK_P=config.wgrad_block_h, BLOCK_Q=config.wgrad_block_r), wgrad_config,
                aligned)
            add(_adapter_weight_grad_kernel, wgrad_pointers, dtype,
                dict(wgrad, D_UP=False, BLOCK_P=config.wgrad_block_r, BLOCK_Q=config.wgrad_block_h), wgrad_config,
                aligned)
    decode_entry = AdapterConfig.from_entry(configs.adapter_decode_entry())
    for dtype, precision in _COMPILE_VARIANTS:  # the decode path: the fused forward by expert, aligned launches only
        config, data = for_dtype(decode_entry, dtype), _POINTER[dtype]
        pointers = {"tile_offsets_ptr": "*i32", "expert_offsets_ptr": "*i32", "sorted_slots_ptr": "*i32",
                    "h_ptr": data, "dy_ptr": data, "down_ptr": data, "up_ptr": data, "weights_ptr": "*fp32",
                    "act_out_ptr": data, "dz_out_ptr": data, "dweights_ptr": "*fp32"}
        for code, by_token in itertools.product(_ADAPTER_CODES, (False, True)):
            add(_adapter_fused_kernel, dict(pointers, out_ptr=data), dtype,
                dict(BLOCK_M=config.block_m, UPCAST=False, DOT_PRECISION=precision, ACTIVATION=code, BACKWARD=False,
                     OUT_BY_TOKEN=by_token, BY_EXPERT=True, BLOCK_K=config.block_k, BLOCK_N=config.block_n,
                     BLOCK_R=config.block_r), config, True)
    combine = AdapterConfig(False, 16, 16, 16, 16, **COMBINE_OPTIONS)  # only its warps and stages count
    for dtype in _COMPILE_DTYPES:  # the slot combine (triton/common.py) of both kernel modules
        for aligned in (True, False):
            add(_combine_slots_kernel, {"slot_rows_ptr": _POINTER[dtype], "out_ptr": _POINTER[dtype]}, dtype,
                dict(BLOCK_T=COMBINE_BLOCK_T, BLOCK_N=COMBINE_BLOCK_N), combine, aligned)
    return specs


COMPILE_SPECS = _compile_specs()


__all__ = ["adapter_moe_triton", "adapter_moe_forward_op", "adapter_moe_inference_op", "adapter_moe_backward_op",
           "AdapterConfig", "COMPILE_SPECS", "decode_config", "forced_config", "select_config", "table_configs"]
