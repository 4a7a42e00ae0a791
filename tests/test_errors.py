"""Bad input gets a clear Python exception that names the argument, on every public op and backend."""

import pytest
import torch
from moe_testing import backends_for, backends_under_test, device_for

import moe_kernels
from moe_kernels import BackendError

E, H, I, T, K = 4, 8, 6, 5, 2


def _mlp(**overrides):
    args = dict(x=torch.randn(T, H), gate_up_proj=torch.randn(E, 2 * I, H), down_proj=torch.randn(E, H, I),
                weights=torch.rand(T, K), ids=torch.randint(0, E, (T, K), dtype=torch.int32))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(x=torch.randn(T, H, 1)), ValueError, "x must have 2 dimensions"),
    (dict(x=torch.randn(T, H).long()), TypeError, "x must have dtype"),
    (dict(gate_up_proj=torch.randn(E, 2 * I, H + 1)), ValueError, "gate_up_proj.*hidden size"),
    (dict(gate_up_proj=torch.randn(E, 2 * I + 1, H)), ValueError, "gate_up_proj.*even"),
    (dict(down_proj=torch.randn(E + 1, H, I)), ValueError, "down_proj.*number of experts"),
    (dict(down_proj=torch.randn(E, H, I + 1)), ValueError, "down_proj.*intermediate"),
    (dict(down_proj=torch.randn(E, H, I).half()), TypeError, "down_proj has dtype"),
    (dict(ids=torch.randint(0, E, (T, K)).float()), TypeError, "ids must have dtype int32 or int64"),
    (dict(ids=torch.full((T, K), E, dtype=torch.int32)), ValueError, r"ids must lie in \[0, 4\)"),
    (dict(ids=torch.full((T, K), -1, dtype=torch.int32)), ValueError, r"ids must lie in \[0, 4\)"),
    (dict(ids=torch.randint(0, E, (T + 1, K), dtype=torch.int32), weights=torch.rand(T + 1, K)), ValueError,
     "ids: expected number of tokens"),
    (dict(weights=torch.rand(T, K + 1)), ValueError, "weights has shape"),
    (dict(weights=torch.rand(T, K).double()), TypeError, "weights must have dtype"),
    (dict(ids=torch.randint(0, E, (T, E + 1), dtype=torch.int32), weights=torch.rand(T, E + 1)), ValueError,
     "k = 5 choices"),
])
def test_moe_mlp_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        moe_kernels.moe_mlp(**_mlp(**overrides))


def test_moe_mlp_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_kernels.moe_mlp(**_mlp(), activation="tanh")


@pytest.mark.parametrize("limit", [0.0, -7.0, float("nan"), float("inf"), "7", True])
def test_moe_mlp_bad_swiglu_limit(limit):
    x = torch.randn(3, 8)
    gate_up, down = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    ids = torch.tensor([[0], [1], [0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="swiglu_limit"):
        moe_kernels.moe_mlp(x, gate_up, down, torch.ones(3, 1), ids, activation="gpt_oss", swiglu_limit=limit)


@pytest.mark.parametrize("activation,softcaps,match", [
    ("softcap_swiglu", None, "needs softcaps"),
    ("softcap_swiglu", (1.0,), "pair"),
    ("softcap_swiglu", (1.0, 0.0), "finite numbers > 0"),
    ("softcap_swiglu", (float("inf"), 2.0), "finite numbers > 0"),
    ("softcap_swiglu", (True, 2.0), "finite numbers > 0"),
    ("silu", (1.0, 2.0), "softcap_swiglu only"),
    ("softcap_swiglu", (1.0, 2.0, 7.0), "does not apply"),  # with swiglu_limit=7.0
])
def test_moe_mlp_bad_softcaps(activation, softcaps, match):
    x, gate_up, down = torch.randn(3, 4), torch.randn(2, 8, 4), torch.randn(2, 4, 4)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    limit = None
    if softcaps is not None and len(softcaps) == 3:
        *softcaps, limit = softcaps
    with pytest.raises(ValueError, match=match):
        moe_kernels.moe_mlp(x, gate_up, down, torch.ones(3, 1), ids, activation=activation, softcaps=softcaps,
                            swiglu_limit=limit)


def test_moe_mlp_device_mismatch():
    meta_w = torch.randn(E, 2 * I, H, device="meta")
    with pytest.raises(ValueError, match="gate_up_proj is on meta but x is on cpu"):
        moe_kernels.moe_mlp(**_mlp(gate_up_proj=meta_w))


@pytest.mark.parametrize("k,match", [(0, "1 <= k <= num_experts = 4"), (5, "1 <= k <= num_experts = 4")])
def test_route_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        moe_kernels.route(torch.randn(T, E), k)


def test_route_bad_k_type():
    with pytest.raises(TypeError, match="k must be an int"):
        moe_kernels.route(torch.randn(T, E), 2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_route_rejects_nan_and_posinf_logits(bad):
    logits = torch.randn(T, E)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match="logits contains"):
        moe_kernels.route(logits, 2)


def test_route_accepts_neg_inf_as_masked_expert():
    logits = torch.randn(T, E)
    logits[:, 0] = float("-inf")
    _, ids = moe_kernels.route(logits, 2)
    assert (ids != 0).all()


def test_route_refuses_a_row_with_every_expert_masked():
    logits = torch.randn(T, E)
    logits[3] = float("-inf")
    with pytest.raises(ValueError, match="row 3 is -inf in every column"):
        moe_kernels.route(logits, 2)


@pytest.mark.parametrize("backend", backends_under_test())
def test_route_kernels_keep_ids_in_range_for_an_unchecked_masked_row(backend):
    """On a GPU (no value checks outside debug mode) a row of -inf logits reaches the kernels: its ids must still lie
    in [0, E), or moe_mlp would read past the expert weights. Triton returned its padded block width (8 of E = 6)."""
    from moe_kernels.backends import get_backend

    logits = torch.randn(3, 6, device=device_for(backend))
    logits[1] = float("-inf")
    _, ids = get_backend(backend).route(logits=logits, k=2, scoring="softmax", order="softmax_then_topk",
                                        renormalize=True, bias=None, n_group=None, topk_group=None, scale=1.0,
                                        weights_dtype=torch.float32, ids_dtype=torch.int32)
    assert ((ids >= 0) & (ids < 6)).all(), ids
    assert ids[1].unique().numel() == 2  # two distinct experts, as for any row


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_route_refuses_a_nan_or_posinf_bias(bad):
    bias = torch.zeros(E)
    bias[1] = bad
    with pytest.raises(ValueError, match="bias contains"):
        moe_kernels.route(torch.randn(T, E), 2, scoring="sigmoid", bias=bias)


def test_load_balancing_loss_checks_the_ids_range():
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\)"):
        moe_kernels.load_balancing_loss(torch.randn(8, 4), torch.full((8, 2), 4), 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scoring="relu"), "scoring must be one of"),
    (dict(order="sideways"), "order must be one of"),
    (dict(bias=torch.randn(E + 1)), "bias: expected number of experts"),
    (dict(n_group=3, topk_group=1), "n_group must be a positive divisor"),
    (dict(n_group=2), "n_group and topk_group must be given together"),
    (dict(n_group=2, topk_group=3), "topk_group must satisfy"),
    (dict(scale=float("nan")), "scale must be a finite number"),
])
def test_route_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_kernels.route(torch.randn(T, E), 2, **kwargs)


@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_flags_must_be_bools(value):
    """bool("false") is True: a string flag from a config used to renormalize / interleave without a word."""
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        moe_kernels.route(torch.randn(T, E), 2, renormalize=value)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        moe_kernels.moe_mlp(**_mlp(), interleaved=value)


def test_bools_are_not_numbers():
    """True is an int: it passed as scale 1.0, as one expert group, and as num_experts 1 (a one-expert plan on the
    kernels, a bincount TypeError on the oracle); load_balancing_loss took num_experts 4.0 into torch.zeros."""
    logits = torch.randn(T, 8)
    with pytest.raises(ValueError, match="scale must be a finite number, got True"):
        moe_kernels.route(logits, 2, scale=True)
    with pytest.raises(ValueError, match="n_group must be a positive divisor"):
        moe_kernels.route(logits, 2, n_group=True, topk_group=True)
    with pytest.raises(ValueError, match="topk_group must satisfy"):
        moe_kernels.route(logits, 2, n_group=2, topk_group=True)
    with pytest.raises(ValueError, match="scale must be a finite number, got True"):
        moe_kernels.adapter_moe(torch.randn(T, H), torch.randn(E, 3, H), torch.randn(E, H, 3), torch.rand(T, K),
                                torch.randint(0, E, (T, K)), scale=True)
    for backend in backends_for("cpu"):
        with pytest.raises(ValueError, match="num_experts must be an int >= 1, got True"):
            moe_kernels.plan(torch.zeros(T, K, dtype=torch.int32), True, backend=backend)
    for bad in (True, 4.0):
        with pytest.raises(ValueError, match=f"num_experts must be an int >= 1, got {bad}"):
            moe_kernels.load_balancing_loss(torch.randn(T, 4), torch.zeros(T, K, dtype=torch.int64), bad)


def test_route_k_beyond_eligible_groups():
    with pytest.raises(ValueError, match="exceeds the 2 experts eligible"):
        moe_kernels.route(torch.randn(T, 8), 3, scoring="sigmoid", n_group=4, topk_group=1)


@pytest.mark.parametrize("rank", [0, 1025])
def test_adapter_rank_bounds(rank):
    with pytest.raises(ValueError, match=r"adapter rank \(dim 1\) must be in \[1, 1024\]"):
        moe_kernels.adapter_moe(torch.randn(T, H), torch.randn(E, rank, H), torch.randn(E, H, rank),
                                torch.rand(T, K), torch.randint(0, E, (T, K)))


def test_adapter_up_shape():
    with pytest.raises(ValueError, match="up must have shape"):
        moe_kernels.adapter_moe(torch.randn(T, H), torch.randn(E, 3, H), torch.randn(E, 3, H),
                                torch.rand(T, K), torch.randint(0, E, (T, K)))


def test_unknown_and_unavailable_backends():
    with pytest.raises(BackendError, match="backend must be one of"):
        moe_kernels.moe_mlp(**_mlp(), backend="mps-magic")
    with pytest.raises(BackendError, match="backend 'cuda'"):
        moe_kernels.moe_mlp(**_mlp(), backend="cuda")


def test_env_override_is_honoured(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "nonexistent")
    with pytest.raises(BackendError, match="backend must be one of"):
        moe_kernels.route(torch.randn(T, E), 2)


def test_backend_errors_list_the_backends_available_here(monkeypatch):
    """An unknown or unbuilt backend names the ones that would work; a name from MOE_KERNELS_BACKEND says so (the
    caller passed no backend=); a non-string name gets the same error (a list raised 'unhashable type')."""
    here = repr(moe_kernels.available_backends()).replace("[", r"\[").replace("]", r"\]")
    for name in ("mps-magic", ["cpu"]):
        with pytest.raises(BackendError, match=f"backend must be one of .*; available here: {here}"):
            moe_kernels.route(torch.randn(T, E), 2, backend=name)
    if "cuda" not in moe_kernels.available_backends():
        with pytest.raises(BackendError, match=f"backend 'cuda' is not available: .*; available here: {here}"):
            moe_kernels.route(torch.randn(T, E), 2, backend="cuda")
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "Triton")
    with pytest.raises(BackendError, match="got 'Triton'.*set by the MOE_KERNELS_BACKEND environment variable"):
        moe_kernels.route(torch.randn(T, E), 2)
    with pytest.raises(BackendError, match="got 'Triton'") as raised:  # an explicit backend= is not blamed on the env
        moe_kernels.route(torch.randn(T, E), 2, backend="Triton")
    assert "MOE_KERNELS_BACKEND" not in str(raised.value)


@pytest.mark.skipif("triton" not in moe_kernels.available_backends(), reason="triton not installed")
def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match=r"TRITON_INTERPRET=1.*; backends that can here: \['reference'"):
        moe_kernels.route(torch.randn(T, E), 2, backend="triton")


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_non_contiguous_weights_are_handled(backend):
    args = _mlp()
    transposed = args["gate_up_proj"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not transposed.is_contiguous()
    a = moe_kernels.moe_mlp(**{**args, "gate_up_proj": transposed}, backend=backend)
    b = moe_kernels.moe_mlp(**args, backend=backend)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ float arguments traced by torch.compile

# The backends that run here (a CUDA build on a machine without a GPU has the cuda backend but cannot run it); the
# oracle is not traced whole.
_COMPILED_BACKENDS = [b for b in backends_under_test() if b != "reference"]


def _traced_inputs(backend):
    """(x, gate_up, down, adapter down, adapter up, logits), fixed seed, on the device the backend runs on."""

    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, H, generator=g).to(device), (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device),
            (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device),
            (torch.randn(E, 3, H, generator=g) / H ** 0.5).to(device),
            (torch.randn(E, H, 3, generator=g) / 3 ** 0.5).to(device), torch.randn(T, E, generator=g).to(device))


def _compiled_ops(backend):
    """route, moe_mlp (GPT-OSS's clamp) and adapter_moe with their float arguments as inputs of a compiled function
    (dynamic=True: the floats are traced as symbols that Python cannot test); on the device the backend runs on."""
    x, gate_up, down, a_down, a_up, logits = _traced_inputs(backend)

    def run(scale, limit, adapter_scale):
        weights, ids = moe_kernels.route(logits, K, scale=scale, backend=backend)
        y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="gpt_oss", swiglu_limit=limit,
                                backend=backend)
        return moe_kernels.adapter_moe(y, a_down, a_up, weights, ids, scale=adapter_scale, backend=backend)

    return run


def _check_traced_floats(backend, say=lambda message: None, localize=False):
    run = _compiled_ops(backend)
    if localize:  # each op compiled alone first, so that a crash names its op (the child process on a GPU)
        for name, step in _single_op_steps(backend):
            say(f"{name} alone")
            torch._dynamo.reset()
            torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")(1.0, 7.0, 0.5)
    torch._dynamo.reset()
    compiled = torch.compile(run, dynamic=True, fullgraph=True, backend="aot_eager")
    for args in ((1.0, 7.0, 0.5), (2.5, 3.0, 2.0)):
        say(f"finite {args}")
        torch.testing.assert_close(compiled(*args), run(*args))
    for bad in ((float("inf"), 7.0, 0.5), (1.0, float("inf"), 0.5), (1.0, 7.0, float("nan"))):
        say(f"non-finite {bad}")
        with pytest.raises(Exception, match="must be a finite number"):
            compiled(*bad)
    say("done")


def _single_op_steps(backend):
    """(name, fn(scale, limit, adapter_scale)) for route, moe_mlp and adapter_moe alone, on _compiled_ops' inputs."""
    x, gate_up, down, a_down, a_up, logits = _traced_inputs(backend)
    weights, ids = moe_kernels.route(logits, K, backend=backend)
    return [("route", lambda s, lim, a: moe_kernels.route(logits, K, scale=s, backend=backend)),
            ("moe_mlp", lambda s, lim, a: moe_kernels.moe_mlp(x, gate_up, down, weights, ids, activation="gpt_oss",
                                                              swiglu_limit=lim, backend=backend)),
            ("adapter_moe", lambda s, lim, a: moe_kernels.adapter_moe(x, a_down, a_up, weights, ids, scale=a,
                                                                      backend=backend))]


@pytest.mark.parametrize("backend", _COMPILED_BACKENDS)
def test_traced_float_arguments_compile_and_are_checked_where_they_run(backend):
    """Under torch.compile(dynamic=True, fullgraph=True) the float arguments are symbols: moe_kernels.ops cannot test
    them, so the backend ops test the values they are called with. Finite values give the eager result; a
    non-finite one raises where the op runs, never a silent result.

    With a GPU the check runs in a child process: on the H200 run of 2026-11-27 it died with SIGSEGV inside a C++
    op of the compiled graph (cpu and cuda backends; not reproduced on the CPU machine with the same torch and
    build), which killed the test worker. A child turns a crash into this test's failure, with its last step
    and the fault handler's stack. Run 3 (same day) localized it: each op compiles and runs with finite values,
    and the crash comes with the first non-finite one, where the C++ op raises; direct eager calls of route's C++
    ops with a bad argument crashed as well (tests/backends/test_native_contract.py now checks those)."""
    if not torch.cuda.is_available():
        _check_traced_floats(backend)
        return
    import os
    import subprocess
    import sys

    from moe_testing import crash_probe_env

    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, {here!r}); import test_errors; "
            "test_errors._check_traced_floats({backend!r}, lambda m: print('step:', m, file=sys.stderr, flush=True), "
            "localize=True)"
            ).format(here=here, backend=backend)
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           timeout=600, env=crash_probe_env())
    # the steps, the fault handler's Python stack and the native one (where a C compiler built the preload)
    assert child.returncode == 0, f"child exited with {child.returncode}:\n{child.stderr[-12000:]}"
    assert "step: done" in child.stderr
