"""Shared test helpers (imported by name; conftest.py files are not importable reliably when both
tests/ and integration/ are collected): backends that run here and the device each runs on, per-dtype
tolerances, hard-case ids, skip marks per backend, and the grouped expert path's problems and oracle checks
(shared by tests/test_moe_mlp.py, tests/test_adapter_moe.py and tests/backends/test_grouped_rows.py).
The fixture ``one_thread`` lives in the repository's root conftest.py (pytest loads it for tests/ and
integration/ alike)."""

import importlib.util

import pytest
import torch

import moe_kernels
from moe_kernels import native, reference
from moe_kernels.backends import get_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative (norm-wise) tolerance of a backend's result in `dtype` against the fp32 oracle.
REL_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

GPU = torch.cuda.is_available()
# Backends that run on CUDA tensors; without a GPU, triton runs on CPU tensors in Triton's interpreter
# (conftest.py sets TRITON_INTERPRET=1 then) and cuda does not run at all.
GPU_BACKENDS = ("triton", "cuda")

# Skip marks for a backend's own tests (the per-backend sections of the op files, tests/backends/).
NATIVE = native._C is not None
needs_native = pytest.mark.skipif(not NATIVE, reason=f"moe_kernels._C is not built: {native._LOAD_ERROR}")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
CUDA_KERNELS = GPU and NATIVE and all(native.has_kernel(name, "CUDA") for name in native.SHARED_OPS)
needs_cuda_kernels = pytest.mark.skipif(
    not CUDA_KERNELS, reason="needs a CUDA device and moe_kernels._C built with the CUDA kernels (CI has no GPU: "
    "there .ci/cuda_compile_check.sh proves the sources compile and register)")


def backends_for(device: str = "cpu") -> list[str]:
    """Backends built here that can run on tensors of ``device``."""
    names = []
    for name in moe_kernels.available_backends():
        if get_backend(name).device_error(torch.device(device)) is None:
            names.append(name)
    return names


def device_for(backend: str) -> torch.device:
    """The device a test runs ``backend`` on: CUDA for the GPU backends when a GPU is present, else CPU."""
    return torch.device("cuda" if GPU and backend in GPU_BACKENDS else "cpu")


def backends_under_test() -> list[str]:
    """Every backend built here that can run in this process on the device ``device_for`` gives it: the
    CPU-side backends, plus triton/cuda on CUDA tensors with a GPU, or triton in the interpreter without one.
    (Not named test_*: test modules import it, and pytest would collect it as a test.)"""
    return [name for name in moe_kernels.available_backends()
            if get_backend(name).device_error(device_for(name)) is None]


def oracle_for(backend: str):
    """The oracle a backend's results are compared with in the "every backend against the oracle" tests: the module
    ``moe_kernels.reference`` for every backend but ``reference`` itself, which is compared with the independent
    token-by-token loops of naive_oracle.py (the same signatures) -- compared with itself it could not fail."""
    if backend == "reference":
        import naive_oracle
        return naive_oracle
    return reference


def on_triton_launch(monkeypatch, record) -> None:
    """Calls ``record(kernel name, positional arguments)`` at every Triton launch for the rest of the test (both the
    JIT and the interpreter launch through KernelInterface.__getitem__)."""
    import triton.runtime.jit as jit

    original = jit.KernelInterface.__getitem__

    def recording(self, grid):
        launch = original(self, grid)

        def run(*args, **kwargs):
            record(self.fn.__name__, args)
            return launch(*args, **kwargs)
        return run

    monkeypatch.setattr(jit.KernelInterface, "__getitem__", recording)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_close_rel(actual, expected, dtype, what="", factor=1.0):
    err = rel_err(actual, expected)
    assert err <= REL_TOL[dtype] * factor, f"{what}: relative error {err:.3e} > {REL_TOL[dtype] * factor:.1e} ({dtype})"


def make_ids(pattern: str, num_tokens: int, num_experts: int, k: int, generator=None, device=None) -> torch.Tensor:
    """[T,k] int32 expert ids with distinct experts per token, following a hard-case pattern; drawn on the CPU
    (``generator`` is a CPU generator), then moved to ``device`` (default: stay on the CPU).

    random:      k distinct random experts per token
    one_expert:  every token's first choice is expert 0 (all tokens on one expert)
    skip_last:   expert E-1 never chosen (an expert with no tokens); needs k < E
    """
    g = generator or torch.Generator().manual_seed(0)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if pattern == "one_expert":
        scores[:, 0] = 2.0
    elif pattern == "skip_last":
        scores[:, -1] = -1.0
    ids = scores.topk(k, dim=-1).indices.to(torch.int32)
    return ids if device is None else ids.to(device)


def permuted_ids(pattern: str, num_tokens: int, num_experts: int, k: int, generator) -> torch.Tensor:
    """[T,k] int32 ids with distinct experts per row, each row a random permutation's first k (the C++ ops'
    tests draw these); pattern: random | one_expert (expert 0 first in every row) | skip_odd (only even
    experts: every odd expert has no tokens)."""
    if pattern == "one_expert":
        rest = torch.stack([torch.randperm(num_experts - 1, generator=generator)[: k - 1] + 1
                            for _ in range(num_tokens)]) if k > 1 else torch.empty(num_tokens, 0, dtype=torch.long)
        ids = torch.cat([torch.zeros(num_tokens, 1, dtype=torch.long), rest], dim=1)
    elif pattern == "skip_odd":
        evens = torch.arange(0, num_experts, 2)
        ids = torch.stack([evens[torch.randperm(len(evens), generator=generator)[:k]] for _ in range(num_tokens)])
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)])
    return ids.to(torch.int32)


# (rtol, atol) of the C++ CPU ops' outputs and gradients against the fp32 reference; low precision ones round
# the GEMM inputs/outputs and the intermediate activations to their dtype.
SCALED_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (8e-2, 2e-2)}


def assert_close_scaled(actual, expected, dtype, what=""):
    """Element-wise, with the absolute tolerance relative to the tensor's scale: sums over many rounded terms,
    not single values."""
    rtol, atol = SCALED_TOL[dtype]
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def make_routing(T, E, k, pattern, g, ids=make_ids):
    """Routing weights (softmax of normals) and ids of ``pattern`` drawn by ``ids`` (make_ids or permuted_ids)."""
    ids = ids(pattern, T, E, k, g)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return weights, ids


# --- the grouped expert path (grouped_mlp_forward/backward) and the cuda backend: problems, oracle checks ---

# (T, H, I, E, k, pattern): one token, odd widths and prime E, k = 1 with all tokens on one expert, k = E,
# an expert without tokens, widths below the 16-byte alignment.
MLP_SHAPES = [
    (1, 8, 4, 4, 2, "random"),
    (13, 33, 10, 7, 3, "random"),
    (24, 16, 8, 4, 1, "one_expert"),
    (10, 12, 6, 5, 5, "random"),
    (30, 16, 12, 8, 2, "skip_last"),
    (9, 7, 3, 11, 2, "random"),
]
ACTIVATION_CASES = [  # (activation, interleaved, swiglu_limit, biases, gated, softcaps)
    ("silu", False, None, False, True, None), ("gelu", False, None, True, True, None),
    ("gelu_tanh", True, None, False, True, None), ("relu", False, None, True, True, None),
    ("gpt_oss", True, 1.0, True, True, None), ("gpt_oss", False, None, False, True, None),
    ("silu", False, 0.5, False, True, None),  # DeepSeek-V4's clamped SwiGLU
    ("relu2", False, None, True, False, None),  # Nemotron-H: no gate, ReLU^2 (the first weight is [E, I, H])
    ("softcap_swiglu", False, None, True, True, (0.8, 1.2)),  # Inkling2's soft caps, scaled down to bind
]


def mlp_problem(shape, dtype, biases, seed=0, device="cpu", gated=True):
    T, H, I, E, k, pattern = shape
    width = 2 * I if gated else I
    g = torch.Generator().manual_seed(seed + T * 7 + H)
    weights, ids = make_routing(T, E, k, pattern, g)
    t = dict(x=torch.randn(T, H, generator=g), gate_up=torch.randn(E, width, H, generator=g) / H ** 0.5,
             down=torch.randn(E, H, I, generator=g) / I ** 0.5, weights=weights)
    if biases:
        t["b1"] = torch.randn(E, width, generator=g) * 0.1
        t["b2"] = torch.randn(E, H, generator=g) * 0.1
    t = {n: (v if n == "weights" else v.to(dtype)).to(device).requires_grad_() for n, v in t.items()}
    return t, ids.to(device), torch.randn(T, H, generator=g).to(dtype).to(device)


def act_case_in(act_case, dtype):
    """ACTIVATION_CASES entry for inputs in ``dtype``: a clamp limit of 1.0 becomes GPT-OSS's 7.0 below fp32, where
    rounding to fp16/bf16 moves values across the clamp edge at 1.0."""
    activation, interleaved, limit, biases, gated, softcaps = act_case
    if limit is not None and dtype != torch.float32:
        limit = 7.0
    return activation, interleaved, limit, biases, gated, softcaps


def check_mlp_against_oracle(path, shape, dtype, act_case, device="cpu", gradients=True):
    """Runs `path` (the grouped op, the decode op, or the cuda backend) and the oracle on the same inputs; outputs and
    (with ``gradients``; else ``path`` runs without them) every gradient within the README's tolerance."""
    activation, interleaved, limit, biases, gated, softcaps = act_case_in(act_case, dtype)
    t, ids, grad = mlp_problem(shape, dtype, biases, device=device, gated=gated)
    b1, b2 = t.get("b1"), t.get("b2")
    with torch.set_grad_enabled(gradients):
        out = path(t["x"], t["gate_up"], t["down"], b1, b2, t["weights"], ids, activation, gated, interleaved, limit,
                   1.0, softcaps)
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, activation, b1, b2, interleaved,
                            limit, gated, softcaps)
    assert out.dtype == dtype and out.shape == t["x"].shape and out.device == t["x"].device
    assert_close_rel(out, ref, dtype, "output")
    if not gradients:
        return
    names = list(t)
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(ref, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_rel(a, b, dtype, f"grad {name}", factor=2)


ADAPTER_SHAPES = [  # (T, H, r, E, k, pattern): rank 1, odd H, k = E, empty experts, all on one expert
    (1, 8, 1, 3, 1, "random"), (21, 33, 1, 7, 2, "random"), (16, 24, 64, 4, 4, "random"),
    (12, 16, 5, 6, 2, "skip_last"), (25, 10, 3, 5, 1, "one_expert"),
]


def check_adapter_against_oracle(path, shape, dtype, activation, device="cpu", gradients=True):
    """As check_mlp_against_oracle, for adapter_moe's form (w1 = down [E, r, H], w2 = up [E, H, r], scale 0.5)."""
    T, H, r, E, k, pattern = shape
    g = torch.Generator().manual_seed(T + r)
    weights, ids = make_routing(T, E, k, pattern, g)
    t = dict(h=torch.randn(T, H, generator=g).to(dtype), down=(torch.randn(E, r, H, generator=g) / H ** 0.5).to(dtype),
             up=(torch.randn(E, H, r, generator=g) / r ** 0.5).to(dtype), weights=weights)
    t = {n: v.to(device).requires_grad_() for n, v in t.items()}
    ids = ids.to(device)
    with torch.set_grad_enabled(gradients):
        out = path(t["h"], t["down"], t["up"], None, None, t["weights"], ids, activation, False, False, None, 0.5)
    ref = reference.adapter_moe(t["h"], t["down"], t["up"], t["weights"], ids, activation, 0.5)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "output")
    if not gradients:
        return
    grad = torch.randn(T, H, generator=g).to(dtype).to(device)
    names = list(t)
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(ref, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        assert_close_rel(a, b, dtype, f"grad {name}", factor=2)


def expert_leaves(T, H, I, E, g):
    """x [T,H], gate_up [E,2I,H], down [E,H,I], gate_up_bias [E,2I], down_bias [E,H]: standard normals drawn from
    ``g`` in that order, leaves that require grad (opcheck inputs)."""
    shapes = [(T, H), (E, 2 * I, H), (E, H, I), (E, 2 * I), (E, H)]
    return [torch.randn(*shape, generator=g, requires_grad=True) for shape in shapes]


def check_hf_experts_against_transformers(experts, backend, what="", num_tokens=9, k=2):
    """A transformers experts module (already on ``device_for(backend)``) through the moe_kernels experts
    implementation on ``backend`` against the module's own forward: output and the gradients of the hidden states,
    the routing weights and every parameter (fp32 tolerances). Returns (x, ids, weights, transformers' output) for
    further checks on the same inputs."""
    from moe_kernels.hf.experts import BACKEND_ATTRIBUTE, moe_kernels_experts_forward

    device = device_for(backend)
    hidden, num_experts = experts.down_proj.shape[1], experts.num_experts
    if getattr(experts, "is_transposed", False):
        hidden = experts.down_proj.shape[2]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, hidden, generator=g).to(device)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)]).to(device)  # int64
    weights = torch.softmax(torch.randn(num_tokens, k, generator=g), -1).to(device)
    grad = torch.randn(num_tokens, hidden, generator=g).to(device)
    leaves = [x.requires_grad_(), weights.requires_grad_(), *experts.parameters()]
    want = experts(x, ids, weights)  # transformers' eager experts forward
    setattr(experts, BACKEND_ATTRIBUTE, backend)
    got = moe_kernels_experts_forward(experts, x, ids, weights)
    assert_close_rel(got, want, torch.float32, f"{what} output")
    names = ["x", "weights", *(n for n, _ in experts.named_parameters())]
    for name, a, b in zip(names, torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        assert_close_rel(a, b, torch.float32, f"{what} grad {name}", factor=5.0)
    return x.detach(), ids, weights.detach(), want.detach()


def native_opcheck_cases(*op_names):
    """(op, args) for torch.library.opcheck of the C++ ops named (route_forward, plan, gather_rows, ...), in one
    fixed order; the inputs are drawn from one generator in the same order whatever is asked for."""
    ops = torch.ops.moe_kernels
    g = torch.Generator().manual_seed(9)
    T, H, I, E, k = 6, 8, 4, 5, 2
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    weights, ids = make_routing(T, E, k, "random", g, ids=permuted_ids)
    plan = tuple(reference.plan(ids, E))
    x, gate_up, down, b1, b2 = expert_leaves(T, H, I, E, g)
    w = weights.clone().requires_grad_()
    y_sorted = torch.randn(T * k, H, generator=g, requires_grad=True)
    cases = [
        (ops.route_forward, (logits, k, False, False, True, None, 0, 0, 1.0)),
        (ops.route_forward, (logits, 4, True, False, True, torch.randn(E, generator=g), 0, 0, 2.0)),
        (ops.route_backward, (torch.randn(T, k, generator=g), logits.detach(), ids, True, True, True, 1.0)),
        # a Hugging Face router's outputs: weights in a model dtype, int64 ids (and their gradient in that dtype)
        (ops.route_forward, (logits, 3, False, True, False, None, 0, 0, 1.0, torch.bfloat16, torch.int64)),
        (ops.route_backward, (weights.to(torch.bfloat16), logits.detach(), ids.long(), False, False, True, 1.0)),
        (ops.plan, (ids, E)),
        (ops.gather_rows, (x, plan[1], k)),
        (ops.scatter_rows_sum, (y_sorted, plan[2], k)),
        (ops.combine, (y_sorted, plan[2], w)),
        (ops.combine_backward, (torch.randn(T, H, generator=g), y_sorted.detach(), plan[2], weights)),
        (ops.expert_mlp_forward, (x, gate_up, down, b1, b2, w, *plan, "gpt_oss", True, True, 3.0, 1.0, True)),
        (ops.expert_mlp_forward, (x, gate_up[:, :I], down, None, None, w, *plan, "gelu", False, False, None, 0.5,
                                  False)),
        (ops.expert_mlp_backward, (torch.randn(T, H, generator=g), x.detach(), gate_up.detach(), down.detach(),
                                   None, b2.detach(), weights, *plan, torch.empty(0, 2 * I), "silu", True, False,
                                   None, 1.0)),
        # Inkling2's soft-capped SwiGLU: the trailing gate_cap / up_cap arguments
        (ops.expert_mlp_forward, (x, gate_up, down, b1, None, w, *plan, "softcap_swiglu", True, False, None, 1.0,
                                  True, 0.8, 1.2)),
        (ops.expert_mlp_backward, (torch.randn(T, H, generator=g), x.detach(), gate_up.detach(), down.detach(),
                                   None, None, weights, *plan, torch.empty(0, 2 * I), "softcap_swiglu", True, False,
                                   None, 1.0, 0.8, 1.2)),
    ]
    wanted = [getattr(ops, name) for name in op_names]
    return [(op, args) for op, args in cases if op in wanted]


# --- property tests (hypothesis, imported here only when used: the helpers above must not need it) ----------

# The Triton interpreter costs seconds per example: fewer examples for it.
HYPOTHESIS_EXAMPLES = {"triton": 8}


def hypothesis_settings(backend):
    from hypothesis import HealthCheck, settings
    return settings(max_examples=HYPOTHESIS_EXAMPLES.get(backend, 25), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def routing_problem():
    """A hypothesis strategy of (num_tokens, num_experts, k, seed)."""
    from hypothesis import strategies as st

    @st.composite
    def problem(draw):
        num_experts = draw(st.integers(1, 12))
        k = draw(st.integers(1, num_experts))
        num_tokens = draw(st.integers(1, 24))
        seed = draw(st.integers(0, 2 ** 16))
        return num_tokens, num_experts, k, seed

    return problem()


def ids_and_weights(num_tokens, num_experts, k, seed, skew, device):
    """Top-k ids of random scores (skew: every token on expert 0) and random weights, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if skew:
        scores[:, 0] += 1.0  # every token on expert 0
    ids = scores.topk(k, dim=-1).indices.to(torch.int32)
    return ids.to(device), torch.rand(num_tokens, k, generator=g).to(device)


def seeded_mlp_inputs(num_tokens, hidden, inter, num_experts, k, pattern, dtype=torch.float32, bias=False,
                      transposed=False, device=None):
    """(x, gate_up, down, weights, ids, gate_up_bias, down_bias) from a fixed seed, on ``device`` (default: where
    the triton backend runs, CUDA with a GPU); ``transposed``: gate_up/down are views of GPT-OSS's [E, H, 2I] and
    [E, I, H] storage."""
    device = device or ("cuda" if GPU else "cpu")
    g = torch.Generator().manual_seed(1)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device, dtype)

    x = rand(num_tokens, hidden)
    if transposed:  # GPT-OSS stores [E, H, 2I] and [E, I, H]; the op sees transposed views
        gate_up = rand(num_experts, hidden, 2 * inter, s=hidden ** -0.5).transpose(1, 2)
        down = rand(num_experts, inter, hidden, s=inter ** -0.5).transpose(1, 2)
    else:
        gate_up = rand(num_experts, 2 * inter, hidden, s=hidden ** -0.5)
        down = rand(num_experts, hidden, inter, s=inter ** -0.5)
    weights = torch.rand(num_tokens, k, generator=g).to(device)
    ids = make_ids(pattern, num_tokens, num_experts, k).to(device)
    gate_up_bias = rand(num_experts, 2 * inter, s=0.1) if bias else None
    down_bias = rand(num_experts, hidden, s=0.1) if bias else None
    return x, gate_up, down, weights, ids, gate_up_bias, down_bias


def check_native_mlp(path, act_case, shape, dtype):
    """The cpu backend's fused expert op (path "fused") or the cuda backend's composed expert path on CPU tensors
    (path "composed": native gather/combine + torch matmuls) against the oracle, outputs and every gradient."""
    activation, interleaved, limit, biases, gated, softcaps = act_case_in(act_case, dtype)
    T, H, I, E, k, pattern = shape
    width = 2 * I if gated else I
    g = torch.Generator().manual_seed(T * 7 + H)
    weights, ids = make_routing(T, E, k, pattern, g, ids=permuted_ids)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    gate_up = (torch.randn(E, width, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype).requires_grad_()
    b1 = (torch.randn(E, width, generator=g) * 0.1).to(dtype).requires_grad_() if biases else None
    b2 = (torch.randn(E, H, generator=g) * 0.1).to(dtype).requires_grad_() if biases else None
    weights.requires_grad_()
    inputs = [t for t in (x, gate_up, down, b1, b2, weights) if t is not None]
    if path == "fused":
        out = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation=activation, gate_up_bias=b1,
                                  down_bias=b2, interleaved=interleaved, swiglu_limit=limit, gated=gated,
                                  softcaps=softcaps, backend="cpu")
    else:
        out = native.composed_expert_mlp(x, gate_up, down, b1, b2, weights, ids, activation, gated, interleaved,
                                         limit, 1.0, softcaps)
    ref = reference.moe_mlp(x, gate_up, down, weights, ids, activation, b1, b2, interleaved, limit, gated, softcaps)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close_scaled(out, ref, dtype, "output")
    grad = torch.randn(T, H, generator=g).to(dtype)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    names = ["x", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias", "weights"]
    names = [n for n, t in zip(names, (x, gate_up, down, b1, b2, weights)) if t is not None]
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close_scaled(a, b, dtype, f"grad {name}")


def adapter_leaves(T, H, E, k, rank, dtype, ids=None, pattern="random", device=None):
    """Leaves (h, down, up, weights) and ids on ``device`` (default: where the triton backend runs); values drawn
    on the CPU so both devices see the same."""
    device = device or ("cuda" if GPU else "cpu")
    h = torch.randn(T, H).to(device, dtype)
    down = (torch.randn(E, rank, H) / H ** 0.5).to(device, dtype)
    up = (torch.randn(E, H, rank) / rank ** 0.5).to(device, dtype)
    weights = (torch.rand(T, k) + 0.1).to(device)
    if ids is None:
        ids = make_ids(pattern, T, E, k)
    return [t.requires_grad_() for t in (h, down, up, weights)], ids.to(device)


def native_backtrace_env(env: dict) -> dict:
    """``env`` with LD_PRELOAD set to tests/helpers/segv_backtrace.c built into a temporary folder (once per process),
    so that a child process that crashes prints its native stack; ``env`` unchanged where no C compiler builds it."""
    import os
    import shutil
    import subprocess
    import tempfile

    global _SEGV_LIBRARY
    if _SEGV_LIBRARY is None:
        _SEGV_LIBRARY = ""
        compiler = shutil.which("cc") or shutil.which("gcc")
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "segv_backtrace.c")
        if compiler and os.path.exists(source):
            library = os.path.join(tempfile.mkdtemp(prefix="moe_segv_"), "segv_backtrace.so")
            built = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source],
                                   capture_output=True, text=True)
            _SEGV_LIBRARY = library if built.returncode == 0 else ""
    if not _SEGV_LIBRARY:
        return env
    preload = " ".join(filter(None, [_SEGV_LIBRARY, env.get("LD_PRELOAD", "")]))
    return {**env, "LD_PRELOAD": preload}


_SEGV_LIBRARY = None


def crash_probe_env() -> dict:
    """The environment of a crash-probe child process: this one's, the repository root first on PYTHONPATH (the
    child imports moe_kernels and the tests from the checkout) and the native-stack preload
    (:func:`native_backtrace_env`)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return native_backtrace_env({**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])})


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (the benchmarks folder is not a package), for tests of its functions."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", f"{name}.py")
    import sys

    module_name = f"benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # registered before it runs: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
