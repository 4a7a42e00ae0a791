"""Gather-GEMM-scatter expert MLP in Triton, forward and backward.

Semantics: :func:`moe_kernels.reference.moe_mlp`. Data flow (N = T*k routed slots, rows in *sorted
order* p = position of a slot in the dispatch plan, so each expert owns one contiguous run of rows):

forward
  plan        :func:`moe_kernels.triton.plan.dispatch_plan` (on device) + per-expert tile counts
              scanned on device (``common.tile_maps``: the block sizes of the forward's and the backward's
              kernels in one launch, kept for the backward); programs find their expert by binary search,
              so nothing waits on the host.
  gate/up     ``_gate_up_kernel``: act[p] = gated_act(x[token(p)] @ W_gu[e]^T + b_gu[e]); the row
              gather is in the x loads, gate and up are two accumulators of one K loop, the activation
              is the epilogue. Under autograd it also stores the pre-activation ``pre`` [N, 2I].
  down        ``_rows_matmul_kernel``: out[slot(p)] = w[slot] * (act[p] @ W_d[e]^T + b_d[e]), stored at
              the slot's row (a scatter, no atomics); y[t] = sum_j out[t*k + j] in fixed order (for
              k = 1 the slot rows *are* y).
backward (nothing permuted is kept but ``pre``, and with MOE_KERNELS_RECOMPUTE=1 not even that: the
          backward re-runs the gate/up GEMM; the activation is always recomputed from ``pre``)
  ``_down_backward_kernel``  G[p] = dy[token(p)] @ W_d[e] (transposed gather-GEMM); epilogue: d(weight)
              partials <act, G> (+ <b_d, dy>), and d pre = act'(pre) * w * G. Split where the config asks
              (``split_down_backward_tile``: the class of the most rows per expert): G by ``_gate_up_kernel`` as a
              plain gather-GEMM with a wide tile, then ``_activation_backward_kernel`` (the same epilogue, elementwise).
  ``_rows_matmul_kernel``    dx slot rows = d pre[p] @ W_gu[e], combined like the forward.
  ``_expert_outer_kernel``   per-expert grouped GEMMs over the expert's row run: dW_d[e] = (w dy)^T act,
              dW_gu[e] = d pre^T x (k-grouped: the reduction runs over the token segment), bias grads
              as row sums.

Deterministic: every output element is written by one program, reductions run in a fixed order.
On GPUs the GEMMs run on tensor cores in the input dtype with fp32 accumulation (fp32 inputs use TF32
only if ``torch.backends.cuda.matmul.allow_tf32``); under
TRITON_INTERPRET=1 (``UPCAST``) operands are converted to fp32 first because the interpreter computes
bf16 wrongly.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import device_capability, fp32_int32_routing
from ..first_order import first_order_only
from ..spec import ACTIVATION_CODES
from ..validation import check_finite_scalars
from .common import (_TILE_SCAN_BLOCK_E, TILE_MAPS, _tile_scan_kernel, cdiv, combine_slots, dot_precision, find_tile,
                     gated_backward, gated_forward, interpreting, launcher, max_tiles, operand, program_rows,
                     register_op, tile_and_column, tile_maps)
from .configs import decode_config, entries, grouped_mm_wgrad_wanted, mlp_config, one_token_config
from .plan import dispatch_plan


def recompute_enabled() -> bool:
    """MOE_KERNELS_RECOMPUTE=1: keep no [N, 2I] pre-activation for backward; recompute it there (one more
    gate/up GEMM, saves 2*N*I elements of activation memory per layer)."""
    return os.environ.get("MOE_KERNELS_RECOMPUTE", "0") not in ("", "0")


DEFAULT_GROUP_M = 8  # row tiles per group (common.tile_and_column): the value of Triton's matmul tutorial


def configured_group_m(cfg: dict) -> int:
    """The program order a config asks for: its GROUP_M, else DEFAULT_GROUP_M (what the compile check compiles)."""
    return cfg.get("GROUP_M", DEFAULT_GROUP_M)


def group_m(cfg: dict) -> int:
    """The program order of a planned GEMM launch (common.tile_and_column): MOE_KERNELS_GROUP_M when set (0 = the
    launch order every release before it used, for side-by-side timing), else :func:`configured_group_m`."""
    choice = os.environ.get("MOE_KERNELS_GROUP_M", "")
    if not choice:
        return configured_group_m(cfg)
    if not choice.isdigit():
        raise ValueError(f"MOE_KERNELS_GROUP_M must be a whole number (0 = launch order), not {choice!r}")
    return int(choice)


def split_down_backward_tile(entry: dict) -> Optional[dict]:
    """The GEMM tile of the split backward through the down GEMM and the activation (:func:`_split_down_backward`:
    G as a plain gather-GEMM, then an elementwise pass), or None where it runs fused (``_down_backward_kernel``, the
    activation's backward in the GEMM's epilogue). ``entry``: the call's 'mlp' config entry.

    MOE_KERNELS_DOWN_BWD = "split" / "fused" when set (side-by-side timing), else split where the entry's
    'down_bwd' config holds a ``split`` tile. The tile's rows are always down_bwd's BLOCK_M (the forward made the
    tile map for them) and its program order down_bwd's; a forced split without a ``split`` tile takes the
    entry's 'dx' tile (a plain GEMM of the same rows class).

    Why split (by arithmetic, not measured yet): the fused epilogue holds pre's gate and up tiles beside the
    accumulator, so its tile stays narrow (128x32 at the most rows per expert: wider ones spilled); each program
    reads its BLOCK_M gathered dy rows over all of H, so every row is read I/BLOCK_N times (24 at Qwen3's I = 768,
    448 at Mixtral's 14336). The split form writes and reads G once more (2 N I elements).
    """
    choice = os.environ.get("MOE_KERNELS_DOWN_BWD", "")
    if choice not in ("", "split", "fused"):
        raise ValueError(f"MOE_KERNELS_DOWN_BWD must be split or fused, not {choice!r}")
    if choice == "fused" or (not choice and "split" not in entry["down_bwd"]):
        return None
    return split_tile(entry)


def split_tile(entry: dict) -> dict:
    """The split down backward's GEMM tile for an 'mlp' entry (:func:`split_down_backward_tile`)."""
    fused = entry["down_bwd"]
    tile = fused.get("split") or entry["dx"]
    order = {"GROUP_M": fused["GROUP_M"]} if "GROUP_M" in fused else {}
    return dict({key: tile[key] for key in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")},
                BLOCK_M=fused["BLOCK_M"], **order)


def paired(x: torch.Tensor, gated: bool) -> bool:
    """Whether the gate/up GEMM runs gate and up as one dot (``_paired_gate_up``): MOE_KERNELS_PAIRED_DOT=0/1 when
    set (0 = the two dots of every release before it, for side-by-side timing); else for gated experts with 16-bit
    inputs on Hopper or newer, whose warpgroup MMA it widens (fp32 dots run without tensor cores, and on Ampere's
    mma.sync the wider tile only costs registers: 128 -> 190 per thread for the 128-row bf16 tile on sm_80), and
    under the interpreter (so that the CPU tests run the form Hopper runs)."""
    choice = os.environ.get("MOE_KERNELS_PAIRED_DOT", "")
    if choice not in ("", "0", "1"):
        raise ValueError(f"MOE_KERNELS_PAIRED_DOT must be 0 (two dots) or 1 (one paired dot), not {choice!r}")
    if not gated:
        return False
    if choice:
        return choice == "1"
    if x.dtype == torch.float32:
        return False
    return interpreting() or (x.device.type == "cuda" and device_capability(x.device) >= (9, 0))


# ----------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _gate_up_columns(cols, inter, INTERLEAVED: tl.constexpr):
    """Rows of W_gu (and columns of pre) holding gate and up of intermediate column ``cols`` (gated experts)."""
    if INTERLEAVED:
        return 2 * cols, 2 * cols + 1
    return cols, cols + inter


@triton.jit
def _pre_width(inter, GATED: tl.constexpr):
    """Rows of W_gu (= columns of pre): 2I for gated experts, I for experts without a gate (W_gu = W_up)."""
    if GATED:
        width = 2 * inter
    else:
        width = inter
    return width


@triton.jit
def _load_pre(pre_ptr, rows, cols, mask, inter, INTERLEAVED: tl.constexpr, GATED: tl.constexpr):
    """(gate, up) fp32 [rows, cols] tiles of pre [N, 2I] contiguous (columns laid out like W_gu's rows); not GATED:
    pre [N, I], up = gate (unused)."""
    gate_cols, up_cols = _gate_up_columns(cols, inter, INTERLEAVED)
    pre_row = pre_ptr + rows.to(tl.int64)[:, None] * _pre_width(inter, GATED)
    gate = tl.load(pre_row + gate_cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(pre_row + up_cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        up = gate  # unused
    return gate, up


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _paired_gate_up(x_ptr, stride_xt, stride_xh, w_base, stride_wn, stride_wh, tokens, row_mask, col_tile, hidden,
                    inter, INTERLEAVED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(gate, up) accumulators [BLOCK_M, BLOCK_N] of one column tile from a single dot over 2*BLOCK_N weight rows.

    The weight tile's columns are the W_gu rows in the order they are stored: gate and up alternating when
    INTERLEAVED (2c, 2c+1: one contiguous run of rows), else the tile's BLOCK_N gate rows then its BLOCK_N up rows.
    Either way the accumulator is split back into (gate, up) along a dimension of 2, which the MMA layout keeps in
    each thread's registers.
    """
    pair = tl.arange(0, 2 * BLOCK_N)
    if INTERLEAVED:
        cols = col_tile * BLOCK_N + pair // 2
        w_rows = 2 * col_tile * BLOCK_N + pair
    else:
        cols = col_tile * BLOCK_N + pair % BLOCK_N
        w_rows = cols + (pair // BLOCK_N) * inter
    pair_mask = cols < inter
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        xt = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + w_rows[None, :] * stride_wn + ks[:, None] * stride_wh,
                    mask=k_mask[:, None] & pair_mask[None, :], other=0.0)
        acc = tl.dot(operand(xt, UPCAST, x_ptr.dtype.element_ty), operand(w, UPCAST, x_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PRECISION)
    if INTERLEAVED:
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    else:
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    return gate, up


@triton.jit
def _gate_up_kernel(x_ptr, stride_xt, stride_xh, w_ptr, stride_we, stride_wn, stride_wh, bias_ptr, stride_be,
                    stride_bn, sorted_slots_ptr, expert_offsets_ptr, tile_offsets_ptr, act_ptr, pre_ptr,
                    hidden, inter, num_experts, num_rows, top_k, search_steps, limit, gate_cap, up_cap,
                    ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_LIMIT: tl.constexpr, STORE_ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_EXPERT: tl.constexpr,
                    PAIRED: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """First GEMM with the row gather fused into its loads and the gated activation into its epilogue.

    x_ptr:   [T, H] strides (stride_xt, stride_xh).  w_ptr: W_gu [E, 2I, H] strides (we, wn, wh), any
    layout (HF transposed views included).  bias_ptr: [E, 2I] strides (be, bn) if HAS_BIAS.
    sorted_slots_ptr [N] / expert_offsets_ptr [E+1] / tile_offsets_ptr [E+1]: the plan (int32).
    act_ptr: [N, I] out (STORE_ACT), contiguous, x's dtype, sorted rows.  pre_ptr: [N, 2I] out (SAVE_PRE), contiguous,
    x's dtype, sorted rows, columns laid out like W_gu's rows.  limit: GPT-OSS clamp (HAS_LIMIT).  gate_cap, up_cap:
    the soft caps of ACTIVATION softcap_swiglu (else unused).
    Grid: (upper bound of tiles, cdiv(I, BLOCK_N)), or (E, cdiv(I, BLOCK_N)) with BY_EXPERT (the decode
    path: ids, int32 or int64, in sorted_slots_ptr, act/pre indexed by slot; see ``program_rows``).
    ACTIVATION: code of moe_kernels.spec.ACTIVATION_CODES (a gated activation; an elementwise one when not GATED).
    GATED=False (experts without a gate): W_gu is W_up [E, I, H], pre [N, I], act = act(pre); no up accumulator.
    GROUP_M: the program order (common.tile_and_column; 0 with BY_EXPERT).
    PAIRED (GATED only): gate and up in one dot of 2*BLOCK_N columns, split in the epilogue, instead of two dots of
    BLOCK_N. The same accumulator; on Hopper the warpgroup MMA is twice as wide (m64n128 at BLOCK_N 64): a narrow
    one reads its x tile from shared memory once per BLOCK_N columns, about as fast as the tensor cores consume it.
    """
    tile, col_tile = tile_and_column(GROUP_M)
    expert, rows, row_mask, slots, valid = program_rows(tile, tile_offsets_ptr, expert_offsets_ptr, sorted_slots_ptr,
                                                        num_experts, num_rows, search_steps, BLOCK_M, BY_EXPERT)
    if valid:
        tokens = (slots // top_k).to(tl.int64)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < inter
        gate_rows, up_rows = _gate_up_columns(cols, inter, INTERLEAVED)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        if GATED and PAIRED:
            acc_gate, acc_up = _paired_gate_up(x_ptr, stride_xt, stride_xh, w_base, stride_wn, stride_wh, tokens,
                                               row_mask, col_tile, hidden, inter, INTERLEAVED, UPCAST, DOT_PRECISION,
                                               BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < hidden
                xt = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh,
                             mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w_mask = k_mask[:, None] & col_mask[None, :]
                wg = tl.load(w_base + gate_rows[None, :] * stride_wn + ks[:, None] * stride_wh, mask=w_mask,
                             other=0.0)
                xt = operand(xt, UPCAST, x_ptr.dtype.element_ty)
                acc_gate = tl.dot(xt, operand(wg, UPCAST, x_ptr.dtype.element_ty), acc_gate,
                                  input_precision=DOT_PRECISION)
                if GATED:
                    wu = tl.load(w_base + up_rows[None, :] * stride_wn + ks[:, None] * stride_wh, mask=w_mask,
                                 other=0.0)
                    acc_up = tl.dot(xt, operand(wu, UPCAST, x_ptr.dtype.element_ty), acc_up,
                                    input_precision=DOT_PRECISION)
        if HAS_BIAS:
            b_base = bias_ptr + expert.to(tl.int64) * stride_be
            acc_gate += tl.load(b_base + gate_rows * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(b_base + up_rows * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        if SAVE_PRE:
            pre_row = pre_ptr + rows64 * _pre_width(inter, GATED)
            tl.store(pre_row + gate_rows[None, :], acc_gate.to(pre_ptr.dtype.element_ty), mask=out_mask)
            if GATED:
                tl.store(pre_row + up_rows[None, :], acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
        if STORE_ACT:
            act = gated_forward(acc_gate, acc_up, limit, gate_cap, up_cap, ACTIVATION, HAS_LIMIT, GATED)
            tl.store(act_ptr + rows64 * inter + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _rows_matmul_kernel(in_ptr, w_ptr, stride_we, stride_wc, stride_wj, bias_ptr, stride_be, stride_bj,
                        route_w_ptr, sorted_slots_ptr, expert_offsets_ptr, tile_offsets_ptr, out_ptr,
                        reduce_dim, out_dim, num_experts, num_rows, search_steps,
                        HAS_BIAS: tl.constexpr, HAS_ROUTE_W: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_EXPERT: tl.constexpr,
                        GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sorted rows times their expert's matrix, scattered to slot rows:
    out[slot(p), j] = route_w[slot(p)] * (sum_c in[p, c] * W[e, c, j] + bias[e, j]).

    in_ptr:  [N, C] contiguous, sorted rows (C = reduce_dim).  w_ptr: [E, C, J] strides (we, wc, wj), so
    W_d [E,H,I] enters as strides (s0, s2, s1) and W_gu [E,2I,H] as is.  bias_ptr: [E, J] strides (be, bj).
    route_w_ptr: [N] float32 (x's dtype too on the decode path) indexed by slot (HAS_ROUTE_W).  out_ptr: [N, J]
    contiguous, indexed by slot, in the inputs' dtype (the fp32 sum rounded once per slot).
    Grid: (upper bound of tiles, cdiv(J, BLOCK_N)), or (E, cdiv(J, BLOCK_N)) with BY_EXPERT (the decode
    path: ids, int32 or int64, in sorted_slots_ptr, in_ptr rows indexed by slot; see ``program_rows``).
    GROUP_M: the program order (common.tile_and_column; 0 with BY_EXPERT).
    """
    tile, col_tile = tile_and_column(GROUP_M)
    expert, rows, row_mask, slots, valid = program_rows(tile, tile_offsets_ptr, expert_offsets_ptr, sorted_slots_ptr,
                                                        num_experts, num_rows, search_steps, BLOCK_M, BY_EXPERT)
    if valid:
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < out_dim
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        rows64 = rows.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, reduce_dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < reduce_dim
            a = tl.load(in_ptr + rows64 * reduce_dim + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + ks[:, None] * stride_wc + cols[None, :] * stride_wj,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(operand(a, UPCAST, in_ptr.dtype.element_ty), operand(w, UPCAST, in_ptr.dtype.element_ty), acc,
                         input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert.to(tl.int64) * stride_be + cols * stride_bj, mask=col_mask,
                           other=0.0).to(tl.float32)[None, :]
        if HAS_ROUTE_W:
            acc *= tl.load(route_w_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + slots.to(tl.int64)[:, None] * out_dim + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _one_token_gate_up_kernel(x_ptr, stride_xh, w_ptr, stride_we, stride_wn, stride_wh, bias_ptr, stride_be,
                              stride_bn, ids_ptr, act_ptr, hidden, inter, limit, gate_cap, up_cap,
                              ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr, GATED: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token's gate/up GEMVs and activation: act[j, c] = gated_act(x @ W_gu[ids[j]]^T + b_gu[ids[j]]) at
    intermediate columns c of this program's tile, for the token's slot j.

    x_ptr: [1, H] stride stride_xh along H.  w_ptr: W_gu [E, 2I, H] ([E, I, H] not GATED) strides (we, wn, wh).
    bias_ptr: [E, 2I] strides (be, bn) if HAS_BIAS.  ids_ptr: [k] int32 or int64.  act_ptr: [k, I] out, contiguous,
    x's dtype.
    Grid: (k, cdiv(I, BLOCK_N)). A GEMV: products and sums in fp32 (no tensor cores, no 16-row padding); each
    slot's expert rows are read once, as a decode step must.
    """
    slot = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    gate_rows, up_rows = _gate_up_columns(cols, inter, INTERLEAVED)
    w_base = w_ptr + expert * stride_we
    # products summed per element across the K steps and reduced over K once at the end: a reduction inside the
    # loop synchronised the program's warps at every step (shuffles and barriers between the weight loads)
    prod_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    prod_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        w_mask = col_mask[:, None] & k_mask[None, :]
        # x read in the weight tile's own layout (each row's copy from cache): a [BLOCK_K] load broadcast to the
        # tile would pass through shared memory, with barriers, at every step
        xk = tl.load(x_ptr + (ks * stride_xh)[None, :] + 0 * cols[:, None], mask=w_mask, other=0.0).to(tl.float32)
        wg = tl.load(w_base + gate_rows[:, None] * stride_wn + ks[None, :] * stride_wh, mask=w_mask, other=0.0)
        prod_gate += wg.to(tl.float32) * xk
        if GATED:
            wu = tl.load(w_base + up_rows[:, None] * stride_wn + ks[None, :] * stride_wh, mask=w_mask, other=0.0)
            prod_up += wu.to(tl.float32) * xk
    acc_gate = tl.sum(prod_gate, axis=1)
    acc_up = tl.sum(prod_up, axis=1)
    if HAS_BIAS:
        b_base = bias_ptr + expert * stride_be
        acc_gate += tl.load(b_base + gate_rows * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
        if GATED:
            acc_up += tl.load(b_base + up_rows * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
    act = gated_forward(acc_gate, acc_up, limit, gate_cap, up_cap, ACTIVATION, HAS_LIMIT, GATED)
    tl.store(act_ptr + slot.to(tl.int64) * inter + cols, act.to(act_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _one_token_down_kernel(act_ptr, w_ptr, stride_we, stride_wh, stride_wi, bias_ptr, stride_be, stride_bh,
                           route_w_ptr, ids_ptr, y_ptr, inter, hidden, top_k,
                           HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token's down GEMVs, weighted and summed over its k slots in one program per output tile:
    y[h] = sum_j route_w[j] * (act[j] @ W_d[ids[j]]^T + b_d[ids[j]])[h], in fp32 in a fixed order (no slot rows, no
    combine launch).

    act_ptr: [k, I] contiguous.  w_ptr: W_d [E, H, I] strides (we, wh, wi).  bias_ptr: [E, H] strides (be, bh) if
    HAS_BIAS.  route_w_ptr: [k] fp32 or x's dtype.  ids_ptr: [k] int32 or int64.  y_ptr: [1, H] out, contiguous,
    x's dtype.
    Grid: (cdiv(H, BLOCK_N),).
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    # weighted products summed per element over the slots and K steps, reduced over K once at the end (as in
    # _one_token_gate_up_kernel: no barrier between one step's weight loads and the next)
    prod = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, top_k):
        expert = tl.load(ids_ptr + j).to(tl.int64)
        w_base = w_ptr + expert * stride_we
        route_w = tl.load(route_w_ptr + j).to(tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < inter
            mask = col_mask[:, None] & k_mask[None, :]
            # act read in the weight tile's layout, as x in _one_token_gate_up_kernel
            a = tl.load(act_ptr + j * inter + ks[None, :] + 0 * cols[:, None], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_base + cols[:, None] * stride_wh + ks[None, :] * stride_wi, mask=mask, other=0.0)
            prod += w.to(tl.float32) * (a * route_w)
        if HAS_BIAS:
            acc += route_w * tl.load(bias_ptr + expert * stride_be + cols * stride_bh, mask=col_mask,
                                     other=0.0).to(tl.float32)
    acc += tl.sum(prod, axis=1)
    tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _down_backward_kernel(grad_y_ptr, stride_gt, stride_gh, w_ptr, stride_we, stride_wh, stride_wn, bias_ptr,
                          stride_be, stride_bh, route_w_ptr, pre_ptr, sorted_slots_ptr, expert_offsets_ptr,
                          tile_offsets_ptr, grad_pre_ptr, grad_w_partial_ptr, hidden, inter, num_experts, top_k,
                          search_steps, num_col_tiles, limit, gate_cap, up_cap,
                          ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr, GATED: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward through the down GEMM and the activation, for sorted rows.

    G[p, n] = sum_h dy[token(p), h] * W_d[e, h, n] (gathered dy rows); act and its derivative are
    recomputed from pre.  Writes grad_pre[p, gate/up columns] = d(act)/d(pre) * route_w * G (x's dtype)
    and grad_w_partial[slot, pid_n] = sum_n act * G over this column tile (+ <b_d[e], dy[token]> in the
    first column tile), whose row sums are d(routing weight).
    grad_y_ptr: [T, H] strides (gt, gh).  w_ptr: W_d [E, H, I] strides (we, wh, wn).  bias_ptr: [E, H]
    strides (be, bh).  route_w_ptr: [N] fp32 by slot.  pre_ptr, grad_pre_ptr: [N, 2I] contiguous ([N, I] when
    not GATED).
    grad_w_partial_ptr: [N, num_col_tiles] fp32.  Grid: (upper bound of tiles, cdiv(I, BLOCK_N)).
    GROUP_M: the program order (common.tile_and_column).
    """
    tile, pid_n = tile_and_column(GROUP_M)
    expert, row_start, row_end, valid = find_tile(tile, tile_offsets_ptr, expert_offsets_ptr, num_experts,
                                                  search_steps, BLOCK_M)
    if valid:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
        tokens = (slots // top_k).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < inter
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        bias_dot = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < hidden
            g = tl.load(grad_y_ptr + tokens[:, None] * stride_gt + ks[None, :] * stride_gh,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + ks[:, None] * stride_wh + cols[None, :] * stride_wn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(operand(g, UPCAST, grad_y_ptr.dtype.element_ty),
                         operand(w, UPCAST, grad_y_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                if pid_n == 0:
                    b = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + ks * stride_bh, mask=k_mask, other=0.0)
                    bias_dot += tl.sum(g.to(tl.float32) * b.to(tl.float32)[None, :], axis=1)
        _activation_backward(acc, bias_dot, rows, row_mask, slots, cols, col_mask, pid_n, pre_ptr, route_w_ptr,
                             grad_pre_ptr, grad_w_partial_ptr, inter, num_col_tiles, limit, gate_cap, up_cap,
                             ACTIVATION, INTERLEAVED, GATED, HAS_LIMIT)


@triton.jit
def _activation_backward(grad_act, bias_dot, rows, row_mask, slots, cols, col_mask, col_tile, pre_ptr, route_w_ptr,
                         grad_pre_ptr, grad_w_partial_ptr, inter, num_col_tiles, limit, gate_cap, up_cap,
                         ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr, GATED: tl.constexpr,
                         HAS_LIMIT: tl.constexpr):
    """The down GEMM's backward after G: for a [rows, cols] tile of G = ``grad_act`` (fp32: dy @ W_d, the gradient
    of act before the routing weight's factor),
    recomputes act from pre, stores grad_pre = d(act)/d(pre) * route_w * G and this column tile's partial
    <act, G> (+ ``bias_dot``) of each slot's d(routing weight) at grad_w_partial[slot, col_tile]. The epilogue of
    ``_down_backward_kernel`` and the body of ``_activation_backward_kernel`` (the split form)."""
    out_mask = row_mask[:, None] & col_mask[None, :]
    gate, up = _load_pre(pre_ptr, rows, cols, out_mask, inter, INTERLEAVED, GATED)
    act = gated_forward(gate, up, limit, gate_cap, up_cap, ACTIVATION, HAS_LIMIT, GATED)
    partial = tl.sum(tl.where(out_mask, act * grad_act, 0.0), axis=1) + bias_dot
    tl.store(grad_w_partial_ptr + slots.to(tl.int64) * num_col_tiles + col_tile, partial, mask=row_mask)
    route_w = tl.load(route_w_ptr + slots, mask=row_mask, other=0.0)
    d_gate, d_up = gated_backward(gate, up, grad_act * route_w[:, None], limit, gate_cap, up_cap, ACTIVATION,
                                  HAS_LIMIT, GATED)
    gate_cols, up_cols = _gate_up_columns(cols, inter, INTERLEAVED)
    grad_row = grad_pre_ptr + rows.to(tl.int64)[:, None] * _pre_width(inter, GATED)
    tl.store(grad_row + gate_cols[None, :], d_gate.to(grad_pre_ptr.dtype.element_ty), mask=out_mask)
    if GATED:
        tl.store(grad_row + up_cols[None, :], d_up.to(grad_pre_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _activation_backward_kernel(grad_act_ptr, pre_ptr, route_w_ptr, sorted_slots_ptr, grad_pre_ptr,
                                grad_w_partial_ptr, num_rows, inter, num_col_tiles, limit, gate_cap, up_cap,
                                ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr, GATED: tl.constexpr,
                                HAS_LIMIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The split down backward's second pass (elementwise): ``_activation_backward`` over G read from memory.

    grad_act_ptr: G [N, I] contiguous, sorted rows (the first pass: ``_gate_up_kernel`` ungated over dy and W_d^T).
    pre_ptr, grad_pre_ptr: [N, 2I] contiguous ([N, I] when not GATED).  route_w_ptr: [N] fp32 by slot.
    sorted_slots_ptr: [N] int32.  grad_w_partial_ptr: [N, num_col_tiles] fp32 by slot, num_col_tiles =
    cdiv(I, BLOCK_C).  Grid: (cdiv(N, BLOCK_R), cdiv(I, BLOCK_C)).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_tile = tl.program_id(1)
    cols = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < num_rows
    col_mask = cols < inter
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    grad_act = tl.load(grad_act_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :],
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    _activation_backward(grad_act, tl.zeros([BLOCK_R], dtype=tl.float32), rows, row_mask, slots, cols, col_mask,
                         col_tile, pre_ptr, route_w_ptr, grad_pre_ptr, grad_w_partial_ptr, inter, num_col_tiles,
                         limit, gate_cap, up_cap, ACTIVATION, INTERLEAVED, GATED, HAS_LIMIT)


@triton.jit
def _expert_outer_kernel(lhs_ptr, stride_lt, stride_lc, rhs_ptr, stride_rt, stride_rc, route_w_ptr,
                         sorted_slots_ptr, expert_offsets_ptr, out_ptr, stride_oe, stride_oi, stride_oj,
                         bias_grad_ptr, stride_bge, lhs_dim, rhs_dim, inter, top_k, limit, gate_cap, up_cap,
                         LHS_BY_TOKEN: tl.constexpr, LHS_WEIGHTED: tl.constexpr, RHS_BY_TOKEN: tl.constexpr,
                         RHS_ACT: tl.constexpr, ACTIVATION: tl.constexpr, INTERLEAVED: tl.constexpr,
                         GATED: tl.constexpr, HAS_LIMIT: tl.constexpr, BIAS_GRAD: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EXPERT_MAJOR: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-expert grouped GEMM over the expert's run of sorted rows (the weight gradients):
    out[e, i, j] = sum_{p in rows of e} L[p, i] * R[p, j];  bias_grad[e, i] = sum_p L[p, i].

    L row p is lhs[token(p)] if LHS_BY_TOKEN else lhs[p] (strides lt, lc), times route_w[slot(p)] if
    LHS_WEIGHTED.  R row p is rhs[token(p)] or rhs[p] (strides rt, rc); if RHS_ACT, rhs is pre [N, 2I]
    ([N, I] when not GATED) and R = the activation of it (j < I).  out_ptr: [E, lhs_dim, rhs_dim] strides (oe, oi, oj), the
    weights' dtype; experts without rows get zeros.  bias_grad_ptr: [E, lhs_dim] (BIAS_GRAD), written
    by the programs of column tile 0.  Grid: (cdiv(lhs_dim, BLOCK_I), cdiv(rhs_dim, BLOCK_J), E) with EXPERT_MAJOR,
    else (E, cdiv(lhs_dim, BLOCK_I), cdiv(rhs_dim, BLOCK_J)).
    EXPERT_MAJOR: the GPU starts programs axis 0 first, so the expert on the last axis runs all tiles of one expert
    together and its rows of L and R (read by every column / row tile) stay in L2; with the expert on axis 0, the
    programs running together belong to different experts and share no rows (the order of releases before it).
    """
    if EXPERT_MAJOR:
        expert = tl.program_id(2)
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
    else:
        expert = tl.program_id(0)
        pid_i = tl.program_id(1)
        pid_j = tl.program_id(2)
    i_idx = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j_idx = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = i_idx < lhs_dim
    j_mask = j_idx < rhs_dim
    row_start = tl.load(expert_offsets_ptr + expert)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_I], dtype=tl.float32)
    for p0 in range(row_start, row_end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        row_mask = rows < row_end
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
        tokens = (slots // top_k).to(tl.int64)
        rows64 = rows.to(tl.int64)
        if LHS_BY_TOKEN:
            lhs_rows = tokens
        else:
            lhs_rows = rows64
        # L^T tile [BLOCK_I, BLOCK_P]
        lhs = tl.load(lhs_ptr + lhs_rows[None, :] * stride_lt + i_idx[:, None] * stride_lc,
                      mask=i_mask[:, None] & row_mask[None, :], other=0.0)
        if LHS_WEIGHTED:
            lhs = lhs.to(tl.float32) * tl.load(route_w_ptr + slots, mask=row_mask, other=0.0)[None, :]
        if BIAS_GRAD:
            if pid_j == 0:
                bias_acc += tl.sum(lhs.to(tl.float32), axis=1)
        if RHS_BY_TOKEN:
            rhs_rows = tokens
        else:
            rhs_rows = rows64
        rhs_mask = row_mask[:, None] & j_mask[None, :]
        if RHS_ACT:
            gate_cols, up_cols = _gate_up_columns(j_idx, inter, INTERLEAVED)
            gate = tl.load(rhs_ptr + rhs_rows[:, None] * stride_rt + gate_cols[None, :] * stride_rc,
                           mask=rhs_mask, other=0.0).to(tl.float32)
            if GATED:
                up = tl.load(rhs_ptr + rhs_rows[:, None] * stride_rt + up_cols[None, :] * stride_rc,
                             mask=rhs_mask, other=0.0).to(tl.float32)
            else:
                up = gate  # unused
            rhs = tl.where(rhs_mask, gated_forward(gate, up, limit, gate_cap, up_cap, ACTIVATION, HAS_LIMIT, GATED), 0.0)
        else:
            rhs = tl.load(rhs_ptr + rhs_rows[:, None] * stride_rt + j_idx[None, :] * stride_rc, mask=rhs_mask,
                          other=0.0)
        acc = tl.dot(operand(lhs, UPCAST, out_ptr.dtype.element_ty), operand(rhs, UPCAST, out_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PRECISION)
    out = out_ptr + expert.to(tl.int64) * stride_oe + i_idx[:, None] * stride_oi + j_idx[None, :] * stride_oj
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])
    if BIAS_GRAD:
        if pid_j == 0:
            tl.store(bias_grad_ptr + expert.to(tl.int64) * stride_bge + i_idx,
                     bias_acc.to(bias_grad_ptr.dtype.element_ty), mask=i_mask)


@triton.jit
def _gated_activation_kernel(pre_ptr, act_ptr, num_rows, inter, limit, gate_cap, up_cap, ACTIVATION: tl.constexpr,
                             INTERLEAVED: tl.constexpr, GATED: tl.constexpr, HAS_LIMIT: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """act[p, c] = gated activation of pre[p] at intermediate column c, in act's dtype (elementwise).

    pre_ptr: [N, 2I] contiguous, columns laid out like W_gu's rows ([N, I] when not GATED: act = act(pre)).
    act_ptr: [N, I] out, contiguous.  Grid: (cdiv(N, BLOCK_R), cdiv(I, BLOCK_C)).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < num_rows)[:, None] & (cols < inter)[None, :]
    gate, up = _load_pre(pre_ptr, rows, cols, mask, inter, INTERLEAVED, GATED)
    act = gated_forward(gate, up, limit, gate_cap, up_cap, ACTIVATION, HAS_LIMIT, GATED)
    tl.store(act_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rows_kernel(src_ptr, stride_st, stride_sc, sorted_slots_ptr, route_w_ptr, out_ptr, num_rows, width, top_k,
                        SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[p] = src[token(p)], times the slot's routing weight in fp32 when SCALED, in out's dtype (one pass).

    src_ptr: [T, width] strides (stride_st, stride_sc).  sorted_slots_ptr: [N] int32 (token = slot // top_k).
    route_w_ptr: [T*k] fp32 by slot (SCALED).  out_ptr: [N, width] out, contiguous, sorted rows.
    Grid: (cdiv(N, BLOCK_R), cdiv(width, BLOCK_C)). The grouped-GEMM weight gradients' operands: x and w*dy in
    sorted order, without the fp32 [N, width] temporaries of the same product in torch.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < width)[None, :]
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    tokens = (slots // top_k).to(tl.int64)
    values = tl.load(src_ptr + tokens[:, None] * stride_st + cols[None, :] * stride_sc, mask=mask, other=0.0)
    if SCALED:
        values = values.to(tl.float32) * tl.load(route_w_ptr + slots, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], values.to(out_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers

_ROW_BLOCK_R, _ROW_BLOCK_C = 16, 128  # the elementwise row kernels: the activation pass and the row gather


def weight_grads_by_grouped_mm(x: torch.Tensor, hidden: int, inter: int, has_bias: bool, num_rows: int = 0) -> bool:
    """Whether the weight gradients of a call with ``num_rows`` routed slots (T*k) run as torch's CUTLASS grouped
    GEMM in its k-grouped form (``torch._grouped_mm``) instead of ``_expert_outer_kernel``.

    MOE_KERNELS_WGRAD = "grouped_mm" forces it (a ValueError where it cannot run), "triton" forbids it;
    unset or "auto", the config table's ``wgrad`` entry decides (on, from ``min_rows`` slots). It can run for
    bf16 on sm90+ GPUs with widths that keep every row 16-byte aligned, without biases (their gradients are row
    sums that the Triton kernel forms on the way).
    """
    choice = os.environ.get("MOE_KERNELS_WGRAD", "auto") or "auto"
    if choice not in ("auto", "grouped_mm", "triton"):
        raise ValueError(f"MOE_KERNELS_WGRAD must be auto, grouped_mm or triton, not {choice!r}")
    if choice == "triton":
        return False
    reasons = []
    if interpreting() or x.device.type != "cuda":
        reasons.append("needs a CUDA device (not the interpreter)")
    elif device_capability(x.device) < (9, 0):
        reasons.append("needs sm90 or newer")
    if x.dtype != torch.bfloat16:
        reasons.append("needs bfloat16")
    if hidden % 8 or inter % 8:
        reasons.append("needs hidden and intermediate sizes divisible by 8")
    if has_bias:
        reasons.append("does not form bias gradients")
    if not hasattr(torch, "_grouped_mm"):
        reasons.append("needs torch._grouped_mm (torch >= 2.8)")
    if choice == "grouped_mm" and reasons:
        raise ValueError("MOE_KERNELS_WGRAD=grouped_mm: the grouped GEMM " + "; ".join(reasons))
    return not reasons and (choice == "grouped_mm" or grouped_mm_wgrad_wanted(num_rows))


def _grouped_mm_weight_grads(grad_y, x, pre, grad_pre, route_w, expert_offsets, sorted_slots, top_k, activation,
                             interleaved, swiglu_limit, gated, softcaps):
    """(d gate_up_proj [E, 2I, H] ([E, I, H] when not gated), d down_proj [E, H, I]) as k-grouped GEMMs over each
    expert's sorted rows: dW_gu[e] = d pre_e^T x_e and dW_d[e] = (w dy)_e^T act_e. Gathers x and w*dy into sorted
    order (``_gather_rows_kernel``) and forms act from pre (the Triton path forms all three on the fly instead)."""
    num_rows, width = pre.shape
    inter = width // 2 if gated else width
    offs = expert_offsets[1:]
    x_sorted = _gather_rows(x, sorted_slots, top_k, None)
    grad_gate_up = torch._grouped_mm(grad_pre.t(), x_sorted, offs=offs)
    del x_sorted
    act = torch.empty((num_rows, inter), dtype=pre.dtype, device=pre.device)
    launcher(_gated_activation_kernel, (cdiv(num_rows, _ROW_BLOCK_R), cdiv(inter, _ROW_BLOCK_C)))(
        pre, act, num_rows, inter, float(swiglu_limit or 0.0), *_caps(softcaps), ACTIVATION=ACTIVATION_CODES[activation],
        INTERLEAVED=interleaved, GATED=gated, HAS_LIMIT=swiglu_limit is not None, BLOCK_R=_ROW_BLOCK_R,
        BLOCK_C=_ROW_BLOCK_C)
    grad_y_sorted = _gather_rows(grad_y, sorted_slots, top_k, route_w, x.dtype)
    grad_down = torch._grouped_mm(grad_y_sorted.t(), act, offs=offs)
    return grad_gate_up, grad_down


def _gather_rows(src: torch.Tensor, sorted_slots: torch.Tensor, top_k: int, route_w: Optional[torch.Tensor],
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[N, width] rows of ``src`` [T, width] in sorted order, scaled by each slot's weight if ``route_w`` is given."""
    num_rows, width = sorted_slots.shape[0], src.shape[1]
    out = torch.empty((num_rows, width), dtype=dtype or src.dtype, device=src.device)
    launcher(_gather_rows_kernel, (cdiv(num_rows, _ROW_BLOCK_R), cdiv(width, _ROW_BLOCK_C)))(
        src, src.stride(0), src.stride(1), sorted_slots, src if route_w is None else route_w, out, num_rows, width,
        top_k, SCALED=route_w is not None, BLOCK_R=_ROW_BLOCK_R, BLOCK_C=_ROW_BLOCK_C)
    return out


def _check_scalars(swiglu_limit, softcaps) -> None:
    """The float arguments are finite: a traced float reaches the op unchecked (validation.finite_or_traced)."""
    check_finite_scalars(swiglu_limit=swiglu_limit, **dict(zip(("gate_cap", "up_cap"), softcaps or ())))


def _caps(softcaps) -> tuple[float, float]:
    """The kernels' (gate_cap, up_cap) arguments: softcap_swiglu's caps, else 1.0 (unused)."""
    return (1.0, 1.0) if softcaps is None else (float(softcaps[0]), float(softcaps[1]))


def _weight_strides(w: Optional[torch.Tensor], fallback: torch.Tensor):
    return (w, w.stride(0), w.stride(1)) if w is not None else (fallback, 0, 0)


def _intermediate(gate_up_proj: torch.Tensor, gated: bool) -> int:
    """I of W_gu [E, 2I, H] (gated) or W_up [E, I, H] (not gated)."""
    return gate_up_proj.shape[1] // 2 if gated else gate_up_proj.shape[1]


def _gate_up(x, gate_up_proj, gate_up_bias, top_k, expert_offsets, sorted_slots, tiles, cfg, activation, interleaved,
             swiglu_limit, gated, softcaps, store_act, save_pre):
    """Launch ``_gate_up_kernel``: returns (act [N, I] or empty, pre [N, 2I] ([N, I] not gated) or empty)."""
    num_rows = sorted_slots.numel()
    num_experts, width, hidden = gate_up_proj.shape
    inter = _intermediate(gate_up_proj, gated)
    act = torch.empty((num_rows if store_act else 0, inter), dtype=x.dtype, device=x.device)
    pre = torch.empty((num_rows if save_pre else 0, width), dtype=x.dtype, device=x.device)
    bias, stride_be, stride_bn = _weight_strides(gate_up_bias, x)
    launcher(_gate_up_kernel, (max_tiles(num_rows, num_experts, cfg["BLOCK_M"]), cdiv(inter, cfg["BLOCK_N"])))(
        x, x.stride(0), x.stride(1), gate_up_proj, *gate_up_proj.stride(), bias, stride_be, stride_bn,
        sorted_slots, expert_offsets, tiles, act if store_act else pre, pre if save_pre else act,
        hidden, inter, num_experts, num_rows, top_k, num_experts.bit_length(), float(swiglu_limit or 0.0),
        *_caps(softcaps),
        ACTIVATION=ACTIVATION_CODES[activation], INTERLEAVED=interleaved, GATED=gated,
        HAS_BIAS=gate_up_bias is not None, HAS_LIMIT=swiglu_limit is not None, STORE_ACT=store_act, SAVE_PRE=save_pre,
        UPCAST=interpreting(),
        DOT_PRECISION=dot_precision(x.dtype), BY_EXPERT=False, PAIRED=paired(x, gated), GROUP_M=group_m(cfg),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return act, pre


# The planned kernels' rows of the [TILE_MAPS, E+1] tile maps a forward computes (common.tile_maps).
_TILE_ROW = {"up": 0, "down": 1, "down_bwd": 2, "dx": 3}


def _forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, interleaved,
             swiglu_limit, gated, softcaps, save_pre):
    num_tokens, hidden = x.shape
    num_experts = gate_up_proj.shape[0]
    inter = _intermediate(gate_up_proj, gated)
    top_k = ids.shape[1]
    num_rows = num_tokens * top_k
    plan = dispatch_plan(ids, num_experts)
    cfg = mlp_config(num_rows, num_experts, inter, fp32=x.dtype == torch.float32, device=x.device)
    upcast = interpreting()
    precision = dot_precision(x.dtype)
    steps = num_experts.bit_length()
    up = cfg["up"]
    # the tile maps of this forward's kernels and of the backward's, in one launch (the backward reuses them)
    tiles = tile_maps(plan.expert_offsets, *(cfg[name]["BLOCK_M"] for name in _TILE_ROW))
    act, pre = _gate_up(x, gate_up_proj, gate_up_bias, top_k, plan.expert_offsets, plan.sorted_slots,
                        tiles[_TILE_ROW["up"]], up, activation, interleaved, swiglu_limit, gated, softcaps, store_act=True,
                        save_pre=save_pre)
    down = cfg["down"]
    slot_rows = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    bias, stride_be, stride_bj = _weight_strides(down_bias, x)
    launcher(_rows_matmul_kernel, (max_tiles(num_rows, num_experts, down["BLOCK_M"]), cdiv(hidden, down["BLOCK_N"])))(
        act, down_proj, down_proj.stride(0), down_proj.stride(2), down_proj.stride(1), bias, stride_be, stride_bj,
        weights.reshape(-1), plan.sorted_slots, plan.expert_offsets, tiles[_TILE_ROW["down"]], slot_rows,
        inter, hidden, num_experts, num_rows, steps,
        HAS_BIAS=down_bias is not None, HAS_ROUTE_W=True, UPCAST=upcast, DOT_PRECISION=precision, BY_EXPERT=False,
        GROUP_M=group_m(down), BLOCK_M=down["BLOCK_M"], BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
        num_warps=down["num_warps"], num_stages=down["num_stages"])
    y = combine_slots(slot_rows, num_tokens, top_k, x.dtype)
    return y, pre, plan.expert_offsets, plan.sorted_slots, tiles


def _decode_forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, interleaved,
                    swiglu_limit, gated, softcaps, cfg):
    """Forward without a plan for a few routed slots (decode): both GEMM kernels in BY_EXPERT mode, one
    program per (expert, column tile) taking every slot routed to its expert, so each touched expert's
    weights are read once and experts without slots return at once. Three launches in all."""
    num_tokens, hidden = x.shape
    num_experts = gate_up_proj.shape[0]
    inter = _intermediate(gate_up_proj, gated)
    top_k = ids.shape[1]
    num_rows = num_tokens * top_k
    flat_ids = ids.reshape(-1)
    upcast, precision = interpreting(), dot_precision(x.dtype)
    act = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    up, down = cfg["up"], cfg["down"]
    bias, stride_be, stride_bn = _weight_strides(gate_up_bias, x)
    launcher(_gate_up_kernel, (num_experts, cdiv(inter, up["BLOCK_N"])))(
        x, x.stride(0), x.stride(1), gate_up_proj, *gate_up_proj.stride(), bias, stride_be, stride_bn,
        flat_ids, flat_ids, flat_ids, act, act, hidden, inter, num_experts, num_rows, top_k, 0,
        float(swiglu_limit or 0.0), *_caps(softcaps), ACTIVATION=ACTIVATION_CODES[activation],
        INTERLEAVED=interleaved, GATED=gated,
        HAS_BIAS=gate_up_bias is not None, HAS_LIMIT=swiglu_limit is not None, STORE_ACT=True, SAVE_PRE=False,
        UPCAST=upcast, DOT_PRECISION=precision, BY_EXPERT=True, PAIRED=paired(x, gated), GROUP_M=0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"], num_warps=up["num_warps"],
        num_stages=up["num_stages"])
    slot_rows = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    bias, stride_be, stride_bj = _weight_strides(down_bias, x)
    launcher(_rows_matmul_kernel, (num_experts, cdiv(hidden, down["BLOCK_N"])))(
        act, down_proj, down_proj.stride(0), down_proj.stride(2), down_proj.stride(1), bias, stride_be, stride_bj,
        weights.reshape(-1), flat_ids, flat_ids, flat_ids, slot_rows, inter, hidden, num_experts, num_rows, 0,
        HAS_BIAS=down_bias is not None, HAS_ROUTE_W=True, UPCAST=upcast, DOT_PRECISION=precision, BY_EXPERT=True,
        GROUP_M=0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
        num_warps=down["num_warps"], num_stages=down["num_stages"])
    return combine_slots(slot_rows, num_tokens, top_k, x.dtype)


def one_token_path_enabled() -> bool:
    """MOE_KERNELS_ONE_TOKEN = "gemv" (default) or "tiles": how a one-token forward without gradients runs, as
    the two GEMV kernels (:func:`_one_token_forward`, two launches) or as the decode path's tiles (three)."""
    choice = os.environ.get("MOE_KERNELS_ONE_TOKEN", "gemv") or "gemv"
    if choice not in ("gemv", "tiles"):
        raise ValueError(f"MOE_KERNELS_ONE_TOKEN must be gemv or tiles, not {choice!r}")
    return choice == "gemv"


def _one_token_forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, interleaved,
                       swiglu_limit, gated, softcaps, cfg):
    """Forward of one token (batch-1 decode) without a plan: a GEMV per routed slot for gate/up, then one program
    per output tile that runs the k down GEMVs and sums them with the routing weights. Two launches, and the
    host's time to issue a launch is most of a decode step's MoE time on a GPU (benchmarks/RESULTS_GPU.md)."""
    hidden = x.shape[1]
    inter = _intermediate(gate_up_proj, gated)
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    up, down = cfg["up"], cfg["down"]
    act = torch.empty((top_k, inter), dtype=x.dtype, device=x.device)
    bias, stride_be, stride_bn = _weight_strides(gate_up_bias, x)
    launcher(_one_token_gate_up_kernel, (top_k, cdiv(inter, up["BLOCK_N"])))(
        x, x.stride(1), gate_up_proj, *gate_up_proj.stride(), bias, stride_be, stride_bn, flat_ids, act, hidden,
        inter, float(swiglu_limit or 0.0), *_caps(softcaps), ACTIVATION=ACTIVATION_CODES[activation],
        INTERLEAVED=interleaved, GATED=gated, HAS_BIAS=gate_up_bias is not None, HAS_LIMIT=swiglu_limit is not None,
        BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"], num_warps=up["num_warps"], num_stages=up["num_stages"])
    y = torch.empty((1, hidden), dtype=x.dtype, device=x.device)
    bias, stride_be, stride_bh = _weight_strides(down_bias, x)
    launcher(_one_token_down_kernel, (cdiv(hidden, down["BLOCK_N"]),))(
        act, down_proj, *down_proj.stride(), bias, stride_be, stride_bh, weights.reshape(-1), flat_ids, y, inter,
        hidden, top_k, HAS_BIAS=down_bias is not None, BLOCK_N=down["BLOCK_N"], BLOCK_K=down["BLOCK_K"],
        num_warps=down["num_warps"], num_stages=down["num_stages"])
    return y


# The split down backward's first pass runs _gate_up_kernel as a plain gather-GEMM: no activation is applied
# (STORE_ACT off), so its code is any valid one; one fixed value keeps to one compiled variant per tile.
_PLAIN_GEMM_ACTIVATION = ACTIVATION_CODES["silu"]


def _split_down_backward(grad_y, down_proj, down_bias, ids, route_w, pre, grad_pre, sorted_slots, expert_offsets,
                         tiles, cfg, activation, interleaved, swiglu_limit, gated, softcaps) -> torch.Tensor:
    """The backward through the down GEMM and the activation in two passes (:func:`split_down_backward_tile`):
    G[p] = dy[token(p)] @ W_d[e] as ``_gate_up_kernel`` ungated over W_d^T (its pre output, the gathered rows and
    the wide tiles of ``cfg``), then ``_activation_backward_kernel`` (grad_pre and the d(routing weight) partials).
    Fills ``grad_pre``; returns d(routing weights) [T, k] fp32. A down bias adds <b_d[e], dy[token]> per slot, one
    [T, E] product gathered at ``ids``."""
    num_rows = sorted_slots.numel()
    num_experts, hidden, inter = down_proj.shape
    num_tokens, top_k = ids.shape
    grad_act = torch.empty((num_rows, inter), dtype=grad_y.dtype, device=grad_y.device)
    launcher(_gate_up_kernel, (max_tiles(num_rows, num_experts, cfg["BLOCK_M"]), cdiv(inter, cfg["BLOCK_N"])))(
        grad_y, grad_y.stride(0), grad_y.stride(1), down_proj, down_proj.stride(0), down_proj.stride(2),
        down_proj.stride(1), grad_y, 0, 0, sorted_slots, expert_offsets, tiles, grad_act, grad_act, hidden, inter,
        num_experts, num_rows, top_k, num_experts.bit_length(), 0.0, 1.0, 1.0,
        ACTIVATION=_PLAIN_GEMM_ACTIVATION, INTERLEAVED=False, GATED=False, HAS_BIAS=False, HAS_LIMIT=False,
        STORE_ACT=False, SAVE_PRE=True, UPCAST=interpreting(), DOT_PRECISION=dot_precision(grad_y.dtype),
        BY_EXPERT=False, PAIRED=False, GROUP_M=group_m(cfg), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    col_tiles = cdiv(inter, _ROW_BLOCK_C)
    grad_w_partial = torch.empty((num_rows, col_tiles), dtype=torch.float32, device=grad_y.device)
    launcher(_activation_backward_kernel, (cdiv(num_rows, _ROW_BLOCK_R), col_tiles))(
        grad_act, pre, route_w, sorted_slots, grad_pre, grad_w_partial, num_rows, inter, col_tiles,
        float(swiglu_limit or 0.0), *_caps(softcaps), ACTIVATION=ACTIVATION_CODES[activation],
        INTERLEAVED=interleaved, GATED=gated, HAS_LIMIT=swiglu_limit is not None, BLOCK_R=_ROW_BLOCK_R,
        BLOCK_C=_ROW_BLOCK_C)
    grad_weights = grad_w_partial.sum(dim=1).view(num_tokens, top_k)
    if down_bias is not None:
        grad_weights += torch.mm(grad_y.float(), down_bias.float().t()).gather(1, ids.long())
    return grad_weights


def _backward(grad_y, x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, pre, expert_offsets,
              sorted_slots, tiles, activation, interleaved, swiglu_limit, gated, softcaps, need_x, need_params):
    num_tokens, hidden = x.shape
    num_experts, width, _ = gate_up_proj.shape  # width = 2I gated, I not gated
    inter = _intermediate(gate_up_proj, gated)
    top_k = ids.shape[1]
    num_rows = num_tokens * top_k
    cfg = mlp_config(num_rows, num_experts, inter, fp32=x.dtype == torch.float32, device=x.device)
    upcast = interpreting()
    precision = dot_precision(x.dtype)
    steps = num_experts.bit_length()
    code = ACTIVATION_CODES[activation]
    limit = float(swiglu_limit or 0.0)
    caps = _caps(softcaps)
    route_w = weights.reshape(-1)

    # d pre and d(routing weights)
    bw = cfg["down_bwd"]
    grad_pre = torch.empty((num_rows, width), dtype=x.dtype, device=x.device)
    split_tile = split_down_backward_tile(cfg)
    if split_tile is not None:
        grad_weights = _split_down_backward(grad_y, down_proj, down_bias, ids, route_w, pre, grad_pre, sorted_slots,
                                            expert_offsets, tiles[_TILE_ROW["down_bwd"]], split_tile, activation,
                                            interleaved, swiglu_limit, gated, softcaps)
    else:
        col_tiles = cdiv(inter, bw["BLOCK_N"])
        grad_w_partial = torch.empty((num_rows, col_tiles), dtype=torch.float32, device=x.device)
        bias, stride_be, stride_bh = _weight_strides(down_bias, x)
        launcher(_down_backward_kernel, (max_tiles(num_rows, num_experts, bw["BLOCK_M"]), col_tiles))(
            grad_y, grad_y.stride(0), grad_y.stride(1), down_proj, *down_proj.stride(), bias, stride_be, stride_bh,
            route_w, pre, sorted_slots, expert_offsets, tiles[_TILE_ROW["down_bwd"]], grad_pre,
            grad_w_partial, hidden, inter, num_experts, top_k, steps, col_tiles, limit, *caps,
            ACTIVATION=code, INTERLEAVED=interleaved, GATED=gated, HAS_BIAS=down_bias is not None,
            HAS_LIMIT=swiglu_limit is not None, UPCAST=upcast, DOT_PRECISION=precision, GROUP_M=group_m(bw),
            BLOCK_M=bw["BLOCK_M"], BLOCK_N=bw["BLOCK_N"], BLOCK_K=bw["BLOCK_K"],
            num_warps=bw["num_warps"], num_stages=bw["num_stages"])
        grad_weights = grad_w_partial.sum(dim=1).view(num_tokens, top_k)

    def empty():  # a distinct placeholder per missing gradient (op outputs must not alias)
        return x.new_empty(0)

    grad_x = empty()
    if need_x:
        dx = cfg["dx"]
        slot_rows = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
        launcher(_rows_matmul_kernel, (max_tiles(num_rows, num_experts, dx["BLOCK_M"]), cdiv(hidden, dx["BLOCK_N"])))(
            grad_pre, gate_up_proj, *gate_up_proj.stride(), x, 0, 0, route_w, sorted_slots, expert_offsets,
            tiles[_TILE_ROW["dx"]], slot_rows, width, hidden, num_experts, num_rows, steps,
            HAS_BIAS=False, HAS_ROUTE_W=False, UPCAST=upcast, DOT_PRECISION=precision, BY_EXPERT=False,
            GROUP_M=group_m(dx), BLOCK_M=dx["BLOCK_M"], BLOCK_N=dx["BLOCK_N"], BLOCK_K=dx["BLOCK_K"],
            num_warps=dx["num_warps"], num_stages=dx["num_stages"])
        grad_x = combine_slots(slot_rows, num_tokens, top_k, x.dtype)

    grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias = empty(), empty(), empty(), empty()
    if need_params and weight_grads_by_grouped_mm(x, hidden, inter, gate_up_bias is not None or down_bias is not None,
                                                  num_rows):
        grad_gate_up, grad_down = _grouped_mm_weight_grads(grad_y, x, pre, grad_pre, route_w, expert_offsets,
                                                           sorted_slots, top_k, activation, interleaved, swiglu_limit,
                                                           gated, softcaps)
    elif need_params:
        wg = cfg["dw"]
        grad_down = torch.empty(down_proj.shape, dtype=down_proj.dtype, device=x.device)
        grad_down_bias = torch.empty((num_experts, hidden), dtype=x.dtype, device=x.device) if down_bias is not None else empty()
        expert_major = group_m(wg) > 0  # MOE_KERNELS_GROUP_M=0: the old order here too

        def outer_grid(lhs_dim, rhs_dim):
            tiles = (cdiv(lhs_dim, wg["BLOCK_I"]), cdiv(rhs_dim, wg["BLOCK_J"]))
            return (*tiles, num_experts) if expert_major else (num_experts, *tiles)

        launcher(_expert_outer_kernel, outer_grid(hidden, inter))(
            grad_y, grad_y.stride(0), grad_y.stride(1), pre, width, 1, route_w, sorted_slots, expert_offsets,
            grad_down, *grad_down.stride(), grad_down_bias if down_bias is not None else grad_down, hidden,
            hidden, inter, inter, top_k, limit, *caps,
            LHS_BY_TOKEN=True, LHS_WEIGHTED=True, RHS_BY_TOKEN=False, RHS_ACT=True, ACTIVATION=code,
            INTERLEAVED=interleaved, GATED=gated, HAS_LIMIT=swiglu_limit is not None, BIAS_GRAD=down_bias is not None,
            UPCAST=upcast, DOT_PRECISION=precision, EXPERT_MAJOR=expert_major, BLOCK_I=wg["BLOCK_I"],
            BLOCK_J=wg["BLOCK_J"], BLOCK_P=wg["BLOCK_P"],
            num_warps=wg["num_warps"], num_stages=wg["num_stages"])
        grad_gate_up = torch.empty(gate_up_proj.shape, dtype=gate_up_proj.dtype, device=x.device)
        grad_gate_up_bias = (torch.empty((num_experts, width), dtype=x.dtype, device=x.device)
                             if gate_up_bias is not None else empty())
        launcher(_expert_outer_kernel, outer_grid(width, hidden))(
            grad_pre, width, 1, x, x.stride(0), x.stride(1), route_w, sorted_slots, expert_offsets,
            grad_gate_up, *grad_gate_up.stride(), grad_gate_up_bias if gate_up_bias is not None else grad_gate_up,
            width, width, hidden, inter, top_k, limit, *caps,
            LHS_BY_TOKEN=False, LHS_WEIGHTED=False, RHS_BY_TOKEN=True, RHS_ACT=False, ACTIVATION=code,
            INTERLEAVED=interleaved, GATED=gated, HAS_LIMIT=swiglu_limit is not None, BIAS_GRAD=gate_up_bias is not None,
            UPCAST=upcast, DOT_PRECISION=precision, EXPERT_MAJOR=expert_major, BLOCK_I=wg["BLOCK_I"],
            BLOCK_J=wg["BLOCK_J"], BLOCK_P=wg["BLOCK_P"],
            num_warps=wg["num_warps"], num_stages=wg["num_stages"])
    return grad_x, grad_gate_up, grad_down, grad_weights, grad_gate_up_bias, grad_down_bias


# ----------------------------------------------------------------------------------------------------
# registered ops (moe_kernels_triton::moe_mlp_forward / moe_mlp_inference / moe_mlp_backward) and autograd


def _forward_impl(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                  activation: str, interleaved: bool, swiglu_limit: Optional[float], gated: bool,
                  softcaps: Optional[list[float]], save_pre: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [T,H], pre [N or 0, 2I] ([N or 0, I] not gated), expert_offsets [E+1], sorted_slots [N],
    tiles [4, E+1]); the last four are the state the backward needs (pre is empty unless save_pre)."""
    _check_scalars(swiglu_limit, softcaps)
    return _forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, interleaved,
                    swiglu_limit, gated, softcaps, save_pre)


def _forward_fake(x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, activation, interleaved,
                  swiglu_limit, gated, softcaps, save_pre):
    num_rows = ids.shape[0] * ids.shape[1]
    num_experts = gate_up_proj.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((num_rows if save_pre else 0, gate_up_proj.shape[1])),
            ids.new_empty((num_experts + 1,), dtype=torch.int32),
            ids.new_empty((num_rows,), dtype=torch.int32),
            ids.new_empty((TILE_MAPS, num_experts + 1), dtype=torch.int32))


def _inference_impl(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, gate_up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                    activation: str, interleaved: bool, swiglu_limit: Optional[float], gated: bool,
                    softcaps: Optional[list[float]]) -> torch.Tensor:
    """y [T,H] of a forward that needs no gradient: the one-token GEMVs for T = 1, the decode path for T*k <= the
    decode config's BLOCK_M slots, else the planned forward without its backward state. The first two read the
    routing as given (weights float32 or x's dtype, ids int32 or int64: no conversion launch at decode). The
    choice is made here,
    inside the op, so that torch.compile traces one opaque call and never the config table (a file read Dynamo
    cannot trace)."""
    _check_scalars(swiglu_limit, softcaps)
    cfg = (one_token_config(x.dtype == torch.float32, down_proj.shape[2], x.device)
           if ids.shape[0] == 1 and one_token_path_enabled() else None)
    if cfg is not None:  # None above the GEMVs' widest intermediate size: the decode tiles are faster there
        return _one_token_forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                                  interleaved, swiglu_limit, gated, softcaps, cfg)
    cfg = decode_config(ids.numel(), x.dtype == torch.float32, down_proj.shape[2], x.device)
    if cfg is not None:
        return _decode_forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                               interleaved, swiglu_limit, gated, softcaps, cfg)
    weights, ids = fp32_int32_routing(weights, ids)  # the plan and the planned kernels read int32 ids, fp32 weights
    return _forward(x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, interleaved,
                    swiglu_limit, gated, softcaps, False)[0]


def _inference_fake(x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, activation, interleaved,
                    swiglu_limit, gated, softcaps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_impl(grad_y: torch.Tensor, x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   weights: torch.Tensor, ids: torch.Tensor, gate_up_bias: Optional[torch.Tensor],
                   down_bias: Optional[torch.Tensor], pre: torch.Tensor, expert_offsets: torch.Tensor,
                   sorted_slots: torch.Tensor, tiles: torch.Tensor, activation: str, interleaved: bool,
                   swiglu_limit: Optional[float], gated: bool, softcaps: Optional[list[float]], need_x: bool,
                   need_params: bool) -> list[torch.Tensor]:
    """Returns [dx, d gate_up_proj, d down_proj, d weights, d gate_up_bias, d down_bias]; a gradient not
    asked for (need_x / need_params false, or no bias) is an empty tensor."""
    return list(_backward(grad_y, x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, pre,
                          expert_offsets, sorted_slots, tiles, activation, interleaved, swiglu_limit, gated, softcaps,
                          need_x, need_params))


def _backward_fake(grad_y, x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, pre, expert_offsets,
                   sorted_slots, tiles, activation, interleaved, swiglu_limit, gated, softcaps, need_x, need_params):
    def empty():
        return x.new_empty(0)

    return [torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else empty(),
            x.new_empty(gate_up_proj.shape) if need_params else empty(),
            x.new_empty(down_proj.shape) if need_params else empty(),
            weights.new_empty(ids.shape, dtype=torch.float32),
            x.new_empty(gate_up_bias.shape) if need_params and gate_up_bias is not None else empty(),
            x.new_empty(down_bias.shape) if need_params and down_bias is not None else empty()]


moe_mlp_forward_op = register_op("moe_mlp_forward", _forward_impl, _forward_fake)
moe_mlp_inference_op = register_op("moe_mlp_inference", _inference_impl, _inference_fake)
moe_mlp_backward_op = register_op("moe_mlp_backward", _backward_impl, _backward_fake)


class MoeMLPFunction(torch.autograd.Function):
    """The expert MLP with its backward: the forward op keeps the plan, its tile maps and (unless
    MOE_KERNELS_RECOMPUTE) the pre-activation for the backward op."""

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, activation, interleaved,
                swiglu_limit, gated, softcaps):
        save_pre = not recompute_enabled()
        y, pre, expert_offsets, sorted_slots, tiles = moe_mlp_forward_op(
            x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, activation, interleaved, swiglu_limit,
            gated, softcaps, save_pre)
        ctx.save_for_backward(x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, pre, expert_offsets,
                              sorted_slots, tiles)
        ctx.options = (activation, interleaved, swiglu_limit, gated, softcaps)
        return y

    @staticmethod
    @first_order_only("moe_mlp (triton)")
    def backward(ctx, grad_y):
        (x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, pre, expert_offsets, sorted_slots,
         tiles) = ctx.saved_tensors
        activation, interleaved, swiglu_limit, gated, softcaps = ctx.options
        if pre.shape[0] != ids.numel():  # recompute mode: one more gate/up GEMM instead of keeping [N, 2I]
            cfg = mlp_config(ids.numel(), gate_up_proj.shape[0], _intermediate(gate_up_proj, gated),
                             fp32=x.dtype == torch.float32, device=x.device)["up"]
            _, pre = _gate_up(x, gate_up_proj, gate_up_bias, ids.shape[1], expert_offsets, sorted_slots,
                              tiles[_TILE_ROW["up"]], cfg, activation, interleaved, swiglu_limit, gated, softcaps,
                              store_act=False, save_pre=True)
        needs = ctx.needs_input_grad
        need_params = any(needs[i] for i in (1, 2, 5, 6))
        dx, dgu, dd, dw, dgub, ddb = moe_mlp_backward_op(
            grad_y.contiguous(), x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, pre,
            expert_offsets, sorted_slots, tiles, activation, interleaved, swiglu_limit, gated, softcaps, needs[0],
            need_params)
        return (dx if needs[0] else None, dgu if needs[1] else None, dd if needs[2] else None,
                dw if needs[3] else None, None,
                dgub if needs[5] else None, ddb if needs[6] else None, None, None, None, None, None)


def moe_mlp(x, gate_up_proj, down_proj, weights, ids, activation="silu", gate_up_bias=None, down_bias=None,
            interleaved=False, swiglu_limit=None, gated=True, softcaps=None):
    """Backend entry point (arguments validated by :func:`moe_kernels.ops.moe_mlp`: weights [T,k] float32 or x's
    dtype and ids [T,k] int32 or int64, both contiguous; interleaved and gated bools; swiglu_limit None or a float;
    softcaps None or (gate_cap, up_cap) for softcap_swiglu):
    y [T, H] in x's dtype."""
    softcaps = None if softcaps is None else list(softcaps)  # the registered ops take float[]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gate_up_proj, down_proj, weights, gate_up_bias, down_bias))
    if needs_grad:
        # (a bf16 weights' gradient comes back through the conversion's own backward)
        weights, ids = fp32_int32_routing(weights, ids)
        return MoeMLPFunction.apply(x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, activation,
                                    interleaved, swiglu_limit, gated, softcaps)
    return moe_mlp_inference_op(x, gate_up_proj, down_proj, weights, ids, gate_up_bias, down_bias, activation,
                                interleaved, swiglu_limit, gated, softcaps)


# ----------------------------------------------------------------------------------------------------
# ahead-of-time compile list (for ``moe-kernels compile-check``)

_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}
_INT_POINTERS = ("sorted_slots_ptr", "expert_offsets_ptr", "tile_offsets_ptr", "ids_ptr")
_FP32_POINTERS = ("route_w_ptr", "grad_w_partial_ptr")
# A Hugging Face router's routing (int64 ids, weights in the model's dtype), which the decode and one-token
# kernels read as they get it; the decode (BY_EXPERT) launches pass the flat ids in all three plan pointers.
_HF_ROUTING = {"ids_ptr": "*i64", "route_w_ptr": "*bf16"}
_BY_EXPERT_IDS = ("sorted_slots_ptr", "expert_offsets_ptr", "tile_offsets_ptr")


def _routings(activation: str, limit: bool, data: str) -> list[dict]:
    """The routing pointer types a decode-side kernel is compiled for: as the kernels' own (no override), and for
    the plain SwiGLU in bf16 also as a Hugging Face router hands it over."""
    return [{}] + ([_HF_ROUTING] if activation == "silu" and not limit and data == "*bf16" else [])
# (activation, interleaved, bias, limit, gated): the plain SwiGLU of most families, DeepSeek-V4's clamped one,
# GPT-OSS's form, the longest epilogue (clamps, biases, interleaved columns), Inkling2's soft-capped SwiGLU and
# Nemotron-H's ungated ReLU^2.
_COMPILE_VARIANTS = (("silu", False, False, False, True), ("silu", False, False, True, True),
                     ("gpt_oss", True, True, True, True), ("softcap_swiglu", False, False, False, True),
                     ("relu2", False, False, False, False))


def _signature(kernel, constexprs: dict, data: str, overrides: dict = ()) -> dict:
    overrides = dict(overrides)
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in overrides:
            types[name] = overrides[name]
        elif name.endswith("_ptr"):
            types[name] = "*i32" if name in _INT_POINTERS else "*fp32" if name in _FP32_POINTERS else data
        else:
            types[name] = "fp32" if name in ("limit", "gate_cap", "up_cap") else "i32"
    return types


# The contiguous HF layout of a real launch: unit strides (constexprs there, as the JIT specialises them)
# and the integer arguments that are multiples of 16 for real model sizes.
_LAYOUT = {
    "gate_up": ({"stride_xh": 1, "stride_wh": 1, "stride_bn": 1},
                ("stride_xt", "stride_we", "stride_wn", "stride_be", "hidden", "inter")),
    "down": ({"stride_wc": 1, "stride_bj": 1}, ("stride_we", "stride_wj", "stride_be", "reduce_dim", "out_dim")),
    "dx": ({"stride_wj": 1, "stride_bj": 1}, ("stride_we", "stride_wc", "stride_be", "reduce_dim", "out_dim")),
    "down_bwd": ({"stride_gh": 1, "stride_wn": 1, "stride_bh": 1},
                 ("stride_gt", "stride_we", "stride_wh", "stride_be", "hidden", "inter")),
    # the split down backward's G GEMM: _gate_up_kernel over dy and W_d^T (reduce stride I, no bias: zero strides)
    "down_bwd_split": ({"stride_xh": 1, "stride_wn": 1},
                       ("stride_xt", "stride_we", "stride_wh", "stride_be", "stride_bn", "hidden", "inter")),
    "one_token_up": ({"stride_xh": 1, "stride_wh": 1, "stride_bn": 1},
                     ("stride_we", "stride_wn", "stride_be", "hidden", "inter")),
    "one_token_down": ({"stride_wi": 1, "stride_bh": 1}, ("stride_we", "stride_wh", "stride_be", "inter", "hidden")),
    "dw": ({"stride_lc": 1, "stride_rc": 1, "stride_oj": 1},
           ("stride_lt", "stride_rt", "stride_oe", "stride_oi", "stride_bge", "lhs_dim", "rhs_dim", "inter")),
}


TUNE_CANDIDATES_VARIABLE = "MOE_KERNELS_COMPILE_TUNE_CANDIDATES"  # set by compile-check --tune-candidates


def _compile_specs():
    """(kernel, signature, constexprs, options, divisible) for every expert-MLP kernel at every shipped config:
    the planned kernels of the 'mlp' families and the decode (BY_EXPERT) launches of the 'mlp_decode' ones."""
    specs = []

    def add(kernel, cfg, constexprs, layout, data, precision, overrides=()):
        # precision None: a kernel without tl.dot (the one-token GEMVs), so neither UPCAST nor DOT_PRECISION
        unit_strides, divisible = _LAYOUT[layout]
        dot = {} if precision is None else {"UPCAST": False, "DOT_PRECISION": precision}
        constexprs = dict(dot, **unit_strides, **constexprs)
        specs.append((kernel, _signature(kernel, constexprs, data, overrides), constexprs,
                      {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}, divisible))

    def gemm(cfg, block_m=None):  # block_m: the decode path's (by expert, launch order)
        return {"BLOCK_M": block_m or cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                "GROUP_M": 0 if block_m else configured_group_m(cfg)}

    # the tile maps of every planned launch (common.tile_maps; the adapters' too)
    tile_scan = {"BLOCK_E": _TILE_SCAN_BLOCK_E}
    specs.append((_tile_scan_kernel, _signature(_tile_scan_kernel, tile_scan, "*i32"), tile_scan,
                  {"num_warps": 4, "num_stages": 1}, ()))
    if os.environ.get(TUNE_CANDIDATES_VARIABLE) == "1":  # compile-check --tune-candidates: the tuner's tiles only
        from .tune import candidate_entries, decode_candidate_entries

        families = ((torch.bfloat16, candidate_entries(), decode_candidate_entries()),)
    else:
        families = ((dtype, entries("mlp" + suffix), entries("mlp_decode" + suffix))
                    for dtype, suffix in ((torch.bfloat16, ""), (torch.float32, "_fp32")))
    for dtype, mlp_entries, decode_entries in families:
        data = _POINTER_TYPES[dtype]
        precision = "ieee" if dtype == torch.float32 else "tf32"
        # the gate/up dot forms a launch can take (paired(): both for 16-bit gated experts, by arch; else two dots)
        gated_forms = (False,) if dtype == torch.float32 else (True, False)
        for entry in mlp_entries:
            for activation, interleaved, bias, limit, gated in _COMPILE_VARIANTS:
                act = {"ACTIVATION": ACTIVATION_CODES[activation], "INTERLEAVED": interleaved, "HAS_LIMIT": limit,
                       "GATED": gated}
                for pair in (gated_forms if gated else (False,)):
                    add(_gate_up_kernel, entry["up"], dict(act, HAS_BIAS=bias, STORE_ACT=True, SAVE_PRE=True,
                                                           BY_EXPERT=False, PAIRED=pair, **gemm(entry["up"])),
                        "gate_up", data, precision)
                # the fused form (the default without a 'split' tile; MOE_KERNELS_DOWN_BWD=fused's otherwise)
                add(_down_backward_kernel, entry["down_bwd"], dict(act, HAS_BIAS=bias, **gemm(entry["down_bwd"])),
                    "down_bwd", data, precision)
                dw = entry["dw"]
                blocks = {"BLOCK_I": dw["BLOCK_I"], "BLOCK_J": dw["BLOCK_J"], "BLOCK_P": dw["BLOCK_P"],
                          "EXPERT_MAJOR": configured_group_m(dw) > 0}
                add(_expert_outer_kernel, dw, dict(act, LHS_BY_TOKEN=True, LHS_WEIGHTED=True, RHS_BY_TOKEN=False,
                                                   RHS_ACT=True, BIAS_GRAD=bias, **blocks), "dw", data, precision)
                add(_expert_outer_kernel, dw, dict(act, LHS_BY_TOKEN=False, LHS_WEIGHTED=False, RHS_BY_TOKEN=True,
                                                   RHS_ACT=False, BIAS_GRAD=bias, **blocks), "dw", data, precision)
            if "split" in entry["down_bwd"]:  # the split form's G GEMM (its elementwise pass: below)
                split = split_tile(entry)
                add(_gate_up_kernel, split, dict(ACTIVATION=_PLAIN_GEMM_ACTIVATION, INTERLEAVED=False, GATED=False,
                                                 HAS_BIAS=False, HAS_LIMIT=False, STORE_ACT=False, SAVE_PRE=True,
                                                 BY_EXPERT=False, PAIRED=False, **gemm(split)),
                    "down_bwd_split", data, precision)
            add(_rows_matmul_kernel, entry["down"], dict(HAS_BIAS=True, HAS_ROUTE_W=True, BY_EXPERT=False,
                                                         **gemm(entry["down"])), "down", data, precision)
            add(_rows_matmul_kernel, entry["dx"], dict(HAS_BIAS=False, HAS_ROUTE_W=False, BY_EXPERT=False,
                                                       **gemm(entry["dx"])), "dx", data, precision)
        if dtype == torch.bfloat16:  # the grouped-GEMM weight gradients' activation pass (bf16 only)
            for activation, interleaved, _, limit, gated in _COMPILE_VARIANTS:
                constexprs = {"ACTIVATION": ACTIVATION_CODES[activation], "INTERLEAVED": interleaved,
                              "GATED": gated, "HAS_LIMIT": limit, "BLOCK_R": _ROW_BLOCK_R, "BLOCK_C": _ROW_BLOCK_C}
                specs.append((_gated_activation_kernel, _signature(_gated_activation_kernel, constexprs, data),
                              constexprs, {"num_warps": 4, "num_stages": 3}, ("inter",)))
            for activation, interleaved, _, limit, gated in _COMPILE_VARIANTS:  # the split down backward's pass 2
                constexprs = {"ACTIVATION": ACTIVATION_CODES[activation], "INTERLEAVED": interleaved,
                              "GATED": gated, "HAS_LIMIT": limit, "BLOCK_R": _ROW_BLOCK_R, "BLOCK_C": _ROW_BLOCK_C}
                specs.append((_activation_backward_kernel, _signature(_activation_backward_kernel, constexprs, data),
                              constexprs, {"num_warps": 4, "num_stages": 3}, ("inter",)))
            for scaled in (False, True):  # its operand gathers: x, and w * dy
                constexprs = {"stride_sc": 1, "SCALED": scaled, "BLOCK_R": _ROW_BLOCK_R, "BLOCK_C": _ROW_BLOCK_C}
                specs.append((_gather_rows_kernel, _signature(_gather_rows_kernel, constexprs, data), constexprs,
                              {"num_warps": 4, "num_stages": 3}, ("stride_st", "width")))
        for entry in decode_entries:
            for activation, interleaved, bias, limit, gated in _COMPILE_VARIANTS:
                act = {"ACTIVATION": ACTIVATION_CODES[activation], "INTERLEAVED": interleaved, "HAS_LIMIT": limit,
                       "GATED": gated}
                routings = _routings(activation, limit, data)
                for routing in routings:
                    ids_in_plan = {name: routing["ids_ptr"] for name in _BY_EXPERT_IDS} if routing else {}
                    for pair in (gated_forms if gated else (False,)):
                        add(_gate_up_kernel, entry["up"],
                            dict(act, HAS_BIAS=bias, STORE_ACT=True, SAVE_PRE=False, BY_EXPERT=True, PAIRED=pair,
                                 **gemm(entry["up"], entry["BLOCK_M"])),
                            "gate_up", data, precision, ids_in_plan)
                    add(_rows_matmul_kernel, entry["down"], dict(HAS_BIAS=bias, HAS_ROUTE_W=True, BY_EXPERT=True,
                                                                 **gemm(entry["down"], entry["BLOCK_M"])),
                        "down", data, precision, dict(ids_in_plan,
                                                      **({"route_w_ptr": routing["route_w_ptr"]} if routing else {})))
    # the one-token GEMVs
    if os.environ.get(TUNE_CANDIDATES_VARIABLE) == "1":
        from .tune import one_token_candidate_entries

        one_token = ((torch.bfloat16, one_token_candidate_entries()),)
    else:
        one_token = ((torch.bfloat16, entries("mlp_one_token")), (torch.float32, entries("mlp_one_token_fp32")))
    for dtype, one_token_entries in one_token:
        data = _POINTER_TYPES[dtype]
        for entry in one_token_entries:
            up, down = entry["up"], entry["down"]
            for activation, interleaved, bias, limit, gated in _COMPILE_VARIANTS:
                routings = _routings(activation, limit, data)
                for routing in routings:
                    add(_one_token_gate_up_kernel, up,
                        {"ACTIVATION": ACTIVATION_CODES[activation], "INTERLEAVED": interleaved, "GATED": gated,
                         "HAS_LIMIT": limit, "HAS_BIAS": bias, "BLOCK_N": up["BLOCK_N"], "BLOCK_K": up["BLOCK_K"]},
                        "one_token_up", data, None, {"ids_ptr": routing["ids_ptr"]} if routing else {})
                    add(_one_token_down_kernel, down, {"HAS_BIAS": bias, "BLOCK_N": down["BLOCK_N"],
                                                       "BLOCK_K": down["BLOCK_K"]}, "one_token_down", data, None,
                        routing)
    return specs
