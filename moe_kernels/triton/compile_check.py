"""Ahead-of-time compile check of every Triton kernel of moe_kernels for real GPUs (no GPU needed).

``moe-kernels compile-check --arch sm_80,sm_90`` compiles each kernel at every shipped config
(``COMPILE_SPECS`` / ``_compile_specs()`` of each module in ``moe_kernels.triton.KERNEL_MODULES``) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and prints, per kernel and config,
the registers per thread, the shared memory Triton allocates, and the spill bytes ptxas reports
(``ptxas -v`` on the generated PTX, with the ptxas bundled with triton). The exit status is non-zero
on any compile failure, any spill, or shared memory above the architecture's per-block limit.

Must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces compilation); main()
re-executes itself in a clean subprocess when it finds the variable set.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

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
    """[(module, kernel, signature, constexprs, options[, divisible])] for every kernel module of the package;
    ``divisible`` (optional) names integer arguments that are multiples of 16 in real launches."""
    from . import KERNEL_MODULES
    specs = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        module_specs = getattr(module, "COMPILE_SPECS", None)
        if module_specs is None:
            module_specs = module._compile_specs()
        specs.extend((name, *spec) for spec in module_specs)
    return specs


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


def _ptxas_usage(ptx: str, arch_name: str, cc: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX."""
    ptxas = _ptxas_path(cc)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={arch_name}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill_store = re.search(r"(\d+) bytes spill stores", log)
    spill_load = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill": (int(spill_store.group(1)) if spill_store else 0) + (int(spill_load.group(1)) if spill_load else 0),
            "stack": int(stack.group(1)) if stack else 0}


def _compile_one(job):
    """Compile one (spec, arch); returns a result row (runs in a worker process)."""
    index, cc = job
    module, kernel, signature, constexprs, options, *rest = _specs_in_worker()[index]
    divisible = set(rest[0]) if rest else set()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    row = {"module": module, "kernel": kernel.__name__, "arch": f"sm_{cc}", "config": _describe(constexprs, options)}
    try:
        # As the JIT specialises a launch: torch allocations are 16-byte aligned, and the spec names the
        # integer arguments that are multiples of 16 in real shapes (unit strides are constexprs there).
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name].startswith("*") or name in divisible}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                                  options=dict(options))
        target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.MULTILINE).group(1)
        row.update(_ptxas_usage(compiled.asm["ptx"], target, cc))
        row["shared"] = int(compiled.metadata.shared)
        row["error"] = None
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
        row.update(registers=-1, spill=-1, stack=-1, shared=-1, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return row


def _describe(constexprs: dict, options: dict) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("K", "E_PAD"))
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()
                     if not (k.startswith(("BLOCK", "stride")) or k in ("K", "E_PAD", "UPCAST")))
    return f"{blocks} w={options.get('num_warps')} s={options.get('num_stages')} | {flags}"


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
    return issues


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels compile-check",
                                     description="AOT-compile every Triton kernel at every shipped config.")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90")
    parser.add_argument("--only", default=None, help="only kernel modules whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    archs = _parse_arch(args.arch)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
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
    selected = [i for i, spec in enumerate(all_specs) if args.only is None or args.only in spec[0]]
    specs = [all_specs[i] for i in selected]
    jobs = [(i, cc) for i in selected for cc in archs]
    failed = 0
    header = ["kernel", "arch", "regs", "smem", "spill", "status", "config"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    else:
        print(f"{'kernel':<28}{'arch':<7}{'regs':>5}{'smem':>8}{'spill':>6}  {'status':<7}config")
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    results = pool.map(_compile_one, jobs) if pool else map(_compile_one, jobs)
    rows = []
    for row in results:  # printed as they finish, in order
        rows.append(row)
        issues = problems(row, int(row["arch"][3:]))
        failed += bool(issues)
        status = "FAIL: " + "; ".join(issues) if issues else "ok"
        if args.markdown:
            print("| " + " | ".join([row["kernel"], row["arch"], str(row["registers"]), str(row["shared"]),
                                     str(row["spill"]), status, row["config"]]) + " |", flush=True)
        else:
            print(f"{row['kernel']:<28}{row['arch']:<7}{row['registers']:>5}{row['shared']:>8}{row['spill']:>6}  "
                  f"{'FAIL' if issues else 'ok':<7}{row['config']}", flush=True)
            if issues:
                print(f"    -> {status}", flush=True)
    if pool:
        pool.shutdown()
    print(f"compile-check: {len(rows)} compiles ({len(specs)} kernel configs x {len(archs)} archs), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
