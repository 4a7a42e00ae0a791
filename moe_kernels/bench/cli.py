"""``moe-kernels bench`` (and ``python -m moe_kernels.bench``): arguments, the run, and its outputs under
``--out``."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

from .report import plot_suite, render_summary, roofline_rows, write_csv
from .runner import run_benchmarks
from .shapes import ADAPTER_SHAPES, DTYPES, LORA_SHAPES, MOE_SHAPES, PASSES, SUITES


def _parse_args(argv):
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package docstring's first paragraph
    parser = argparse.ArgumentParser(prog="moe-kernels bench", description=summary)
    parser.add_argument("--quick", action="store_true",
                        help="OLMoE and Qwen3 shapes, decode and one training size, all suites at one size "
                             "(under 5 minutes on a 2-core CPU)")
    parser.add_argument("--suite", action="append", choices=SUITES, help="suites to run (repeatable; default all)")
    parser.add_argument("--out", default="bench_out", help="folder for bench.csv, plots and summary.md")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="dtypes (default fp32 and bf16)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--shape", action="append", help="restrict to these shape names")
    parser.add_argument("--tokens", type=int, action="append",
                        help="token counts (full-size values; training counts are scaled on the CPU)")
    parser.add_argument("--pass", dest="passes", action="append", choices=PASSES, help="passes (default all)")
    parser.add_argument("--repeats", type=int, default=None, help="minimum timed repeats per measurement")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--scale", type=int, default=None, help="override every shape's CPU scale factor")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory / saved-bytes measurement")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--bandwidth-mb", type=int, default=256, help="size of the copy that measures bandwidth")
    args = parser.parse_args(argv)
    known = set(MOE_SHAPES) | set(ADAPTER_SHAPES) | set(LORA_SHAPES)
    unknown = sorted(set(args.shape or ()) - known)
    if unknown:
        parser.exit(2, f"moe-kernels bench: unknown --shape {unknown}; known: {sorted(known)}\n")
    if args.threads < 1:
        parser.exit(2, f"moe-kernels bench: --threads must be >= 1, got {args.threads}\n")
    return args


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of ``moe-kernels bench``; returns the exit status."""
    args = _parse_args(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    suites = args.suite or list(SUITES)
    load_before = _load_average()
    rows, info = run_benchmarks(args)
    info["load"] = (load_before, _load_average(), time.perf_counter() - started)
    roofline = roofline_rows() if "roofline" in suites else []
    csv_path = os.path.join(args.out, "bench.csv")
    write_csv(rows, csv_path)
    if roofline:
        with open(os.path.join(args.out, "roofline.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(roofline[0]))
            writer.writeheader()
            writer.writerows(roofline)
    plots = []
    if not args.no_plot:
        for suite in SUITES:
            path = os.path.join(args.out, f"{suite}.png")
            if suite in suites and plot_suite(rows, suite, path):
                plots.append(path)
    summary = render_summary(rows, info, suites, roofline)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    print(f"wrote {csv_path}" + (f", {', '.join(plots)}" if plots else "") +
          f", {os.path.join(args.out, 'summary.md')} in {time.perf_counter() - started:.0f} s")
    return 0
