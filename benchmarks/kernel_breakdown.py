"""Where the time of one ``moe_mlp`` call goes, kernel by kernel: the measured cause behind a gap to the floor.

    python benchmarks/kernel_breakdown.py [--out DIR] [--shapes Qwen3,Mixtral] [--tokens 64,4096]
                                          [--backends cuda,triton,triton[group_m=0]] [--passes fwd,fwdbwd]
                                          [--iters 5] [--top 10]
    python benchmarks/kernel_breakdown.py --dry-run     # no GPU: tiny shapes, interpreter, CPU ops (CI runs this)

``gpu_bench.py`` says how far a call is from its roofline floor; this says why. Each (shape, tokens, backend, pass)
is run under ``torch.profiler`` for ``--iters`` calls after two warm-ups, and reports per call:

* ``wall``: the call's time, CUDA events (as gpu_bench times it, here median of ``--iters``, under the profiler);
* ``kernels``: the sum of its GPU kernel times, and how many kernels it launched;
* ``gpu idle``: 1 - kernels / wall. Near 0: the kernels are the cost (compare each with its share of the floor);
  large: the host is (Python, launches, allocations), as runs 2 and 3 concluded for decode and small-T training
  from host-time figures alone;
* the top kernels by time, with launches per call and their share of the kernel time.

Inputs, weights, shapes and the floor are gpu_bench's (one place for each). Writes ``kernel_breakdown.md`` and
``kernel_breakdown.csv`` to ``--out``. Without a GPU (``--dry-run``) the profiled events are CPU operators, not
kernels: the run checks the plumbing, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402  (sets TRITON_INTERPRET for --dry-run before triton is imported)
import torch  # noqa: E402

from moe_kernels.bench.timing import kernel_times  # noqa: E402

QUICK = [("Qwen3-30B-A3B", (64, 4096, 16384)), ("Mixtral-8x7B", (1, 4096))]
# Backend variants (--backends): the backend and the environment it runs under, and which cases they apply to.
# triton[group_m=0]: the planned GEMMs in launch order (runs 1-3) beside the grouped order (the default above 16
# rows per expert; common.tile_and_column), per kernel.
# triton[paired=0] (opt-in, --backends cuda,triton,triton[paired=0]): the gate/up GEMM as two dots (runs 1-3) beside
# the paired dot (the default on sm90+); gpu_bench times the same pair whole by default.
# triton[down_bwd=fused] (opt-in, backward only): the fused backward through the down GEMM (runs 1-3) beside the split
# one (the default at the most rows per expert, experts.split_down_backward_tile), per kernel; gpu_bench times the
# same pair whole by default.
# triton[wgrad=triton] (and with group_m=0): the Triton weight-gradient kernel where the default on sm90 is torch's
# grouped GEMM, in its expert-major order and in the old one (opt-in: --backends cuda,triton,triton[wgrad=triton]).
VARIANTS = {"triton[group_m=0]": ("triton", {"MOE_KERNELS_GROUP_M": "0"}, gpu_bench.group_order_applies),
            "triton[paired=0]": ("triton", {"MOE_KERNELS_PAIRED_DOT": "0"}, gpu_bench.paired_dot_applies),
            "triton[down_bwd=fused]": ("triton", {"MOE_KERNELS_DOWN_BWD": "fused"},
                                       gpu_bench.split_down_backward_applies),
            "triton[wgrad=triton]": ("triton", {"MOE_KERNELS_WGRAD": "triton"}, lambda shape, tokens: True),
            "triton[wgrad=triton,group_m=0]": ("triton", {"MOE_KERNELS_WGRAD": "triton", "MOE_KERNELS_GROUP_M": "0"},
                                               gpu_bench.group_order_applies)}
BACKWARD_ONLY = {"triton[down_bwd=fused]"}
DRY = [("tiny", (1, 7, 48))]  # 48 tokens: above 16 rows per expert, where triton[group_m=0] runs
COLUMNS = ["case", "tokens", "backend", "pass", "wall_ms", "kernel_ms", "launches", "gpu_idle", "floor_ms",
           "kernel", "kernel_launches", "kernel_ms_each_call", "share"]


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def run_case(shape, tokens, backend, passes, device, dtype, ceilings, iters):
    gate_up, down = gpu_bench.moe_weights(shape, device, dtype)
    sets = []
    for seed in range(3):
        inp = gpu_bench.moe_inputs(shape, tokens, device, dtype, seed)
        inp.update(gate_up=gate_up, down=down)
        sets.append(inp)
    name, env, _ = VARIANTS.get(backend, (backend, None, None))
    fn = gpu_bench._moe_kernels_provider(name, shape, env)
    calls = {"fwd": lambda i: gpu_bench._no_grad_call(fn, sets[i % 3]),
             "fwdbwd": lambda i: gpu_bench._fwd_bwd_call(
                 fn, sets[i % 3], [sets[i % 3]["x"], sets[i % 3]["weights"], gate_up, down])}
    bytes_per = torch.finfo(dtype).bits // 8
    results = []
    for pass_name in passes:
        result = kernel_times(calls[pass_name], iters, device)
        result.update(case=shape.name, tokens=tokens, backend=backend, pass_name=pass_name,
                      floor_ms=gpu_bench.moe_floor_ms(shape, tokens, ceilings, bytes_per, pass_name == "fwdbwd"))
        results.append(result)
    return results


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}g}"


def render(results, info, top: int) -> str:
    lines = ["# moe_mlp kernel breakdown", "", info, "",
             "Per call: wall time (CUDA events, median), the sum of its kernels' times and their count, the share of "
             "the wall time the GPU ran no kernel of this call (gpu idle: the host's part), and the floor of "
             "gpu_bench.py. Then the top kernels by time.", ""]
    for r in results:
        lines.append(f"## {r['case']} T={r['tokens']} {r['backend']} {r['pass_name']}")
        lines.append("")
        idle = "-" if r["gpu_idle"] is None else f"{100 * r['gpu_idle']:.0f}%"
        lines.append(f"wall {_fmt(r['wall_ms'])} ms, kernels {_fmt(r['kernel_ms'])} ms in {r['launches']:.0f} "
                     f"launches, gpu idle {idle}, floor {_fmt(r['floor_ms'])} ms "
                     f"(kernels x floor {_fmt(r['kernel_ms'] / r['floor_ms'])})")
        lines.append("")
        lines.append("| kernel | launches | ms | share |")
        lines.append("| --- | --- | --- | --- |")
        ranked = sorted(r["kernels"].items(), key=lambda item: -item[1][1])
        for name, (count, ms) in ranked[:top]:
            share = ms / r["kernel_ms"] if r["kernel_ms"] else 0.0
            lines.append(f"| `{_short(name)}` | {count:.0f} | {_fmt(ms)} | {100 * share:.0f}% |")
        if len(ranked) > top:
            rest = sum(ms for _, (_, ms) in ranked[top:])
            lines.append(f"| {len(ranked) - top} others | {sum(c for _, (c, _) in ranked[top:]):.0f} | {_fmt(rest)} | "
                         f"{100 * rest / r['kernel_ms'] if r['kernel_ms'] else 0:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path, results):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for r in results:
            base = {"case": r["case"], "tokens": r["tokens"], "backend": r["backend"], "pass": r["pass_name"],
                    "wall_ms": r["wall_ms"], "kernel_ms": r["kernel_ms"], "launches": r["launches"],
                    "gpu_idle": r["gpu_idle"], "floor_ms": r["floor_ms"]}
            for name, (count, ms) in sorted(r["kernels"].items(), key=lambda item: -item[1][1]):
                writer.writerow({**base, "kernel": name, "kernel_launches": count,
                                 "kernel_ms_each_call": ms, "share": ms / r["kernel_ms"] if r["kernel_ms"] else None})


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results_gpu")
    parser.add_argument("--shapes",
                        help="comma-separated name prefixes of gpu_bench's shapes (default: Qwen3, Mixtral)")
    parser.add_argument("--tokens", help="comma-separated token counts (default per shape: Qwen3 64,4096,16384; "
                                         "Mixtral 1,4096)")
    parser.add_argument("--backends", default="cuda,triton,triton[group_m=0]",
                        help=f"comma-separated backends, or variants of one: {', '.join(VARIANTS)}")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--top", type=int, default=10, help="kernels listed per case")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes, interpreter, CPU operators")
    args = parser.parse_args(argv)
    passes = _csv_list(args.passes)
    if not passes or set(passes) - {"fwd", "fwdbwd"}:
        parser.error(f"--passes takes fwd and/or fwdbwd, got {args.passes!r}")
    if args.iters < 1 or args.top < 1:
        parser.error("--iters and --top must be at least 1")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU visible to torch: use --dry-run")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shapes = {shape.name: shape for shape in (gpu_bench.DRY_SHAPES if args.dry_run else gpu_bench.MOE_SHAPES)}
    plan = DRY if args.dry_run else QUICK
    if args.shapes:
        prefixes = _csv_list(args.shapes)
        default_tokens = dict(QUICK + DRY)
        plan = [(name, default_tokens.get(name, (64, 4096))) for name in shapes
                if any(name.startswith(p) for p in prefixes)]
        if not plan:
            parser.error(f"--shapes {args.shapes!r} matches none of {sorted(shapes)}")
    if args.tokens:
        tokens = tuple(int(t) for t in _csv_list(args.tokens))
        plan = [(name, tokens) for name, _ in plan]
    asked = [b.strip() for b in re.split(r",(?![^\[]*\])", args.backends) if b.strip()]  # commas outside [...]
    unknown = [b for b in asked if b not in VARIANTS and b not in ("cuda", "triton")]
    if unknown:
        parser.error(f"--backends: unknown {unknown}; known: cuda, triton, {', '.join(VARIANTS)}")
    runnable = gpu_bench.runnable_backends(device)
    backends = [b for b in asked if VARIANTS.get(b, (b,))[0] in runnable]
    if not backends:
        parser.error(f"none of --backends {args.backends!r} is built and can run on {device}: "
                     f"{gpu_bench.runnable_backends(device)}")
    ceilings = gpu_bench.measure_ceilings(device)
    env = gpu_bench.environment(device)
    info = " | ".join(f"{key} {value}" for key, value in env.items())
    results, failed = [], 0
    for name, token_counts in plan:
        for tokens in token_counts:
            for backend in backends:
                if backend in VARIANTS and not VARIANTS[backend][2](shapes[name], tokens):
                    continue  # the variant changes nothing at this shape
                # a backward-only variant: its forward is the backend's (profiled once there)
                case_passes = [p for p in passes if p == "fwdbwd"] if backend in BACKWARD_ONLY else passes
                if not case_passes:
                    continue
                try:
                    case = run_case(shapes[name], tokens, backend, case_passes, device, dtype, ceilings, args.iters)
                except Exception as exc:  # noqa: BLE001 - one failing case is reported, the rest still run
                    print(f"[kernel_breakdown] {name} T={tokens} {backend}: {type(exc).__name__}: {exc}")
                    failed += 1
                    continue
                results += case
                print(f"[kernel_breakdown] {name} T={tokens} {backend}: " + ", ".join(
                    f"{r['pass_name']} wall {_fmt(r['wall_ms'])} ms, kernels {_fmt(r['kernel_ms'])} ms" for r in case))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_breakdown.md"), "w") as handle:
        handle.write(render(results, info, args.top))
    write_csv(os.path.join(args.out, "kernel_breakdown.csv"), results)
    print(f"[kernel_breakdown] {len(results)} rows (case x pass), {failed} cases failed; "
          f"wrote {args.out}/kernel_breakdown.md and .csv")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
