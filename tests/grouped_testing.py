"""Problems and oracle checks of the grouped expert path, shared by tests/test_native_grouped.py (CPU tensors)
and tests/test_cuda_grouped.py (CUDA tensors). Imported by name, as moe_testing is."""

import torch
from moe_testing import assert_close_rel, make_ids

from moe_kernels import reference

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
ACTIVATION_CASES = [  # (activation, interleaved, swiglu_limit, biases)
    ("silu", False, None, False), ("gelu", False, None, True), ("gelu_tanh", True, None, False),
    ("relu", False, None, True), ("gpt_oss", True, 1.0, True), ("gpt_oss", False, None, False),
]


def make_routing(T, E, k, pattern, g):
    ids = make_ids(pattern, T, E, k, g)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return weights, ids


def mlp_problem(shape, dtype, biases, seed=0, device="cpu"):
    T, H, I, E, k, pattern = shape
    g = torch.Generator().manual_seed(seed + T * 7 + H)
    weights, ids = make_routing(T, E, k, pattern, g)
    t = dict(x=torch.randn(T, H, generator=g), gate_up=torch.randn(E, 2 * I, H, generator=g) / H ** 0.5,
             down=torch.randn(E, H, I, generator=g) / I ** 0.5, weights=weights)
    if biases:
        t["b1"] = torch.randn(E, 2 * I, generator=g) * 0.1
        t["b2"] = torch.randn(E, H, generator=g) * 0.1
    t = {n: (v if n == "weights" else v.to(dtype)).to(device).requires_grad_() for n, v in t.items()}
    return t, ids.to(device), torch.randn(T, H, generator=g).to(dtype).to(device)


def check_mlp_against_oracle(path, shape, dtype, act_case, device="cpu"):
    """Runs `path` (the grouped op, or the cuda backend) and the oracle on the same inputs; outputs and every
    gradient within the README's tolerance."""
    activation, interleaved, limit, biases = act_case
    if limit is not None and dtype != torch.float32:
        limit = 7.0  # GPT-OSS's value; at 1.0 rounding to fp16/bf16 moves values across the clamp edge
    t, ids, grad = mlp_problem(shape, dtype, biases, device=device)
    b1, b2 = t.get("b1"), t.get("b2")
    out = path(t["x"], t["gate_up"], t["down"], b1, b2, t["weights"], ids, activation, True, interleaved, limit, 1.0)
    ref = reference.moe_mlp(t["x"], t["gate_up"], t["down"], t["weights"], ids, activation, b1, b2, interleaved,
                            limit)
    assert out.dtype == dtype and out.shape == t["x"].shape and out.device == t["x"].device
    assert_close_rel(out, ref, dtype, "output")
    names = list(t)
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(ref, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_rel(a, b, dtype, f"grad {name}", factor=2)


ADAPTER_CASES = [  # (T, H, r, E, k, pattern): rank 1, odd H, k = E, empty experts, all on one expert
    (1, 8, 1, 3, 1, "random"), (21, 33, 1, 7, 2, "random"), (16, 24, 64, 4, 4, "random"),
    (12, 16, 5, 6, 2, "skip_last"), (25, 10, 3, 5, 1, "one_expert"),
]


def check_adapter_against_oracle(path, shape, dtype, activation, device="cpu"):
    T, H, r, E, k, pattern = shape
    g = torch.Generator().manual_seed(T + r)
    weights, ids = make_routing(T, E, k, pattern, g)
    t = dict(h=torch.randn(T, H, generator=g).to(dtype), down=(torch.randn(E, r, H, generator=g) / H ** 0.5).to(dtype),
             up=(torch.randn(E, H, r, generator=g) / r ** 0.5).to(dtype), weights=weights)
    t = {n: v.to(device).requires_grad_() for n, v in t.items()}
    ids = ids.to(device)
    out = path(t["h"], t["down"], t["up"], None, None, t["weights"], ids, activation, False, False, None, 0.5)
    ref = reference.adapter_moe(t["h"], t["down"], t["up"], t["weights"], ids, activation, 0.5)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "output")
    grad = torch.randn(T, H, generator=g).to(dtype).to(device)
    names = list(t)
    got = torch.autograd.grad(out, [t[n] for n in names], grad)
    want = torch.autograd.grad(ref, [t[n] for n in names], grad)
    for name, a, b in zip(names, got, want):
        assert_close_rel(a, b, dtype, f"grad {name}", factor=2)


