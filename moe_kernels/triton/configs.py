"""Launch configurations of the Triton kernels, per shape class, loaded from ``configs.json``.

The table maps a shape class (token count, experts, rows per expert, adapter rank) of each kernel family
(routing, plan, expert MLP, adapter experts) to block sizes, warps and stages. The code never autotunes at call
time (autotune costs a warm-up per shape). Instead, configs are tuned per GPU model, as vLLM ships its fused-MoE
configs, and read in this order for a launch on a CUDA device:

1. the user's tuned table for the GPU model, written by ``moe-kernels tune --triton``
   (:func:`user_configs_path`: ``$MOE_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_kernels``, else
   ``~/.cache/moe_kernels``, folder ``triton_configs``);
2. the table shipped for the GPU model (``moe_kernels/triton/configs/<GPU name>.json``; none is shipped yet);
3. ``configs.json`` (or the file ``MOE_KERNELS_TRITON_CONFIGS`` names, which replaces all three).

A per-GPU table holds only the families it tunes (:data:`TUNED_FAMILIES`); its entries are tried before the base
table's, and carry ``min_*`` as well as ``max_*`` bounds. The tables are read once per process and GPU model
(:func:`clear_cache` rereads them). The compile check (:mod:`moe_kernels.triton.compile_check`) compiles
every entry of ``configs.json`` and of the shipped per-GPU tables for every target GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(os.environ.get("MOE_KERNELS_TRITON_CONFIGS", Path(__file__).with_name("configs.json")))
SHIPPED_DEVICE_DIR = Path(__file__).with_name("configs")
TUNED_FAMILIES = ("mlp", "mlp_decode", "mlp_one_token")  # the families a per-GPU table may hold


@lru_cache(maxsize=1)
def load_table() -> dict:
    """The config table (a dict of kernel family -> list of entries)."""
    with open(TABLE_PATH) as f:
        return json.load(f)


def save_table(table: dict, path: Path | str = TABLE_PATH) -> None:
    """Write a (tuned) table; the next :func:`load_table` in a fresh process picks it up."""
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
    clear_cache()


def device_file_name(device_name: str) -> str:
    """The file of a GPU model's table: its name with every run of other characters than letters, digits,
    '-' and '.' made one '_' (``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3.json``)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json"


def user_configs_path(device_name: str) -> Path:
    """Where ``moe-kernels tune --triton`` writes the table of a GPU model: ``triton_configs/`` in the user's
    cache (:func:`moe_kernels.user_cache.cache_dir`)."""
    from ..user_cache import cache_dir

    return Path(cache_dir()) / "triton_configs" / device_file_name(device_name)


def _read_device_table(path: Path) -> dict | None:
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return None
    unknown = [key for key in table if not key.startswith("_") and key not in (*TUNED_FAMILIES, "device", "how")]
    if unknown:
        raise ValueError(f"{path}: not a moe_kernels per-GPU Triton config table (unknown keys {unknown}; a table "
                         f"holds {', '.join(TUNED_FAMILIES)})")
    return table


@lru_cache(maxsize=16)
def device_tables(device_name: str | None) -> tuple[tuple[str, dict], ...]:
    """((path, table), ...) of the per-GPU tables in force for a GPU model, the user's first."""
    if device_name is None or "MOE_KERNELS_TRITON_CONFIGS" in os.environ:
        return ()
    found = []
    for path in (user_configs_path(device_name), SHIPPED_DEVICE_DIR / device_file_name(device_name)):
        table = _read_device_table(path)
        if table is not None:
            found.append((str(path), table))
    return tuple(found)


_device_names: dict = {}


def device_name_of(device) -> str | None:
    """The GPU model of a CUDA device (cached per device index); None for other devices."""
    if device is None or device.type != "cuda":
        return None
    index = device.index
    name = _device_names.get(index)
    if name is None:
        import torch

        name = _device_names[index] = torch.cuda.get_device_name(device)
    return name


def clear_cache() -> None:
    """Reread every table at the next lookup (after ``moe-kernels tune --triton`` wrote one)."""
    load_table.cache_clear()
    device_tables.cache_clear()


def _fits(entry: dict, sizes: dict) -> bool:
    for name, value in sizes.items():
        low, high = entry.get(f"min_{name}"), entry.get(f"max_{name}")
        if (high is not None and value > high) or (low is not None and value < low):
            return False
    return True


_overrides: dict = {}  # family -> the one entry every lookup returns (set by :func:`override`)


@contextlib.contextmanager
def override(family: str, entry: dict):
    """Within the block, every lookup of ``family`` returns ``entry`` (the tuner times candidates this way)."""
    previous = _overrides.get(family)
    _overrides[family] = entry
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(family)
        else:
            _overrides[family] = previous


_base_only = [False]  # set by :func:`base_table_only`


@contextlib.contextmanager
def base_table_only():
    """Within the block, lookups ignore every per-GPU table: configs.json alone (benchmarks time it beside a tuned table)."""
    previous = _base_only[0]
    _base_only[0] = True
    try:
        yield
    finally:
        _base_only[0] = previous


def _first_fit(family: str, device_name: str | None = None, **sizes) -> dict | None:
    """The entry of ``family`` in force for ``sizes``: an :func:`override`'s, else the first whose bounds hold in the
    GPU model's tables (:func:`device_tables`), then configs.json; None where none holds."""
    if _overrides:
        forced = _overrides.get(family)
        if forced is not None:
            return forced
    if _base_only[0]:
        device_name = None
    for path, table in device_tables(device_name):
        for entry in table.get(family, ()):
            if _fits(entry, sizes):
                return entry
    return next((entry for entry in load_table()[family] if _fits(entry, sizes)), None)


def _pick(family: str, device_name: str | None = None, **sizes) -> dict:
    entry = _first_fit(family, device_name, **sizes)
    if entry is None:
        raise LookupError(f"no '{family}' config in {TABLE_PATH} covers {sizes}")
    return entry


def shipped_device_tables() -> list[tuple[str, dict]]:
    """(path, table) of every per-GPU table shipped with the package."""
    if not SHIPPED_DEVICE_DIR.is_dir():
        return []
    return [(str(path), _read_device_table(path)) for path in sorted(SHIPPED_DEVICE_DIR.glob("*.json"))]


def entries(family: str) -> list[dict]:
    """Every shipped config of a kernel family (for the compile check): configs.json's, then each shipped
    per-GPU table's."""
    found = list(load_table()[family])
    for _, table in shipped_device_tables():
        found.extend(table.get(family, ()))
    return found


def plan_config(num_slots: int, num_experts: int) -> dict:
    return _pick("plan", slots=num_slots, experts=num_experts)


def route_config(num_tokens: int, num_experts: int) -> dict:
    return _pick("route", tokens=num_tokens, experts=num_experts)


def mlp_config(num_rows: int, num_experts: int, inter: int, *, fp32: bool = False, device=None) -> dict:
    """Configs of the expert-MLP kernels for N = T*k routed rows over E experts of intermediate size I (keys up,
    down, down_bwd, dx, dw), chosen by the average rows per expert and I; float32 inputs use the 'mlp_fp32'
    family. ``device``: the tensors' device (a CUDA device's GPU model selects its tuned table)."""
    if fp32:
        return _pick("mlp_fp32", rows_per_expert=-(-num_rows // num_experts), inter=inter)
    return _pick("mlp", device_name_of(device), rows_per_expert=-(-num_rows // num_experts), inter=inter)


def decode_config(num_rows: int, fp32: bool = False, inter: int | None = None, device=None) -> dict | None:
    """Config of the expert-MLP forward without a plan (decode), or None when ``num_rows`` routed slots
    do not fit one program's BLOCK_M rows (then the planned path runs). bf16/fp16 launches on a GPU model with
    a tuned table take its 'mlp_decode' entry for the intermediate size ``inter`` where it has one."""
    if fp32:
        entry = load_table()["mlp_decode_fp32"][0]
    elif inter is None:
        entry = load_table()["mlp_decode"][0]
    else:
        entry = _pick("mlp_decode", device_name_of(device), inter=inter)
    return entry if num_rows <= entry["BLOCK_M"] else None


def one_token_config(fp32: bool = False, inter: int | None = None, device=None) -> dict | None:
    """Config of the one-token forward's GEMV kernels (see ``_comment_mlp_one_token``) for intermediate size
    ``inter``, or None where no entry covers it (then the decode tiles run); ``inter`` None: configs.json's first
    entry. bf16/fp16 launches on a GPU model with a tuned table take its 'mlp_one_token' entry for ``inter``."""
    family = "mlp_one_token_fp32" if fp32 else "mlp_one_token"
    if inter is None:
        return load_table()[family][0]
    return _first_fit(family, None if fp32 else device_name_of(device), inter=inter)


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


def grouped_mm_wgrad_wanted(num_rows: int) -> bool:
    """Whether the table asks for the grouped-GEMM weight gradients at ``num_rows`` routed slots (T*k), where they
    can run: below ``min_rows`` the Triton outer-product kernel measured as fast or faster."""
    wgrad = wgrad_config()
    return bool(wgrad["grouped_mm"]) and num_rows >= wgrad.get("min_rows", 0)
