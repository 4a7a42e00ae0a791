"""Dispatch plan in Triton: a stable counting sort of the T*k routed slots by expert, on the device.

Four launches, no host synchronisation, no E-sized register tensors (so thousands of experts work):

1. ``_block_sort_kernel``   each program sorts one chunk of BLOCK slots by (expert, slot) with ``tl.sort``
                            on a packed key, finds each element's rank inside its expert's run (a
                            segmented scan) and records the chunk's per-expert counts [num_chunks, E].
2. ``_chunk_scan_kernel``   per expert (BLOCK_E experts per program): exclusive scan of the counts over
                            the chunks -> chunk_bases[c, e], and each expert's total.
3. ``_expert_scan_kernel``  one program: exclusive scan of the totals over experts -> expert_offsets [E+1].
4. ``_scatter_kernel``      each chunk writes sorted_slots[pos] = slot and slot_positions[slot] = pos with
                            pos = expert_offsets[e] + chunk_bases[c, e] + rank.

Stability: chunks are scanned in chunk order and ranks inside a chunk follow the slot order, so slots
ascend within each expert, exactly as :func:`moe_kernels.reference.plan`.

A plan of at most one small chunk (decode, small batches: the all-pairs size of ``_block_sort_kernel``) is one
launch instead, ``_small_plan_kernel``: a slot's position is the count of slots that sort before it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import Plan
from .common import cdiv, launcher
from .configs import plan_config


# Chunks up to this size rank by an all-pairs comparison instead of tl.sort (cheaper for small chunks,
# and much cheaper under the interpreter, where tl.sort is emulated).
PAIRWISE_MAX_SLOTS = 128
PAIRWISE_MAX_BLOCK = tl.constexpr(PAIRWISE_MAX_SLOTS)
SMALL_PLAN_BLOCK_E = 32  # experts per step of _small_plan_kernel's offsets loop ([BLOCK_E, BLOCK] compares)


@triton.jit
def _segment_start_combine(left_id, left_start, right_id, right_start):
    # Scan over a sorted run of ids: carry the start position of the current run of equal ids.
    # Associative for sorted input: a right part spanning several runs never has right_id == left_id.
    same = left_id == right_id
    return right_id, tl.where(same, left_start, right_start)


@triton.jit
def _block_sort_kernel(ids_ptr, sorted_key_ptr, rank_ptr, chunk_counts_ptr, num_slots, num_experts,
                       BLOCK: tl.constexpr):
    """Sort one chunk of slots by expert.

    ids_ptr:          [num_slots] int32, contiguous (flattened [T,k] ids).
    sorted_key_ptr:   [num_chunks * BLOCK] int32 out: packed key ``expert * BLOCK + local_slot`` (padding
                      lanes carry expert = num_experts), sorted when BLOCK > PAIRWISE_MAX_BLOCK, else in
                      slot order (ranks come from an all-pairs count there; any order works for the scatter).
    rank_ptr:         [num_chunks * BLOCK] int32 out: rank of each element among its chunk's slots of the
                      same expert.
    chunk_counts_ptr: [num_chunks, num_experts] int32, zero-initialised; out: slots of expert e in chunk c.
    BLOCK:            slots per program (power of two); ``num_experts * BLOCK`` must fit in int32.
    """
    chunk = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    slot = chunk * BLOCK + local
    valid = slot < num_slots
    expert = tl.load(ids_ptr + slot, mask=valid, other=num_experts)
    if BLOCK <= PAIRWISE_MAX_BLOCK:
        # small chunks: rank = earlier slots of the same expert, by an all-pairs count (no sort);
        # elements stay in slot order
        same_before = (expert[:, None] == expert[None, :]) & (local[None, :] < local[:, None])
        rank = tl.sum(same_before.to(tl.int32), axis=1)
        key = expert * BLOCK + local
        sorted_expert = expert
    else:
        key = tl.sort(expert * BLOCK + local)
        sorted_expert = key // BLOCK
        run_start = tl.associative_scan((sorted_expert, local), 0, _segment_start_combine)[1]
        rank = local - run_start
    out = chunk * BLOCK + local
    tl.store(sorted_key_ptr + out, key)
    tl.store(rank_ptr + out, rank)
    # The last element of a run holds the largest rank: an atomic max leaves rank + 1 = the run length.
    in_range = sorted_expert < num_experts
    tl.atomic_max(chunk_counts_ptr + chunk * num_experts + sorted_expert, rank + 1, mask=in_range)


@triton.jit
def _small_plan_kernel(ids_ptr, offsets_ptr, sorted_slots_ptr, slot_positions_ptr, num_slots, num_experts,
                       BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """The whole plan in one program, for num_slots <= BLOCK (<= PAIRWISE_MAX_BLOCK).

    ids_ptr: [num_slots] int32, contiguous.  offsets_ptr: [num_experts + 1] int32 out.
    sorted_slots_ptr, slot_positions_ptr: [num_slots] int32 out.
    A slot's position is the number of slots before it in (expert, slot) order (all pairs, so stable);
    offsets[e] is the number of slots of experts below e, BLOCK_E experts per loop step.
    """
    local = tl.arange(0, BLOCK)
    valid = local < num_slots
    expert = tl.load(ids_ptr + local, mask=valid, other=num_experts)  # padding sorts after every expert
    earlier = local[None, :] < local[:, None]
    before = (expert[None, :] < expert[:, None]) | ((expert[None, :] == expert[:, None]) & earlier)
    position = tl.sum(before.to(tl.int32), axis=1)
    tl.store(sorted_slots_ptr + position, local, mask=valid)
    tl.store(slot_positions_ptr + local, position, mask=valid)
    for start in range(0, num_experts + 1, BLOCK_E):
        experts = start + tl.arange(0, BLOCK_E)
        below = (expert[None, :] < experts[:, None]) & valid[None, :]
        tl.store(offsets_ptr + experts, tl.sum(below.to(tl.int32), axis=1), mask=experts <= num_experts)


@triton.jit
def _chunk_scan_kernel(chunk_counts_ptr, chunk_bases_ptr, totals_ptr, num_chunks, num_experts,
                       BLOCK_E: tl.constexpr):
    """Exclusive scan over chunks, per expert.

    chunk_counts_ptr: [num_chunks, num_experts] int32.
    chunk_bases_ptr:  [num_chunks, num_experts] int32 out: slots of expert e in chunks before c.
    totals_ptr:       [num_experts] int32 out: slots of expert e in all chunks.
    BLOCK_E:          experts per program (power of two).
    """
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = experts < num_experts
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for chunk in range(num_chunks):
        count = tl.load(chunk_counts_ptr + chunk * num_experts + experts, mask=mask, other=0)
        tl.store(chunk_bases_ptr + chunk * num_experts + experts, running, mask=mask)
        running += count
    tl.store(totals_ptr + experts, running, mask=mask)


@triton.jit
def _expert_scan_kernel(totals_ptr, offsets_ptr, num_experts, BLOCK_E: tl.constexpr):
    """Exclusive scan over experts (one program): offsets[0] = 0, offsets[e+1] = offsets[e] + totals[e].

    totals_ptr:  [num_experts] int32.
    offsets_ptr: [num_experts + 1] int32 out.
    BLOCK_E:     experts per loop step (power of two).
    """
    carry = 0
    tl.store(offsets_ptr, 0)
    for start in range(0, num_experts, BLOCK_E):
        experts = start + tl.arange(0, BLOCK_E)
        mask = experts < num_experts
        totals = tl.load(totals_ptr + experts, mask=mask, other=0)
        inclusive = tl.cumsum(totals, 0) + carry
        tl.store(offsets_ptr + experts + 1, inclusive, mask=mask)
        carry += tl.sum(totals, 0)


@triton.jit
def _scatter_kernel(sorted_key_ptr, rank_ptr, chunk_bases_ptr, offsets_ptr, sorted_slots_ptr,
                    slot_positions_ptr, num_slots, num_experts, BLOCK: tl.constexpr):
    """Write the permutation and its inverse.

    sorted_key_ptr, rank_ptr: [num_chunks * BLOCK] int32 from ``_block_sort_kernel``.
    chunk_bases_ptr:          [num_chunks, num_experts] int32 from ``_chunk_scan_kernel``.
    offsets_ptr:              [num_experts + 1] int32 from ``_expert_scan_kernel``.
    sorted_slots_ptr, slot_positions_ptr: [num_slots] int32 out.
    """
    chunk = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    key = tl.load(sorted_key_ptr + chunk * BLOCK + local)
    rank = tl.load(rank_ptr + chunk * BLOCK + local)
    expert = key // BLOCK
    slot = chunk * BLOCK + key % BLOCK
    valid = expert < num_experts
    base = tl.load(offsets_ptr + expert, mask=valid, other=0)
    base += tl.load(chunk_bases_ptr + chunk * num_experts + expert, mask=valid, other=0)
    position = base + rank
    tl.store(sorted_slots_ptr + position, slot, mask=valid)
    tl.store(slot_positions_ptr + slot, position, mask=valid)


def dispatch_plan(ids: torch.Tensor, num_experts: int) -> Plan:
    """Stable counting sort of the slots of ``ids`` [T,k] (int32, values in [0, E)) by expert.

    Returns :class:`moe_kernels.backends.Plan` (expert_offsets [E+1], sorted_slots [T*k],
    slot_positions [T*k], int32), equal to :func:`moe_kernels.reference.plan`. No host sync.
    """
    flat = ids.reshape(-1)  # int32 contiguous: moe_kernels.ops normalised it
    num_slots = flat.numel()
    device = flat.device
    cfg = plan_config(num_slots, num_experts)
    block, block_e = cfg["BLOCK"], cfg["BLOCK_E"]
    if num_experts * block >= 2**31:
        raise ValueError(f"num_experts = {num_experts} is too large for the Triton plan (max {2**31 // block - 1})")
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(num_slots, dtype=torch.int32, device=device)
    slot_positions = torch.empty(num_slots, dtype=torch.int32, device=device)
    if num_slots == 0:
        offsets.zero_()
        return Plan(offsets, sorted_slots, slot_positions)
    if num_slots <= block <= PAIRWISE_MAX_SLOTS:
        launcher(_small_plan_kernel, (1,))(flat, offsets, sorted_slots, slot_positions, num_slots, num_experts,
                                           BLOCK=block, BLOCK_E=SMALL_PLAN_BLOCK_E, num_warps=cfg["num_warps"])
        return Plan(offsets, sorted_slots, slot_positions)
    num_chunks = cdiv(num_slots, block)
    sorted_keys = torch.empty(num_chunks * block, dtype=torch.int32, device=device)
    ranks = torch.empty_like(sorted_keys)
    chunk_counts = torch.zeros((num_chunks, num_experts), dtype=torch.int32, device=device)
    chunk_bases = torch.empty_like(chunk_counts)
    totals = torch.empty(num_experts, dtype=torch.int32, device=device)
    launcher(_block_sort_kernel, (num_chunks,))(flat, sorted_keys, ranks, chunk_counts, num_slots, num_experts,
                                                BLOCK=block, num_warps=cfg["num_warps"])
    launcher(_chunk_scan_kernel, (cdiv(num_experts, block_e),))(chunk_counts, chunk_bases, totals, num_chunks,
                                                                num_experts, BLOCK_E=block_e)
    launcher(_expert_scan_kernel, (1,))(totals, offsets, num_experts, BLOCK_E=block_e)
    launcher(_scatter_kernel, (num_chunks,))(sorted_keys, ranks, chunk_bases, offsets, sorted_slots, slot_positions,
                                             num_slots, num_experts, BLOCK=block, num_warps=cfg["num_warps"])
    return Plan(offsets, sorted_slots, slot_positions)


def _compile_specs():
    """(kernel, signature, constexprs, options) tuples for the AOT compile check, one per shipped config."""
    from .configs import entries
    specs = []
    for cfg in entries("plan"):
        b, be, w = cfg["BLOCK"], cfg["BLOCK_E"], cfg["num_warps"]
        opts = {"num_warps": w, "num_stages": 1}
        specs.append((_block_sort_kernel, {"ids_ptr": "*i32", "sorted_key_ptr": "*i32", "rank_ptr": "*i32",
                                           "chunk_counts_ptr": "*i32", "num_slots": "i32", "num_experts": "i32",
                                           "BLOCK": "constexpr"}, {"BLOCK": b}, opts))
        specs.append((_scatter_kernel, {"sorted_key_ptr": "*i32", "rank_ptr": "*i32", "chunk_bases_ptr": "*i32",
                                        "offsets_ptr": "*i32", "sorted_slots_ptr": "*i32",
                                        "slot_positions_ptr": "*i32", "num_slots": "i32", "num_experts": "i32",
                                        "BLOCK": "constexpr"}, {"BLOCK": b}, opts))
        opts_e = {"num_warps": 4, "num_stages": 1}
        specs.append((_chunk_scan_kernel, {"chunk_counts_ptr": "*i32", "chunk_bases_ptr": "*i32", "totals_ptr": "*i32",
                                           "num_chunks": "i32", "num_experts": "i32", "BLOCK_E": "constexpr"},
                      {"BLOCK_E": be}, opts_e))
        specs.append((_expert_scan_kernel, {"totals_ptr": "*i32", "offsets_ptr": "*i32", "num_experts": "i32",
                                            "BLOCK_E": "constexpr"}, {"BLOCK_E": be}, opts_e))
        if b <= PAIRWISE_MAX_SLOTS:
            specs.append((_small_plan_kernel, {"ids_ptr": "*i32", "offsets_ptr": "*i32", "sorted_slots_ptr": "*i32",
                                               "slot_positions_ptr": "*i32", "num_slots": "i32", "num_experts": "i32",
                                               "BLOCK": "constexpr", "BLOCK_E": "constexpr"},
                          {"BLOCK": b, "BLOCK_E": SMALL_PLAN_BLOCK_E}, opts))
    return specs
