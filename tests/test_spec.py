"""moe_kernels.spec is the one definition of the activations, their codes and the shared constants.

* The C++ header and name parser agree with the spec (parsed from csrc/, so no build is needed).
* The Python modules take their codes and constants from the spec.
* Every spec activation runs on every backend present and matches the oracle, forward and backward, so
  a new activation fails here until each backend has a kernel branch for it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import moe_kernels
from moe_kernels import reference, spec
from moe_testing import assert_close_rel, backends_under_test, device_for, oracle_for

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _cpp_enum() -> dict:
    text = (CSRC / "common" / "activations.h").read_text()
    body = re.search(r"enum\s+Activation\s*:\s*int\s*\{([^}]*)\}", text)
    assert body, "enum Activation not found in csrc/common/activations.h"
    codes = {}
    for name, value in re.findall(r"\bk(\w+)\s*=\s*(\d+)", body.group(1)):
        codes[_snake(name)] = int(value)
    return codes


def _cpp_constant(path: str, name: str) -> float:
    text = (CSRC / path).read_text()
    match = re.search(rf"\b{name}\s*=\s*([0-9.eE+-]+)f?\s*;", text)
    assert match, f"{name} not found in csrc/{path}"
    return float(match.group(1))


def test_cpp_activation_enum_equals_the_spec():
    assert _cpp_enum() == spec.ACTIVATION_CODES


def test_cpp_table_covers_every_activation():
    assert set(spec.ACTIVATION_CODES) == set(spec.GATED_ACTIVATIONS) | set(spec.ADAPTER_ACTIVATIONS)
    assert len(set(spec.ACTIVATION_CODES.values())) == len(spec.ACTIVATION_CODES)  # one code per activation


def test_cpp_name_parser_maps_each_spec_name_to_its_code():
    """Every ``name == "..." ... act::kX`` in csrc/ maps a spec name to the enum entry of that name, and only
    where the spec allows it (``gated`` / ``!gated`` guards match the gated / adapter tables)."""
    pattern = re.compile(r'==\s*"(\w+)"\s*(&&\s*(!?)\s*gated)?\s*\)\s*[^;]*?\bact::k(\w+)')
    found = {}
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            for name, guard, negated, enum_name in pattern.findall(path.read_text()):
                found.setdefault(name, set()).add((_snake(enum_name), guard and ("adapter" if negated else "gated")))
    assert found, "no activation name parser found under csrc/"
    assert set(found) == set(spec.ACTIVATION_CODES), set(found) ^ set(spec.ACTIVATION_CODES)
    for name, entries in found.items():
        for enum_name, guard in entries:
            assert enum_name == name, (name, enum_name)
            gated, adapter = name in spec.GATED_ACTIVATIONS, name in spec.ADAPTER_ACTIVATIONS
            assert guard == ("" if gated and adapter else "gated" if gated else "adapter"), (name, guard)


def test_cpp_constants_equal_the_spec():
    assert _cpp_constant("common/activations.h", "kGptOssAlpha") == pytest.approx(spec.GPT_OSS_ALPHA, rel=1e-7)
    assert _cpp_constant("common/routing_row.h", "kRenormEps") == pytest.approx(spec.RENORM_EPS, rel=1e-7)


def test_triton_kernels_branch_on_every_activation_code():
    """The Triton activation helpers name a branch for every spec code but identity (their default), read
    from the source so no Triton is needed."""
    text = (CSRC.parent / "moe_kernels" / "triton" / "common.py").read_text()
    named = set(re.findall(r'ACTIVATION_CODES\["(\w+)"\]', text))
    assert named == set(spec.ACTIVATION_CODES) - {"identity"}, named


def test_python_modules_use_the_spec():
    from moe_kernels import ops

    assert reference.GATED_ACTIVATIONS is spec.GATED_ACTIVATIONS
    assert reference.ADAPTER_ACTIVATIONS is spec.ADAPTER_ACTIVATIONS
    assert reference.GPT_OSS_ALPHA == spec.GPT_OSS_ALPHA and reference.RENORM_EPS == spec.RENORM_EPS
    assert ops.MAX_ADAPTER_RANK == spec.MAX_ADAPTER_RANK
    assert ops.SCORINGS == spec.ROUTE_SCORINGS and ops.ORDERS == spec.ROUTE_ORDERS
    if "triton" in moe_kernels.available_backends():
        from moe_kernels.triton import adapters, experts

        assert experts.ACTIVATION_CODES is spec.ACTIVATION_CODES
        assert adapters.ACTIVATION_CODES is spec.ACTIVATION_CODES


# The parameters a gated activation needs (given exactly to those in spec.SOFTCAP_ACTIVATIONS), small enough to bind.
GATED_PARAMS = {"softcap_swiglu": dict(softcaps=(0.8, 1.2))}


def test_reference_implements_every_activation():
    x = torch.linspace(-3, 3, 16).reshape(2, 8)
    for name in spec.ADAPTER_ACTIVATIONS:
        assert reference.apply_activation(x, name).shape == x.shape
    assert set(GATED_PARAMS) == set(spec.SOFTCAP_ACTIVATIONS)
    for name in spec.GATED_ACTIVATIONS:
        assert reference.gated_activation(x, name, **GATED_PARAMS.get(name, {})).shape == (2, 4)


# ---------------------------------------------------------------------------------------------- backends

T, H, I, E, K, R = 6, 16, 16, 4, 2, 4


def _routing(device):
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, K).softmax(dim=-1)
    return weights.to(device), ids.to(device)


def _grads(fn, inputs):
    out = fn(*inputs)
    grad_out = torch.randn_like(out)
    return out, torch.autograd.grad(out, inputs, grad_out)


def _assert_matches_oracle(run, naive, backend: str, inputs: dict, what: str) -> None:
    """``run(name)`` -> a function of ``inputs``' tensors on backend ``name``; ``backend``'s output and gradients
    w.r.t. every input equal the reference backend's (same upstream gradient), and the reference backend's equal
    ``naive``'s (the same function written with naive_oracle.py's token-by-token loops: compared with itself the
    reference could not fail)."""
    tensors = [t.requires_grad_() for t in inputs.values()]
    torch.manual_seed(1)
    expected, expected_grads = _grads(naive if backend == "reference" else run("reference"), tensors)
    torch.manual_seed(1)
    actual, actual_grads = _grads(run(backend), tensors)
    assert_close_rel(actual, expected, torch.float32, f"{what} forward")
    for name, a, e in zip(inputs, actual_grads, expected_grads):
        assert_close_rel(a, e, torch.float32, f"{what} d{name}")


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("activation", spec.GATED_ACTIVATIONS)
def test_every_gated_activation_runs_on_every_backend(backend, activation):
    device = device_for(backend)
    x = torch.randn(T, H, device=device)
    gate_up = torch.randn(E, 2 * I, H, device=device) / H ** 0.5
    down = torch.randn(E, H, I, device=device) / I ** 0.5
    weights, ids = _routing(device)
    limit = 1.0 if activation == "gpt_oss" else None  # small enough that the clamps cut

    def run(which):
        return lambda x, gu, d, w: moe_kernels.moe_mlp(x, gu, d, w, ids, activation=activation, swiglu_limit=limit,
                                                       backend=which, **GATED_PARAMS.get(activation, {}))

    def naive(x, gu, d, w):
        return oracle_for("reference").moe_mlp(x, gu, d, w, ids, activation=activation, swiglu_limit=limit,
                                               **GATED_PARAMS.get(activation, {}))

    _assert_matches_oracle(run, naive, backend,
                           {"x": x, "gate_up_proj": gate_up, "down_proj": down, "weights": weights},
                           f"{backend} {activation}")


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("activation", spec.ADAPTER_ACTIVATIONS)
def test_every_adapter_activation_runs_on_every_backend(backend, activation):
    device = device_for(backend)
    h = torch.randn(T, H, device=device)
    down = torch.randn(E, R, H, device=device) / H ** 0.5
    up = torch.randn(E, H, R, device=device) / R ** 0.5
    weights, ids = _routing(device)

    def run(which):
        return lambda h, d, u, w: moe_kernels.adapter_moe(h, d, u, w, ids, activation=activation, scale=0.5,
                                                          backend=which)

    def naive(h, d, u, w):
        return oracle_for("reference").adapter_moe(h, d, u, w, ids, activation=activation, scale=0.5)

    _assert_matches_oracle(run, naive, backend, {"h": h, "down": down, "up": up, "weights": weights},
                           f"{backend} {activation}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's sigmoid
@pytest.mark.parametrize("backend", backends_under_test())
def test_renorm_eps_keeps_an_underflowed_choice_finite_on_every_backend(backend):
    """sigmoid(-200) underflows to 0 in fp32: renormalising divides 0 by (0 + RENORM_EPS), which gives 0, not NaN."""
    device = device_for(backend)
    logits = torch.full((3, 4), -200.0, device=device, requires_grad=True)
    expected = moe_kernels.route(logits, 2, scoring="sigmoid", backend="reference")[0]
    actual = moe_kernels.route(logits, 2, scoring="sigmoid", backend=backend)[0]
    assert torch.equal(actual, expected) and not actual.any()
    (grad,) = torch.autograd.grad(actual.sum(), logits)
    assert torch.isfinite(grad).all()
