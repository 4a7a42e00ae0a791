"""The ``"moe_kernels"`` experts implementation for transformers' ``ExpertsInterface``.

Importing this module registers :func:`moe_kernels_experts_forward` under the name ``"moe_kernels"``,
so ``model.set_experts_implementation("moe_kernels")`` and
``from_pretrained(..., experts_implementation="moe_kernels")`` route every experts module built with
``@use_experts_implementation`` through :func:`moe_kernels.moe_mlp`.

The function reads the weights from the module at call time (never a cached copy), so wrappers that
swap parameters during the forward -- PEFT's ``target_parameters`` LoRA, parametrizations -- keep
working. It honours the module's layout flags set by ``use_experts_implementation``:

* ``is_transposed``: weights stored [E, H, 2I] / [E, I, H]; passed to the kernel as transposed views.
* ``has_bias``: ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H].
* gate (:func:`gate_form`, read from the class's ``_apply_gate`` source): the default ``act(gate) * up`` on
  concatenated halves; its clamped form (DeepSeek-V4, GLM-5-next, HunYuan-V4; ``swiglu_limit``); GPT-OSS's
  clamped SwiGLU (``activation="gpt_oss"``) on interleaved rows (GPT-OSS) or concatenated halves (MiniMax-M3-VL,
  OpenAI privacy filter). Other gates are refused.
* ``has_gate=False`` (``act(up_proj x)``, e.g. Nemotron-H with its ReLU^2): ``moe_mlp(..., gated=False)`` on
  ``up_proj`` as it is (no copy, one GEMM of width I).
* ``has_post_expert_norm`` (MuseSpark: the module's ``post_expert_norm`` between each expert's output and its
  routing weight): one row per (token, choice) through ``moe_mlp`` with unit weights, the module's own norm on
  those rows, then the weighted sum over the k choices in fp32 (a copy of x per choice; the fused weighting of
  the other families cannot hold a norm in between).
* Expert parallelism (sentinel ids) is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import activations as hf_act  # here, not in activation_name: torch.compile traces that

import moe_kernels
from moe_kernels.reference import GPT_OSS_ALPHA
from moe_kernels.spec import GATED_ACTIVATIONS

EXPERTS_IMPLEMENTATION = "moe_kernels"
BACKEND_ATTRIBUTE = "_moe_kernels_backend"  # set on a module by moe_kernels.hf.apply(..., backend=...)


class UnsupportedExpertsError(NotImplementedError):
    """An experts module uses a feature the moe_kernels experts implementation cannot run exactly."""


def activation_name(act_fn: nn.Module) -> str:
    """Map a transformers activation module (``ACT2FN[config.hidden_act]``) to a moe_kernels activation."""
    if isinstance(act_fn, (hf_act.SiLUActivation, nn.SiLU)):
        return "silu"
    if isinstance(act_fn, nn.ReLU):
        return "relu"
    if isinstance(act_fn, hf_act.GELUTanh) or (isinstance(act_fn, nn.GELU) and act_fn.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(act_fn, hf_act.GELUActivation) and type(act_fn) is hf_act.GELUActivation:
        return "gelu"
    if isinstance(act_fn, nn.GELU) and act_fn.approximate == "none":
        return "gelu"
    if type(act_fn) is getattr(hf_act, "ReLUSquaredActivation", None):
        return "relu2"
    raise UnsupportedExpertsError(
        f"moe_kernels experts: activation {type(act_fn).__name__} is not supported; supported are SiLU/swish, "
        "GELU (exact), GELU (tanh: gelu_pytorch_tanh), ReLU and ReLU^2 (relu2, experts without a gate)")


def normalised_source(fn) -> str | None:
    """Source of ``fn`` with comments dropped and whitespace collapsed (to compare code copied between
    transformers families); None when the source is unavailable."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    source = re.sub(r"#[^\n]*", "", source)
    return re.sub(r"\s+", " ", source).strip()


def source_hash(*fns) -> str | None:
    """A short hash of the normalised source of ``fns`` together (None when one has no source): what the HF
    integration pins the transformers code it reproduces by (router variants, block variants)."""
    sources = [normalised_source(fn) for fn in fns]
    if any(source is None for source in sources):
        return None
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


# The recognised forms of an experts class's ``_apply_gate`` (transformers copies them between families with small
# differences: attribute names, ``min=None``, ``1`` or ``1.0``, a named temporary, fp32 math). Matched against the
# normalised source (normalised_source), so only code known to compute one of moe_mlp's activations is accepted.
_GATE_HEAD = r"def _apply_gate\(self, gate_up(?:: torch\.Tensor)?\)(?: -> torch\.Tensor)?: "
_GATE_SPLIT = (r"gate, up = (?:(?P<chunk>gate_up\.chunk\(2, dim=-1\))"
               r"|(?P<interleaved>gate_up\[\.\.\., ::2\], gate_up\[\.\.\., 1::2\])) ")
_GATE_CLAMP = (r"(?:gate = gate\.clamp\((?:min=None, )?max=self\.(?P<limit>\w+)\) "
               r"up = up\.clamp\(min=-self\.(?P=limit), max=self\.(?P=limit)\) )?")
_GATE_TAILS = {
    # GPT-OSS's SwiGLU: (up + 1) * gate * sigmoid(alpha * gate)
    "gpt_oss": r"glu = gate \* torch\.sigmoid\(gate \* self\.(?P<alpha>\w+)\) "
               r"(?:return \(up \+ 1(?:\.0)?\) \* glu|gated_output = \(up \+ 1(?:\.0)?\) \* glu return gated_output)",
    # act(gate) * up: the module's act_fn or SiLU, in the input dtype or in fp32 (Beam), which the kernels use anyway
    "act": r"return (?:(?P<act>self\.act_fn|F\.silu)\(gate\) \* up"
           r"|\((?P<act32>self\.act_fn)\(gate\.float\(\)\) \* up\.float\(\)\)\.to\(gate\.dtype\))",
    # the module's act_fn takes both halves (Inkling2's soft-capped SwiGLU; softcap_caps reads which one it is)
    "act_pair": r"return self\.act_fn\(gate, up\)",
}
# Inkling2's SoftcappedSwiGLU.forward and its Softcap.forward, as normalised_source writes them
_SOFTCAP_SWIGLU_FORWARD = (r"def forward\(self, gate(?:: torch\.Tensor)?, up(?:: torch\.Tensor)?\)(?: -> torch\.Tensor)?: "
                           r"input_dtype = gate\.dtype gate, up = gate\.float\(\), up\.float\(\) "
                           r"return \(self\.gate_softcap\(gate\) \* torch\.sigmoid\(gate\) \* "
                           r"self\.up_softcap\(up\)\)\.to\(input_dtype\)")
_SOFTCAP_FORWARD = (r"def forward\(self, hidden_states(?:: torch\.Tensor)?\)(?: -> torch\.Tensor)?: "
                    r"return torch\.tanh\(hidden_states / self\.softcap\) \* self\.softcap")


_SOURCE_MATCHES: dict[tuple, bool] = {}


# Folded at trace time by torch.compile, as gate_form is (reading source cannot be traced).
@torch.compiler.assume_constant_result
def forward_matches(module_class: type, pattern: str) -> bool:
    """Whether ``module_class.forward``'s normalised source matches ``pattern`` (cached per class and pattern)."""
    key = (module_class, pattern)
    if key not in _SOURCE_MATCHES:
        source = normalised_source(module_class.forward)
        _SOURCE_MATCHES[key] = bool(source) and re.fullmatch(pattern, source) is not None
    return _SOURCE_MATCHES[key]


def softcap_caps(act_fn: nn.Module) -> tuple[float, float] | None:
    """(gate_cap, up_cap) when ``act_fn`` computes Inkling2's soft-capped SwiGLU (read from its class's source),
    else None."""
    if not forward_matches(type(act_fn), _SOFTCAP_SWIGLU_FORWARD):
        return None
    caps = []
    for name in ("gate_softcap", "up_softcap"):
        cap_module = getattr(act_fn, name, None)
        cap = getattr(cap_module, "softcap", None)
        if (not isinstance(cap_module, nn.Module) or not forward_matches(type(cap_module), _SOFTCAP_FORWARD)
                or type(cap) not in (int, float)):
            return None
        caps.append(float(cap))
    return caps[0], caps[1]


@dataclass(frozen=True)
class GateForm:
    """How an experts class gates: ``kind`` "act" (act(gate) * up: transformers' default ``_apply_gate`` or a
    recognised copy), "gpt_oss" (GPT-OSS's SwiGLU), "act_pair" (``self.act_fn(gate, up)``: a two-input activation
    module, see :func:`softcap_caps`) or "custom" (unrecognised); the split of the pre-activation
    (``interleaved`` rows or concatenated halves); the attributes holding the clamp limit (None: no clamp) and
    GPT-OSS's alpha; ``act_fn``: whether the activation is the module's ``act_fn`` (else SiLU, written in the
    source)."""
    kind: str
    interleaved: bool = False
    limit_attribute: str | None = None
    alpha_attribute: str | None = None
    act_fn: bool = True


_GATE_FORMS: dict[type, GateForm] = {}  # reading source is slow; a class's gate does not change


# torch.compile calls it at trace time and folds its result into the graph: reading source cannot be traced, and a
# graph break per MoE layer would split every compiled forward (fullgraph=True would refuse the model).
@torch.compiler.assume_constant_result
def gate_form(experts_class: type) -> GateForm:
    """The :class:`GateForm` of an experts class, from its ``_apply_gate`` (cached per class)."""
    form = _GATE_FORMS.get(experts_class)
    if form is None:
        form = _GATE_FORMS[experts_class] = _read_gate_form(experts_class)
    return form


def _clear_source_caches() -> None:
    _GATE_FORMS.clear()
    _SOURCE_MATCHES.clear()


gate_form.cache_clear = _clear_source_caches  # as an lru_cache's: tests start from a fresh process's state


def _read_gate_form(experts_class: type) -> GateForm:
    from .compat import default_apply_gate

    gate = getattr(experts_class, "_apply_gate", None)
    if gate is None or gate is default_apply_gate():
        return GateForm("act")
    source = normalised_source(gate)
    for kind, tail in _GATE_TAILS.items():
        match = source and re.fullmatch(_GATE_HEAD + _GATE_SPLIT + _GATE_CLAMP + tail, source)
        if match:
            return GateForm(kind, interleaved=match.group("interleaved") is not None,
                            limit_attribute=match.group("limit"),
                            alpha_attribute=match.group("alpha") if kind == "gpt_oss" else None,
                            act_fn=kind != "act" or match.group("act") != "F.silu")
    return GateForm("custom")


def describe_experts(module: nn.Module) -> dict:
    """How :func:`moe_kernels_experts_forward` runs this experts module: activation, layout and limits.

    Raises :class:`UnsupportedExpertsError` naming the feature when it cannot run the module exactly.
    """
    name = type(module).__name__
    if not hasattr(module, "has_gate"):
        raise UnsupportedExpertsError(f"{name} is not an experts module built with @use_experts_implementation")
    post_norm = bool(getattr(module, "has_post_expert_norm", False))
    if post_norm and not isinstance(getattr(module, "post_expert_norm", None), nn.Module):
        raise UnsupportedExpertsError(f"{name}: has_post_expert_norm=True but no post_expert_norm module")
    form = gate_form(type(module))
    is_concatenated = getattr(module, "is_concatenated", True)
    info = {"transposed": bool(getattr(module, "is_transposed", False)), "bias": bool(module.has_bias),
            "has_gate": bool(module.has_gate), "swiglu_limit": None, "interleaved": False, "softcaps": None,
            "post_expert_norm": post_norm}
    if not module.has_gate:
        info.update(activation=activation_name(module.act_fn))
        return info
    if form.kind == "custom":
        raise UnsupportedExpertsError(
            f"{name} overrides _apply_gate with a gate moe_kernels does not know; supported gates are "
            "act(gate) * up, its clamped form (DeepSeek-V4), GPT-OSS's SwiGLU and Inkling2's soft-capped SwiGLU")
    if form.interleaved == is_concatenated:
        raise UnsupportedExpertsError(
            f"{name}: its _apply_gate splits gate/up {'interleaved' if form.interleaved else 'in halves'} but "
            f"is_concatenated={is_concatenated}")
    if form.kind == "act_pair":
        caps = softcap_caps(module.act_fn)
        if caps is None:
            raise UnsupportedExpertsError(
                f"{name}: its _apply_gate calls act_fn(gate, up) with {type(module.act_fn).__name__}, which "
                "moe_kernels does not know (it runs Inkling2's soft-capped SwiGLU)")
        info.update(activation="softcap_swiglu", softcaps=caps, interleaved=form.interleaved)
        if form.limit_attribute is not None:
            raise UnsupportedExpertsError(f"{name}: a clamp before the soft-capped SwiGLU is not supported")
        return info
    if form.kind == "gpt_oss":
        alpha = float(getattr(module, form.alpha_attribute, GPT_OSS_ALPHA))
        if abs(alpha - GPT_OSS_ALPHA) > 1e-12:
            raise UnsupportedExpertsError(
                f"{name}: GPT-OSS gate with alpha={alpha}; moe_kernels fixes alpha={GPT_OSS_ALPHA}")
        info["activation"] = "gpt_oss"
    else:
        activation = activation_name(module.act_fn) if form.act_fn else "silu"
        if activation not in GATED_ACTIVATIONS:  # relu2: elementwise only
            raise UnsupportedExpertsError(
                f"{name}: activation {type(module.act_fn).__name__} in a gated MLP; moe_kernels gates with "
                f"{', '.join(a for a in GATED_ACTIVATIONS if a not in ('gpt_oss', 'softcap_swiglu'))}")
        info["activation"] = activation
    info["interleaved"] = form.interleaved
    if form.limit_attribute is not None:
        limit = getattr(module, form.limit_attribute, None)
        number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
        if number and math.isfinite(limit) and limit > 0:
            info["swiglu_limit"] = float(limit)
        elif not (number and limit == math.inf):  # a clamp at +inf changes nothing; anything else is refused
            raise UnsupportedExpertsError(
                f"{name}: clamp limit {form.limit_attribute}={limit!r} is not a finite number > 0")
    return info


_DESCRIPTION_ATTRIBUTE = "_moe_kernels_description"  # (key, description) cached in the module's __dict__
# the layout flags describe_experts reads; the clamp limit and GPT-OSS's alpha are read under the names the
# class's gate form gives them (gate_form), so a key reads exactly what the description depends on
_DESCRIBED_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
_PLAIN = (bool, int, float, str, type(None))


def _description_key(module: nn.Module) -> tuple | None:
    """What :func:`describe_experts` reads from the module: the class, the activation module and its
    ``approximate`` (activation_name reads it), the layout flags and the gate's limit and alpha. None (not cached)
    when one of them is not a plain value (a tensor, e.g. a buffer, could change in place)."""
    act_fn = getattr(module, "act_fn", None)
    cls = type(module)
    key = [cls, act_fn, type(act_fn), getattr(act_fn, "approximate", None)]
    form = gate_form(cls)
    for name in (*_DESCRIBED_FLAGS, form.limit_attribute, form.alpha_attribute):
        value = getattr(module, name, None) if name is not None else None
        if type(value) not in _PLAIN:
            return None
        key.append(value)
    if form.kind == "act_pair":  # the soft caps live on act_fn's submodules
        for name in ("gate_softcap", "up_softcap"):
            value = getattr(getattr(act_fn, name, None), "softcap", None)
            if type(value) not in _PLAIN:
                return None
            key.append(value)
    return tuple(key)


def _settings(module: nn.Module) -> tuple[dict, str | None]:
    """(describe_experts(module), the module's backend) for one forward."""
    if torch.compiler.is_compiling():  # traced (constant-folded) as before; no module state written
        return describe_experts(module), getattr(module, BACKEND_ATTRIBUTE, None)
    return _cached_description(module), getattr(module, BACKEND_ATTRIBUTE, None)


def _cached_description(module: nn.Module) -> dict:
    """describe_experts(module), cached on the module per :func:`_description_key`: recomputed when the class, the
    activation or any flag changes (equal keys give equal descriptions); errors are not cached. Weights are never
    part of it: the forward reads them on every call (PEFT swaps them during the forward)."""
    key = _description_key(module)
    if key is None:
        return describe_experts(module)
    cached = module.__dict__.get(_DESCRIPTION_ATTRIBUTE)
    if cached is not None and cached[0] == key:
        return cached[1]
    info = describe_experts(module)
    module.__dict__[_DESCRIPTION_ATTRIBUTE] = (key, info)
    return info


def _as_hf_v5_layout(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, in, out] storage (is_transposed) -> an [E, out, in] view; the kernels accept strided views."""
    return weight.transpose(1, 2) if transposed else weight


def moe_kernels_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """ExpertsInterface entry: hidden_states [T,H], top_k_index [T,k] (int), top_k_weights [T,k] -> [T,H].

    Output dtype = hidden_states' dtype; the kernel accumulates the k weighted expert outputs in fp32.
    """
    if getattr(self, "_is_expert_parallel", False):
        raise UnsupportedExpertsError(
            f"{type(self).__name__}: expert parallelism (sentinel expert ids) is not supported by the moe_kernels "
            "experts implementation; use moe_kernels.distributed instead")
    info, backend = _settings(self)
    transposed = info["transposed"]
    down_proj = _as_hf_v5_layout(self.down_proj, transposed)
    weight_dtype = down_proj.dtype
    # as transformers' grouped_mm path does under autocast (no call when the dtype is already right)
    x = hidden_states if hidden_states.dtype == weight_dtype else hidden_states.to(weight_dtype)
    down_bias = self.down_proj_bias if info["bias"] else None
    gated = info["has_gate"]
    if gated:
        gate_up_proj = _as_hf_v5_layout(self.gate_up_proj, transposed)
        gate_up_bias = self.gate_up_proj_bias if info["bias"] else None
    else:  # act(up x + b): the up projection is the first GEMM's weight as it is
        gate_up_proj = _as_hf_v5_layout(self.up_proj, transposed)
        gate_up_bias = self.up_proj_bias if info["bias"] else None
    # moe_mlp takes weights in float32 or x's dtype and converts them itself; only another dtype (a router under
    # another autocast dtype) is converted here.
    weights = top_k_weights if top_k_weights.dtype in (torch.float32, x.dtype) else top_k_weights.float()
    options = dict(activation=info["activation"], gate_up_bias=gate_up_bias, down_bias=down_bias,
                   interleaved=info["interleaved"], swiglu_limit=info["swiglu_limit"], gated=gated,
                   softcaps=info["softcaps"], backend=backend)
    if info["post_expert_norm"]:
        out = _with_post_expert_norm(self, x, gate_up_proj, down_proj, weights, top_k_index, options)
    else:
        out = moe_kernels.moe_mlp(x, gate_up_proj, down_proj, weights, top_k_index, **options)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def expert_per_choice(rows, gate_up_proj, down_proj, top_k_index, **options):
    """expert_{ids[t, j]}(rows[t*k + j]) for every (token, choice): each row through moe_mlp alone with weight 1, so
    the output is the expert's own ([T*k, H]), for what transformers applies per choice (a norm after the expert,
    Llama 4's scaling before it)."""
    unit = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
    return moe_kernels.moe_mlp(rows, gate_up_proj, down_proj, unit, top_k_index.reshape(-1, 1), **options)


def _with_post_expert_norm(module, x, gate_up_proj, down_proj, weights, top_k_index, options):
    """sum_j w[t,j] * post_expert_norm(expert_j(x_t)): each (token, choice) as its own row with weight 1 (so
    moe_mlp returns the expert's output itself), the module's norm on those rows, the weighting and the sum over
    the k choices in fp32."""
    num_tokens, k = top_k_index.shape
    rows = x.repeat_interleave(k, dim=0)  # row t*k + j is token t for choice j
    per_choice = expert_per_choice(rows, gate_up_proj, down_proj, top_k_index, **options)
    normed = module.post_expert_norm(per_choice).view(num_tokens, k, -1)
    return (normed.float() * weights.float().unsqueeze(-1)).sum(dim=1)


def register() -> None:
    """Register ``"moe_kernels"`` with transformers' global ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, moe_kernels_experts_forward)  # class-wide mapping


register()

__all__ = ["EXPERTS_IMPLEMENTATION", "UnsupportedExpertsError", "GateForm", "activation_name", "describe_experts", "gate_form",
           "moe_kernels_experts_forward", "normalised_source", "register", "softcap_caps"]
