"""The triton backend's own machinery (the ops themselves are tested against the oracle in tests/test_<op>.py):
the plan kernel's sort path, the expert MLP's decode path and its boundary, the weight-gradient choice, config
tables, the adapter launcher's aligned/unaligned configs, the compile check and its kernel specs, and the
backend's device check.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported).
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from moe_testing import (adapter_leaves, assert_close_rel, make_ids, on_triton_launch,  # noqa: E402
                         seeded_mlp_inputs)

from moe_kernels import ops, reference  # noqa: E402
from moe_kernels.triton import BACKEND, adapters, compile_check, configs  # noqa: E402
from moe_kernels.triton.plan import dispatch_plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


# ---------------------------------------------------------------------------------------------- plan kernel

def test_plan_sort_path_over_several_chunks(monkeypatch):
    # BLOCK above the all-pairs limit takes the tl.sort path; 2.3 chunks exercise the chunk scan
    table = dict(configs.load_table(), plan=[{"max_slots": None, "BLOCK": 256, "BLOCK_E": 16, "num_warps": 4}])
    monkeypatch.setattr(configs, "load_table", lambda: table)
    ids = make_ids("random", 130, 37, 3).to(DEVICE)
    ids[:, 0] = 36  # a crowded expert across both chunks
    ids[:, 1] = torch.where(ids[:, 1] == 36, 0, ids[:, 1])
    ids[:, 2] = torch.where(ids[:, 2] == 36, 1, ids[:, 2])
    got, want = dispatch_plan(ids, 37), reference.plan(ids, 37)
    for name, a, b in zip(("expert_offsets", "sorted_slots", "slot_positions"), got, want):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a} != {b}"


# ------------------------------------------------------------------------------ expert MLP: weight gradients

def test_wgrad_choice_is_explicit(monkeypatch):
    from moe_kernels.triton.experts import weight_grads_by_grouped_mm
    x = torch.zeros(2, 16, dtype=torch.bfloat16, device=DEVICE)
    monkeypatch.setenv("MOE_KERNELS_WGRAD", "triton")
    assert not weight_grads_by_grouped_mm(x, 16, 16, False)
    monkeypatch.setenv("MOE_KERNELS_WGRAD", "bogus")
    with pytest.raises(ValueError, match="MOE_KERNELS_WGRAD"):
        weight_grads_by_grouped_mm(x, 16, 16, False)
    monkeypatch.setenv("MOE_KERNELS_WGRAD", "grouped_mm")
    with pytest.raises(ValueError, match="bias"):  # forced where it cannot run: an error, not a silent fallback
        weight_grads_by_grouped_mm(x, 16, 16, True)
    with pytest.raises(ValueError, match="divisible by 8"):
        weight_grads_by_grouped_mm(x, 17, 16, False)
    if not GPU_SM90:
        with pytest.raises(ValueError, match="grouped GEMM"):
            weight_grads_by_grouped_mm(x, 16, 16, False)


def test_wgrad_auto_follows_the_measured_row_threshold(monkeypatch):
    """Unset, the table decides by routed slots: the grouped GEMM from min_rows on (measured faster there on an H200),
    the Triton kernel below; never where it cannot run."""
    from moe_kernels.triton import configs
    from moe_kernels.triton.experts import weight_grads_by_grouped_mm
    monkeypatch.delenv("MOE_KERNELS_WGRAD", raising=False)
    min_rows = configs.wgrad_config()["min_rows"]
    assert configs.wgrad_config()["grouped_mm"] and min_rows > 1
    assert configs.grouped_mm_wgrad_wanted(min_rows) and not configs.grouped_mm_wgrad_wanted(min_rows - 1)
    shipped = configs.wgrad_config
    monkeypatch.setattr(configs, "wgrad_config", lambda: {"grouped_mm": False, "min_rows": 0})
    assert not configs.grouped_mm_wgrad_wanted(10 ** 6)
    monkeypatch.setattr(configs, "wgrad_config", shipped)
    x = torch.zeros(2, 16, dtype=torch.bfloat16, device=DEVICE)
    assert weight_grads_by_grouped_mm(x, 16, 16, False, min_rows) == GPU_SM90
    assert not weight_grads_by_grouped_mm(x, 16, 16, False, min_rows - 1)
    assert not weight_grads_by_grouped_mm(x, 16, 16, True, min_rows)  # biases: the Triton kernel forms their sums


def test_gather_rows_kernel_matches_torch():
    """The grouped-GEMM weight gradients' operand gather: x rows, and dy rows times the slot's weight (fp32 product,
    one cast), in sorted order, from a strided source."""
    from moe_kernels.triton.experts import _gather_rows
    g = torch.Generator().manual_seed(3)
    src = torch.randn(40, 7, 24, generator=g).to(torch.bfloat16)[:, 2, :].to(DEVICE)  # row stride 168, not width
    sorted_slots = torch.randperm(80, generator=g)[:70].to(torch.int32).to(DEVICE)  # T = 40, k = 2; ten slots unused
    route_w = torch.rand(80, generator=g).to(DEVICE)
    tokens = (sorted_slots // 2).long()
    assert torch.equal(_gather_rows(src, sorted_slots, 2, None), src.index_select(0, tokens))
    want = (src.index_select(0, tokens).float() * route_w[sorted_slots.long(), None]).to(torch.bfloat16)
    got = _gather_rows(src, sorted_slots, 2, route_w, torch.bfloat16)
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    else:  # the interpreter's fp32 -> bf16 cast truncates where the GPU's rounds to nearest: one bf16 ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)


@pytest.mark.skipif(torch.cuda.is_available() and not GPU_SM90, reason="CUDA's grouped GEMM needs sm90 for bf16")
@pytest.mark.parametrize("shape", [(12, 32, 16, 5, 2, "skip_last"), (40, 16, 24, 3, 3, "one_expert"),
                                   (1, 8, 8, 4, 4, "random")], ids=lambda s: "T{}-H{}-I{}-E{}-k{}-{}".format(*s))
def test_grouped_mm_weight_grads_match_the_triton_kernel(monkeypatch, shape):
    """The weight gradients through torch's k-grouped GEMM (the shipped choice from the config's min_rows slots on
    sm90 GPUs) agree with ``_expert_outer_kernel``'s. Forced on here, so that it runs without a GPU too: Triton's
    interpreter with torch's CPU grouped GEMM (an empty expert, all rows on one expert, k = E)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    from moe_kernels.triton import experts
    inputs = seeded_mlp_inputs(*shape, dtype=torch.bfloat16)
    x, gate_up, down, weights, ids, _, _ = (t.to(DEVICE).requires_grad_(t.is_floating_point()) if t is not None
                                            else t for t in inputs)
    grads = {}
    for way, forced in (("triton", False), ("grouped_mm", True)):
        monkeypatch.setattr(experts, "weight_grads_by_grouped_mm", lambda *args, forced=forced: forced)
        y = experts.moe_mlp(x, gate_up, down, weights, ids)
        grads[way] = torch.autograd.grad(y.float().square().sum(), (gate_up, down))
    for name, a, b in zip(("d gate_up_proj", "d down_proj"), grads["grouped_mm"], grads["triton"]):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        assert_close_rel(a, b, torch.bfloat16, name)


# ----------------------------------------------------------------------------------- expert MLP: decode path

# the decode path (no plan, no gradient, T*k <= the decode config's BLOCK_M): one token, k = 1, k = E,
# prime E, all tokens on one expert, an expert without tokens, odd widths
DECODE_GRID = [
    (1, 32, 16, 4, 2, "random"),
    (1, 33, 24, 7, 1, "random"),
    (6, 16, 8, 5, 5, "random"),
    (16, 16, 16, 3, 2, "one_expert"),
    (12, 32, 16, 6, 2, "skip_last"),
    (9, 17, 20, 13, 3, "random"),
]


def _check_decode(inputs, dtype, activation="silu", interleaved=False, swiglu_limit=None):
    """The decode path (tiles by expert) against the oracle; one token takes it with MOE_KERNELS_ONE_TOKEN=tiles."""
    from unittest import mock

    from moe_kernels.triton import experts
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = inputs
    assert configs.decode_config(ids.numel(), fp32=dtype == torch.float32) is not None, "shape must take the decode path"
    kwargs = dict(activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=interleaved,
                  swiglu_limit=swiglu_limit)
    calls = []
    original = experts._decode_forward
    experts._decode_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad(), mock.patch.dict(os.environ, {"MOE_KERNELS_ONE_TOKEN": "tiles"}):
            y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton", **kwargs)
    finally:
        experts._decode_forward = original
    assert calls, "the decode path did not run"
    want = reference.moe_mlp(x, gate_up, down, weights, ids, **kwargs)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_rel(y.float(), want.float(), dtype, "y (decode path)")


@pytest.mark.parametrize("shape", DECODE_GRID, ids=lambda s: "T{}-H{}-I{}-E{}-k{}-{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_mlp_decode_path(shape, dtype):
    _check_decode(seeded_mlp_inputs(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("activation,interleaved,bias,limit,transposed", [
    ("gelu", False, True, None, False),
    ("relu", False, True, None, True),
    ("gpt_oss", True, True, 0.7, True),
])
def test_moe_mlp_decode_path_activations_layouts_biases(activation, interleaved, bias, limit, transposed):
    inputs = seeded_mlp_inputs(3, 24, 16, 5, 2, "skip_last", bias=bias, transposed=transposed)
    _check_decode(inputs, torch.float32, activation, interleaved, limit)


def test_moe_mlp_decode_path_boundary():
    """Exactly BLOCK_M slots take the decode path, one more the planned path; both agree with the oracle."""
    block_m = configs.decode_config(1, fp32=True)["BLOCK_M"]
    assert configs.decode_config(block_m + 1, fp32=True) is None
    _check_decode(seeded_mlp_inputs(block_m // 2, 16, 8, 5, 2, "random"), torch.float32)
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(block_m // 2 + 1, 16, 8, 5, 2, "random")
    with torch.no_grad():
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    assert_close_rel(y, reference.moe_mlp(x, gate_up, down, weights, ids), torch.float32, "y (planned path)")


# ------------------------------------------------------------------------- expert MLP: the program order

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moe_kernels.triton.common import tile_and_column  # noqa: E402


@triton.jit
def _order_probe_kernel(out_ptr, GROUP_M: tl.constexpr):
    tile, column = tile_and_column(GROUP_M)
    launch = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out_ptr + 2 * launch, tile)
    tl.store(out_ptr + 2 * launch + 1, column)


@pytest.mark.parametrize("num_tiles,num_cols,group", [(1, 1, 8), (7, 3, 8), (20, 3, 8), (21, 5, 4), (9, 1, 2),
                                                      (6, 4, 0), (5, 2, 1)])
def test_program_order_is_a_bijection_that_sweeps_columns_by_group(num_tiles, num_cols, group):
    """common.tile_and_column: every (row tile, column tile) exactly once, whatever the group size and a short
    last group; in launch order, GROUP_M row tiles take every column before the next group starts (GROUP_M = 0:
    the launch order itself, axis 0 fastest)."""
    out = torch.full((num_tiles * num_cols, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_probe_kernel[(num_tiles, num_cols)](out, GROUP_M=group)
    pairs = [tuple(p) for p in out.cpu().tolist()]  # by launch id
    assert sorted(pairs) == [(t, c) for t in range(num_tiles) for c in range(num_cols)]
    if group == 0:
        assert pairs == [(t, c) for c in range(num_cols) for t in range(num_tiles)]
        return
    for start in range(0, num_tiles, group):
        size = min(group, num_tiles - start)
        first = start * num_cols  # launches of this group
        block = pairs[first:first + size * num_cols]
        assert {t for t, _ in block} == set(range(start, start + size)), (start, block)
        assert block[:size] == [(start + r, 0) for r in range(size)]  # the group's row tiles side by side


def _small_tiles(num_rows, num_experts, inter, *, fp32=False, device=None):
    """16-row, 16-column tiles everywhere: at small shapes, several row tiles per expert and several column
    tiles, so the program order has something to reorder (and short groups)."""
    gemm = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return {"up": gemm, "down": gemm, "down_bwd": gemm, "dx": gemm,
            "dw": {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_P": 16, "num_warps": 4, "num_stages": 1}}


@pytest.mark.parametrize("group", ["1", "2", "3"])
def test_moe_mlp_results_do_not_depend_on_the_program_order(group, monkeypatch):
    """Forward and every gradient with the grouped program order (and the weight-gradient kernel's expert-major
    grid) equal the launch order's bit for bit (each output element is one program's, in the same reduction
    order) and agree with the oracle; 5 experts (prime), an expert with no rows, several row tiles per expert."""
    from moe_kernels.triton import experts

    monkeypatch.setattr(experts, "mlp_config", _small_tiles)
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(40, 48, 40, 5, 2, "skip_last")
    x, gate_up, down, weights = (t.requires_grad_(True) for t in (x, gate_up, down, weights))
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device)

    def run():
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
        return (y, *torch.autograd.grad(y, (x, gate_up, down, weights), grad_y))

    monkeypatch.setenv("MOE_KERNELS_GROUP_M", "0")
    launch_order = run()
    monkeypatch.setenv("MOE_KERNELS_GROUP_M", group)
    grouped = run()
    for name, a, b in zip(("y", "dx", "d gate_up", "d down", "d weights"), grouped, launch_order):
        assert torch.equal(a, b), name
    y = reference.moe_mlp(x, gate_up, down, weights, ids)
    want = (y, *torch.autograd.grad(y, (x, gate_up, down, weights), grad_y))
    for name, a, b in zip(("y", "dx", "d gate_up", "d down", "d weights"), grouped, want):
        assert_close_rel(a, b, torch.float32, name)


@pytest.mark.parametrize("form", ["hf", "gpt_oss_transposed", "decode"])
def test_paired_gate_up_dot_equals_the_two_dots(form, monkeypatch):
    """Gate and up as one dot over 2*BLOCK_N weight rows (the default) against two dots of BLOCK_N: forward and every
    gradient agree to fp32 accumulation order, for gate/up rows stored one block after the other (HF) and interleaved
    in a transposed view (GPT-OSS, biases and the clamp), and on the decode path; I = 40 leaves a partial column
    tile (16-column tiles), 5 experts (prime) with one empty."""
    from moe_kernels.triton import experts

    if form != "decode":
        monkeypatch.setattr(experts, "mlp_config", _small_tiles)
    gpt_oss = form == "gpt_oss_transposed"
    tokens = 3 if form == "decode" else 40
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = seeded_mlp_inputs(
        tokens, 48, 40, 5, 2, "skip_last", bias=gpt_oss, transposed=gpt_oss)
    leaves = [t.requires_grad_(True) for t in (x, gate_up, down, weights)]
    kwargs = dict(activation="gpt_oss", interleaved=True, swiglu_limit=7.0, gate_up_bias=gate_up_bias,
                  down_bias=down_bias) if gpt_oss else {}
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device)

    def run():
        if form == "decode":
            with torch.no_grad():
                return (ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton"),)
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton", **kwargs)
        return (y, *torch.autograd.grad(y, leaves, grad_y))

    monkeypatch.setenv("MOE_KERNELS_PAIRED_DOT", "0")
    two_dots = run()
    monkeypatch.setenv("MOE_KERNELS_PAIRED_DOT", "1")
    paired = run()
    names = ("y", "dx", "d gate_up", "d down", "d weights")
    for name, a, b in zip(names, paired, two_dots):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    y = reference.moe_mlp(x, gate_up, down, weights, ids, **kwargs)
    want = (y,) if form == "decode" else (y, *torch.autograd.grad(y, leaves, grad_y))
    for name, a, b in zip(names, paired, want):
        assert_close_rel(a, b, torch.float32, name)


def test_paired_dot_choice_is_explicit(monkeypatch):
    """The paired gate/up dot runs for gated 16-bit experts where warpgroup MMA exists (and under the interpreter),
    never for fp32 or experts without a gate; MOE_KERNELS_PAIRED_DOT forces either form and rejects other values."""
    from moe_kernels.triton import experts

    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16, device=DEVICE), torch.empty(1, device=DEVICE)
    monkeypatch.delenv("MOE_KERNELS_PAIRED_DOT", raising=False)
    assert experts.paired(bf16, True) is (GPU_SM90 or not torch.cuda.is_available())
    assert experts.paired(fp32, True) is False
    assert experts.paired(bf16, False) is False
    monkeypatch.setenv("MOE_KERNELS_PAIRED_DOT", "1")
    assert experts.paired(fp32, True) is True
    assert experts.paired(bf16, False) is False
    monkeypatch.setenv("MOE_KERNELS_PAIRED_DOT", "0")
    assert experts.paired(bf16, True) is False
    monkeypatch.setenv("MOE_KERNELS_PAIRED_DOT", "yes")
    with pytest.raises(ValueError, match="MOE_KERNELS_PAIRED_DOT"):
        experts.paired(bf16, True)


def _split_small_tiles(num_rows, num_experts, inter, *, fp32=False, device=None):
    """:func:`_small_tiles` whose down_bwd asks for the split form, with a G tile wider than its fused one (32
    columns: I = 40 leaves a partial one)."""
    tiles = _small_tiles(num_rows, num_experts, inter)
    split = {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return dict(tiles, down_bwd=dict(tiles["down_bwd"], GROUP_M=3, split=split))


@pytest.mark.parametrize("form,tokens,dtype", [("hf", 40, torch.float32), ("hf", 1, torch.float32),
                                               ("hf", 40, torch.bfloat16), ("gpt_oss_transposed", 40, torch.float32),
                                               ("relu2", 40, torch.float32), ("one_expert", 40, torch.float32)])
def test_split_down_backward_equals_the_fused_kernel(form, tokens, dtype, monkeypatch):
    """The backward through the down GEMM and the activation in two passes (G as a plain gather-GEMM, then the
    elementwise activation backward) against the fused kernel and the oracle, every gradient: SwiGLU, GPT-OSS's form
    (interleaved transposed views, biases: the <b_d, dy> term of d weights, the clamp), experts without a gate (ReLU^2),
    one token, all tokens on one expert; 5 experts (prime) with one empty, partial column tiles of both passes."""
    from moe_kernels.triton import experts

    monkeypatch.setattr(experts, "mlp_config", _split_small_tiles)
    gpt_oss, gated = form == "gpt_oss_transposed", form != "relu2"
    pattern = "one_expert" if form == "one_expert" else "skip_last"
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = seeded_mlp_inputs(
        tokens, 48, 40, 5, 2, pattern, dtype=dtype, bias=gpt_oss, transposed=gpt_oss)
    if not gated:
        gate_up = gate_up[:, :40].contiguous()  # the up projection [E, I, H]
    leaves = [t.requires_grad_(True) for t in (x, gate_up, down, weights)]
    kwargs = (dict(activation="gpt_oss", interleaved=True, swiglu_limit=7.0, gate_up_bias=gate_up_bias,
                   down_bias=down_bias) if gpt_oss else {} if gated else dict(activation="relu2", gated=False))
    if gpt_oss:
        leaves += [t.requires_grad_(True) for t in (gate_up_bias, down_bias)]
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device, dtype)
    launched = []
    on_triton_launch(monkeypatch, lambda name, args: launched.append(name))

    def run(choice):
        monkeypatch.setenv("MOE_KERNELS_DOWN_BWD", choice)
        launched.clear()
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton", **kwargs)
        return (y, *torch.autograd.grad(y, leaves, grad_y)), set(launched)

    fused, fused_kernels = run("fused")
    split, split_kernels = run("split")
    assert "_down_backward_kernel" in fused_kernels and "_activation_backward_kernel" not in fused_kernels
    assert "_activation_backward_kernel" in split_kernels and "_down_backward_kernel" not in split_kernels
    names = ("y", "dx", "d gate_up", "d down", "d weights", "d gate_up_bias", "d down_bias")
    if dtype == torch.float32:  # the same sums in another order: fp32 accumulation order apart
        for name, a, b in zip(names, split, fused):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    y = reference.moe_mlp(*(t.float() for t in (x, gate_up, down, weights)), ids,
                          **{k: v.float() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    want = (y, *torch.autograd.grad(y, leaves, grad_y.float()))
    for name, a, b in zip(names, split, want):
        assert_close_rel(a, b, dtype, name)


def test_split_down_backward_at_the_shipped_tiles(monkeypatch):
    """The class of the most rows per expert (280 here) with configs.json's own tiles, bf16: the backward splits by
    default (the 128-row tile map the forward made, G's 128x128 tile) and agrees with the fused kernel and the
    oracle; 5 experts with one empty, I = 200 and H = 80 leave partial column and K tiles."""
    monkeypatch.delenv("MOE_KERNELS_DOWN_BWD", raising=False)
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(700, 80, 200, 5, 2, "skip_last", dtype=torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in (x, gate_up, down, weights)]
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.device, x.dtype)
    launched = []
    on_triton_launch(monkeypatch, lambda name, args: launched.append(name))

    def run():
        launched.clear()
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
        return (y, *torch.autograd.grad(y, leaves, grad_y)), set(launched)

    split, kernels = run()
    assert "_activation_backward_kernel" in kernels and "_down_backward_kernel" not in kernels
    monkeypatch.setenv("MOE_KERNELS_DOWN_BWD", "fused")
    fused, kernels = run()
    assert "_down_backward_kernel" in kernels
    y = reference.moe_mlp(*(t.float() for t in (x, gate_up, down, weights)), ids)
    want = (y, *torch.autograd.grad(y, leaves, grad_y.float()))
    for name, a, b, c in zip(("y", "dx", "d gate_up", "d down", "d weights"), split, fused, want):
        assert_close_rel(a, c, torch.bfloat16, f"split {name}")
        assert_close_rel(b, c, torch.bfloat16, f"fused {name}")


def test_split_down_backward_choice_is_explicit(monkeypatch):
    """The split form runs where the entry's down_bwd has a 'split' tile (configs.json: the class of the most rows per
    expert), with down_bwd's rows and program order (the forward's tile map); MOE_KERNELS_DOWN_BWD forces either form
    (a forced split without a tile takes the dx tile) and rejects other values."""
    from moe_kernels.triton import experts

    monkeypatch.delenv("MOE_KERNELS_DOWN_BWD", raising=False)
    largest = configs.load_table()["mlp"][-1]
    assert "split" in largest["down_bwd"]
    tile = experts.split_down_backward_tile(largest)
    assert tile["BLOCK_M"] == largest["down_bwd"]["BLOCK_M"]
    assert tile["BLOCK_N"] == largest["down_bwd"]["split"]["BLOCK_N"] > largest["down_bwd"]["BLOCK_N"]
    smallest = configs.load_table()["mlp"][0]
    assert experts.split_down_backward_tile(smallest) is None
    monkeypatch.setenv("MOE_KERNELS_DOWN_BWD", "split")
    forced = experts.split_down_backward_tile(smallest)
    assert forced["BLOCK_M"] == smallest["down_bwd"]["BLOCK_M"]
    assert forced["GROUP_M"] == smallest["down_bwd"]["GROUP_M"]
    assert (forced["BLOCK_N"], forced["BLOCK_K"]) == (smallest["dx"]["BLOCK_N"], smallest["dx"]["BLOCK_K"])
    monkeypatch.setenv("MOE_KERNELS_DOWN_BWD", "fused")
    assert experts.split_down_backward_tile(largest) is None
    monkeypatch.setenv("MOE_KERNELS_DOWN_BWD", "two")
    with pytest.raises(ValueError, match="MOE_KERNELS_DOWN_BWD"):
        experts.split_down_backward_tile(largest)


def test_group_m_choice_is_explicit(monkeypatch):
    from moe_kernels.triton import experts

    monkeypatch.delenv("MOE_KERNELS_GROUP_M", raising=False)
    assert experts.group_m({}) == experts.DEFAULT_GROUP_M
    assert experts.group_m({"GROUP_M": 4}) == 4
    monkeypatch.setenv("MOE_KERNELS_GROUP_M", "0")
    assert experts.group_m({"GROUP_M": 4}) == 0
    monkeypatch.setenv("MOE_KERNELS_GROUP_M", "rows")
    with pytest.raises(ValueError, match="MOE_KERNELS_GROUP_M"):
        experts.group_m({})


# ------------------------------------------------------------------------- expert MLP: one-token path (GEMVs)

# one token, no gradient: a GEMV per slot for gate/up, one program per output tile for the k down GEMVs and their
# weighted sum. k = 1, k = E, prime E, odd widths, an expert twice is impossible (top-k ids are distinct).
ONE_TOKEN_GRID = [(32, 16, 4, 2), (33, 24, 7, 1), (16, 8, 5, 5), (17, 20, 13, 3), (300, 40, 3, 2)]


def _one_token(x, gate_up, down, weights, ids, launches, **kwargs):
    launches.clear()
    with torch.no_grad():
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton", **kwargs)
    assert launches == ["_one_token_gate_up_kernel", "_one_token_down_kernel"], launches
    return y


@pytest.mark.parametrize("shape", ONE_TOKEN_GRID, ids=lambda s: "H{}-I{}-E{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_mlp_one_token_path(shape, dtype, launches, monkeypatch):
    """Against the oracle, and against the decode path's tiles on the same inputs."""
    inputs = seeded_mlp_inputs(1, *shape, "random", dtype=dtype)
    y = _one_token(*inputs[:5], launches)
    want = reference.moe_mlp(*inputs[:5])
    assert y.dtype == dtype and y.shape == inputs[0].shape
    assert_close_rel(y.float(), want.float(), dtype, "y (one-token path)")
    monkeypatch.setenv("MOE_KERNELS_ONE_TOKEN", "tiles")
    with torch.no_grad():
        tiles = ops.moe_mlp(*inputs[:5], backend="triton")
    assert_close_rel(y.float(), tiles.float(), dtype, "y (one-token path against the decode tiles)")


def test_moe_mlp_one_token_wider_than_its_entries_takes_the_decode_tiles(launches, monkeypatch):
    """The GEMV entries carry max_inter (measured slower than the decode tiles at Mixtral's I = 14336 on the H200):
    one token wider than every entry runs the decode path's three launches, and still agrees with the oracle."""
    assert configs.one_token_config(False, 4096) is not None and configs.one_token_config(False, 4097) is None
    assert configs.one_token_config(True, 14336) is None and configs.one_token_config(True) is not None
    table = dict(configs.load_table())
    table["mlp_one_token_fp32"] = [dict(entry, max_inter=8) for entry in table["mlp_one_token_fp32"]]
    monkeypatch.setattr(configs, "load_table", lambda: table)
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(1, 24, 16, 5, 2, "random")
    launches.clear()
    with torch.no_grad():
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    assert launches == ["_gate_up_kernel", "_rows_matmul_kernel", "_combine_slots_kernel"], launches
    assert_close_rel(y, reference.moe_mlp(x, gate_up, down, weights, ids), torch.float32, "y (decode tiles)")


@pytest.mark.parametrize("activation,interleaved,bias,limit,transposed,softcaps", [
    ("gelu", False, True, None, False, None),
    ("relu", False, True, None, True, None),
    ("gpt_oss", True, True, 0.7, True, None),
    ("silu", False, False, 0.5, False, None),
    ("softcap_swiglu", False, True, None, False, (0.8, 1.2)),
])
def test_moe_mlp_one_token_activations_layouts_biases(activation, interleaved, bias, limit, transposed, softcaps,
                                                      launches):
    x, gate_up, down, weights, ids, b1, b2 = seeded_mlp_inputs(1, 24, 16, 5, 2, "random", bias=bias,
                                                               transposed=transposed)
    kwargs = dict(activation=activation, gate_up_bias=b1, down_bias=b2, interleaved=interleaved, swiglu_limit=limit,
                  softcaps=softcaps)
    y = _one_token(x, gate_up, down, weights, ids, launches, **kwargs)
    assert_close_rel(y, reference.moe_mlp(x, gate_up, down, weights, ids, **kwargs), torch.float32, "y")


@pytest.mark.parametrize("bias", [False, True])
def test_moe_mlp_one_token_without_a_gate(bias, launches):
    """Nemotron-H's ReLU^2 experts (W_up [E, I, H]) on the one-token path, and a strided x row."""
    g = torch.Generator().manual_seed(3)
    H, I, E, k = 20, 12, 6, 3
    x = torch.randn(1, 2 * H, generator=g).to(DEVICE)[:, ::2]  # stride 2 along H
    up = (torch.randn(E, I, H, generator=g) / H ** 0.5).to(DEVICE)
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(DEVICE)
    b1 = (torch.randn(E, I, generator=g) * 0.1).to(DEVICE) if bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(DEVICE) if bias else None
    weights, ids = ops.route(torch.randn(1, E, generator=g).to(DEVICE), k, backend="reference")
    kwargs = dict(activation="relu2", gated=False, gate_up_bias=b1, down_bias=b2)
    y = _one_token(x, up, down, weights, ids, launches, **kwargs)
    assert_close_rel(y, reference.moe_mlp(x, up, down, weights, ids, **kwargs), torch.float32, "y (ungated)")


def test_one_token_choice_is_explicit(monkeypatch):
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(1, 16, 8, 3, 2, "random")
    monkeypatch.setenv("MOE_KERNELS_ONE_TOKEN", "fastest")
    with torch.no_grad(), pytest.raises(ValueError, match="MOE_KERNELS_ONE_TOKEN"):
        ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")


# ---------------------------------------------------------------------------- counting launches (fixture)

@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched, in order."""
    names = []
    on_triton_launch(monkeypatch, lambda name, args: names.append(name))
    return names


# ---------------------------------------------------------------------------------------- adapter decode path

# (T, H, E, k, rank, ids pattern, activation): one token, k = 1 (output by token), an expert without slots,
# all slots on one expert, k = E, ranks below / at / across the rank tiles, odd widths (unaligned: planned path)
ADAPTER_DECODE_GRID = [
    (1, 32, 4, 1, 16, "random", "gelu"),
    (1, 48, 5, 2, 8, "random", "identity"),
    (3, 64, 7, 4, 33, "skip_last", "silu"),
    (4, 64, 16, 4, 128, "random", "relu"),
    (8, 32, 3, 2, 17, "one_expert", "gelu_tanh"),
    (5, 32, 3, 3, 1, "random", "gelu"),
    (16, 16, 3, 1, 4, "random", "gelu"),
    (2, 33, 5, 2, 16, "random", "gelu"),
]


@pytest.mark.parametrize("shape", ADAPTER_DECODE_GRID, ids=lambda s: "T{}-H{}-E{}-k{}-r{}-{}-{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_decode_path(shape, dtype):
    T, H, E, k, rank, pattern, activation = shape
    (h, down, up, weights), ids = adapter_leaves(T, H, E, k, rank, dtype, pattern=pattern)
    with torch.no_grad():
        y = ops.adapter_moe(h, down, up, weights, ids, activation=activation, scale=0.7, backend="triton")
    want = reference.adapter_moe(h.detach().float(), down.detach().float(), up.detach().float(), weights.detach(),
                                 ids, activation, 0.7)
    assert y.dtype == dtype
    assert_close_rel(y, want, dtype, "y (adapter decode)")


def test_adapter_decode_path_boundary(launches):
    """Slots up to the decode config's block_m and ranks up to its block_r take the decode path (fused kernel by
    expert, then the combine); one slot or one rank tile more, a non-multiple-of-16 width or a gradient take the
    planned path. Both agree with the oracle."""
    block_m = adapters.decode_config(1, 1, torch.bfloat16).block_m
    max_rank = adapters.decode_config(1, 1, torch.bfloat16).block_r
    assert adapters.decode_config(block_m + 1, 1, torch.bfloat16) is None
    assert adapters.decode_config(1, max_rank + 1, torch.bfloat16) is None
    cases = [((block_m // 2, 32, 5, 2, 16), True), ((block_m // 2 + 1, 32, 5, 2, 16), False),
             ((2, 32, 5, 2, max_rank), True), ((2, 32, 5, 2, max_rank + 1), False), ((2, 33, 5, 2, 16), False),
             ((3, 32, 5, 1, 16), True)]
    for (T, H, E, k, rank), decode in cases:
        (h, down, up, weights), ids = adapter_leaves(T, H, E, k, rank, torch.bfloat16)
        launches.clear()
        with torch.no_grad():
            y = ops.adapter_moe(h, down, up, weights, ids, backend="triton")
        expected = ["_adapter_fused_kernel"] + (["_combine_slots_kernel"] if k > 1 else [])
        assert (launches == expected) == decode, (T, k, rank, launches)
        want = reference.adapter_moe(h.detach().float(), down.detach().float(), up.detach().float(),
                                     weights.detach(), ids)
        assert_close_rel(y, want, torch.bfloat16, f"y (T={T}, k={k}, r={rank})")
    (h, down, up, weights), ids = adapter_leaves(2, 32, 5, 2, 16, torch.bfloat16)
    launches.clear()
    ops.adapter_moe(h, down, up, weights, ids, backend="triton")  # needs a gradient: the planned path
    assert launches[0] == "_small_plan_kernel"


# ------------------------------------------------------------------------------------------- launch budget

def test_launch_budget_of_the_hot_paths(launches, monkeypatch):
    """At decode and small batches the host's time per launch is the latency, so the number of launches is part of
    each path's contract: one token 2, decode 3, routing 1, a planned forward of at most 128 slots 5 (one-launch
    plan, one tile-map launch for the forward's and the backward's kernels), its backward 5 (no tile maps again),
    adapter decode 2."""
    monkeypatch.setenv("MOE_KERNELS_WGRAD", "triton")
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(3, 16, 8, 5, 2, "random")
    with torch.no_grad():
        ops.route(torch.randn(3, 5, device=DEVICE), 2, backend="triton")
        assert launches == ["_route_fwd_kernel"]
        launches.clear()
        ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    assert launches == ["_gate_up_kernel", "_rows_matmul_kernel", "_combine_slots_kernel"]
    launches.clear()
    with torch.no_grad():
        ops.moe_mlp(x[:1], gate_up, down, weights[:1], ids[:1], backend="triton")
    assert launches == ["_one_token_gate_up_kernel", "_one_token_down_kernel"]
    launches.clear()
    leaves = [t.requires_grad_() for t in (x, gate_up, down)]
    y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    assert launches == ["_small_plan_kernel", "_tile_scan_kernel", "_gate_up_kernel", "_rows_matmul_kernel",
                        "_combine_slots_kernel"]
    launches.clear()
    torch.autograd.grad(y.sum(), leaves)
    assert launches == ["_down_backward_kernel", "_rows_matmul_kernel", "_combine_slots_kernel",
                        "_expert_outer_kernel", "_expert_outer_kernel"]
    (h, down, up, weights), ids = adapter_leaves(3, 32, 5, 2, 16, torch.float32)
    launches.clear()
    with torch.no_grad():
        ops.adapter_moe(h, down, up, weights, ids, backend="triton")
    assert launches == ["_adapter_fused_kernel", "_combine_slots_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slot_rows_are_in_the_inputs_dtype(dtype, monkeypatch):
    """Every slot combine (planned forward, its dx, the decode path, adapters) reads k > 1 slot rows in the inputs'
    dtype and sums them in fp32: a token's output rounds once per slot and once at the end, as the cuda backend's and
    transformers' grouped_mm experts do, and fp32 rows would double the traffic of the combine and of the GEMM
    epilogue writing them."""
    read = []  # (slot rows, output) dtypes of each combine
    on_triton_launch(monkeypatch, lambda name, args: read.append((args[0].dtype, args[1].dtype))
               if name == "_combine_slots_kernel" else None)
    monkeypatch.setenv("MOE_KERNELS_WGRAD", "triton")
    x, gate_up, down, weights, ids, _, _ = seeded_mlp_inputs(3, 16, 8, 5, 2, "random", dtype=dtype)
    with torch.no_grad():
        y_decode = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    leaves = [t.detach().requires_grad_() for t in (x, gate_up, down)]
    y = ops.moe_mlp(*leaves, weights, ids, backend="triton")
    torch.autograd.grad(y.float().sum(), leaves)
    (h, a_down, a_up, a_weights), a_ids = adapter_leaves(3, 32, 5, 2, 16, dtype)
    with torch.no_grad():
        ops.adapter_moe(h, a_down, a_up, a_weights, a_ids, backend="triton")
    assert read == [(dtype, dtype)] * 4, read  # decode, forward, dx, adapters
    want = reference.moe_mlp(*(t.float() for t in (x, gate_up, down)), weights, ids)
    for got, what in ((y_decode, "decode"), (y, "planned")):
        assert got.dtype == dtype
        assert_close_rel(got.float(), want, dtype, f"y ({what} path, {dtype} slot rows)")


# ------------------------------------------------------------------------------------------ backend, configs

def test_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in BACKEND.device_error(torch.device("cpu"))
    assert BACKEND.device_error(torch.device("cuda")) is None


def test_config_table_covers_every_shape_class():
    for num_rows, num_experts in [(1, 8), (64, 8), (4096, 64), (10 ** 6, 256), (8, 4096)]:
        for fp32 in (False, True):
            cfg = configs.mlp_config(num_rows, num_experts, 768, fp32=fp32)
            assert set(cfg) >= {"up", "down", "down_bwd", "dx", "dw"}
        assert configs.plan_config(num_rows, num_experts)["BLOCK"] >= 1
        assert configs.route_config(num_rows, num_experts)["BLOCK_T"] >= 1


def test_adapter_config_table_is_complete_and_valid():
    for dtype in (torch.bfloat16, torch.float32):
        for rank in (1, 8, 16, 17, 64, 100, 128, 129, 1024):
            for slots in (1, 256, 257, 8192, 8193, 100000):
                config = adapters.select_config(slots, rank, dtype)
                assert config.block_r >= 16 and config.block_m >= 16  # tl.dot's minimum tile
                if config.fused:
                    assert adapters._rank_tile(rank) <= config.block_r


def test_adapter_configs_come_from_the_json_table(monkeypatch):
    """The adapter kernels read the same config table as the expert kernels (so MOE_KERNELS_TRITON_CONFIGS
    tunes them too): an edited 'adapter' family is what select_config returns."""
    tuned = dict(configs.entries("adapter")[0], max_rank=None, max_slots=None, fused=False, block_m=32, num_warps=2)
    table = dict(configs.load_table(), adapter=[tuned])
    monkeypatch.setattr(configs, "load_table", lambda: table)
    config = adapters.select_config(1000, 64, torch.bfloat16)
    assert (config.fused, config.block_m, config.num_warps) == (False, 32, 2)
    assert adapters.table_configs() == [adapters.AdapterConfig.from_entry(tuned), adapters.unaligned_config()]


@pytest.mark.parametrize("H,misaligned,aligned", [(32, None, True), (20, None, False), (24, None, False),
                                                    (32, "h", False), (32, "weights", False),
                                                    (32, "strided_up", False)])
def test_only_aligned_adapter_launches_take_table_configs(H, misaligned, aligned):
    """The compile check compiles table configs with H divisible by 16, aligned pointers and row-major weights:
    the launcher must run them only then, and the unaligned fallback otherwise."""
    (h, down, up, weights), ids = adapter_leaves(4, H, 3, 2, 8, torch.float32)
    h, weights, up = h.detach(), weights.detach(), up.detach()
    if misaligned == "h":  # contiguous, but 4 bytes into its storage
        h = torch.cat([torch.zeros(1, device=DEVICE), h.flatten()])[1:].view(4, H)
    elif misaligned == "weights":
        weights = torch.cat([torch.zeros(1, device=DEVICE), weights.flatten()])[1:].view(4, 2)
    elif misaligned == "strided_up":  # a transposed view: the unit stride is not the last one
        up = up.transpose(1, 2).contiguous().transpose(1, 2)
    plan = reference.plan(ids, 3)
    config = adapters._launch_params(h, down.detach(), up, weights, plan.expert_offsets,
                                     plan.sorted_slots)["config"]
    unaligned = adapters.unaligned_config()
    expected = adapters.select_config(8, 8, torch.float32) if aligned else unaligned
    key = lambda c: (c.fused, c.block_m, c.block_r, c.num_warps, c.num_stages)  # noqa: E731
    assert key(adapters.select_config(8, 8, torch.float32)) != key(unaligned)  # distinguishable
    assert key(config)[:4] == key(expected)[:4]  # (stages are reset under the interpreter)


# ------------------------------------------------------------------------- compile check and kernel specs

def test_compile_check_lists_every_kernel_with_full_signatures():
    specs = compile_check.collect_specs()
    modules = {spec[0] for spec in specs}
    assert modules == {"plan", "routing", "experts", "adapters"}
    for module, kernel, signature, constexprs, options, *divisible in specs:
        assert list(signature) == list(kernel.arg_names), kernel.__name__
        assert all(signature[name] == "i32" for names in divisible for name in names), kernel.__name__
        assert all(signature[name] == "constexpr" for name in constexprs), kernel.__name__
        assert options["num_warps"] in (1, 2, 4, 8, 16)


def test_compile_check_flags_spills_shared_memory_and_errors():
    ok = {"error": None, "spill": 0, "shared": 1024, "registers": 128, "mma": "wgmma", "mma_fallback": False}
    assert compile_check.problems(ok, 90) == []
    # a dot on Hopper lowered to mma.sync (about half the tensor-core rate) where warpgroup MMA fits fails the check
    assert compile_check.problems(dict(ok, mma="mma", mma_fallback=True), 90)
    assert compile_check.problems(dict(ok, mma="mma"), 90) == []
    assert compile_check.problems(dict(ok, spill=8), 90)
    assert compile_check.problems(dict(ok, shared=200 * 1024), 80)
    assert not compile_check.problems(dict(ok, shared=200 * 1024), 90)
    assert compile_check.problems(dict(ok, error="CompilationError: boom"), 90)
    # TTGIR dot lines as Triton 3.6-3.9 print them (operands shortened)
    wgmma = ("%acc = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : "
             "tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * !ttg.memdesc<32x16xbf16> "
             "-> tensor<64x16xf32, #mma> loc(#loc96)")
    sync = "%d = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<{m}x64xbf16> * tensor<64x32xbf16> -> tensor<{m}x32xf32, #mma1>"
    fma = "%d = tt.dot %a, %b, %c : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32, #blocked2>"
    assert compile_check.mma_kind(wgmma, 4) == ("wgmma", False)
    assert compile_check.mma_kind(sync.format(m=16), 4) == ("mma", False)  # decode's 16-row tiles: by design
    assert compile_check.mma_kind(sync.format(m=128), 8) == ("mma", True)  # the slow instruction where wgmma fits
    assert compile_check.mma_kind(sync.format(m=64), 2) == ("mma", False)  # not a whole warpgroup
    assert compile_check.mma_kind(fma, 4) == ("-", False)
    with pytest.raises(SystemExit):
        compile_check._parse_arch("sm_12")
    assert compile_check._parse_arch("sm_80,sm_90a") == [80, 90]


def test_compile_check_reads_spills_from_the_ptxas_log_and_lists_each_specialisation_once():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
           "ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 64 registers, used 1 barriers, 24 bytes stack frame\n")
    assert compile_check._parse_ptxas_log(log) == {"registers": 64, "spill": 24, "stack": 24}
    assert compile_check._parse_ptxas_log("") is None
    keys = [(spec[1].__name__, tuple(spec[2].items()), compile_check._freeze(spec[3]),
             compile_check._freeze(spec[4]), frozenset(spec[5])) for spec in compile_check.collect_specs()]
    assert len(keys) == len(set(keys))


@pytest.mark.slow
def test_compile_check_compiles_the_plan_kernels():
    assert compile_check.main(["--arch", "sm_90", "--only", "plan", "--jobs", "1"]) == 0


def test_adapter_compile_specs_cover_every_kernel():
    kernels = {spec[0].__name__ for spec in adapters.COMPILE_SPECS}
    assert kernels == {"_adapter_fused_kernel", "_adapter_shrink_kernel", "_adapter_expand_kernel",
                       "_adapter_weight_grad_kernel", "_combine_slots_kernel"}
    hints = set()
    for kernel, signature, constexprs, options, divisible in adapters.COMPILE_SPECS:
        assert list(signature) == list(kernel.arg_names)
        assert all(signature[name] == "constexpr" for name in constexprs)
        assert all(signature[name] == "i32" for name in divisible)
        hints.add(tuple(divisible))
        if constexprs.get("OUT_BY_TOKEN"):  # the k = 1 launch: the JIT makes top_k the constant 1
            assert constexprs["top_k"] == 1
        for name in ("stride_dh", "stride_ur"):  # row-major weights: the JIT makes their unit strides constants
            if name in signature:
                assert constexprs[name] == 1
    # table configs are compiled with H % 16 == 0 (as the JIT specialises their launches) and the weight strides
    # that are multiples of H, the unaligned fallback without; both for ranks that are multiples of 16 (with the
    # strides that are multiples of R) and ranks that are not
    table = {tuple(d) for d in hints if "H" in d}
    assert {("H",), ("H", "R"), ()} <= hints and ("R",) in hints
    assert all(set(d) <= {"H", "R", "stride_de", "stride_dr", "stride_ue", "stride_uh", "stride_w2e", "stride_w2r",
                          "stride_w2n"} for d in hints)
    assert ("H", "stride_de", "stride_dr", "stride_ue", "R", "stride_uh") in table


def test_adapter_compile_specs_cover_every_table_config():
    """Every shipped config (both dtypes' variants) has its block sizes and warps in the compile list."""
    compiled = {(spec[0].__name__, spec[2].get("BLOCK_M"), spec[3]["num_warps"], spec[3]["num_stages"])
                for spec in adapters.COMPILE_SPECS}
    unaligned = adapters.unaligned_config()
    for table_config in adapters.table_configs():
        for dtype in (torch.bfloat16, torch.float32):
            config = adapters.for_dtype(table_config, dtype) if table_config != unaligned else table_config
            first = "_adapter_fused_kernel" if config.fused else "_adapter_shrink_kernel"
            assert (first, config.block_m, config.num_warps, config.num_stages) in compiled, config
            assert ("_adapter_weight_grad_kernel", config.wgrad_block_m, config.num_warps,
                    config.wgrad_stages) in compiled, config
