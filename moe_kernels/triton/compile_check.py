"""Ahead-of-time compile check of every Triton kernel of moe_kernels for real GPUs (no GPU needed).

``moe-kernels compile-check --arch sm_80,sm_90`` compiles each kernel at every shipped config
(``COMPILE_SPECS`` / ``_compile_specs()`` of each module in ``moe_kernels.triton.KERNEL_MODULES``) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and prints, per kernel and config,
the registers per thread, the shared memory Triton allocates, and the spill bytes ptxas reports
(``ptxas -v``, the ptxas bundled with triton), and which tensor-core instruction its dots became (``wgmma``,
``mma`` or ``-``). The exit status is non-zero on any compile failure, any spill, more than 255 registers, shared
memory above the architecture's per-block limit, or a dot on Hopper that took mma.sync although its tile fits
warpgroup MMA (see :func:`mma_kind`). Each spec is
compiled in the specialisation Triton's JIT gives its real launches (see :func:`collect_specs`).
Results are cached with Triton's cache, so a rerun recompiles only what changed. The table of the
shipped configs is in docs/triton_compile_check.md.

Must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces compilation); main()
re-executes itself in a clean subprocess when it finds the variable set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from .common import interpreting

# Opt-in dynamic shared memory per block (bytes), from the CUDA programming guide's compute capability table.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
REGISTER_LIMIT = 255


def _parse_arch(text: str) -> list[int]:
    archs = []
    for item in text.split(","):
        item = item.strip().lower().removeprefix("sm_").removeprefix("sm").rstrip("a")
        if not item.isdigit() or int(item) not in SHARED_LIMIT:
            raise SystemExit(f"compile-check: unsupported --arch entry {item!r}; known: "
                             f"{', '.join(f'sm_{cc}' for cc in SHARED_LIMIT)}")
        archs.append(int(item))
    return archs


def collect_specs():
    """Every kernel module's compile list as ``[(module, kernel, signature, constexprs, options, divisible)]``.

    A module lists ``(kernel, signature, constexprs, options[, divisible])`` in ``COMPILE_SPECS`` or
    ``_compile_specs()``: ``signature`` maps every argument of ``kernel`` to its Triton type ("constexpr"
    for those in ``constexprs``); ``divisible`` names the integer arguments that are multiples of 16 at
    every launch of that config. The check compiles the specialisation Triton's JIT gives such a launch:
    tt.divisibility=16 on every pointer (torch allocations are 16-byte aligned) and on ``divisible``.
    Specs that compile the same specialisation twice (a config shared by two table entries) are listed once.
    """
    from . import KERNEL_MODULES
    specs, seen = [], set()
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        module_specs = getattr(module, "COMPILE_SPECS", None)
        if module_specs is None:
            module_specs = module._compile_specs()
        for kernel, signature, constexprs, options, *rest in module_specs:
            divisible = tuple(rest[0]) if rest else ()
            wrong = [arg for arg in divisible if signature.get(arg) not in ("i32", "i64")]
            if len(rest) > 1 or wrong:
                raise ValueError(f"{name}: compile spec of {kernel.__name__}: 'divisible' must name integer "
                                 f"arguments (got {wrong or rest})")
            key = (kernel.__module__, kernel.__name__, tuple(signature.items()), _freeze(constexprs),
                   _freeze(options), frozenset(divisible))
            if key not in seen:
                seen.add(key)
                specs.append((name, kernel, signature, constexprs, options, divisible))
    return specs


def _freeze(mapping: dict) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in mapping.items()))


@functools.lru_cache(maxsize=1)
def _specs_in_worker():
    return collect_specs()


def _ptxas_path(cc: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        tool = get_ptxas(cc)  # triton >= 3.9 picks a ptxas per arch
    except TypeError:
        tool = get_ptxas()
    return getattr(tool, "path", tool)


def _ptxas_command(arch_name: str, cc: int, fp_fusion: bool) -> list[str]:
    """``ptxas -v`` with the flags Triton's own cubin step passes that change code (register allocation
    level, fmad)."""
    return [_ptxas_path(cc), "-v", "--regAllocOptLevel=2", *([] if fp_fusion else ["--fmad=false"]),
            f"--gpu-name={arch_name}"]


def _parse_ptxas_log(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    spill_store = re.search(r"(\d+) bytes spill stores", log)
    spill_load = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)),
            "spill": sum(int(match.group(1)) for match in (spill_store, spill_load) if match),
            "stack": int(stack.group(1)) if stack else 0}


def _ptxas_usage(ptx: str, command: list[str], triton_log: str = "") -> dict:
    """Registers and spill bytes of the kernel's PTX: from ``triton_log`` (Triton's own ``ptxas -v`` output
    when it has just compiled the kernel), else from a cache next to Triton's (keyed by the PTX and the
    command), else by running ``command``. A rerun over a warm Triton cache costs no compile and no ptxas."""
    import triton
    from triton import knobs
    key = hashlib.sha256("\0".join([triton.__version__, *command, ptx]).encode()).hexdigest()
    cache_path = os.path.join(knobs.cache.dir, "moe_kernels_ptxas", key + ".json")
    usage = _parse_ptxas_log(triton_log)
    if usage is None:
        with contextlib.suppress(OSError, ValueError):
            with open(cache_path) as f:
                return json.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = os.path.join(tmp, "kernel.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            run = subprocess.run([*command, ptx_path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True,
                                 text=True)
        if run.returncode != 0:
            raise RuntimeError(f"ptxas failed: {(run.stdout + run.stderr).strip()[-500:]}")
        usage = _parse_ptxas_log(run.stdout + run.stderr) or {"registers": -1, "spill": 0, "stack": 0}
    with contextlib.suppress(OSError):  # the cache is an optimisation only
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache_path), delete=False) as f:
            json.dump(usage, f)
        os.replace(f.name, cache_path)
    return usage


def _compile_one(job):
    """Compile one (spec, arch); returns a result row (runs in a worker process)."""
    index, cc = job
    module, kernel, signature, constexprs, options, divisible = _specs_in_worker()[index]
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    row = {"module": module, "kernel": kernel.__name__, "arch": f"sm_{cc}",
           "config": _describe(signature, constexprs, options, divisible)}
    try:
        # As the JIT specialises a real launch (see collect_specs); without these hints the check would
        # measure unvectorised variants that never run (one 64-bit address per loaded element).
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name].startswith("*") or name in divisible}
        # Triton's cubin step runs ptxas -v; with its log printed (captured here) a fresh compile needs
        # no second ptxas run. A cache hit prints nothing and falls back to the check's own cache.
        knobs.nvidia.dump_ptxas_log = True
        triton_log = io.StringIO()
        with contextlib.redirect_stdout(triton_log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", cc, 32), options=dict(options))
        target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.MULTILINE).group(1)
        command = _ptxas_command(target, cc, bool(compiled.metadata.enable_fp_fusion))
        row.update(_ptxas_usage(compiled.asm["ptx"], command, triton_log.getvalue()))
        row["shared"] = int(compiled.metadata.shared)
        row["mma"], fallback = mma_kind(compiled.asm["ttgir"], options.get("num_warps", 4))
        row["mma_fallback"] = cc >= 90 and fallback
        row["error"] = None
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
        row.update(registers=-1, spill=-1, stack=-1, shared=-1, mma="-", mma_fallback=False,
                   error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return row


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, #(\w+)")


def mma_kind(ttgir: str, num_warps: int) -> tuple[str, bool]:
    """(instruction, fallback) of a kernel's dots, from its TTGIR: "wgmma" (Hopper's asynchronous warpgroup MMA),
    "mma" (the warp-level mma.sync of Ampere, which Hopper runs at about half the rate) or "-" (no tensor-core
    dot); fallback is true when a dot took mma.sync although its output tile fits warpgroup MMA (a multiple of 64
    rows, whole warpgroups): on Hopper that is the slow instruction where the fast one was possible."""
    kinds, fallback = set(), False
    for op, rows, _cols, encoding in _DOT.findall(ttgir):
        if op == "ttng.warp_group_dot":
            kinds.add("wgmma")
        elif encoding.startswith("mma"):
            kinds.add("mma")
            fallback |= int(rows) % 64 == 0 and num_warps % 4 == 0
    return ("wgmma" if "wgmma" in kinds else "mma" if kinds else "-"), fallback


def _describe(signature: dict, constexprs: dict, options: dict, divisible) -> str:
    """Blocks, warps, stages | the variant's flags, its floating-point data types and its %16 integer hints."""
    blocks = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("K", "E_PAD"))
    flags = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()
             if not (k.startswith(("BLOCK", "stride")) or k in ("K", "E_PAD", "UPCAST"))]
    floats = sorted({kind[1:] for kind in signature.values() if kind.startswith(("*fp", "*bf"))})
    if floats:
        flags.append("ptr=" + "+".join(floats))
    if "*i64" in signature.values():  # int64 indices (a Hugging Face router's ids, read as they come)
        flags.append("i64")
    if divisible:
        flags.append("div16=" + "+".join(divisible))
    return f"{blocks} w={options.get('num_warps')} s={options.get('num_stages')} | {','.join(flags)}"


def problems(row: dict, cc: int) -> list[str]:
    issues = []
    if row["error"]:
        issues.append(row["error"])
    else:
        if row["spill"] > 0:
            issues.append(f"{row['spill']} spill bytes")
        if row["shared"] > SHARED_LIMIT[cc]:
            issues.append(f"shared memory {row['shared']} > {SHARED_LIMIT[cc]}")
        if row["registers"] > REGISTER_LIMIT:
            issues.append(f"{row['registers']} registers")
        if row.get("mma_fallback"):
            issues.append("mma.sync on Hopper where warpgroup MMA fits the tile")
    return issues


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels compile-check",
                                     description="AOT-compile every Triton kernel at every shipped config.")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    parser.add_argument("--only", default=None, help="only kernel modules or kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel compiles (default min(4, CPU cores))")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--tune-candidates", action="store_true",
                        help="compile the candidate tiles of 'moe-kernels tune --triton' (bf16 expert-MLP kernels) "
                             "instead of the shipped configs")
    args = parser.parse_args(argv)
    if args.tune_candidates:  # read by experts._compile_specs, here and in the worker processes
        from .experts import TUNE_CANDIDATES_VARIABLE

        os.environ[TUNE_CANDIDATES_VARIABLE] = "1"
        args.only = args.only or "experts"
    archs = _parse_arch(args.arch)
    if interpreting():
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        return subprocess.call([sys.executable, "-m", __name__, *(argv if argv is not None else sys.argv[1:])], env=env)
    try:
        all_specs = collect_specs()
    except ImportError as exc:
        print(f"compile-check: cannot load the Triton kernels: {exc}", file=sys.stderr)
        return 2
    # workers rebuild the (deterministic) spec list and take theirs by index
    selected = [i for i, spec in enumerate(all_specs)
                if args.only is None or args.only in spec[0] or args.only in spec[1].__name__]
    jobs = [(i, cc) for i in selected for cc in archs]
    started = time.monotonic()
    if args.markdown:
        header = ["kernel", "config (blocks, warps, stages \\| variant flags)",
                  *(f"sm_{cc} regs / smem B / spill B / mma" for cc in archs), "status"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    else:
        print(f"{'kernel':<30}{'arch':<7}{'regs':>5}{'smem':>8}{'spill':>6} {'mma':>6}  {'status':<7}config")
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    results = pool.map(_compile_one, jobs) if pool else map(_compile_one, jobs)
    rows, spec_rows, failed = [], [], 0
    for row in results:  # in job order, printed as they finish: one spec's archs are consecutive
        rows.append(row)
        spec_rows.append(row)
        row["issues"] = problems(row, int(row["arch"][3:]))
        failed += bool(row["issues"])
        if not args.markdown:
            print(f"{row['kernel']:<30}{row['arch']:<7}{row['registers']:>5}{row['shared']:>8}{row['spill']:>6} "
                  f"{row['mma']:>6}  "
                  f"{'FAIL' if row['issues'] else 'ok':<7}{row['config']}", flush=True)
            if row["issues"]:
                print(f"    -> FAIL: {'; '.join(row['issues'])}", flush=True)
        elif len(spec_rows) == len(archs):
            status = "; ".join(f"{r['arch']} FAIL: {', '.join(r['issues'])}" for r in spec_rows if r["issues"]) or "ok"
            cells = [f"`{row['kernel']}`", row["config"].replace("|", "\\|"),
                     *(f"{r['registers']} / {r['shared']} / {r['spill']} / {r['mma']}" for r in spec_rows), status]
            print("| " + " | ".join(cells) + " |", flush=True)
        if len(spec_rows) == len(archs):
            spec_rows = []
    if pool:
        pool.shutdown()
    summary = [f"compile-check: {len(rows)} compiles ({len(selected)} kernel configs x {len(archs)} archs), "
               f"{failed} failed, {time.monotonic() - started:.0f} s"]
    for cc in archs:
        done = [r for r in rows if r["arch"] == f"sm_{cc}" and not r["error"]]
        if done:
            most_regs = max(done, key=lambda r: r["registers"])
            most_shared = max(done, key=lambda r: r["shared"])
            summary.append(f"sm_{cc}: max {most_regs['registers']} registers ({most_regs['kernel']}), "
                           f"max {most_shared['shared']} B shared of {SHARED_LIMIT[cc]} ({most_shared['kernel']}), "
                           f"{sum(r['spill'] > 0 for r in done)} with spills; dots: "
                           + ", ".join(f"{sum(r['mma'] == kind for r in done)} {kind}" for kind in ("wgmma", "mma")))
    print(("\n\n" if args.markdown else "") + ("  \n" if args.markdown else "\n").join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
