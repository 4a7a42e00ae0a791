"""Input checks for the public entry points.

Shape, dtype and device checks are free (metadata only) and always run. Value checks (NaN logits,
ids out of range) need the data: they always run on CPU tensors, and on accelerators only in debug
mode (``MOE_KERNELS_DEBUG=1`` or :func:`set_debug`), so the GPU hot path never waits on a host sync.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_debug = os.environ.get("MOE_KERNELS_DEBUG", "0") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Enable value checks (NaN logits, ids range) on accelerator tensors too. They cost a host sync."""
    global _debug
    _debug = bool(enabled)


def value_checks_enabled(t: torch.Tensor) -> bool:
    # The cheap flag first: on accelerators outside debug mode (the hot path) nothing else is asked.
    if not (_debug or t.is_cpu):  # (is_cpu: a fifth of the cost of device.type)
        return False
    return not torch.compiler.is_compiling()  # data-dependent checks would break the graph; eager runs check


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> torch.device:
    # One pass, no intermediate list: this runs on every call of every op.
    first = device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            first, device = name, t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}; "
                             "all tensors must be on one device")
    return device


def check_dim(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: expected {what} = {expected}, got {actual}")


def check_hidden(x: torch.Tensor, hidden_size: int) -> None:
    """A layer's input [..., H]: its last dim must be H (reshape(-1, H) would silently regroup another width)."""
    if x.dim() < 1 or x.shape[-1] != hidden_size:
        raise ValueError(f"x: expected last dim = hidden_size = {hidden_size}, got shape {tuple(x.shape)}")


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """An int in [low, high] (high None: no upper bound). bool is refused: it is an int subclass, so True would pass
    as 1 (a silent one-expert plan on the kernels, an obscure torch error on the oracle)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


def check_number(name: str, value) -> None:
    """A finite int or float, not a bool (True would silently mean 1.0); symbolic while torch.compile traces."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite_or_traced(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_flag(name: str, value) -> None:
    """A bool flag. bool(value) would turn the string "false" (a config value) into True without a word."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def finite_or_traced(value) -> bool:
    """``math.isfinite(value)``, or True while torch.compile traces. A float argument can then be a symbolic value
    (``dynamic=True``, or a float that changed between calls) that Python cannot test; the backend ops check the
    concrete value they are called with instead (csrc/common/op_args.h; :func:`check_finite_scalars` in the
    Triton ops), so nothing non-finite runs either way."""
    return torch.compiler.is_compiling() or math.isfinite(value)


def check_finite_scalars(**values) -> None:
    """A backend op's float arguments (None: not given) are finite: the run-time half of :func:`finite_or_traced`."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_top_k(k, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= num_experts = {num_experts}, got k = {k}")


def check_finite_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """NaN or +inf logits have no defined routing; -inf (a masked expert) is allowed, but not in every column of a
    row (a token with no expert left: its softmax is 0/0). ``name``: a 1-D selection bias is checked the same way."""
    if value_checks_enabled(logits) and logits.numel():
        # One reduction finds all three: the max is NaN when any entry is NaN (max propagates NaN), else +inf
        # when any entry is +inf; only a -inf min needs the per-row look.
        smallest, largest = (float(v) for v in torch.aminmax(logits.detach()))
        if largest != largest:
            raise ValueError(f"{name} contains NaN; routing is undefined (see README: error behaviour)")
        if largest == float("inf"):
            raise ValueError(f"{name} contains +inf; routing is undefined (see README: error behaviour)")
        if smallest == float("-inf") and logits.dim() == 2:
            masked_rows = (logits == float("-inf")).all(dim=1).nonzero()
            if len(masked_rows):
                raise ValueError(f"{name} row {int(masked_rows[0])} is -inf in every column: no expert is left to "
                                 "route to")


def check_ids_in_range(ids: torch.Tensor, num_experts: int, source: str = "") -> None:
    """ids values in [0, num_experts) (on CPU tensors always, on GPUs in debug mode: the check syncs)."""
    if value_checks_enabled(ids) and ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))  # one pass for both bounds
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"ids must lie in [0, {num_experts}){source}, got values in [{lo}, {hi}]")


def check_routing(weights, ids, num_tokens: int, num_experts: int, x_dtype: torch.dtype) -> None:
    """weights [T,k] float32 or x's dtype; ids [T,k] int32/int64 with values in [0, E)."""
    check_tensor("ids", ids, 2, dtypes=None)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must have dtype int32 or int64, got {str(ids.dtype).replace('torch.', '')}")
    # Common case first (no set built per call); anything else goes through the full check and its message.
    if not (isinstance(weights, torch.Tensor) and weights.dim() == 2
            and (weights.dtype is torch.float32 or weights.dtype is x_dtype)):
        check_tensor("weights", weights, 2, dtypes=tuple({torch.float32, x_dtype}))
    shape = ids.shape
    if weights.shape != shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)} but ids has shape {tuple(shape)}; "
                         "they must match")
    check_dim("ids", shape[0], num_tokens, "number of tokens (rows of x)")
    k = shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"ids has k = {k} choices per token; expected 1 <= k <= num_experts = {num_experts}")
    check_ids_in_range(ids, num_experts, " (num_experts from the expert weights)")
