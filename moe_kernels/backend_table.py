"""The ``auto`` backend on CUDA: triton or cuda per op and shape class, from a table of measurements.

A *shape class* is (op, dtype, experts, width, tokens, mode), each number put in a bucket:

* experts ``E``: <=8, <=32, <=128, >128
* width, the hidden size ``H``: <=2048, >2048
* tokens ``T``: <=8 (decode: triton's no-plan decode path and one-token GEMVs run there), <=64, <=1024, >1024
* mode: ``train`` when a gradient is needed, ``infer`` otherwise

The table (``moe_kernels/backend_table.json``, or the file ``MOE_KERNELS_BACKEND_TABLE`` names) holds one
block per GPU model (``device`` = ``torch.cuda.get_device_name()``, or ``"*"`` for any GPU); each block maps
shape classes to a backend, with the timings that chose it when ``measured`` is true. Classes the table
lacks take the block's ``default``, except a decode class (``T<=8``), which first takes its ``T<=64`` class's
entry (blocks measured before the decode bucket existed have none of their own). Two rules come before the
table: the cuda expert path is only a choice where torch's CUTLASS grouped GEMM runs (bfloat16, sm90/sm100: see
``moe_kernels.native.grouped_gemm_status``), and a backend that is not built is never chosen.

The shipped table's ``"*"`` block holds UNMEASURED DEFAULTS (``"measured": false``): triton, the previous
default, for any GPU model without a block of its own. Its ``NVIDIA H100 80GB HBM3`` and ``NVIDIA H200`` blocks
were written by the command below on those GPUs (see their ``how``). Measure and write the block for the local GPU
with

    python -m moe_kernels.backend_table --write          # about a minute on an H100 (``--budget`` seconds)

which times both backends on one representative shape per class (bfloat16, forward for ``infer``,
forward + backward for ``train``) and records the faster, in the shipped file (for maintainers). Users run
``moe-kernels tune``: the same measurement, written to a table in their cache (:func:`user_table_path`) that
``auto`` reads first for that GPU model. ``moe-kernels info`` prints the block in force and its file.
``backend=`` and ``MOE_KERNELS_BACKEND`` override the choice; ``backend="auto"`` asks for it explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import native
from .user_cache import cache_dir

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_table.json")
TABLE_OPS = ("moe_mlp", "adapter_moe")
CHOICES = ("triton", "cuda")

EXPERT_BUCKETS = ((8, "<=8"), (32, "<=32"), (128, "<=128"), (None, ">128"))
WIDTH_BUCKETS = ((2048, "<=2048"), (None, ">2048"))
TOKEN_BUCKETS = ((8, "<=8"), (64, "<=64"), (1024, "<=1024"), (None, ">1024"))
MODES = ("infer", "train")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _bucket(value: int, buckets) -> str:
    for limit, label in buckets:
        if limit is None or value <= limit:
            return label
    raise AssertionError("unreachable")


def shape_class(op: str, dtype: torch.dtype, experts: int, width: int, tokens: int, grad: bool) -> str:
    """The key of a call's shape class in the table, e.g. ``moe_mlp|bfloat16|E<=128|H<=2048|T>1024|train``."""
    return "|".join((op, _DTYPE_NAMES.get(dtype, str(dtype)), "E" + _bucket(experts, EXPERT_BUCKETS),
                     "H" + _bucket(width, WIDTH_BUCKETS), "T" + _bucket(tokens, TOKEN_BUCKETS),
                     "train" if grad else "infer"))


# ---- the table ------------------------------------------------------------------------------------------

_table_cache: dict = {}


def table_path() -> str:
    return os.environ.get("MOE_KERNELS_BACKEND_TABLE") or TABLE_PATH


def user_table_path() -> str:
    """Where ``moe-kernels tune`` writes the block of the user's GPU: ``backend_table.json`` in the user's cache
    (:func:`moe_kernels.user_cache.cache_dir`)."""
    return os.path.join(cache_dir(), "backend_table.json")


def block_in_force(device_label: str | None) -> tuple[dict, str]:
    """(block, file it came from) for a GPU model. ``MOE_KERNELS_BACKEND_TABLE`` names the only table read;
    otherwise the user's tuned table (:func:`user_table_path`) answers for a GPU model it has a block of, and
    the shipped table for every other (its own block for the model, else ``"*"``)."""
    if os.environ.get("MOE_KERNELS_BACKEND_TABLE"):
        path = table_path()
        return block_for(device_label, load_table(path)), path
    user = user_table_path()
    if device_label is not None:
        for block in load_table(user)["blocks"]:  # a missing file reads as no blocks
            if block.get("device") == device_label:
                return block, user
    return block_for(device_label, load_table(TABLE_PATH)), TABLE_PATH


def load_table(path: str | None = None) -> dict:
    """The table file (cached per path and modification time)."""
    path = path or table_path()
    try:
        stamp = os.path.getmtime(path)
    except OSError:
        return {"format": 1, "blocks": []}
    if _table_cache.get(path, (None,))[0] != stamp:
        with open(path) as f:
            table = json.load(f)
        if table.get("format") != 1 or not isinstance(table.get("blocks"), list):
            raise ValueError(f"{path}: not a moe_kernels backend table (format 1 with a list of blocks)")
        _table_cache[path] = (stamp, table)
    return _table_cache[path][1]


def device_name(device: torch.device | None = None) -> str | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def block_for(device_label: str | None, table: dict | None = None) -> dict:
    """The table's block for a GPU model: its own, else the ``"*"`` block, else an empty one."""
    table = table if table is not None else load_table()
    fallback = {"device": "*", "measured": False, "default": "triton", "entries": {}}
    for block in table["blocks"]:
        if device_label is not None and block.get("device") == device_label:
            return block
    for block in table["blocks"]:
        if block.get("device") == "*":
            return block
    return fallback


# (device index, table state) -> {"block": the block in force (read when first needed), "choices": {choice
# arguments: (backend, why)}}. The choices made from a block live with it, so whatever drops the block (a new
# table state, write_block, a test resetting this dict) drops them too.
_block_by_index: dict = {}


def _file_stamp(path: str):
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


# How long the table state (its variables and the answering file's stamp) is trusted before it is looked at again:
# auto on CUDA asks on every op call, and the four variable reads and the stat were most of its host time.
TABLE_RECHECK_S = 1.0
_state_cache: dict = {"until": float("-inf"), "state": None}


def _table_state() -> tuple:
    """What the block in force depends on besides the GPU model: ``MOE_KERNELS_BACKEND_TABLE``, the user's table
    path, and the state of the file that answers first (a table rewritten by another process, e.g. by
    ``moe-kernels tune``, is read again; a changed variable too). Looked at again at most every
    ``TABLE_RECHECK_S`` seconds. The shipped table changes only through write_block, which clears the cache."""
    now = time.monotonic()
    if now < _state_cache["until"]:
        return _state_cache["state"]
    table = os.environ.get("MOE_KERNELS_BACKEND_TABLE")
    user = user_table_path()
    state = (table, user, _file_stamp(table or user))
    _state_cache.update(until=now + TABLE_RECHECK_S, state=state)
    return state


def _entry_for_index(index: int) -> dict:
    key = (index, *_table_state())
    entry = _block_by_index.get(key)
    if entry is None:
        entry = _block_by_index[key] = {"choices": {}}
    return entry


def _block_of(entry: dict, index: int) -> dict:
    if "block" not in entry:
        entry["block"] = block_in_force(device_name(index))[0]
    return entry["block"]


def _block_for_device(device: torch.device) -> dict:
    # Cached per device index and table state: the lookup runs inside torch.compile tracing too, where the
    # device name query cannot be traced.
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _block_of(_entry_for_index(index), index)


def choose(op: str, device: torch.device, dtype: torch.dtype, experts: int, width: int, tokens: int, grad: bool,
           built: list[str]) -> tuple[str, str]:
    """(backend name, why) for one call on a CUDA device; ``built`` = backends that can run there.

    The shape becomes a class key here (plain comparisons: under torch.compile they become guards); the
    lookup itself reads files and device properties, so torch.compile takes its result as a constant."""
    key = shape_class(op, dtype, experts, width, tokens, grad)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _choose_constant(op, index, dtype, int(experts), key, tuple(built))


@torch.compiler.assume_constant_result
def _choose_constant(op: str, index: int, dtype: torch.dtype, experts: int, key: str, built: tuple) -> tuple[str, str]:
    # Eager calls run this every time: the answer is cached with the block it was read from (so it follows the
    # table state, see _table_state) per its arguments and the grouped-GEMM rule (a function of the arguments
    # and the device; part of the key so that a replaced rule, as tests do, is asked again).
    entry = _entry_for_index(index)
    choice_key = (op, dtype, experts, key, built, native.grouped_gemm_status)
    choice = entry["choices"].get(choice_key)
    if choice is None:
        choice = entry["choices"][choice_key] = _choose_uncached(op, index, dtype, experts, key, built, entry)
    return choice


def _choose_uncached(op: str, index: int, dtype: torch.dtype, experts: int, key: str, built: tuple,
                     entry: dict) -> tuple[str, str]:
    device = torch.device("cuda", index)
    candidates = [name for name in CHOICES if name in built]
    if not candidates:
        return ("reference", "neither triton nor cuda is built")
    if len(candidates) == 1:
        return (candidates[0], f"only {candidates[0]} is built")
    if op not in TABLE_OPS:
        return ("triton", f"{op}: not in the table (triton, the default)")
    if op in ("moe_mlp", "adapter_moe"):
        reason = native.grouped_gemm_status(device, dtype, experts)
        if reason is not None:
            return ("triton", f"cuda expert path has no fast grouped GEMM here: {reason}")
    block = _block_of(entry, index)
    found, row = entry_for(block, key)
    if row is None:
        return (block.get("default", "triton"), f"{key}: not in the table, block default")
    how = "measured" if row.get("measured") else "unmeasured default"
    return (row["backend"], f"{found}: {how} ({block.get('device')})")


def entry_for(block: dict, key: str) -> tuple[str, dict | None]:
    """(the key found, its entry) for a shape class in a block: the class itself, else for a decode class
    (``T<=8``) its ``T<=64`` class, else (key, None)."""
    entries = block.get("entries", {})
    if key in entries:
        return key, entries[key]
    enclosing = key.replace("|T<=8|", "|T<=64|")
    if enclosing != key and enclosing in entries:
        return enclosing, entries[enclosing]
    return key, None


# ---- measuring -------------------------------------------------------------------------------------------


def representative_shape(op: str, experts: str, width: str, tokens: str) -> dict:
    """One shape per class: (T, H, I or r, E, k), sized like the models of its class."""
    E = {"<=8": 8, "<=32": 32, "<=128": 128, ">128": 256}[experts]
    H = {"<=2048": 2048, ">2048": 4096}[width]
    # <=8: T*k <= 64 slots at every k here, triton's decode path (a T = 16 shape at k = 8 is planned, not decode)
    T = {"<=8": 4, "<=64": 16, "<=1024": 512, ">1024": 4096}[tokens]
    k = 2 if E <= 8 else 8
    if op == "moe_mlp":
        inner = {8: 4096, 32: 1408, 128: 768, 256: 512}[E]
    else:
        inner = 16
        k = min(k, 4)
    return dict(T=T, H=H, inner=inner, E=E, k=k)


def _case(op: str, shape: dict, device, dtype=torch.bfloat16):
    import moe_kernels as mk

    g = torch.Generator(device=device).manual_seed(0)
    T, H, inner, E, k = shape["T"], shape["H"], shape["inner"], shape["E"], shape["k"]
    x = (torch.randn(T, H, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    logits = torch.randn(T, E, device=device, generator=g)
    weights, ids = mk.route(logits, k, backend="cuda")
    if op == "moe_mlp":
        w1 = (torch.randn(E, 2 * inner, H, device=device, generator=g) * H ** -0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(E, H, inner, device=device, generator=g) * inner ** -0.5).to(dtype).requires_grad_()

        def run(backend):
            return mk.moe_mlp(x, w1, w2, weights, ids, backend=backend)
    else:
        w1 = (torch.randn(E, inner, H, device=device, generator=g) * H ** -0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(E, H, inner, device=device, generator=g) * inner ** -0.5).to(dtype).requires_grad_()

        def run(backend):
            return mk.adapter_moe(x, w1, w2, weights, ids, backend=backend)
    grad = torch.randn(T, H, device=device, generator=g).to(dtype)
    leaves = (x, w1, w2)

    def infer(backend):
        with torch.no_grad():
            run(backend)

    def train(backend):
        torch.autograd.grad(run(backend), leaves, grad)

    return infer, train


def majority_backend(entries: dict) -> str:
    """The block default: the backend that won the most measured classes (triton on a tie or with none), so that a
    class the table lacks (another dtype, a class left unmeasured) takes the usual winner on this GPU."""
    wins = {name: 0 for name in CHOICES}
    for row in entries.values():
        if row.get("measured") and row.get("backend") in wins:
            wins[row["backend"]] += 1
    best = max(wins.values())
    return "triton" if wins.get("triton") == best else max(wins, key=wins.get)


def measure(budget_s: float = 45.0, repeats: int = 5, ops=TABLE_OPS, log=print) -> dict:
    """Times triton and cuda on each shape class's representative shape (bfloat16) on the current GPU; returns
    the table block for it. Classes left when the budget runs out keep an unmeasured entry."""
    from .bench.timing import median_call_ms

    if not torch.cuda.is_available():
        raise RuntimeError("measuring the backend table needs a CUDA GPU")
    from .backends import BackendError, available_backends

    built = available_backends()
    missing = [name for name in CHOICES if name not in built]
    if missing:
        raise RuntimeError(f"both triton and cuda must be built to measure, missing: {missing}")
    device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    entries = {}
    # Token buckets outermost and the ops interleaved, so a short budget still covers both ops' small shapes.
    order = [(op, e, w, t) for t in ("<=8", "<=64", "<=1024", ">1024") for e in ("<=8", "<=32", "<=128", ">128")
             for w in ("<=2048", ">2048") for op in ops]
    for op, e_bucket, w_bucket, t_bucket in order:
        shape = representative_shape(op, e_bucket, w_bucket, t_bucket)
        out_of_time = time.perf_counter() - start > budget_s
        try:
            cases = None if out_of_time else _case(op, shape, device)
        except torch.OutOfMemoryError:
            cases = None
        for mode_index, mode in enumerate(MODES):
            key = "|".join((op, "bfloat16", "E" + e_bucket, "H" + w_bucket, "T" + t_bucket, mode))
            if cases is None:
                entries[key] = {"backend": "triton", "measured": False, "shape": shape,
                                "note": "out of time budget or memory: unmeasured default"}
                continue
            times = {}
            for backend in CHOICES:
                try:
                    times[backend] = round(median_call_ms(lambda: cases[mode_index](backend), repeats, True)[0], 4)
                except (BackendError, RuntimeError) as exc:  # e.g. out of memory on one backend
                    times[backend] = None
                    log(f"  {key} {backend}: {exc}")
            valid = {b: v for b, v in times.items() if v is not None}
            best = min(valid, key=valid.get) if valid else "triton"
            entries[key] = {"backend": best, "measured": bool(valid), "ms": times, "shape": shape}
            log(f"{key:<52} triton {times['triton']} ms, cuda {times['cuda']} ms -> {best}")
        del cases
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(device), "measured": True, "default": majority_backend(entries),
            "torch": torch.__version__, "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "how": f"median of {repeats} runs, CUDA events, bfloat16; python -m moe_kernels.backend_table --write",
            "entries": entries}


def write_block(block: dict, path: str | None = None) -> str:
    """Replaces (or adds) the table's block for ``block['device']`` and writes the file."""
    path = path or table_path()
    table = load_table(path) if os.path.exists(path) else {"format": 1, "blocks": []}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = dict(table, blocks=[b for b in table["blocks"] if b.get("device") != block["device"]] + [block])
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=False)
        f.write("\n")
    _table_cache.pop(path, None)
    _block_by_index.clear()
    _state_cache["until"] = float("-inf")
    return path


def describe(device: torch.device | None = None) -> list[str]:
    """Lines for ``moe-kernels info``: the table file and the block in force for the local GPU."""
    label = device_name(device)
    try:
        block, path = block_in_force(label)
    except (OSError, ValueError) as exc:
        return [f"backend table: unreadable ({exc})"]
    status = "measured" if block.get("measured") else "UNMEASURED defaults (run moe-kernels tune on this GPU)"
    lines = [f"backend table {path}", f"  block in force: device {block.get('device')!r} for local GPU {label!r}: {status}",
             f"  default for classes not listed: {block.get('default', 'triton')}; the cuda expert path only where "
             "torch's CUTLASS grouped GEMM runs (bfloat16, sm90/sm100)"]
    entries = block.get("entries", {})
    for key in sorted(entries):
        entry = entries[key]
        times = entry.get("ms")
        timing = ", ".join(f"{b} {v} ms" for b, v in times.items()) if times else "unmeasured"
        lines.append(f"  {key:<52} {entry['backend']:<7} ({timing})")
    return lines


def tune_main(argv=None) -> int:
    """``moe-kernels tune``: measure the block of the local GPU and write it to the user's cache table, which
    ``auto`` then reads for this GPU model (every process; no environment variable needed)."""
    parser = argparse.ArgumentParser(
        prog="moe-kernels tune",
        description="Measure triton against cuda per shape class on the local GPU and write the result to your "
                    f"cache ({user_table_path()}); backend='auto' then reads it for this GPU model.")
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of measuring before the rest is left "
                        "unmeasured (default 45)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", default=",".join(TABLE_OPS), help="comma-separated ops to measure")
    parser.add_argument("--table", default=None, help=f"file to write (default {user_table_path()})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe-kernels tune: no CUDA GPU here; the table holds measurements of a GPU, so run it on one",
              file=sys.stderr)
        return 2
    block = measure(args.budget, args.repeats, tuple(args.ops.split(",")))
    path = write_block(block, args.table or user_table_path())
    print(f"wrote the block for {block['device']} to {path}")
    print("\n".join(describe()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.backend_table",
                                     description="Show, or measure and write, the auto backend table (the shipped "
                                     "file by default: for maintainers; users run moe-kernels tune).")
    parser.add_argument("--write", action="store_true", help="measure on the local GPU and write its block")
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of measuring before the rest is left "
                        "unmeasured (default 45)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", default=",".join(TABLE_OPS), help="comma-separated ops to measure")
    parser.add_argument("--table", default=None, help="table file (default: MOE_KERNELS_BACKEND_TABLE or the shipped one)")
    args = parser.parse_args(argv)
    if args.write:
        block = measure(args.budget, args.repeats, tuple(args.ops.split(",")))
        path = write_block(block, args.table)
        print(f"wrote the block for {block['device']} to {path}")
    if args.table:
        os.environ["MOE_KERNELS_BACKEND_TABLE"] = args.table
    print("\n".join(describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
