"""The decode expert path (op decode_mlp_forward, csrc/decode_experts.cpp; CUDA kernels csrc/cuda/decode.cu): two
GEMV passes over the routed slots, no plan, forward only, which the cuda backend runs for at most
native.DECODE_MAX_SLOTS slots without gradients. Against the fp32 oracle with the README's tolerances over the hard
cases (one token, empty experts, all tokens on one expert, k = 1, k = E, odd widths, prime E, T*k = 64) and every
activation, for moe_mlp and adapter_moe; against the grouped op on the same inputs; GPT-OSS's transposed weight
views; errors; opcheck; the cuda backend's choice of path.

The CPU kernel runs the per-element code the CUDA kernels run (csrc/common/grouped_rows.h), so these tests run
here; with a GPU and the CUDA build the same grids run on CUDA tensors, where the 16-byte-load kernels take the
aligned widths and the scalar ones the odd widths and transposed views.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from moe_testing import (ACTIVATION_CASES, ADAPTER_SHAPES, CUDA_KERNELS, DTYPES, MLP_SHAPES, assert_close_rel,
                         check_adapter_against_oracle, check_mlp_against_oracle, make_routing, mlp_problem,
                         needs_cuda_kernels)

from moe_kernels import reference

native = pytest.importorskip("moe_kernels.native")
if native._C is None or not native.has_kernel("decode_mlp_forward", "CPU"):
    pytest.skip("moe_kernels._C is not built (or predates decode_mlp_forward)", allow_module_level=True)

ops = torch.ops.moe_kernels
DEVICES = ["cpu"] + (["cuda"] if CUDA_KERNELS else [])
# (T, H, I, E, k, pattern): widths that take the CUDA kernels' 16-byte loads (H, I multiples of 8), T*k = 64 (the
# most the cuda backend sends here), k = E, all on one expert (k = 1: with k = E every expert has every token)
DECODE_SHAPES = [(1, 64, 32, 8, 2, "random"), (4, 128, 48, 16, 4, "skip_last"), (8, 256, 64, 9, 8, "random"),
                 (3, 40, 24, 5, 5, "random"), (5, 40, 24, 7, 1, "one_expert")]


def _decode(t, ids, act_case, scale=1.0):
    activation, interleaved, limit, _, gated, softcaps = act_case
    with torch.no_grad():
        return native.decode_expert_mlp(t["x"], t["gate_up"], t["down"], t.get("b1"), t.get("b2"), t["weights"], ids,
                                        activation, gated, interleaved, limit, scale, softcaps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MLP_SHAPES + DECODE_SHAPES, ids=str)
@pytest.mark.parametrize("act_case", ACTIVATION_CASES, ids=str)
def test_decode_moe_mlp_matches_oracle(act_case, shape, dtype, device):
    check_mlp_against_oracle(native.decode_expert_mlp, shape, dtype, act_case, device=device, gradients=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES + [(8, 64, 16, 16, 4, "random")], ids=str)
@pytest.mark.parametrize("activation", reference.ADAPTER_ACTIVATIONS)
def test_decode_adapter_matches_oracle(activation, shape, dtype, device):
    """adapter_moe's form: w1 = down [E, r, H], w2 = up [E, H, r], a plain activation and an output scale."""
    check_adapter_against_oracle(native.decode_expert_mlp, shape, dtype, activation, device=device, gradients=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_agrees_with_the_grouped_op(device, dtype):
    """The same per-element steps as the grouped path: only the fp32 dot products' order differs, so the two
    agree far inside the oracle tolerance (fp32: to a few ulps)."""
    if not native.has_kernel("grouped_mlp_forward", "CPU"):
        pytest.skip("built without the grouped expert ops")
    act_case = ("gpt_oss", True, 7.0, True, True, None)
    t, ids, _ = mlp_problem((8, 64, 24, 7, 4, "skip_last"), dtype, True, device=device)
    with torch.no_grad():
        grouped = native.grouped_expert_mlp(t["x"], t["gate_up"], t["down"], t["b1"], t["b2"], t["weights"], ids,
                                            "gpt_oss", True, True, 7.0, 1.0)
    out = _decode(t, ids, act_case)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, grouped, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_transposed_weight_views(device):
    """GPT-OSS stores [E, H, 2I] and [E, I, H] and hands the ops transposed views: read through their strides."""
    g = torch.Generator().manual_seed(4)
    T, H, I, E, k = 3, 32, 16, 6, 2
    weights, ids = make_routing(T, E, k, "random", g)
    x = torch.randn(T, H, generator=g).to(device)
    gate_up = (torch.randn(E, H, 2 * I, generator=g) / H ** 0.5).to(device).transpose(1, 2)
    down = (torch.randn(E, I, H, generator=g) / I ** 0.5).to(device).transpose(1, 2)
    weights, ids = weights.to(device), ids.to(device)
    out = native.decode_expert_mlp(x, gate_up, down, None, None, weights, ids, "silu", True, False, None, 1.0)
    ref = reference.moe_mlp(x, gate_up, down, weights, ids)
    assert_close_rel(out, ref, torch.float32, "output")
    assert torch.equal(out, native.decode_expert_mlp(x, gate_up.contiguous(), down.contiguous(), None, None, weights,
                                                     ids, "silu", True, False, None, 1.0)) or device == "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_decode_is_deterministic(device):
    t, ids, _ = mlp_problem((8, 64, 32, 5, 5, "random"), torch.bfloat16, False, device=device)
    case = ("silu", False, None, False, True, None)
    assert torch.equal(_decode(t, ids, case), _decode(t, ids, case))


def test_decode_errors():
    t, ids, _ = mlp_problem((4, 16, 8, 4, 2, "random"), torch.float32, False)
    x, gate_up, down, weights = (t[n].detach() for n in ("x", "gate_up", "down", "weights"))
    args = lambda **kw: {**dict(x=x, w1=gate_up, w2=down, b1=None, b2=None, weights=weights, ids=ids,
                                activation="silu", gated=True, interleaved=False, limit=None, scale=1.0), **kw}
    with pytest.raises(RuntimeError, match="ids must be int32 or int64"):
        ops.decode_mlp_forward(**args(ids=ids.short()))
    with pytest.raises(RuntimeError, match="weights must be float32 or x's dtype"):
        ops.decode_mlp_forward(**args(weights=weights.half()))
    with pytest.raises(RuntimeError, match="disagree on the hidden width"):
        ops.decode_mlp_forward(**args(w2=down[:, :, :5]))
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.decode_mlp_forward(**args(w1=gate_up.double()))
    with pytest.raises(RuntimeError, match="interleaved applies to gated"):
        ops.decode_mlp_forward(**args(w1=gate_up[:, :8], gated=False, interleaved=True))
    with pytest.raises(RuntimeError, match="scale must be a finite number"):
        ops.decode_mlp_forward(**args(scale=float("nan")))
    empty = ops.decode_mlp_forward(**args(x=x[:0], weights=weights[:0], ids=ids[:0]))
    assert empty.shape == (0, 16)


def test_decode_checks_id_values_in_debug_mode(monkeypatch):
    t, ids, _ = mlp_problem((4, 16, 8, 4, 2, "random"), torch.float32, False)
    bad = ids.clone()
    bad[1, 0] = 4
    monkeypatch.setenv("MOE_KERNELS_DEBUG", "1")
    with pytest.raises(RuntimeError, match=r"ids must lie in \[0, 4\)"):
        _decode(t, bad, ("silu", False, None, False, True, None))


def _opcheck_cases():
    t, ids, _ = mlp_problem((5, 16, 8, 4, 2, "skip_last"), torch.float32, True)
    x, gate_up, down, b1, b2, weights = (t[n].detach() for n in ("x", "gate_up", "down", "b1", "b2", "weights"))
    bf = torch.bfloat16
    return [
        (x, gate_up, down, None, None, weights, ids, "silu", True, False, None, 1.0),
        (x, gate_up, down, b1, b2, weights, ids, "gpt_oss", True, True, 3.0, 1.0),
        (x, gate_up[:, :8], down, None, None, weights, ids, "relu2", False, False, None, 0.5),
        (x.to(bf), gate_up.to(bf), down.to(bf), None, None, weights, ids, "softcap_swiglu", True, False, None, 1.0,
         0.8, 1.2),
        # a Hugging Face router's routing: weights in the data dtype, int64 ids
        (x.to(bf), gate_up.to(bf), down.to(bf), None, b2, weights.to(bf), ids.long(), "silu", True, False, None, 1.0),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_reads_the_routing_as_given(device, dtype, bias):
    """Weights in x's dtype and int64 ids (what a Hugging Face router returns) give bit for bit the result of the
    same routing converted to float32 / int32 first: the kernels widen each weight exactly."""
    t, ids, _ = mlp_problem((6, 40, 24, 7, 7, "random"), dtype, bias, device=device)
    case = ("silu", False, None, False, True, None)
    given = dict(t, weights=t["weights"].detach().to(dtype))
    converted = dict(t, weights=given["weights"].float())
    want = _decode(converted, ids.int(), case)
    for routed_ids in (ids.long(), ids.int()):
        assert torch.equal(_decode(given, routed_ids, case), want)
    assert torch.equal(_decode(converted, ids.long(), case), want)


@pytest.mark.parametrize("case", range(5))
def test_decode_opcheck(case):
    torch.library.opcheck(ops.decode_mlp_forward, _opcheck_cases()[case])


def test_cuda_backend_takes_the_decode_op_for_few_slots_without_gradients(monkeypatch):
    """native.cuda_expert_path's choice (exercised on CPU tensors, policy only): the decode op for at most
    DECODE_MAX_SLOTS slots and no gradient, the grouped path otherwise or with MOE_KERNELS_CUDA_DECODE=grouped."""
    calls = []
    monkeypatch.setattr(native, "decode_expert_mlp", lambda *args: calls.append("decode") or "decode")
    monkeypatch.setattr(native, "grouped_expert_mlp", lambda *args: calls.append("grouped") or "grouped")
    monkeypatch.setattr(native, "grouped_gemm_status", lambda device, dtype, e: None)
    monkeypatch.delenv("MOE_KERNELS_CUDA_DECODE", raising=False)

    def path(T, k, grad=False):
        t, ids, _ = mlp_problem((T, 8, 4, 8, k, "random"), torch.float32, False)
        x = t["x"] if grad else t["x"].detach()
        return native.cuda_expert_path(x, t["gate_up"].detach(), t["down"].detach(), None, None,
                                       t["weights"].detach(), ids, "silu", True, False, None, 1.0)

    assert path(32, 2) == "decode" and path(1, 8) == "decode"
    assert path(33, 2) == "grouped"  # 66 slots
    assert path(4, 2, grad=True) == "grouped"
    with torch.no_grad():
        assert path(4, 2, grad=True) == "decode"
    monkeypatch.setenv("MOE_KERNELS_CUDA_DECODE", "grouped")
    assert path(4, 2) == "grouped"
    monkeypatch.setenv("MOE_KERNELS_CUDA_DECODE", "sometimes")
    with pytest.raises(ValueError, match="MOE_KERNELS_CUDA_DECODE"):
        path(4, 2)


def test_cuda_backend_hands_the_decode_op_the_routing_as_given(monkeypatch):
    """A Hugging Face router's bf16 weights and int64 ids reach the decode op unconverted (no conversion launch per
    MoE layer and step) and the grouped op as float32 / int32 (what its kernels read)."""
    seen = {}

    def grouped_op(x, w1, w2, b1, b2, weights, ids, *rest):  # the C++ op's arguments, at its boundary
        seen.setdefault("grouped", (weights.dtype, ids.dtype))
        return x, None, None

    monkeypatch.setattr(native, "decode_expert_mlp", lambda *a: seen.setdefault("decode", (a[5].dtype, a[6].dtype)))
    monkeypatch.setattr(native, "ops", SimpleNamespace(plan=native.ops.plan, grouped_mlp_forward=grouped_op))
    monkeypatch.setattr(native, "grouped_gemm_status", lambda device, dtype, e: None)
    monkeypatch.delenv("MOE_KERNELS_CUDA_DECODE", raising=False)
    for T in (2, 40):  # 4 slots: the decode op; 80: the grouped path
        t, ids, _ = mlp_problem((T, 8, 4, 8, 2, "random"), torch.bfloat16, False)
        with torch.no_grad():
            native.CUDA_BACKEND.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"].to(torch.bfloat16), ids.long(),
                                        "silu", None, None, False, None, True, None)
    assert seen == {"decode": (torch.bfloat16, torch.int64), "grouped": (torch.float32, torch.int32)}


def test_cuda_expert_path_compiles_whole_with_the_decode_op():
    """torch.compile(fullgraph=True) traces the cuda path's choice (an environment read, the slot count) and the
    op (its fake kernel), on CPU tensors here."""
    torch._dynamo.reset()
    t, ids, _ = mlp_problem((4, 16, 8, 4, 2, "random"), torch.float32, False)
    args = (t["x"].detach(), t["gate_up"].detach(), t["down"].detach(), None, None, t["weights"].detach(), ids,
            "silu", True, False, None, 1.0)
    compiled = torch.compile(native.cuda_expert_path, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(*args), native.decode_expert_mlp(*args))


# ---------------------------------------------------------------------------------------------- CUDA tensors

@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cuda_matches_the_cpu_op(dtype):
    """Same per-element code on both devices: the GPU result is the CPU result up to the dot products' order."""
    t, ids, _ = mlp_problem((6, 96, 40, 7, 3, "skip_last"), dtype, True)
    case = ("gpt_oss", True, 7.0, True, True, None)
    cpu = _decode(t, ids, case)
    gpu = _decode({n: v.detach().cuda() for n, v in t.items()}, ids.cuda(), case)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)


@needs_cuda_kernels
def test_decode_cuda_no_host_sync():
    t, ids, _ = mlp_problem((4, 256, 64, 16, 8, "random"), torch.bfloat16, False, device="cuda")
    case = ("silu", False, None, False, True, None)
    _decode(t, ids, case)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _decode(t, ids, case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
