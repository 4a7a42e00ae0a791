"""Whether a tuned Triton table (``moe-kernels tune --triton``) beat the shipped tiles in a ``gpu_bench.py`` run, per
table entry, and the table to ship: only the entries that won.

``gpu_check.sh --tune`` runs the benchmark with the tuned table in the user cache, so its CSV holds both
``moe_kernels:triton`` (the tuned tiles) and ``moe_kernels:triton[configs.json]`` (the shipped ones) on the same
inputs. This script maps each (case, T) of the run to the entry that drives it -- an ``mlp`` entry by width class
and rows per expert for the planned path, the ``mlp_decode`` entry of the width class for the decode path, the
``mlp_one_token`` entry of the width class for one token where the width takes the GEMVs -- and
takes per entry the geometric mean of tuned / shipped time over its cells and both passes. An entry ships when that
mean is below ``--ship-below`` (0.97: three percent, above the run-to-run noise of GPU-bound cells), no cell of it
is slower by more than ``--worst`` (1.05) and at least ``--min-cells`` (2) cells measured it. Cells at T = 1 timed
eagerly are left out: they are bound by the host's time to issue the call, and run 3 measured 9-28% between
identical code paths there; replayed from CUDA graphs (pass ``fwd_graph``) they count.

    python benchmarks/tuned_vs_shipped.py RUN.csv [--tuned TUNED.json --out FILTERED.json]

Reads no GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_bench  # noqa: E402  (the case tables: one place for the benchmark's shapes)

from moe_kernels.triton import configs, tune  # noqa: E402

TUNED, SHIPPED = "moe_kernels:triton", "moe_kernels:triton[configs.json]"


def entry_key(shape, tokens: int, pass_: str) -> tuple:
    """('mlp', width class, rows class), ('mlp_decode', width class) or ('mlp_one_token', width class) of the tuned
    entry that drives ``shape`` at ``tokens`` (bfloat16) in gpu_bench's ``pass_``, by the lookups of
    moe_kernels.triton.configs: the forward ('fwd', and 'fwd_graph' replayed from a CUDA graph: timed without
    gradients) of one token takes the GEMVs where the width has an entry, of a few slots the decode path, fwd+bwd
    always the planned one."""
    width = tune.inter_class(shape.inter)
    slots = tokens * shape.top_k
    if pass_ in ("fwd", "fwd_graph") and tokens == 1 and configs.one_token_config(False, shape.inter) is not None:
        return ("mlp_one_token", width)
    if pass_ in ("fwd", "fwd_graph") and configs.decode_config(slots, False, shape.inter) is not None:
        return ("mlp_decode", width)
    rows = -(-slots // shape.experts)
    for low, high in tune.rows_classes():
        if (low is None or rows >= low) and (high is None or rows <= high):
            return ("mlp", width, (low, high))
    raise AssertionError("the rows classes cover every count")


def verdicts(rows: list[dict], ship_below: float = 0.97, worst: float = 1.05, min_cells: int = 2) -> dict:
    """{entry key: {"cells": [(case, T, pass, tuned / shipped)], "geomean": float, "ship": bool}}"""
    shapes = {s.name: s for s in gpu_bench.MOE_SHAPES}
    times: dict = {}
    for r in rows:
        if r.get("suite") != "moe" or r["provider"] not in (TUNED, SHIPPED) or not r["ms"]:
            continue
        times.setdefault((r["case"], int(r["tokens"]), r["pass"]), {})[r["provider"]] = float(r["ms"])
    found: dict = {}
    for (case, tokens, pass_), pair in sorted(times.items()):
        if (tokens == 1 and pass_ != "fwd_graph") or len(pair) != 2 or case not in shapes:
            continue
        key = entry_key(shapes[case], tokens, pass_)
        found.setdefault(key, {"cells": []})["cells"].append((case, tokens, pass_, pair[TUNED] / pair[SHIPPED]))
    for verdict in found.values():
        ratios = [cell[3] for cell in verdict["cells"]]
        verdict["geomean"] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        verdict["ship"] = verdict["geomean"] < ship_below and max(ratios) <= worst and len(ratios) >= min_cells
    return found


def filtered_table(tuned: dict, found: dict) -> dict:
    """``tuned`` (a per-GPU table) with only the entries whose verdict is to ship; entries no cell measured are
    dropped too."""
    keep = {key for key, verdict in found.items() if verdict["ship"]}
    out = {key: value for key, value in tuned.items() if key not in configs.TUNED_FAMILIES}
    for family in configs.TUNED_FAMILIES:
        chosen = []
        for entry in tuned.get(family, []):
            width = (entry.get("min_inter"), entry.get("max_inter"))
            key = ((family, width, (entry.get("min_rows_per_expert"), entry.get("max_rows_per_expert")))
                   if family == "mlp" else (family, width))
            if key in keep:
                chosen.append(entry)
        if chosen:
            out[family] = chosen
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="gpu_bench.csv of a run with a tuned table in the user cache")
    parser.add_argument("--tuned", default=None, help="the tuned table (tune --triton's copy)")
    parser.add_argument("--out", default=None, help="write the entries that won here (needs --tuned)")
    parser.add_argument("--ship-below", type=float, default=0.97)
    parser.add_argument("--worst", type=float, default=1.05)
    parser.add_argument("--min-cells", type=int, default=2)
    args = parser.parse_args(argv)
    if args.out and not args.tuned:
        parser.error("--out needs --tuned")
    with open(args.csv, newline="") as f:
        found = verdicts(list(csv.DictReader(f)), args.ship_below, args.worst, args.min_cells)
    if not found:
        print("tuned_vs_shipped: the run has no cell timed with both the tuned and the shipped tiles", file=sys.stderr)
        return 1
    for key, verdict in found.items():
        cells = ", ".join(f"{case.split()[0]} T={t} {p} {r:.2f}" for case, t, p, r in verdict["cells"])
        print(f"{'SHIP' if verdict['ship'] else 'keep shipped':<12} {key}: tuned/shipped geomean "
              f"{verdict['geomean']:.3f} ({cells})")
    if args.out:
        with open(args.tuned) as f:
            table = filtered_table(json.load(f), found)
        kept = sum(len(table.get(family, [])) for family in configs.TUNED_FAMILIES)
        if not kept:
            print(f"no entry won: nothing to ship, {args.out} not written")
            return 0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # configs/ holds no table yet
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2)
        print(f"wrote {kept} winning entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
