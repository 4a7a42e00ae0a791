"""The adapter_moe op (PESC-style adapter experts: down -> activation -> up, weighted) on every backend that runs
here against the oracle (``reference.adapter_moe``), forward and all four gradients, over the hard cases (one
token, fewer tokens than a tile, k = 1, k = E, odd H, prime E, all tokens on one expert, an expert with no tokens,
rank 1 to 1024), every activation and dtype; opcheck of the registered adapter ops.

A backend's inputs live on device_for(backend) (CUDA for triton/cuda with a GPU, else triton runs in Triton's
interpreter). The sections after the shared tests hold each backend's own grids (triton: both kernel paths, fused
and split); its private helpers (config table, compile specs, aligned launches, grouped row kernels, the cpu dense
path) are tested in tests/backends/.
"""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_testing import (ADAPTER_SHAPES, DTYPES, REL_TOL, adapter_leaves, assert_close_rel, assert_close_scaled,
                         backends_under_test, check_adapter_against_oracle, device_for, hypothesis_settings,
                         ids_and_weights, make_ids, make_routing, needs_cuda_kernels, needs_native, needs_triton,
                         oracle_for, permuted_ids, routing_problem)

import moe_kernels
from moe_kernels import reference

BACKENDS = backends_under_test()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the triton tests run

# ----------------------------------------------------------------------------------- every backend vs oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 8, 33])
@pytest.mark.parametrize("activation", ["gelu", "identity"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_moe_matches_oracle(backend, rank, activation, dtype):
    num_tokens, hidden, num_experts, k = 21, 40, 7, 2
    device = device_for(backend)
    ids = make_ids("skip_last", num_tokens, num_experts, k, device=device)
    h = torch.randn(num_tokens, hidden).to(device, dtype)
    down = (torch.randn(num_experts, rank, hidden) / hidden ** 0.5).to(device, dtype)
    up = (torch.randn(num_experts, hidden, rank) / rank ** 0.5).to(device, dtype)
    weights = torch.rand(num_tokens, k).to(device)
    leaves = [t.clone().requires_grad_(True) for t in (h, down, up, weights)]
    out = moe_kernels.adapter_moe(*leaves, ids, activation=activation, scale=0.7, backend=backend)
    assert out.dtype == dtype
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves]
    ref = oracle_for(backend).adapter_moe(*ref_leaves, ids, activation=activation, scale=0.7)  # reference: naive loop
    assert_close_rel(out, ref, dtype, "output")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, g, r in zip(("h", "down", "up", "weights"), grads, ref_grads):
        assert_close_rel(g, r, dtype, f"grad {name}", factor=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_moe_empty_batch_gives_zero_gradients(backend):
    """A step without tokens: an empty result, and every leaf (the adapters too, not only h) a zero gradient."""
    (h, down, up, weights), ids = adapter_leaves(0, 16, 5, 2, 4, torch.float32, device=device_for(backend))
    out = moe_kernels.adapter_moe(h, down, up, weights, ids, backend=backend)
    assert out.shape == (0, 16)
    out.sum().backward()
    for name, leaf in zip(("h", "down", "up", "weights"), (h, down, up, weights)):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_moe_property(backend):
    """Hypothesis: random shapes, ranks, dtypes, skewed routing, every adapter activation, scales."""
    device = device_for(backend)

    @hypothesis_settings(backend)
    @given(problem=routing_problem(), hidden=st.integers(1, 40), rank=st.sampled_from([1, 2, 5, 8, 16, 17, 40]),
           dtype=st.sampled_from(DTYPES), skew=st.booleans(),
           activation=st.sampled_from(reference.ADAPTER_ACTIVATIONS), scale=st.floats(0.1, 2.0))
    def check(problem, hidden, rank, dtype, skew, activation, scale):
        num_tokens, num_experts, k, seed = problem
        ids, weights = ids_and_weights(num_tokens, num_experts, k, seed, skew, device)
        g = torch.Generator().manual_seed(seed + 2)
        h = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
        down = (torch.randn(num_experts, rank, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
        up = (torch.randn(num_experts, hidden, rank, generator=g) / rank ** 0.5).to(device, dtype)
        out = moe_kernels.adapter_moe(h, down, up, weights, ids, activation=activation, scale=scale, backend=backend)
        ref = oracle_for(backend).adapter_moe(h.float(), down.float(), up.float(), weights, ids, activation=activation,
                                              scale=scale)
        assert out.dtype == dtype
        # The kernels keep the bottleneck in the input dtype, so a rounding error of each product of up_e and
        # act(down_e h) enters the sum: the bound is relative to the sum of their magnitudes, which is the
        # output's own size unless the terms cancel (hypothesis found hidden = 1, rank 16, fp16: 1.3% of the
        # output, 0.2% of the magnitudes).
        magnitude = _magnitude_of_terms(h, down, up, weights, ids, activation, scale)
        if magnitude.norm() > 1e-6:
            assert (out.double() - ref.double()).norm() <= REL_TOL[dtype] * 2 * magnitude.double().norm()
    check()


def _magnitude_of_terms(h, down, up, weights, ids, activation, scale):
    """sum_j |scale w_tj| |up_e| |act(down_e h_t)| (e = ids[t,j]) in float32: the size of the terms whose sum
    is adapter_moe's output."""
    h, down, up = h.float(), down.float(), up.float()
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for j in range(ids.shape[1]):
        e = ids[:, j].long()
        act = reference.apply_activation(torch.einsum("trh,th->tr", down[e], h), activation).abs()
        out += (abs(scale) * weights[:, j].float().abs())[:, None] * torch.einsum("thr,tr->th", up[e].abs(), act)
    return out


# --------------------------------------------------------------------- cpu backend (C++ expert ops, not gated)

CPU_ADAPTER_SHAPES = [  # (T, H, r, E, k, pattern)
    (1, 8, 1, 3, 1, "random"), (21, 33, 1, 7, 2, "random"), (16, 24, 64, 4, 4, "random"),
    (12, 16, 5, 6, 2, "skip_odd"), (25, 10, 3, 5, 1, "one_expert"),
]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_ADAPTER_SHAPES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_cpu_adapter_moe_matches_reference(activation, shape, dtype):
    T, H, r, E, k, pattern = shape
    g = torch.Generator().manual_seed(T + r)
    weights, ids = make_routing(T, E, k, pattern, g, ids=permuted_ids)
    weights.requires_grad_()
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    down = (torch.randn(E, r, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    up = (torch.randn(E, H, r, generator=g) / r ** 0.5).to(dtype).requires_grad_()
    out = moe_kernels.adapter_moe(h, down, up, weights, ids, activation=activation, scale=0.5, backend="cpu")
    ref = reference.adapter_moe(h, down, up, weights, ids, activation, 0.5)
    assert out.dtype == dtype
    assert_close_scaled(out, ref, dtype, "output")
    grad = torch.randn(T, H, generator=g).to(dtype)
    got = torch.autograd.grad(out, (h, down, up, weights), grad)
    want = torch.autograd.grad(ref, (h, down, up, weights), grad)
    for name, a, b in zip(("h", "down", "up", "weights"), got, want):
        assert_close_scaled(a, b, dtype, f"grad {name}")


@needs_native
def test_cpu_adapter_large_rank():
    g = torch.Generator().manual_seed(5)
    T, H, r, E, k = 6, 16, 1024, 2, 1
    weights, ids = make_routing(T, E, k, "random", g, ids=permuted_ids)
    h = torch.randn(T, H, generator=g)
    down, up = torch.randn(E, r, H, generator=g) * 0.1, torch.randn(E, H, r, generator=g) * 0.1
    out = moe_kernels.adapter_moe(h, down, up, weights, ids, backend="cpu")
    torch.testing.assert_close(out, reference.adapter_moe(h, down, up, weights, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- triton backend (triton/adapters.py)

def _forced(path):
    """The triton adapter kernels forced onto one path. Fused: whole padded rank in one tile, shrink -> act ->
    expand in one program. Split: rank-tiled shrink kernel + expand kernel. Small row tiles so the test shapes
    span several tiles per expert. None: the config the table picks."""
    if path is None:
        return contextlib.nullcontext()
    from moe_kernels.triton.adapters import AdapterConfig, forced_config
    fused = path == "fused"
    return forced_config(AdapterConfig(fused=fused, block_m=16, block_k=64, block_n=64, block_r=256 if fused else 64,
                                       wgrad_block_m=16))


def check_triton_adapter(T, H, E, k, rank, dtype=torch.float32, activation="gelu", scale=0.7, path=None,
                         ids=None, pattern="random"):
    from moe_kernels.triton.adapters import adapter_moe_triton
    leaves, ids = adapter_leaves(T, H, E, k, rank, dtype, ids, pattern)
    with _forced(path):
        out = adapter_moe_triton(*leaves, ids, activation, scale)
    assert out.dtype == dtype and out.shape == (T, H)
    ref = reference.adapter_moe(*leaves, ids, activation, scale)
    assert_close_rel(out, ref, dtype, "forward")
    grad_out = torch.randn(T, H).to(DEVICE, dtype)
    with _forced(path):
        grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    for name, got, want in zip(("d h", "d down", "d up", "d weights"), grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close_rel(got, want, dtype, name, factor=2.0)
    return ids, grads


# (T, H, E, k, rank, ids pattern): one token, tokens fewer than a tile, k = 1, k = E, odd H, prime E,
# all tokens on one expert, an expert with no tokens, r = 1 / 8 / 16 / 64 / 200 (several rank tiles).
TRITON_GRID = [
    (1, 33, 4, 2, 8, "random"),
    (5, 31, 3, 1, 1, "random"),
    (7, 40, 5, 5, 16, "random"),
    (20, 24, 7, 2, 64, "one_expert"),
    (13, 35, 6, 3, 8, "skip_last"),
    (6, 20, 3, 2, 200, "random"),
]


@needs_triton
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("T,H,E,k,rank,pattern", TRITON_GRID)
def test_triton_adapter_matches_oracle_on_hard_cases(T, H, E, k, rank, pattern, path):
    check_triton_adapter(T, H, E, k, rank, path=path, pattern=pattern)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_triton_adapter_every_activation_and_dtype(activation, dtype):
    path = "fused" if activation in ("gelu", "silu", "identity") else "split"
    check_triton_adapter(9, 24, 5, 2, 8, dtype=dtype, activation=activation, path=path)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_adapter_low_precision_large_rank(dtype):
    check_triton_adapter(6, 20, 3, 2, 200, dtype=dtype, activation="silu", path="split")


@needs_triton
def test_triton_adapter_table_config_and_rank_1024():
    check_triton_adapter(4, 16, 3, 2, 1024, activation="gelu_tanh")  # config chosen by the table


@needs_triton
def test_triton_adapter_empty_expert_gets_zero_weight_gradients():
    ids = torch.tensor([[0, 3], [3, 0], [0, 3]], dtype=torch.int32, device=DEVICE)  # experts 1, 2, 4 unused
    for path in ("fused", "split"):
        _, (_, d_down, d_up, _) = check_triton_adapter(3, 18, 5, 2, 8, ids=ids, path=path)
        for expert in (1, 2, 4):
            assert torch.count_nonzero(d_down[expert]) == 0 and torch.count_nonzero(d_up[expert]) == 0


@needs_triton
def test_triton_adapter_deterministic():
    from moe_kernels.triton.adapters import adapter_moe_triton
    leaves, ids = adapter_leaves(11, 24, 4, 3, 8, torch.float32)
    runs = []
    for _ in range(2):
        out = adapter_moe_triton(*leaves, ids, "gelu", 1.3)
        runs.append([out, *torch.autograd.grad(out.sum(), leaves)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@needs_triton
def test_triton_adapter_frozen_experts_skip_weight_gradients():
    from moe_kernels.triton.adapters import adapter_moe_triton
    # Self-MoE: experts frozen, router trained -> only d h and d weights are formed
    (h, down, up, weights), ids = adapter_leaves(6, 24, 4, 2, 8, torch.float32)
    down.requires_grad_(False)
    up.requires_grad_(False)
    out = adapter_moe_triton(h, down, up, weights, ids, "identity", 2.0)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)  # not all ones
    dh, dw = torch.autograd.grad(out, (h, weights), upstream)
    ref = reference.adapter_moe(h, down, up, weights, ids, "identity", 2.0)
    ref_dh, ref_dw = torch.autograd.grad(ref, (h, weights), upstream)
    assert_close_rel(dh, ref_dh, torch.float32, "d h")
    assert_close_rel(dw, ref_dw, torch.float32, "d weights")


@needs_triton
def test_triton_adapter_non_contiguous_weights():
    from moe_kernels.triton.adapters import adapter_moe_triton
    (h, down, up, weights), ids = adapter_leaves(5, 24, 3, 2, 16, torch.float32)
    up_t = up.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided view
    out = adapter_moe_triton(h, down, up_t, weights, ids, "gelu", 1.0)
    assert_close_rel(out, reference.adapter_moe(h, down, up, weights, ids, "gelu", 1.0), torch.float32, "forward")


@needs_triton
def test_triton_adapter_bad_arguments_raise():
    # validated once, by the public op (the backend entry takes normalised arguments and does not re-check)
    (h, down, up, weights), ids = adapter_leaves(3, 16, 3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        moe_kernels.adapter_moe(h, down, up, weights, ids, activation="tanh", backend="triton")
    with pytest.raises(ValueError, match="rank"):
        moe_kernels.adapter_moe(h, down.new_zeros(3, 0, 16), up.new_zeros(3, 16, 0), weights, ids, backend="triton")


@needs_triton
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_adapter_opcheck(path, layout):
    """The registered ops (moe_kernels_triton::adapter_moe_forward plans inside and returns the plan;
    adapter_moe_backward takes it), with row-major weights and with a transposed view of ``up``."""
    from moe_kernels.triton import adapters
    (h, down, up, weights), ids = adapter_leaves(5, 20, 3, 2, 8, torch.float32)
    if layout == "strided":
        up = up.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    args = (h, down, up, weights, ids.to(torch.int32), "gelu", 0.5)
    plan = reference.plan(ids, 3)
    with _forced(path):
        torch.library.opcheck(adapters.adapter_moe_forward_op, args)
        grad = torch.randn(5, 20, device=DEVICE)
        detached = [a.detach() for a in (h, down, up, weights)]
        for weight_grads in (True, False):
            torch.library.opcheck(adapters.adapter_moe_backward_op,
                                  (grad, *detached, plan.expert_offsets, plan.sorted_slots, "gelu", 0.5,
                                   weight_grads))


@needs_triton
@pytest.mark.parametrize("T", [3, 12])
def test_triton_adapter_inference_op_passes_opcheck(T):
    """The no-gradient op on its decode path (3 tokens) and past it (24 slots: the planned forward in the same op)."""
    from moe_kernels.triton import adapters
    (h, down, up, weights), ids = adapter_leaves(T, 32, 5, 2, 8, torch.float32)
    args = (h.detach(), down.detach(), up.detach(), weights.detach(), ids.to(torch.int32), "gelu", 0.5)
    assert (adapters.decode_config(2 * T, 8, torch.float32) is not None) == (T == 3)
    torch.library.opcheck(adapters.adapter_moe_inference_op, args)


# ------------------------------------------------------- cuda backend (the grouped expert path on CUDA tensors)

def _cuda_backend_adapter(x, w1, w2, b1, b2, weights, ids, activation, gated, interleaved, limit, scale):
    """The public op on the cuda backend (validation, plan, the expert path the backend picks)."""
    return moe_kernels.adapter_moe(x, w1, w2, weights, ids, activation=activation, scale=scale, backend="cuda")


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_cuda_adapter_moe_matches_oracle(activation, shape, dtype):
    check_adapter_against_oracle(_cuda_backend_adapter, shape, dtype, activation, device="cuda")
