"""Backend registry: which implementation runs an op, and why.

A backend is an object with the methods of :class:`Backend`. Backends live in their own modules and
are imported lazily (importing triton is slow), so ``import moe_kernels`` stays cheap.

Selection, in order: the ``backend=`` argument, then ``MOE_KERNELS_BACKEND``, then the default for
the tensors' device: on CUDA ``auto`` -- triton or cuda per op and shape class, from the table of
:mod:`moe_kernels.backend_table` (only what is built; reference when neither is) --, on CPU cpu if the
C++ extension is built, else reference. ``"auto"`` may be named explicitly too (on CPU it is the CPU
default). Asking for a backend that is not built, or that cannot run on the tensors' device, raises
:class:`BackendError` -- there is never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
AUTO = "auto"  # not a backend: the per-op, per-shape choice (see resolve_backend)

# name -> "module:attribute" of the Backend instance
_LOADERS = {
    "reference": "moe_kernels.reference:BACKEND",
    "cpu": "moe_kernels.native:CPU_BACKEND",
    "cuda": "moe_kernels.native:CUDA_BACKEND",
    "triton": "moe_kernels.triton:BACKEND",
}

_cache: dict[str, "Backend | Exception"] = {}
# Per device: the default backend's name, and the auto candidates (triton, cuda) that are built and run there.
# What is built and which devices a backend takes are fixed per process (module constants of the backends),
# so each is worked out once; clear_caches() forgets them (tests that patch a backend's availability).
_default_by_device: dict = {}
_auto_built_by_device: dict = {}


def clear_caches() -> None:
    """Forget the per-device answers of :func:`default_backend_name` and of ``auto``'s built backends."""
    _default_by_device.clear()
    _auto_built_by_device.clear()


class BackendError(RuntimeError):
    """A backend was asked for that is not built, cannot run on these tensors, or lacks a feature."""


class Plan(NamedTuple):
    """Dispatch plan of routed slots (slot ``s = t * k + j`` is token t's j-th choice).

    expert_offsets: [E+1] int32; expert e owns sorted positions ``expert_offsets[e]:expert_offsets[e+1]``.
    sorted_slots:   [T*k] int32; the slot at each sorted position (stable: slots ascend within an expert).
    slot_positions: [T*k] int32; the inverse permutation: sorted position of each slot.
    """

    expert_offsets: torch.Tensor
    sorted_slots: torch.Tensor
    slot_positions: torch.Tensor


_capabilities: dict = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, asked of the driver once per device index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def fp32_int32_routing(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weights float32 and ids int32, both contiguous: the inputs themselves when they already are (no call, which
    would return them too after a microsecond of argument parsing each), else one conversion each."""
    if not (weights.dtype is torch.float32 and weights.is_contiguous()):
        weights = weights.float().contiguous()
    if not (ids.dtype is torch.int32 and ids.is_contiguous()):
        ids = ids.to(torch.int32).contiguous()
    return weights, ids


class Backend:
    """Interface every backend implements. ``moe_kernels.ops`` calls the methods by keyword, with arguments it
    validated and normalised once: ``ids`` int32 contiguous [T,k] in range, ``weights`` float32 contiguous
    [T,k] -- except ``moe_mlp``, which gets the routing in the dtypes the caller gave (contiguous, ``weights``
    float32 or x's dtype, ``ids`` int32 or int64: a Hugging Face router's) so that a kernel able to read them
    as they are saves the two conversion launches per call (a decode step's MoE layer is a handful of launches);
    its backends call :func:`fp32_int32_routing` where their kernels need the normalised form. ``route`` writes its
    outputs in the dtypes the caller asked for (``weights_dtype`` float32, float16 or bfloat16, ``ids_dtype`` int32
    or int64, both given as torch dtypes), so a Hugging Face router needs no conversion launches either -- tensors on one
    device, T >= 1, activation a name of :mod:`moe_kernels.spec`, ``n_group`` /
    ``topk_group`` None for no group limit, ``swiglu_limit`` None or a float, ``softcaps`` None or a pair of floats > 0
    (only with "softcap_swiglu"), flags as bools. Backends take
    them as they are (no conversion, no re-check; a kernel op may convert at its own boundary, once).
    Every method must be differentiable where the public op is (autograd.Function or torch.library op)."""

    name = "?"

    def unavailable_reason(self) -> str | None:
        """None if this backend is built and importable, else why not."""
        return None

    def device_error(self, device: torch.device) -> str | None:
        """None if this backend can run on tensors of ``device``, else why not."""
        return None

    def route(self, logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale, weights_dtype, ids_dtype):
        raise BackendError(f"backend '{self.name}' has no route")

    def plan(self, ids, num_experts) -> Plan:
        raise BackendError(f"backend '{self.name}' has no plan")

    def moe_mlp(self, x, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                interleaved, swiglu_limit, gated, softcaps):
        raise BackendError(f"backend '{self.name}' has no moe_mlp")

    def adapter_moe(self, h, down, up, weights, ids, activation, scale):
        raise BackendError(f"backend '{self.name}' has no adapter_moe")


def _load(name: str) -> "Backend | Exception":
    if name not in _cache:
        module_name, attr = _LOADERS[name].split(":")
        try:
            _cache[name] = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # noqa: BLE001 - reported to the user by get_backend
            _cache[name] = exc
    return _cache[name]


def preload(names=("reference", "cpu", "cuda")) -> None:
    """Import cheap backends now, so their first use inside ``torch.compile`` tracing needs no import."""
    for name in names:
        _load(name)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises BackendError if unknown or not built."""
    # (isinstance first: an unhashable name such as a list raised TypeError from the dict lookup)
    if not isinstance(name, str) or name not in _LOADERS:
        raise BackendError(f"backend must be one of {list(BACKEND_NAMES) + [AUTO]}, got {name!r}; "
                           f"available here: {available_backends()}")
    backend = _load(name)
    if isinstance(backend, Exception):
        raise BackendError(f"backend '{name}' could not be loaded: {backend}; available here: {available_backends()}")
    reason = backend.unavailable_reason()
    if reason is not None:
        raise BackendError(f"backend '{name}' is not available: {reason}; available here: {available_backends()}")
    return backend


def available_backends() -> list[str]:
    """Names of the backends that are built and importable in this process (any device)."""
    names = []
    for name in BACKEND_NAMES:
        backend = _load(name)
        if not isinstance(backend, Exception) and backend.unavailable_reason() is None:
            names.append(name)
    return names


def default_backend_name(device: torch.device) -> str:
    name = _default_by_device.get(device)
    if name is None:
        name = _default_by_device[device] = _default_backend_name(device)
    return name


def _default_backend_name(device: torch.device) -> str:
    if device.type == "cuda":
        preferred = ("triton", "cuda", "reference")
    elif device.type == "cpu":
        preferred = ("cpu", "reference")
    else:
        preferred = ("reference",)
    built = available_backends()
    for name in preferred:
        if name in built and get_backend(name).device_error(device) is None:
            return name
    return "reference"


# route() has no shape table: its cuda kernels won every routing case measured against triton (forward and
# forward+backward, T = 1 and 16384, E = 8, 128 and DeepSeek-V3's grouped 256) on an H100 (2026-11-26) and an
# H200 (2026-11-27): benchmarks/RESULTS_GPU.md.
ROUTE_ON_CUDA_WHY = "route: cuda, faster than triton in every routing case measured (H100, H200)"


def auto_backend_name(device: torch.device, op: str | None = None, shape=None) -> tuple[str, str]:
    """(backend name, why) of ``auto`` for one call: on CUDA the backend table's choice for the op's shape
    class (``shape``: dtype, experts, width, tokens, grad, as a dict or a callable returning one) among the
    built backends; elsewhere the device default."""
    if device.type != "cuda":
        return default_backend_name(device), f"{device.type}: the device default"
    built = _auto_built_by_device.get(device)
    if built is None:
        available = available_backends()
        built = _auto_built_by_device[device] = tuple(name for name in ("triton", "cuda") if name in available
                                                      and get_backend(name).device_error(device) is None)
    if op == "route" and "cuda" in built:
        return "cuda", ROUTE_ON_CUDA_WHY
    if op is None or shape is None or len(built) < 2:
        return default_backend_name(device), "no shape to choose by" if len(built) == 2 else "one backend built"
    if callable(shape):
        shape = shape()  # the ops pass it lazily: only this branch looks at it
    from .backend_table import choose

    return choose(op, device, built=built, **shape)


def resolve_backend(name: str | None, device: torch.device, op: str | None = None, shape=None) -> Backend:
    """Pick the backend for an op on tensors of ``device`` (see module docstring for the order). ``op`` and
    ``shape`` (dtype, experts, width, tokens, grad; or a callable returning them, called only when ``auto``
    chooses by shape) let ``auto`` choose per shape class."""
    from_env = False
    if name is None:
        name = os.environ.get("MOE_KERNELS_BACKEND") or None
        from_env = name is not None
    if name is None:
        name = AUTO if device.type == "cuda" else default_backend_name(device)
    if name == AUTO:
        name = auto_backend_name(device, op, shape)[0]
    try:
        backend = get_backend(name)
    except BackendError as exc:
        if from_env:  # the caller passed no backend=: say where the name came from
            raise BackendError(f"{exc} (set by the MOE_KERNELS_BACKEND environment variable)") from None
        raise
    reason = backend.device_error(device)
    if reason is not None:
        usable = [n for n in available_backends() if get_backend(n).device_error(device) is None]
        raise BackendError(f"backend '{name}' cannot run on {device} tensors: {reason}; backends that can here: "
                           f"{usable}" + (" (set by the MOE_KERNELS_BACKEND environment variable)" if from_env else ""))
    return backend
