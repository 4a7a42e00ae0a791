"""The Triton kernels (routing, dispatch plan, expert MLP) against the oracle, forward and gradients.

On a machine without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set here and in
conftest before triton is imported). Shapes stay small: the interpreter's cost grows with programs
times loop steps. Adapter kernels are tested in test_triton_adapters.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from moe_testing import REL_TOL, assert_close_rel, make_ids  # noqa: E402

from moe_kernels import ops, reference  # noqa: E402
from moe_kernels.triton import BACKEND, configs  # noqa: E402
from moe_kernels.triton import compile_check  # noqa: E402
from moe_kernels.triton.experts import moe_mlp, moe_mlp_forward_op  # noqa: E402
from moe_kernels.triton.plan import dispatch_plan  # noqa: E402
from moe_kernels.triton.routing import route, route_backward_op, route_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------------
# dispatch plan


def _assert_plan_equal(ids, num_experts):
    got = dispatch_plan(ids, num_experts)
    want = reference.plan(ids, num_experts)
    for name, a, b in zip(("expert_offsets", "sorted_slots", "slot_positions"), got, want):
        assert a.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a} != {b}"


@pytest.mark.parametrize("num_tokens,num_experts,k,pattern", [
    (1, 1, 1, "random"), (1, 8, 2, "random"), (7, 5, 2, "random"), (13, 7, 7, "random"),   # k = E, prime E
    (40, 3, 2, "one_expert"), (30, 6, 2, "skip_last"), (20, 3000, 4, "random"),             # many experts
])
def test_plan_matches_reference(num_tokens, num_experts, k, pattern):
    _assert_plan_equal(make_ids(pattern, num_tokens, num_experts, k).to(DEVICE), num_experts)


def test_plan_sort_path_over_several_chunks(monkeypatch):
    # BLOCK above the all-pairs limit takes the tl.sort path; 2.3 chunks exercise the chunk scan
    table = dict(configs.load_table(), plan=[{"max_slots": None, "BLOCK": 256, "BLOCK_E": 16, "num_warps": 4}])
    monkeypatch.setattr(configs, "load_table", lambda: table)
    ids = make_ids("random", 130, 37, 3).to(DEVICE)
    ids[:, 0] = 36  # a crowded expert across both chunks
    ids[:, 1] = torch.where(ids[:, 1] == 36, 0, ids[:, 1])
    ids[:, 2] = torch.where(ids[:, 2] == 36, 1, ids[:, 2])
    _assert_plan_equal(ids, 37)


# ----------------------------------------------------------------------------------------------------
# routing

ROUTE_VARIANTS = [
    dict(),                                                              # Mixtral / Qwen / OLMoE
    dict(renormalize=False),                                             # Jamba, Self-MoE
    dict(order="topk_then_softmax", renormalize=False),                  # GPT-OSS, Granite, PESC
    dict(scoring="sigmoid", renormalize=False, scale=2.5),
    dict(scoring="sigmoid", order="topk_then_softmax"),
    dict(scoring="sigmoid", bias=True, scale=2.5),                       # DeepSeek-V3 without groups
    dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2, scale=2.5),  # DeepSeek-V3 / GLM4-MoE
    dict(n_group=2, topk_group=1, renormalize=False),
    dict(order="topk_then_softmax", bias=True),
]


def _route_args(variant, num_experts, dtype):
    args = {key: value for key, value in variant.items() if key != "bias"}
    if variant.get("bias"):
        args["bias"] = torch.randn(num_experts, device=DEVICE).to(dtype)
    return args


def _check_route(logits, k, args, dtype, grad=True):
    logits = logits.detach().requires_grad_(grad)
    weights, ids = ops.route(logits, k, backend="triton", **args)
    want_weights, want_ids = reference.route(logits, k, **{"scoring": "softmax", "order": "softmax_then_topk",
                                                           "renormalize": True, **args})
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids), f"ids differ:\n{ids}\n{want_ids}"
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    if grad:
        upstream = torch.randn_like(weights)
        (got,) = torch.autograd.grad(weights, logits, upstream)
        (want,) = torch.autograd.grad(want_weights, logits, upstream)
        assert got.dtype == logits.dtype
        # absolute floor: with k = 1 and renormalisation the exact gradient is 0 (rounding noise remains)
        tol = 1e-5 if dtype == torch.float32 else REL_TOL[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("variant", ROUTE_VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
@pytest.mark.parametrize("num_tokens,num_experts,k", [(1, 8, 1), (19, 8, 8), (21, 12, 3)])
def test_route_variants_match_oracle(variant, num_tokens, num_experts, k):
    if variant.get("n_group"):
        per_group = num_experts // variant["n_group"]
        if k > variant["topk_group"] * per_group:
            pytest.skip("k larger than the eligible experts is rejected by ops.route")
    logits = torch.randn(num_tokens, num_experts, device=DEVICE) * 2
    _check_route(logits, k, _route_args(variant, num_experts, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
@pytest.mark.parametrize("variant", [ROUTE_VARIANTS[0], ROUTE_VARIANTS[2], ROUTE_VARIANTS[6]],
                         ids=["softmax", "topk_then_softmax", "grouped_sigmoid_bias"])
def test_route_low_precision_logits(dtype, variant):
    # bf16/fp16 logits are upcast on load: the choice must equal the oracle's on the same values
    logits = (torch.randn(17, 7 if not variant.get("n_group") else 16, device=DEVICE) * 3).to(dtype)
    _check_route(logits, 3, _route_args(variant, logits.shape[1], dtype), dtype)


@pytest.mark.parametrize("variant", [ROUTE_VARIANTS[0], ROUTE_VARIANTS[2], ROUTE_VARIANTS[6]],
                         ids=["softmax", "topk_then_softmax", "grouped_sigmoid_bias"])
def test_route_ties_go_to_the_lower_index(variant):
    # integer logits with many exact ties (and tied groups)
    logits = torch.randint(-2, 3, (33, 16), device=DEVICE).float()
    args = _route_args(variant, 16, torch.float32)
    if "bias" in args:
        args["bias"] = torch.zeros(16, device=DEVICE)
    _check_route(logits, 4, args, torch.float32)


def test_route_masked_experts_and_prime_e():
    logits = torch.randn(9, 13, device=DEVICE)
    logits[:, 2] = float("-inf")
    logits[0, :] = float("-inf")
    logits[0, 5] = 1.0  # one finite expert; k = 3 picks the lowest-index masked ones next
    _check_route(logits, 3, dict(renormalize=False), torch.float32)


def test_route_many_experts():
    logits = torch.randn(3, 3000, device=DEVICE)
    _check_route(logits, 8, {}, torch.float32)


def test_route_ops_pass_opcheck():
    logits = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE)
    torch.library.opcheck(route_op, (logits, bias, 3, True, False, True, 4, 2, 2.5))
    torch.library.opcheck(route_op, (logits, None, 2, False, True, False, 1, 1, 1.0))
    weights, ids = route(logits, 3, "softmax", "softmax_then_topk", True, None, None, None, 1.0)
    torch.library.opcheck(route_backward_op, (torch.randn_like(weights), logits.detach(), ids, False, False, True, 1.0))


# ----------------------------------------------------------------------------------------------------
# expert MLP

# (T, H, I, E, k, ids pattern): one token, fewer tokens than a tile, all tokens on one expert (several
# tiles), an expert without tokens, k = 1, k = E, odd sizes, prime E
MLP_GRID = [
    (1, 32, 16, 4, 2, "random"),
    (5, 32, 16, 8, 2, "random"),
    (40, 16, 16, 3, 2, "one_expert"),
    (12, 32, 16, 6, 2, "skip_last"),
    (9, 33, 24, 5, 1, "random"),
    (6, 16, 8, 5, 5, "random"),
    (11, 17, 20, 7, 3, "random"),
]


def _mlp_inputs(num_tokens, hidden, inter, num_experts, k, pattern, dtype=torch.float32, bias=False,
                transposed=False):
    g = torch.Generator().manual_seed(1)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(DEVICE, dtype)

    x = rand(num_tokens, hidden)
    if transposed:  # GPT-OSS stores [E, H, 2I] and [E, I, H]; the op sees transposed views
        gate_up = rand(num_experts, hidden, 2 * inter, s=hidden ** -0.5).transpose(1, 2)
        down = rand(num_experts, inter, hidden, s=inter ** -0.5).transpose(1, 2)
    else:
        gate_up = rand(num_experts, 2 * inter, hidden, s=hidden ** -0.5)
        down = rand(num_experts, hidden, inter, s=inter ** -0.5)
    weights = torch.rand(num_tokens, k, generator=g).to(DEVICE)
    ids = make_ids(pattern, num_tokens, num_experts, k).to(DEVICE)
    gate_up_bias = rand(num_experts, 2 * inter, s=0.1) if bias else None
    down_bias = rand(num_experts, hidden, s=0.1) if bias else None
    return x, gate_up, down, weights, ids, gate_up_bias, down_bias


def _check_mlp(inputs, dtype, activation="silu", interleaved=False, swiglu_limit=None, factor=1.0):
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = inputs
    leaves = [t.detach().requires_grad_() if t is not None else None
              for t in (x, gate_up, down, weights, gate_up_bias, down_bias)]
    x, gate_up, down, weights, gate_up_bias, down_bias = leaves
    kwargs = dict(activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=interleaved,
                  swiglu_limit=swiglu_limit)
    y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton", **kwargs)
    want = reference.moe_mlp(x, gate_up, down, weights, ids, **kwargs)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_rel(y.float(), want.float(), dtype, "y", factor)
    upstream = torch.randn_like(want)
    names = ["x", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"]
    live = [(n, t) for n, t in zip(names, leaves) if t is not None]
    got = torch.autograd.grad(y, [t for _, t in live], upstream)
    ref = torch.autograd.grad(want, [t for _, t in live], upstream)
    for (name, leaf), a, b in zip(live, got, ref):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, name
        assert_close_rel(a.float(), b.float(), dtype, f"d {name}", 2 * factor)


@pytest.mark.parametrize("shape", MLP_GRID, ids=lambda s: "T{}-H{}-I{}-E{}-k{}-{}".format(*s))
def test_moe_mlp_hard_cases_fp32(shape):
    _check_mlp(_mlp_inputs(*shape), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [MLP_GRID[2], MLP_GRID[6]], ids=["one_expert", "prime_E"])
def test_moe_mlp_low_precision(dtype, shape):
    _check_mlp(_mlp_inputs(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("activation,interleaved,bias,limit,transposed", [
    ("gelu", False, True, None, False),
    ("gelu_tanh", True, False, None, False),
    ("relu", False, True, None, True),
    ("gpt_oss", True, True, 0.7, True),     # GPT-OSS: transposed storage, interleaved, biases, clamp
    ("gpt_oss", False, False, None, False),
])
def test_moe_mlp_activations_layouts_biases(activation, interleaved, bias, limit, transposed):
    inputs = _mlp_inputs(10, 24, 16, 5, 2, "skip_last", bias=bias, transposed=transposed)
    _check_mlp(inputs, torch.float32, activation, interleaved, limit)


def test_moe_mlp_bf16_gpt_oss():
    inputs = _mlp_inputs(8, 32, 16, 4, 2, "random", dtype=torch.bfloat16, bias=True, transposed=True)
    _check_mlp(inputs, torch.bfloat16, "gpt_oss", True, 0.7)


def test_moe_mlp_recompute_mode(monkeypatch):
    # MOE_KERNELS_RECOMPUTE=1: forward keeps no pre-activation, backward re-runs the gate/up GEMM
    monkeypatch.setenv("MOE_KERNELS_RECOMPUTE", "1")
    inputs = _mlp_inputs(9, 24, 16, 4, 2, "skip_last", bias=True)
    _check_mlp(inputs, torch.float32, "gpt_oss", True, 0.7)


def test_moe_mlp_frozen_experts_and_no_grad():
    x, gate_up, down, weights, ids, _, _ = _mlp_inputs(7, 16, 16, 4, 2, "random")
    x.requires_grad_()
    with torch.no_grad():
        y_nograd = moe_mlp(x, gate_up, down, weights, ids)
    y = moe_mlp(x, gate_up, down, weights, ids)  # only x needs a gradient: no weight-gradient kernels
    torch.testing.assert_close(y_nograd, y.detach())
    (dx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference.moe_mlp(xr, gate_up, down, weights, ids).sum(), xr)
    assert_close_rel(dx, dx_ref, torch.float32, "dx")


GPU_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not GPU_SM90, reason="the grouped-GEMM weight gradients need an sm90+ GPU")
@pytest.mark.parametrize("wgrad", ["grouped_mm", "triton"])
@pytest.mark.parametrize("shape,activation,interleaved,limit,transposed", [
    ((40, 16, 16, 3, 2, "one_expert"), "silu", False, None, False),
    ((12, 32, 16, 6, 2, "skip_last"), "silu", False, None, False),    # an expert without rows
    ((70, 64, 48, 7, 2, "random"), "gelu_tanh", False, None, False),
    ((10, 24, 16, 5, 2, "skip_last"), "gpt_oss", True, 0.7, True),    # GPT-OSS layout, no biases
])
def test_moe_mlp_weight_grads_both_ways(monkeypatch, wgrad, shape, activation, interleaved, limit, transposed):
    monkeypatch.setenv("MOE_KERNELS_WGRAD", wgrad)
    inputs = _mlp_inputs(*shape, dtype=torch.bfloat16, transposed=transposed)
    _check_mlp(inputs, torch.bfloat16, activation, interleaved, limit)


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
    from moe_kernels.triton import experts
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = inputs
    assert configs.decode_config(ids.numel(), fp32=dtype == torch.float32) is not None, "shape must take the decode path"
    kwargs = dict(activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=interleaved,
                  swiglu_limit=swiglu_limit)
    calls = []
    original = experts._decode_forward
    experts._decode_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
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
    _check_decode(_mlp_inputs(*shape, dtype=dtype), dtype)


@pytest.mark.parametrize("activation,interleaved,bias,limit,transposed", [
    ("gelu", False, True, None, False),
    ("relu", False, True, None, True),
    ("gpt_oss", True, True, 0.7, True),
])
def test_moe_mlp_decode_path_activations_layouts_biases(activation, interleaved, bias, limit, transposed):
    inputs = _mlp_inputs(3, 24, 16, 5, 2, "skip_last", bias=bias, transposed=transposed)
    _check_decode(inputs, torch.float32, activation, interleaved, limit)


def test_moe_mlp_decode_path_boundary():
    """Exactly BLOCK_M slots take the decode path, one more the planned path; both agree with the oracle."""
    block_m = configs.decode_config(1, fp32=True)["BLOCK_M"]
    assert configs.decode_config(block_m + 1, fp32=True) is None
    _check_decode(_mlp_inputs(block_m // 2, 16, 8, 5, 2, "random"), torch.float32)
    x, gate_up, down, weights, ids, _, _ = _mlp_inputs(block_m // 2 + 1, 16, 8, 5, 2, "random")
    with torch.no_grad():
        y = ops.moe_mlp(x, gate_up, down, weights, ids, backend="triton")
    assert_close_rel(y, reference.moe_mlp(x, gate_up, down, weights, ids), torch.float32, "y (planned path)")


def test_moe_mlp_decode_op_passes_opcheck():
    from moe_kernels.triton.experts import moe_mlp_decode_op
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = _mlp_inputs(3, 16, 16, 3, 2, "random", bias=True)
    torch.library.opcheck(moe_mlp_decode_op, (x, gate_up, down, weights, ids, gate_up_bias, down_bias, "silu",
                                              False, None))


def test_moe_mlp_is_deterministic():
    inputs = _mlp_inputs(12, 16, 16, 3, 3, "one_expert", dtype=torch.bfloat16)
    x, gate_up, down, weights, ids, _, _ = (t.detach().requires_grad_() if t is not None and t.is_floating_point()
                                            else t for t in inputs)
    runs = []
    for _ in range(2):
        y = moe_mlp(x, gate_up, down, weights, ids)
        runs.append((y, *torch.autograd.grad(y.float().square().sum(), (x, gate_up, down, weights))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_moe_mlp_op_passes_opcheck():
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = _mlp_inputs(5, 16, 16, 3, 2, "random", bias=True)
    for t in (x, gate_up, down, weights):
        t.requires_grad_()
    torch.library.opcheck(moe_mlp_forward_op, (x, gate_up, down, weights, ids, gate_up_bias, down_bias, "silu",
                                               False, None, True))


# ----------------------------------------------------------------------------------------------------
# backend, configs, compile check


def test_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in BACKEND.device_error(torch.device("cpu"))
    assert BACKEND.device_error(torch.device("cuda")) is None


def test_config_table_covers_every_shape_class():
    for num_rows, num_experts in [(1, 8), (64, 8), (4096, 64), (10 ** 6, 256), (8, 4096)]:
        for fp32 in (False, True):
            cfg = configs.mlp_config(num_rows, num_experts, fp32=fp32)
            assert set(cfg) >= {"up", "down", "down_bwd", "dx", "dw"}
        assert configs.plan_config(num_rows, num_experts)["BLOCK"] >= 1
        assert configs.route_config(num_rows, num_experts)["BLOCK_T"] >= 1


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
    ok = {"error": None, "spill": 0, "shared": 1024, "registers": 128}
    assert compile_check.problems(ok, 90) == []
    assert compile_check.problems(dict(ok, spill=8), 90)
    assert compile_check.problems(dict(ok, shared=200 * 1024), 80)
    assert not compile_check.problems(dict(ok, shared=200 * 1024), 90)
    assert compile_check.problems(dict(ok, error="CompilationError: boom"), 90)
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
