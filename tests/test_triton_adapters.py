"""Triton adapter experts (moe_kernels.triton.adapters) against the oracle: on CUDA tensors when a GPU is
present, else on CPU tensors under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 then).

Forward and all four gradients vs ``moe_kernels.reference.adapter_moe`` (fp32 math on the same inputs),
both kernel paths (fused and split), on the hard-case grid, every activation and input dtype; opcheck
of both torch.library ops.
"""

import os

import torch

if not torch.cuda.is_available():  # conftest.py does the same; this keeps the file runnable on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from moe_testing import DTYPES, assert_close_rel, make_ids  # noqa: E402

from moe_kernels import reference  # noqa: E402
from moe_kernels.triton import adapters  # noqa: E402
from moe_kernels.triton.adapters import AdapterConfig, adapter_moe_triton, forced_config  # noqa: E402

# Fused: whole padded rank in one tile, shrink -> act -> expand in one program. Split: rank-tiled shrink
# kernel + expand kernel. Small row tiles so the test shapes span several tiles per expert.
FUSED = AdapterConfig(fused=True, block_m=16, block_k=64, block_n=64, block_r=256, wgrad_block_m=16)
SPLIT = AdapterConfig(fused=False, block_m=16, block_k=64, block_n=64, block_r=64, wgrad_block_m=16)
PATHS = {"fused": FUSED, "split": SPLIT}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(T, H, E, k, rank, dtype, ids=None, pattern="random"):
    """Leaves (h, down, up, weights) and ids on DEVICE; values drawn on the CPU so both devices see the same."""
    h = torch.randn(T, H).to(DEVICE, dtype)
    down = (torch.randn(E, rank, H) / H ** 0.5).to(DEVICE, dtype)
    up = (torch.randn(E, H, rank) / rank ** 0.5).to(DEVICE, dtype)
    weights = (torch.rand(T, k) + 0.1).to(DEVICE)
    if ids is None:
        ids = make_ids(pattern, T, E, k)
    return [t.requires_grad_() for t in (h, down, up, weights)], ids.to(DEVICE)


def check_against_oracle(T, H, E, k, rank, dtype=torch.float32, activation="gelu", scale=0.7, path=None,
                         ids=None, pattern="random"):
    leaves, ids = make_inputs(T, H, E, k, rank, dtype, ids, pattern)
    if path is None:
        out = adapter_moe_triton(*leaves, ids, activation, scale)
    else:
        with forced_config(PATHS[path]):
            out = adapter_moe_triton(*leaves, ids, activation, scale)
    assert out.dtype == dtype and out.shape == (T, H)
    ref = reference.adapter_moe(*leaves, ids, activation, scale)
    assert_close_rel(out, ref, dtype, "forward")
    grad_out = torch.randn(T, H).to(DEVICE, dtype)
    if path is None:
        grads = torch.autograd.grad(out, leaves, grad_out)
    else:
        with forced_config(PATHS[path]):
            grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    for name, got, want in zip(("d h", "d down", "d up", "d weights"), grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close_rel(got, want, dtype, name, factor=2.0)
    return ids, grads


# (T, H, E, k, rank, ids pattern): one token, tokens fewer than a tile, k = 1, k = E, odd H, prime E,
# all tokens on one expert, an expert with no tokens, r = 1 / 8 / 16 / 64 / 200 (several rank tiles).
GRID = [
    (1, 33, 4, 2, 8, "random"),
    (5, 31, 3, 1, 1, "random"),
    (7, 40, 5, 5, 16, "random"),
    (20, 24, 7, 2, 64, "one_expert"),
    (13, 35, 6, 3, 8, "skip_last"),
    (6, 20, 3, 2, 200, "random"),
]


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("T,H,E,k,rank,pattern", GRID)
def test_matches_oracle_on_hard_cases(T, H, E, k, rank, pattern, path):
    check_against_oracle(T, H, E, k, rank, path=path, pattern=pattern)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_every_activation_and_dtype(activation, dtype):
    path = "fused" if activation in ("gelu", "silu", "identity") else "split"
    check_against_oracle(9, 24, 5, 2, 8, dtype=dtype, activation=activation, path=path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_large_rank(dtype):
    check_against_oracle(6, 20, 3, 2, 200, dtype=dtype, activation="silu", path="split")


def test_table_config_and_rank_1024():
    check_against_oracle(4, 16, 3, 2, 1024, activation="gelu_tanh")  # config chosen by the table


def test_empty_expert_gets_zero_weight_gradients():
    ids = torch.tensor([[0, 3], [3, 0], [0, 3]], dtype=torch.int32, device=DEVICE)  # experts 1, 2, 4 unused
    for path in PATHS:
        _, (_, d_down, d_up, _) = check_against_oracle(3, 18, 5, 2, 8, ids=ids, path=path)
        for expert in (1, 2, 4):
            assert torch.count_nonzero(d_down[expert]) == 0 and torch.count_nonzero(d_up[expert]) == 0


def test_deterministic():
    leaves, ids = make_inputs(11, 24, 4, 3, 8, torch.float32)
    runs = []
    for _ in range(2):
        out = adapter_moe_triton(*leaves, ids, "gelu", 1.3)
        runs.append([out, *torch.autograd.grad(out.sum(), leaves)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_frozen_experts_skip_weight_gradients():
    # Self-MoE: experts frozen, router trained -> only d h and d weights are formed
    (h, down, up, weights), ids = make_inputs(6, 24, 4, 2, 8, torch.float32)
    down.requires_grad_(False)
    up.requires_grad_(False)
    out = adapter_moe_triton(h, down, up, weights, ids, "identity", 2.0)
    dh, dw = torch.autograd.grad(out.sum(), (h, weights))
    ref = reference.adapter_moe(h, down, up, weights, ids, "identity", 2.0)
    ref_dh, ref_dw = torch.autograd.grad(ref.sum(), (h, weights))
    assert_close_rel(dh, ref_dh, torch.float32, "d h")
    assert_close_rel(dw, ref_dw, torch.float32, "d weights")


def test_non_contiguous_weights():
    (h, down, up, weights), ids = make_inputs(5, 24, 3, 2, 16, torch.float32)
    up_t = up.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided view
    out = adapter_moe_triton(h, down, up_t, weights, ids, "gelu", 1.0)
    assert_close_rel(out, reference.adapter_moe(h, down, up, weights, ids, "gelu", 1.0), torch.float32, "forward")


def test_bad_arguments_raise():
    (h, down, up, weights), ids = make_inputs(3, 16, 3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        adapter_moe_triton(h, down, up, weights, ids, "tanh", 1.0)


def test_config_table_is_complete_and_valid():
    for dtype in (torch.bfloat16, torch.float32):
        for rank in (1, 8, 16, 17, 64, 100, 128, 129, 1024):
            for slots in (1, 256, 257, 8192, 8193, 100000):
                config = adapters.select_config(slots, rank, dtype)
                assert config.block_r >= 16 and config.block_m >= 16  # tl.dot's minimum tile
                if config.fused:
                    assert adapters._rank_tile(rank) <= config.block_r


def test_compile_specs_cover_every_kernel():
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
    # table configs are compiled with H % 16 == 0 (as the JIT specialises their launches), the
    # unaligned fallback without; both for ranks that are multiples of 16 and ranks that are not
    assert hints == {("H",), ("H", "R"), (), ("R",)}


def test_compile_specs_cover_every_table_config():
    """Every shipped config (both dtypes' variants) has its block sizes and warps in the compile list."""
    compiled = {(spec[0].__name__, spec[2].get("BLOCK_M"), spec[3]["num_warps"], spec[3]["num_stages"])
                for spec in adapters.COMPILE_SPECS}
    for table_config in (*adapters.ADAPTER_CONFIGS.values(), adapters.UNALIGNED_CONFIG):
        for dtype in (torch.bfloat16, torch.float32):
            config = adapters.for_dtype(table_config, dtype) if table_config is not adapters.UNALIGNED_CONFIG \
                else table_config
            first = "_adapter_fused_kernel" if config.fused else "_adapter_shrink_kernel"
            assert (first, config.block_m, config.num_warps, config.num_stages) in compiled, config
            assert ("_adapter_weight_grad_kernel", config.wgrad_block_m, config.num_warps,
                    config.wgrad_stages) in compiled, config


@pytest.mark.parametrize("H,misaligned,aligned", [(32, None, True), (20, None, False), (24, None, False),
                                                    (32, "h", False), (32, "weights", False)])
def test_only_aligned_launches_take_table_configs(H, misaligned, aligned):
    """The compile check compiles table configs with H divisible by 16 and aligned pointers: the launcher
    must run them only then, and the unaligned fallback otherwise."""
    (h, down, up, weights), ids = make_inputs(4, H, 3, 2, 8, torch.float32)
    h, weights = h.detach(), weights.detach()
    if misaligned == "h":  # contiguous, but 4 bytes into its storage
        h = torch.cat([torch.zeros(1, device=DEVICE), h.flatten()])[1:].view(4, H)
    elif misaligned == "weights":
        weights = torch.cat([torch.zeros(1, device=DEVICE), weights.flatten()])[1:].view(4, 2)
    plan = reference.plan(ids, 3)
    config = adapters._launch_params(h, down.detach(), up.detach(), weights, plan.expert_offsets,
                                     plan.sorted_slots)["config"]
    expected = adapters.select_config(8, 8, torch.float32) if aligned else adapters.UNALIGNED_CONFIG
    key = lambda c: (c.fused, c.block_m, c.block_r, c.num_warps, c.num_stages)  # noqa: E731
    assert key(adapters.select_config(8, 8, torch.float32)) != key(adapters.UNALIGNED_CONFIG)  # distinguishable
    assert key(config)[:4] == key(expected)[:4]  # (stages are reset under the interpreter)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_opcheck(path):
    (h, down, up, weights), ids = make_inputs(5, 20, 3, 2, 8, torch.float32)
    plan = reference.plan(ids, 3)
    args = (h, down, up, weights, plan.expert_offsets, plan.sorted_slots, "gelu", 0.5)
    with forced_config(PATHS[path]):
        torch.library.opcheck(adapters._adapter_moe_op, args)
        grad = torch.randn(5, 20, device=DEVICE)
        for weight_grads in (True, False):
            torch.library.opcheck(adapters._adapter_moe_backward_op,
                                  (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args],
                                   weight_grads))
