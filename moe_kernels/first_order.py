"""First-order gradients only: the backward passes of the fused ops are not differentiable themselves.

The kernels compute gradients; they do not record how those gradients depend on the inputs. Asked for with
``create_graph=True``, such gradients would silently act as constants in a second differentiation (a gradient
penalty would lose the MoE layers' terms). :func:`first_order_only` makes them raise a clear error there instead;
first-order gradients under ``create_graph=True`` stay available. The C++ ops of the native backends do the same
(csrc/autograd.cpp). The reference backend (plain PyTorch) supports higher orders.
"""

from __future__ import annotations

import functools

import torch

MESSAGE = ("{name}: moe_kernels computes first-order gradients only; these were asked for with create_graph=True "
           "and cannot be differentiated again (no double backward). Use backend='reference' for higher-order "
           "derivatives.")


def first_order_only(name: str):
    """Decorator for a ``torch.autograd.Function.backward`` named ``name`` in the error message: runs it without
    grad; under ``create_graph`` its gradients come back through a node that raises when differentiated.

    That node is linked to everything the gradients depend on -- the Function's saved tensors, the incoming
    gradients and any ``ctx.first_order_inputs`` its forward set (inputs it did not save) -- so a second
    differentiation with respect to any of them reaches it and raises, even where other terms also depend on them.
    """
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():  # the usual backward: create_graph=False
                return grads
            depends_on = (*ctx.saved_tensors, *getattr(ctx, "first_order_inputs", ()), *grad_outputs)
            return _guarded(grads, name, depends_on)
        return wrapper
    return decorate


def _differentiable(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point()


def _guarded(grads, name: str, depends_on):
    single = not isinstance(grads, tuple)
    grads = (grads,) if single else grads
    where = [i for i, g in enumerate(grads) if _differentiable(g)]
    if not where:
        return grads[0] if single else grads
    links = [t for t in depends_on if _differentiable(t) and t.requires_grad]
    # DelayedError passes its inputs' values through with one Error node as their grad_fn, whose edges lead to
    # every input: the gradients (as fresh leaves) and the tensors they depend on.
    error = torch._C._functions.DelayedError(MESSAGE.format(name=name), len(where) + len(links))
    guarded = error(*(grads[i].detach().requires_grad_() for i in where), *links)
    guarded = guarded if isinstance(guarded, tuple) else (guarded,)
    out = list(grads)
    for i, tensor in zip(where, guarded):
        out[i] = tensor
    return out[0] if single else tuple(out)
