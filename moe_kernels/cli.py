"""The ``moe-kernels`` command.

    moe-kernels info                      version, backends built, CUDA archs, triton, auto backend table, HF families
    moe-kernels demo [--device D] ...     HF's MoE block vs moe_kernels: agreement and time per fwd/bwd
    moe-kernels bench [--quick] ...       benchmark suites (see benchmarks/)
    moe-kernels craft SRC DST ...         PESC: turn a dense HF checkpoint into an adapter-MoE one
    moe-kernels compile-check --arch ...  ahead-of-time compile of every Triton kernel, registers/spills
    moe-kernels tune [--triton] ...       measure this GPU: the auto backend table, or the Triton tiles
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import moe_kernels
from moe_kernels.backends import BACKEND_NAMES, _load


def _backend_lines() -> list[str]:
    lines = []
    for name in BACKEND_NAMES:
        backend = _load(name)
        if isinstance(backend, Exception):
            lines.append(f"  {name:<10} not available: {backend}")
            continue
        reason = backend.unavailable_reason()
        lines.append(f"  {name:<10} {'built' if reason is None else 'not available: ' + reason}")
    return lines


def _triton_configs_line() -> str:
    """Which Triton config tables are in force for the local GPU (moe_kernels.triton.configs)."""
    from moe_kernels.triton import configs

    base = f"Triton configs: {configs.TABLE_PATH}"
    if not torch.cuda.is_available():
        return base + " (no GPU: no per-GPU table applies)"
    name = torch.cuda.get_device_name()
    tables = configs.device_tables(name)
    if not tables:
        return (base + f"; no tuned table for {name} (moe-kernels tune --triton writes "
                f"{configs.user_configs_path(name)})")
    return base + "; tuned for " + name + ", read first: " + ", ".join(
        f"{path} ({len(table.get('mlp', []))} mlp entries)" for path, table in tables)


def cmd_info(args) -> int:
    print(f"moe_kernels {moe_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, machine {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print("backends:")
    print("\n".join(_backend_lines()))
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()} (torch CUDA {torch.version.cuda})")
    else:
        print("CUDA device: none")
    print(f"CUDA archs a build from this shell targets (TORCH_CUDA_ARCH_LIST): "
          f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0')}"
          + (f"; torch built for {' '.join(torch.cuda.get_arch_list())}" if torch.version.cuda else ""))
    from moe_kernels.backend_table import describe

    print("\n".join(describe()))
    print(_triton_configs_line())
    try:
        from moe_kernels.hf.families import families_table
    except Exception as exc:  # noqa: BLE001 - transformers missing or integration not built
        print(f"Hugging Face families: unavailable ({exc})")
        return 0
    rows = families_table()
    supported = [r for r in rows if r["status"] != "unsupported"]
    print(f"Hugging Face families: {len(supported)} of {len(rows)} MoE families in transformers are supported "
          "(experts: the experts run on moe_kernels; +router: the router too; parity: model = whole-model parity "
          "tests, experts = the experts module's)")
    print(f"  {'model_type':<28}{'patched':<16}{'router variant':<22}{'parity':<8}note")
    for row in rows:
        patched = row["status"] if row["status"] != "unsupported" else "no"
        print(f"  {row['model_type']:<28}{patched:<16}{row['router_variant']:<22}"
              f"{'model' if row['parity_tested'] else 'experts' if row['experts_parity_tested'] else '-':<8}"
              f"{row['reason']}")
    return 0


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _demo_agreement(block, x, top_k: int, backend: str):
    """Check moe_kernels against the HF block in two parts, so a low-precision tie cannot hide a bug:
    routing (ids equal to transformers' router, except rows where the k-th and (k+1)-th scores tie
    exactly and either choice is right), then the experts fed the *same* routing (output and gradients).
    Returns (routing_ok, tied rows that differ, output rel. error, worst gradient rel. error)."""
    with torch.no_grad():
        logits, hf_weights, hf_ids = block.gate(x)
        _, ids = moe_kernels.route(logits, top_k, backend=backend)
        differ = (ids.long().sort(dim=1).values != hf_ids.sort(dim=1).values).any(dim=1)
        if top_k < logits.shape[1]:
            top = torch.softmax(logits.float(), dim=-1).topk(top_k + 1, dim=-1).values
            tied = top[:, top_k - 1] == top[:, top_k]
        else:
            tied = torch.zeros_like(differ)
    experts = block.experts
    params = [experts.gate_up_proj, experts.down_proj]
    outs, grads = [], []
    for run in (lambda i: experts(i, hf_ids, hf_weights),
                lambda i: moe_kernels.moe_mlp(i, *params, hf_weights, hf_ids, backend=backend)):
        inp = x.clone().requires_grad_(True)
        out = run(inp)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out.float().square().sum(), [inp, *params]))
    out_err = _rel_err(outs[1], outs[0])
    grad_err = max(_rel_err(g, r) for g, r in zip(grads[1], grads[0]))
    return not bool((differ & ~tied).any()), int((differ & tied).sum()), out_err, grad_err


def _demo_argument_problem(args) -> str | None:
    """What is wrong with the demo's arguments, in a sentence (None: nothing), before anything is built."""
    for name in ("tokens", "hidden", "intermediate", "experts", "repeats"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if not 1 <= args.top_k <= args.experts:
        return f"--top-k must satisfy 1 <= top-k <= --experts = {args.experts}, got {args.top_k}"
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            return f"--device {args.device!r}: {exc}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA device"
    if args.backend is not None and args.backend != "auto":
        from moe_kernels.backends import get_backend

        try:
            backend = get_backend(args.backend)
        except Exception as exc:  # noqa: BLE001 - not built here: say why
            return f"--backend {args.backend}: {exc}"
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        reason = backend.device_error(device)
        if reason:
            return f"--backend {args.backend}: {reason}"
    return None


def cmd_demo(args) -> int:
    """Run a small Mixtral-style MoE block through HF's default experts path and through moe_kernels."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print("the demo needs transformers: pip install 'moe_kernels[hf]'", file=sys.stderr)
        return 2
    problem = _demo_argument_problem(args)
    if problem:
        print(f"moe-kernels demo: {problem}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    config._experts_implementation = "grouped_mm"  # transformers' default experts path
    block = MixtralSparseMoeBlock(config).to(device=device, dtype=dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    backend = moe_kernels.backends.resolve_backend(args.backend, device).name

    def hf_forward(inp):
        return block(inp.unsqueeze(0)).squeeze(0)

    def mk_forward(inp):
        logits = torch.nn.functional.linear(inp, block.gate.weight)
        weights, ids = moe_kernels.route(logits, args.top_k, backend=backend)
        return moe_kernels.moe_mlp(inp, block.experts.gate_up_proj, block.experts.down_proj, weights, ids,
                                   backend=backend)

    results = {}
    for name, forward in (("transformers grouped_mm", hf_forward), (f"moe_kernels ({backend})", mk_forward)):
        # the default size takes tens of seconds on a small CPU: say what runs (stderr: stdout stays the report)
        print(f"timing {name}: forward, then forward+backward, {args.repeats} repeats each ...", file=sys.stderr,
              flush=True)
        fwd = _time(lambda: forward(x), args.repeats)

        def fwd_bwd():
            i = x.clone().requires_grad_(True)
            torch.autograd.grad(forward(i).float().square().sum(), [i, *block.parameters()])
        results[name] = (fwd, _time(fwd_bwd, args.repeats))

    print("checking agreement: routing, then output and gradients ...", file=sys.stderr, flush=True)
    routing_ok, tie_rows, out_err, grad_err = _demo_agreement(block, x, args.top_k, backend)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    agree = routing_ok and out_err <= tol and grad_err <= tol
    print(f"moe_kernels demo: Mixtral-style MoE block, T={args.tokens} H={args.hidden} I={args.intermediate} "
          f"E={args.experts} k={args.top_k}, {args.dtype}, device {device}, {torch.get_num_threads()} threads")
    print(f"routing: expert ids {'equal to' if routing_ok else 'DIFFER from'} transformers' router"
          + (f" (except {tie_rows} tokens whose k-th and (k+1)-th scores tie exactly)" if tie_rows else ""))
    print(f"experts, same routing: output rel. error {out_err:.2e}, worst gradient rel. error {grad_err:.2e} "
          f"(tolerance {tol:.0e}) -> {'AGREE' if agree else 'MISMATCH'}")
    base_fwd, base_fb = results["transformers grouped_mm"]
    print(f"{'path':<28}{'forward ms':>12}{'fwd+bwd ms':>12}{'fwd speedup':>13}{'f+b speedup':>13}")
    for name, (fwd, fb) in results.items():
        print(f"{name:<28}{fwd * 1e3:>12.2f}{fb * 1e3:>12.2f}{base_fwd / fwd:>12.2f}x{base_fb / fb:>12.2f}x")
    return 0 if agree else 1


def cmd_bench(argv) -> int:
    from moe_kernels.bench import bench_main
    return bench_main(argv)


def cmd_craft(argv) -> int:
    from moe_kernels.hf.craft import craft_main
    return craft_main(argv)


def cmd_tune(argv) -> int:
    if argv and argv[0] == "--triton":  # the Triton tile configs of this GPU (moe_kernels.triton.tune)
        from moe_kernels.triton.tune import main as tune_triton
        return tune_triton(argv[1:])
    from moe_kernels.backend_table import tune_main
    return tune_main(argv)


def cmd_compile_check(argv) -> int:
    from moe_kernels.triton.compile_check import main
    return main(argv)


# Sub-commands with parsers of their own: everything after the name is theirs (``--help`` included).
DELEGATED = {"bench": (cmd_bench, "benchmark suites; see 'moe-kernels bench --help'"),
             "craft": (cmd_craft, "PESC sparsity crafting; see 'moe-kernels craft --help'"),
             "tune": (cmd_tune, "measure triton vs cuda per shape class on this GPU, for backend='auto' "
                      "('moe-kernels tune --help'); 'tune --triton': the Triton tile configs of this GPU "
                      "('moe-kernels tune --triton --help')"),
             "compile-check": (cmd_compile_check, "AOT-compile the Triton kernels; see 'moe-kernels compile-check --help'")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends, CUDA archs, triton, HF families").set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="HF MoE block vs moe_kernels: agreement and timings")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--backend", default=None, choices=BACKEND_NAMES, help="default: picked by device")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    demo.add_argument("--tokens", type=int, default=512)
    demo.add_argument("--hidden", type=int, default=512)
    demo.add_argument("--intermediate", type=int, default=256)
    demo.add_argument("--experts", type=int, default=16)
    demo.add_argument("--top-k", type=int, default=2)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(fn=cmd_demo)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][0](argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
