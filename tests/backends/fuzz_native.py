"""Fuzz the C++ entry points (torch.ops.moe_kernels.*) with malformed arguments.

Run as a script (tests/backends/test_fuzz_native.py runs it in a subprocess, so a crash shows as a signal):
every call must either succeed or raise a Python exception -- never crash the process. Arguments are
drawn per schema type from pools of wrong ranks, dtypes, sizes, layouts and out-of-range values.

It runs in debug mode (MOE_KERNELS_DEBUG=1), the mode in which the C++ ops check the *values* of index tensors
(ids, plan offsets) too. Outside it they trust those values, as csrc/cpu/common.h documents: moe_kernels.ops
validates ids once per call and the plan tensors are right by construction. Fuzzing out-of-range ids without
debug mode writes outside buffers; which draw sequence crashes depends on the ops registered (a CUDA build
registers more), which is why this fuzzer once crashed only on the GPU machine.

Two kinds of draw per op: every argument drawn at random, which the argument checks mostly refuse at once, and one
argument of a valid call replaced (the valid calls recorded from the public ops on the cpu backend, and the cuda
backend's composed, grouped and decode paths run on CPU tensors), which gets past the other arguments' checks to
the ones deeper in, and to the kernels.
"""

import os
import random
import sys

import torch
import torch.utils._pytree


def _tensor_pool():
    ids_ok = torch.randint(0, 4, (5, 2), dtype=torch.int32)
    return [
        torch.randn(5, 4), torch.randn(5, 2), torch.randn(10, 8), ids_ok, ids_ok.long(),
        torch.full((5, 2), 1_000_000, dtype=torch.int32), torch.full((5, 2), -3, dtype=torch.int32),
        torch.randint(0, 10, (10,), dtype=torch.int32), torch.randperm(10).int(),
        torch.randn(4, 6, 8), torch.randn(4, 8, 3), torch.empty(0), torch.empty(0, 4), torch.empty(0, 2, dtype=torch.int32),
        torch.randn(5), torch.randn(5, 4, 3, 2), torch.randn(5, 4).double(), torch.randn(5, 4).bfloat16(),
        torch.randn(5, 4).half(), torch.ones(5, 4, dtype=torch.bool), torch.randn(8, 5).t(),
        torch.randn(5, 4)[:, ::2], torch.tensor(3.0), torch.randn(4, 5, device="meta"),
    ]


POOLS = {
    "int": [-1, 0, 1, 2, 3, 5, 17, 100_000],
    "bool": [True, False],
    "float": [0.0, 1.0, -2.5, float("nan"), float("inf")],
    "str": ["silu", "gelu", "identity", "gpt_oss", "bogus", ""],
}


def _draw(arg_type: str, tensors):
    text = str(arg_type)
    optional = text.endswith("?") or text.startswith("Optional")
    if optional and random.random() < 0.3:
        return None
    if "Tensor" in text:
        return random.choice(tensors)
    for key, pool in POOLS.items():
        if key in text.lower():
            return random.choice(pool)
    return None


def _describe(arg) -> str:
    if isinstance(arg, torch.Tensor):
        return f"{arg.device.type}:{str(arg.dtype).removeprefix('torch.')}{list(arg.shape)}/{list(arg.stride())}"
    return repr(arg)


def _valid_calls() -> dict:
    """One valid call (args, kwargs) of each C++ op that runs on CPU tensors, recorded from the ops' own callers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import moe_kernels as mk
    from moe_kernels import native

    calls = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.startswith("moe_kernels::"):  # detached copies: the replays run without autograd
                keep = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs or {}))
                calls.setdefault(func._schema.name, keep)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    T, H, I, E, k = 6, 8, 4, 4, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    w1 = torch.randn(E, 2 * I, H, generator=g, requires_grad=True)
    w2 = torch.randn(E, H, I, generator=g, requires_grad=True)
    with Record():
        weights, ids = mk.route(logits, k, backend="cpu")
        mk.moe_mlp(x, w1, w2, weights, ids, backend="cpu").sum().backward()
        args = (x, w1, w2, None, None, weights.detach().requires_grad_(), ids, "silu", True, False, None, 1.0)
        native.composed_expert_mlp(*args).sum().backward()
        if native.has_kernel("grouped_mlp_forward", "CPU"):
            native.grouped_expert_mlp(*args).sum().backward()
        if native.has_kernel("decode_mlp_forward", "CPU"):
            with torch.no_grad():
                native.decode_expert_mlp(x[:1], w1, w2, None, None, weights[:1].detach(), ids[:1], "silu", True,
                                         False, None, 1.0)
    return calls


def main(trials_per_op: int = 300) -> int:
    os.environ["MOE_KERNELS_DEBUG"] = "1"  # read by the C++ ops per call: index values are checked (docstring)
    import moe_kernels.native  # noqa: F401  (loads moe_kernels._C and registers the ops)
    random.seed(0)
    torch.manual_seed(0)
    schemas = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("moe_kernels::")]
    if not schemas:
        print("no moe_kernels ops registered", file=sys.stderr)
        return 2
    tensors = _tensor_pool()
    valid = _valid_calls()
    outcomes = {}
    for schema in schemas:
        op = getattr(torch.ops.moe_kernels, schema.name.split("::")[1])
        counts = {"random": [0, 0], "one wrong": [0, 0]}
        base = valid.get(schema.name)
        if base is not None:  # the recorded call itself must run: else the one-wrong draws would test nothing
            op(*base[0], **base[1])
        for trial in range(trials_per_op):
            kind = "one wrong" if base is not None and trial % 2 else "random"
            if kind == "random":
                args, kwargs = [_draw(a.type, tensors) for a in schema.arguments], {}
            else:
                args, kwargs = list(base[0]), dict(base[1])
                position = random.randrange(len(schema.arguments))
                wrong = _draw(schema.arguments[position].type, tensors)
                if position < len(args):
                    args[position] = wrong
                else:
                    kwargs[schema.arguments[position].name] = wrong
            # the call about to run, so that a crash's log (stderr tail) names it
            print(schema.name, kind, [_describe(a) for a in args], kwargs, file=sys.stderr, flush=True)
            try:
                op(*args, **kwargs)
                counts[kind][0] += 1
            except Exception:  # noqa: BLE001 - any Python exception is the correct outcome for bad input
                counts[kind][1] += 1
        outcomes[schema.name] = counts
    for name, counts in sorted(outcomes.items()):
        print(f"{name:<40} " + "; ".join(f"{kind}: {ok:4d} accepted {raised:4d} refused"
                                          for kind, (ok, raised) in counts.items() if ok + raised))
    missing = sorted(name for name in outcomes if name not in valid)
    print(f"fuzzed {len(outcomes)} ops, {trials_per_op} calls each ({len(outcomes) - len(missing)} of them half from "
          f"a valid call with one argument wrong; no valid call for: {', '.join(missing) or 'none'}): no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
