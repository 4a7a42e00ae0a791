"""Write the ``auto`` backend table's block for a GPU from a ``gpu_bench.py`` run on it.

``python -m moe_kernels.backend_table --write`` times one representative shape per shape class. A full
``gpu_bench.py`` run times more (several token counts per class, three input sets, medians of CUDA events) but
its CSV names its cases, not their shapes: this script maps each case back to its shape through
``gpu_bench.py``'s own case tables, puts every (case, T, pass) of the two backends in its shape class, and picks
per class the backend with the smaller summed time. Classes the run did not cover are left out of the block
(they take its ``default``).

    python benchmarks/backend_block_from_bench.py RUN.csv [--table FILE] [--default triton] [--why-default TEXT]
                                                  [--written DATE] [--dry-run]

Reads no GPU: the CSV holds the measurements (card, torch and triton versions per row).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_bench  # noqa: E402  (the case tables: one place for the benchmark's shapes)
import torch  # noqa: E402

from moe_kernels import backend_table  # noqa: E402

PROVIDERS = {"moe_kernels:triton": "triton", "moe_kernels:cuda": "cuda"}
MODES = {"fwd": False, "fwdbwd": True}  # gpu_bench pass -> a gradient is needed


def case_shapes() -> dict:
    """{(suite, case name): (op, experts, hidden)} for every case gpu_bench.py times on both backends (always in
    bfloat16)."""
    shapes = {("moe", s.name): ("moe_mlp", s.experts, s.hidden) for s in gpu_bench.MOE_SHAPES}
    hidden = gpu_bench.ADAPTER_HIDDEN
    shapes.update({("adapter", name): ("adapter_moe", experts, hidden)
                   for name, _rank, experts, _k, _act in gpu_bench.ADAPTER_CASES})
    return shapes


def block_from_rows(rows: list[dict], default: str = "triton") -> dict:
    """The table block for the one device in ``rows`` (gpu_bench.csv rows)."""
    devices = {r["device"] for r in rows}
    if len(devices) != 1:
        raise ValueError(f"the CSV must hold one device's run, got {sorted(devices)}")
    shapes = case_shapes()
    sums: dict[str, dict] = {}
    for r in rows:
        backend = PROVIDERS.get(r["provider"])
        shape = shapes.get((r["suite"], r["case"]))
        if backend is None or shape is None or r["pass"] not in MODES or not r["ms"]:
            continue
        op, experts, hidden = shape
        key = backend_table.shape_class(op, torch.bfloat16, experts, hidden, int(r["tokens"]), MODES[r["pass"]])
        entry = sums.setdefault(key, {"ms": {}, "cases": {}})
        entry["ms"][backend] = entry["ms"].get(backend, 0.0) + float(r["ms"])
        entry["cases"].setdefault(r["case"], set()).add(int(r["tokens"]))
    entries = {}
    for key, entry in sorted(sums.items()):
        if set(entry["ms"]) != set(backend_table.CHOICES):
            continue  # a class measured on one backend only decides nothing
        ms = {b: round(v, 4) for b, v in entry["ms"].items()}
        entries[key] = {"backend": min(ms, key=ms.get), "measured": True, "ms": ms,
                        "cases": {name: sorted(tokens) for name, tokens in entry["cases"].items()}}
    first = rows[0]
    return {"device": first["device"], "measured": True, "default": default, "torch": first["torch"],
            "how": f"benchmarks/backend_block_from_bench.py over a gpu_bench.py run (triton {first['triton']}): per "
                   "shape class, the backend with the smaller sum of medians over the class's cases and token "
                   "counts (CUDA events, three input sets, bfloat16); classes the run did not cover take the default",
            "entries": entries}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="gpu_bench.csv of one run")
    parser.add_argument("--table", default=None, help="table file to write (default: the shipped one)")
    parser.add_argument("--default", default="triton", choices=backend_table.CHOICES,
                        help="the block's backend for classes the run did not cover (default triton)")
    parser.add_argument("--written", default=None, help="the run's date for the block's 'written' field")
    parser.add_argument("--why-default", default=None, help="why the default was chosen (appended to 'how')")
    parser.add_argument("--dry-run", action="store_true", help="print the block, write nothing")
    args = parser.parse_args(argv)
    with open(args.csv, newline="") as f:
        block = block_from_rows(list(csv.DictReader(f)), args.default)
    if args.written:
        block["written"] = args.written
    if args.why_default:
        block["how"] += f"; default {args.default}: {args.why_default}"
    if not block["entries"]:
        print("backend_block_from_bench: the run timed no class on both triton and cuda", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps(block, indent=1))
        return 0
    path = backend_table.write_block(block, args.table or backend_table.TABLE_PATH)
    print(f"wrote the block for {block['device']} ({len(block['entries'])} classes) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
