"""Fuzz the C++ entry points (torch.ops.moe_kernels.*) with malformed arguments.

Run as a script (tests/backends/test_fuzz_native.py runs it in a subprocess, so a crash shows as a signal):
every call must either succeed or raise a Python exception -- never crash the process. Arguments are
drawn per schema type from pools of wrong ranks, dtypes, sizes, layouts and out-of-range values.

It runs in debug mode (MOE_KERNELS_DEBUG=1), the mode in which the C++ ops check the *values* of index tensors
(ids, plan offsets) too. Outside it they trust those values, as csrc/cpu/common.h documents: moe_kernels.ops
validates ids once per call and the plan tensors are right by construction. Fuzzing out-of-range ids without
debug mode writes outside buffers; which draw sequence crashes depends on the ops registered (a CUDA build
registers more), which is why this fuzzer once crashed only on the GPU machine.
"""

import os
import random
import sys

import torch


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
    outcomes = {}
    for schema in schemas:
        op = getattr(torch.ops.moe_kernels, schema.name.split("::")[1])
        ok = raised = 0
        for _ in range(trials_per_op):
            args = [_draw(a.type, tensors) for a in schema.arguments]
            # the call about to run, so that a crash's log (stderr tail) names it
            print(schema.name, [_describe(a) for a in args], file=sys.stderr, flush=True)
            try:
                op(*args)
                ok += 1
            except Exception:  # noqa: BLE001 - any Python exception is the correct outcome for bad input
                raised += 1
        outcomes[schema.name] = (ok, raised)
    for name, (ok, raised) in sorted(outcomes.items()):
        print(f"{name:<40} {ok:4d} accepted {raised:4d} refused")
    print(f"fuzzed {len(outcomes)} ops, {trials_per_op} calls each: no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
