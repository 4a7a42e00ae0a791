"""No host synchronisation on the GPU backends: route, moe_mlp and adapter_moe forward and backward run
under ``torch.cuda.set_sync_debug_mode("error")`` (any synchronising CUDA call raises), and a decode
step (route + experts, one token) is captured in a CUDA graph and replayed on new inputs.
Needs a GPU; skipped otherwise (the interpreter has no streams to sync)."""

import pytest
import torch

import moe_kernels
from moe_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in moe_kernels.available_backends()]


def _inputs(T=5, H=64, I=32, E=7, k=2, r=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    x = torch.randn(T, H, generator=g).to(dev, dtype).requires_grad_()
    logits = torch.randn(T, E, generator=g).to(dev).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dev, dtype).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dev, dtype).requires_grad_()
    a_down = (torch.randn(E, r, H, generator=g) / H ** 0.5).to(dev, dtype).requires_grad_()
    a_up = (torch.randn(E, H, r, generator=g) / r ** 0.5).to(dev, dtype).requires_grad_()
    return x, logits, gate_up, down, a_down, a_up, k


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_forward_and_backward_never_sync(backend):
    x, logits, gate_up, down, a_down, a_up, k = _inputs()
    # first run outside the check: compiles kernels and fills caches (those may sync once)
    for check in (False, True):
        torch.cuda.synchronize()
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            weights, ids = moe_kernels.route(logits, k, backend=backend)
            y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)
            z = moe_kernels.adapter_moe(y, a_down, a_up, weights, ids, backend=backend)
            grads = torch.autograd.grad(z.float().square().sum(), [x, logits, gate_up, down, a_down, a_up])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decode_step_replays_in_a_cuda_graph(backend):
    x, logits, gate_up, down, _, _, k = _inputs(T=1)
    x, logits, gate_up, down = (t.detach() for t in (x, logits, gate_up, down))
    static_x, static_logits = x.clone(), logits.clone()

    def step():
        weights, ids = moe_kernels.route(static_logits, k, backend=backend)
        return moe_kernels.moe_mlp(static_x, gate_up, down, weights, ids, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm-up: compiles outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = step()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        new_x = torch.randn(x.shape, generator=g).to(x)
        new_logits = torch.randn(logits.shape, generator=g).to(logits)
        static_x.copy_(new_x)
        static_logits.copy_(new_logits)
        graph.replay()
        weights, ids = reference.route(new_logits, k)
        want = reference.moe_mlp(new_x.float(), gate_up.float(), down.float(), weights, ids)
        err = ((static_out.float() - want).norm() / want.norm()).item()
        assert err < 3e-2, f"replayed decode step: relative error {err:.2e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["auto"])
def test_decode_graphs_give_the_eager_results(backend, monkeypatch):
    """MOE_KERNELS_DECODE_GRAPHS=1 (moe_kernels/decode_graphs.py): decode calls of moe_mlp and adapter_moe with new
    inputs of the same shape replay one captured graph each and return what the eager calls return."""
    from moe_kernels import decode_graphs

    monkeypatch.setenv(decode_graphs.ENV, "1")
    decode_graphs.clear()
    _, _, gate_up, down, a_down, a_up, k = _inputs()
    gate_up, down, a_down, a_up = (t.detach() for t in (gate_up, down, a_down, a_up))
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for call in range(4):
            for T in (1, 3):
                x = torch.randn(T, gate_up.shape[2], device="cuda", generator=g).to(gate_up.dtype)
                weights, ids = moe_kernels.route(torch.randn(T, gate_up.shape[0], device="cuda", generator=g), k)
                y = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)
                z = moe_kernels.adapter_moe(x, a_down, a_up, weights, ids, backend=backend)
                monkeypatch.setenv(decode_graphs.ENV, "0")
                y_eager = moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)
                z_eager = moe_kernels.adapter_moe(x, a_down, a_up, weights, ids, backend=backend)
                monkeypatch.setenv(decode_graphs.ENV, "1")
                # bf16 tolerances: a library GEMM may pick another algorithm under capture (same inputs otherwise)
                torch.testing.assert_close(y, y_eager)
                torch.testing.assert_close(z, z_eager)
    graphs = [state for state in decode_graphs._cache.values() if isinstance(state, decode_graphs._Graph)]
    assert len(graphs) == 4  # (moe_mlp, adapter_moe) x (T = 1, T = 3), each captured once
    decode_graphs.clear()


@pytest.mark.skipif("triton" not in moe_kernels.available_backends(), reason="triton not installed")
def test_direct_launches_give_the_same_results(monkeypatch):
    """MOE_KERNELS_DIRECT_LAUNCH=1 (moe_kernels.triton.common.launcher): every triton path (one token, decode tiles,
    the planned forward and backward, routing, adapters) gives bit for bit what Triton's own launches give, on the
    same inputs, its second and later calls of a specialization launched directly; and it never syncs."""
    from moe_kernels.triton import common

    x, logits, gate_up, down, a_down, a_up, k = _inputs()

    def run(T):
        xs, ls = x[:T].detach().requires_grad_(), logits[:T].detach().requires_grad_()
        params = [t.detach().requires_grad_() for t in (gate_up, down, a_down, a_up)]
        weights, ids = moe_kernels.route(ls, k, backend="triton")
        y = moe_kernels.moe_mlp(xs, params[0], params[1], weights, ids, backend="triton")
        z = moe_kernels.adapter_moe(y, params[2], params[3], weights, ids, backend="triton")
        grads = torch.autograd.grad(z.float().square().sum(), (xs, ls, *params))
        with torch.no_grad():  # the paths without a plan (one token, decode tiles)
            y_decode = moe_kernels.moe_mlp(xs, params[0], params[1], weights, ids, backend="triton")
            z_decode = moe_kernels.adapter_moe(xs, params[2], params[3], weights, ids, backend="triton")
        return (z, y_decode, z_decode, *grads)

    for T in (1, 5):
        monkeypatch.setattr(common, "DIRECT_LAUNCH", False)
        want = run(T)
        monkeypatch.setattr(common, "DIRECT_LAUNCH", True)
        first = run(T)  # new specializations: Triton's path, remembered
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = run(T)  # launched directly
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for got in (first, again):
            for a, b in zip(got, want):
                assert torch.equal(a, b)


def test_the_tuners_graph_timer_replays_the_call():
    """moe_kernels.bench.timing.replayed_median_ms (the Triton tuner's decode timer): the graph of 16 decode calls
    replays to the eager call's output, and the time per call is positive."""
    from moe_kernels.bench.timing import replayed_median_ms

    x, logits, gate_up, down, _, _, k = _inputs(T=3)
    with torch.no_grad():
        weights, ids = moe_kernels.route(logits, k, backend="triton")

        def decode():
            return moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend="triton")

        eager = decode()
        ms, replayed = replayed_median_ms(decode, 3, True)
    assert ms > 0 and torch.equal(replayed, eager)
