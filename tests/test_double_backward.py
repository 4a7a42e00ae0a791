"""Gradients asked for with create_graph=True (gradient penalties, Hessian-vector products, MAML).

The fused backends compute first-order gradients only (moe_kernels/first_order.py, csrc/autograd.cpp). Under
create_graph those gradients must equal the ordinary ones, and differentiating them again must raise a clear
error -- also when another term of the second differentiation depends on the same inputs, where a gradient taken
for a constant would silently drop the MoE layer's share. The reference backend is plain autograd: its second
derivatives are exact. Each backend runs where backends_under_test puts it (triton in the interpreter without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from moe_testing import backends_under_test, device_for, make_routing

import moe_kernels

BACKENDS = backends_under_test()
FIRST_ORDER_ONLY = "computes first-order gradients only"


def _problem(backend, seed=0):
    """Leaves of a routed expert MLP and an adapter layer on ``backend``'s device: logits, x, gate_up, down,
    adapter down/up."""
    g = torch.Generator().manual_seed(seed)
    T, H, I, E, k, r = 6, 16, 8, 4, 2, 4
    shapes = dict(logits=(T, E), x=(T, H), gate_up=(E, 2 * I, H), down=(E, H, I), a_down=(E, r, H), a_up=(E, H, r))
    return {name: (torch.randn(*shape, generator=g) * 0.5).to(device_for(backend)).requires_grad_()
            for name, shape in shapes.items()}, k


def _layer(t, k, backend):
    """route -> moe_mlp -> adapter_moe: every op of the package in one differentiable chain."""
    weights, ids = moe_kernels.route(t["logits"], k, backend=backend)
    y = moe_kernels.moe_mlp(t["x"], t["gate_up"], t["down"], weights, ids, backend=backend)
    return y + moe_kernels.adapter_moe(y, t["a_down"], t["a_up"], weights, ids, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_gradients_under_create_graph_are_the_ordinary_ones(backend):
    t, k = _problem(backend)
    leaves = list(t.values())
    grad_out = torch.randn_like(t["x"])
    ordinary = torch.autograd.grad(_layer(t, k, backend), leaves, grad_out)
    with_graph = torch.autograd.grad(_layer(t, k, backend), leaves, grad_out, create_graph=True)
    for name, a, b in zip(t, with_graph, ordinary):
        torch.testing.assert_close(a, b, msg=f"{backend}: grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_differentiation_raises_or_is_exact(backend):
    """A gradient penalty on x's gradient, plus a term of its own in the weights: differentiated w.r.t. the weights.
    The fused backends raise (their share would otherwise be silently lost); the reference is exact."""
    t, k = _problem(backend)
    (grad_x,) = torch.autograd.grad(_layer(t, k, backend).square().sum(), t["x"], create_graph=True)
    penalty = grad_x.square().sum() + t["gate_up"].square().sum()
    if backend != "reference":
        with pytest.raises(RuntimeError, match=FIRST_ORDER_ONLY):
            torch.autograd.grad(penalty, t["gate_up"])
        return
    (second,) = torch.autograd.grad(penalty, t["gate_up"])
    # The same by central differences of the penalty along a random direction (smooth in gate_up: the routing
    # depends on the logits only).
    def penalty_at(gate_up):
        (gx,) = torch.autograd.grad(_layer({**t, "gate_up": gate_up}, k, backend).square().sum(), t["x"],
                                    create_graph=True)
        return (gx.square().sum() + gate_up.square().sum()).detach()

    direction = torch.randn_like(t["gate_up"])
    base = t["gate_up"].detach()
    eps = 1e-3
    numeric = (penalty_at(base + eps * direction) - penalty_at(base - eps * direction)) / (2 * eps)
    torch.testing.assert_close((second * direction).sum(), numeric, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backward_through_first_order_gradients_names_the_op(backend):
    t, k = _problem(backend)
    weights, _ids = moe_kernels.route(t["logits"], k, backend=backend)
    (grad_logits,) = torch.autograd.grad(weights.square().sum(), t["logits"], create_graph=True)
    with pytest.raises(RuntimeError, match=rf"route \({'native' if backend in ('cpu', 'cuda') else backend}\): .*"
                                           + FIRST_ORDER_ONLY):
        grad_logits.sum().backward()


def test_fused_gated_cross_entropy_is_first_order_only():
    from moe_kernels.losses import fused_gated_cross_entropy

    g = torch.Generator().manual_seed(0)
    T, H, V = 5, 8, 11
    hidden = [torch.randn(T, H, generator=g, requires_grad=True) for _ in range(2)]
    heads = [torch.randn(V, H, generator=g, requires_grad=True) for _ in range(2)]
    gate = torch.softmax(torch.randn(T, 2, generator=g), -1).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    loss = fused_gated_cross_entropy(hidden, heads, gate, labels)
    (grad_h,) = torch.autograd.grad(loss, hidden[0], create_graph=True)
    with pytest.raises(RuntimeError, match="fused_gated_cross_entropy: .*" + FIRST_ORDER_ONLY):
        torch.autograd.grad(grad_h.square().sum() + heads[0].sum(), heads[0])


def test_native_row_moves_are_differentiable_twice():
    """gather_rows and scatter_rows_sum are each other's backward, so their gradients have gradients of their own
    (the exchange is linear): checked in float64 by gradgradcheck."""
    native = pytest.importorskip("moe_kernels.native")
    if native._C is None:
        pytest.skip("moe_kernels._C is not built")
    from moe_kernels import reference

    g = torch.Generator().manual_seed(0)
    T, H, k, E = 5, 3, 2, 4
    _weights, ids = make_routing(T, E, k, "random", g)
    plan = reference.plan(ids, E)
    x = torch.randn(T, H, dtype=torch.double, generator=g, requires_grad=True)
    rows = torch.randn(T * k, H, dtype=torch.double, generator=g, requires_grad=True)
    ops = torch.ops.moe_kernels
    assert torch.autograd.gradgradcheck(lambda x: ops.gather_rows(x * x, plan.sorted_slots, k), (x,))
    assert torch.autograd.gradgradcheck(lambda r: ops.scatter_rows_sum(r * r, plan.slot_positions, k), (rows,))


def test_expert_parallel_exchange_is_differentiable_twice(tmp_path):
    """all_to_all_rows' backward is the reverse exchange through the same Function, so second derivatives flow
    (one gloo rank: the exchange is the identity, the test is the autograd wiring)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group of this process's own")
    from moe_kernels.distributed.expert_parallel import all_to_all_rows

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        x = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda x: all_to_all_rows(x * x, [5], [5]), (x,))
    finally:
        dist.destroy_process_group()
