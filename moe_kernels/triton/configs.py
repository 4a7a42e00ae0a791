"""Launch configurations of the Triton kernels, per shape class, loaded from ``configs.json``.

The table maps a shape class (token count, experts, rows per expert, adapter rank) of each kernel family
(routing, plan, expert MLP, adapter experts) to block sizes, warps and stages. The code never autotunes (it cannot without a GPU, and autotune costs a warm-up per
shape); benchmarks can tune the table and write it back with :func:`save_table`. The compile check
(:mod:`moe_kernels.triton.compile_check`) compiles every entry of the table for every target GPU.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(os.environ.get("MOE_KERNELS_TRITON_CONFIGS", Path(__file__).with_name("configs.json")))


@lru_cache(maxsize=1)
def load_table() -> dict:
    """The config table (a dict of kernel family -> list of entries)."""
    with open(TABLE_PATH) as f:
        return json.load(f)


def save_table(table: dict, path: Path | str = TABLE_PATH) -> None:
    """Write a (tuned) table; the next :func:`load_table` in a fresh process picks it up."""
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
    load_table.cache_clear()


def _pick(family: str, **sizes) -> dict:
    for entry in load_table()[family]:
        if all(entry.get(f"max_{name}") is None or value <= entry[f"max_{name}"] for name, value in sizes.items()):
            return entry
    raise LookupError(f"no '{family}' config in {TABLE_PATH} covers {sizes}")


def entries(family: str) -> list[dict]:
    """Every shipped config of a kernel family (for the compile check)."""
    return list(load_table()[family])


def plan_config(num_slots: int, num_experts: int) -> dict:
    return _pick("plan", slots=num_slots, experts=num_experts)


def route_config(num_tokens: int, num_experts: int) -> dict:
    return _pick("route", tokens=num_tokens, experts=num_experts)


def mlp_config(num_rows: int, num_experts: int, *, fp32: bool = False) -> dict:
    """Configs of the expert-MLP kernels for N = T*k routed rows over E experts (keys up, down,
    down_bwd, dx, dw), chosen by the average rows per expert; float32 inputs use the 'mlp_fp32' family."""
    return _pick("mlp_fp32" if fp32 else "mlp", rows_per_expert=-(-num_rows // num_experts))


def decode_config(num_rows: int, fp32: bool = False) -> dict | None:
    """Config of the expert-MLP forward without a plan (decode), or None when ``num_rows`` routed slots
    do not fit one program's BLOCK_M rows (then the planned path runs)."""
    entry = load_table()["mlp_decode_fp32" if fp32 else "mlp_decode"][0]
    return entry if num_rows <= entry["BLOCK_M"] else None


def adapter_config(num_slots: int, rank: int, aligned: bool = True) -> dict:
    """Config of the adapter-expert kernels for N = ``num_slots`` routed slots at adapter rank ``rank``;
    launches that are not ``aligned`` (see :func:`moe_kernels.triton.adapters.select_config`) take the
    'adapter_unaligned' entry."""
    if not aligned:
        return load_table()["adapter_unaligned"][0]
    return _pick("adapter", rank=rank, slots=num_slots)


def adapter_decode_entry() -> dict:
    """The adapter forward without a plan (decode): its one entry (see ``_comment_adapter_decode``)."""
    return load_table()["adapter_decode"][0]


def wgrad_config() -> dict:
    """How the expert-MLP weight gradients are formed where both ways can run (see
    :func:`moe_kernels.triton.experts.weight_grads_by_grouped_mm`)."""
    return load_table()["wgrad"]
