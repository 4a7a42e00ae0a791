"""The families table: which transformers ``model_type`` moe_kernels patches, and how.

Generated from the installed transformers, not written by hand:

1. every ``model_type`` of ``CONFIG_MAPPING_NAMES`` whose modeling module uses
   ``@use_experts_implementation``, or holds a MoE block of :data:`moe_kernels.hf.blocks.VARIANTS` (Llama 4's, whose
   experts run inside the block), is a candidate;
2. its experts classes are those whose ``forward`` is that decorator's dispatcher; their layout flags
   (read from the decorator's closure) and gate (:func:`moe_kernels.hf.experts.gate_form`) decide whether
   the ``"moe_kernels"`` experts implementation runs them exactly;
3. its router classes (classes named ``*Router``) are matched, by identical ``forward`` source, to the
   templates of :data:`moe_kernels.hf.routers.VARIANTS`; a matched router is replaced by the fused
   ``moe_kernels.route``, an unmatched one keeps transformers' own forward (named in the table). A class named
   ``*Gate`` is a router only when it matches a template (HunYuan-V1-MoE's gate): most ``*Gate`` classes are other
   gates (forget gates, residual gates) and are not listed.

Status per family: ``"experts+router"`` (both patched), ``"experts"`` (experts patched, router left to
transformers -- still exact), ``"unsupported"`` (with the reason). ``parity_tested`` marks families
whose whole-model parity suite lives in ``integration/test_hf_families.py``, ``experts_parity_tested`` those whose
experts module is compared with transformers' own forward in ``tests/test_hf_gate_forms.py``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass, field

import torch.nn as nn

from .blocks import match_block, variants_in
from .experts import gate_form
from .routers import match_variant

# Families with a whole-model parity suite in integration/test_hf_families.py.
PARITY_TESTED = frozenset({"mixtral", "minimax", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "deepseek_v3",
                           "glm4_moe", "dots1", "gpt_oss", "granitemoe", "jamba", "nemotron_h", "hy_v4",
                           "minimax_m2", "ernie4_5_moe", "inkling2", "gemma4_text", "aria_text",
                           "hunyuan_v1_moe", "llama4_text"})
# Families whose experts module alone is compared with transformers' forward (tests/test_hf_gate_forms.py;
# muse_spark's, with its post-expert norm, in tests/test_hf_post_expert_norm.py).
EXPERTS_PARITY_TESTED = frozenset({"deepseek_v4", "glm5_next", "hy_v4", "minimax_m3_vl", "openai_privacy_filter",
                                   "gpt_oss", "beam", "inkling2", "muse_spark", "gemma4", "diffusion_gemma"})

_ROUTER_NAME = re.compile(r"Router$")
_GATE_NAME = re.compile(r"Gate$")  # a router only where it matches a variant (see the module docstring)
# The config fields that name a family's k: most use num_experts_per_tok; Gemma 4 (and DiffusionGemma's text
# model) top_k_experts, next to enable_moe_block, which is off in its default config; Aria's text model moe_topk.
_TOP_K_FIELDS = ("num_experts_per_tok", "top_k_experts", "moe_topk")


@dataclass
class Family:
    model_type: str
    module: str
    experts_classes: list[str] = field(default_factory=list)
    blocks: dict[str, str] = field(default_factory=dict)  # MoE block class -> block variant name (hf/blocks.py)
    routers: dict[str, str] = field(default_factory=dict)  # router class -> variant name
    unmatched_routers: list[str] = field(default_factory=list)
    status: str = "unsupported"
    reason: str = ""

    def as_dict(self) -> dict:
        experts = self.experts_classes + [f"{name}'s experts" for name in self.blocks]
        return {"model_type": self.model_type, "status": self.status, "experts": ", ".join(experts),
                "router_variant": ", ".join(sorted(set(self.routers.values()))) or "-",
                "routers_patched": ", ".join(self.routers) or "-",
                "routers_kept": ", ".join(self.unmatched_routers) or "-",
                "parity_tested": self.model_type in PARITY_TESTED,
                "experts_parity_tested": self.model_type in EXPERTS_PARITY_TESTED, "reason": self.reason}


def is_experts_class(cls: type) -> bool:
    """True for a class decorated with transformers' ``@use_experts_implementation`` (its forward is the
    decorator's dispatcher, a closure over ``experts_interface``)."""
    forward = cls.__dict__.get("forward")
    forward = getattr(forward, "_moe_kernels_original", forward)  # class patched by apply_to
    if not inspect.isfunction(forward):
        return False
    try:
        return "experts_interface" in inspect.getclosurevars(forward).nonlocals
    except (TypeError, ValueError):
        return False


def _config_has_moe(config_class, depth: int = 2) -> bool:
    """Whether a default config (or one of its sub-configs) routes tokens (has one of :data:`_TOP_K_FIELDS`);
    drops vision/audio sub-model types that share a modeling module with a MoE text model."""
    try:
        config = config_class()
    except Exception:  # noqa: BLE001 - a config that needs arguments: keep it, let the scan decide
        return True
    if any(hasattr(config, name) for name in _TOP_K_FIELDS):
        return True
    if depth == 0:
        return False
    return any(_config_has_moe(sub, depth - 1) for sub in getattr(config, "sub_configs", {}).values()
               if isinstance(sub, type))


def experts_flags(cls: type) -> dict:
    """The ``use_experts_implementation`` flags of an experts class (from its wrapped ``__init__``)."""
    names = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")
    try:
        captured = inspect.getclosurevars(cls.__init__).nonlocals
    except (TypeError, ValueError):
        return {}
    return {name: captured[name] for name in names if name in captured}


def experts_unsupported_reason(cls: type) -> str | None:
    """Why the moe_kernels experts implementation cannot run ``cls`` exactly (None when it can).
    The activation is checked later, per model, because it comes from the config."""
    flags = experts_flags(cls)
    form = gate_form(cls)
    concatenated = flags.get("is_concatenated", True)
    if not flags.get("has_gate", True):
        return None  # act(up x): no gate to read
    if form.kind == "custom":
        return f"{cls.__name__}: custom _apply_gate"
    if form.interleaved == concatenated:
        return f"{cls.__name__}: _apply_gate's gate/up split disagrees with is_concatenated={concatenated}"
    return None


def _module_uses_experts_interface(module_name: str) -> bool:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return False
    with open(spec.origin, encoding="utf-8") as handle:
        return "@use_experts_implementation" in handle.read()


def _classes(module) -> list[type]:
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__]


def scan_family(model_type: str, module_name: str) -> Family:
    family = Family(model_type, module_name)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an optional dependency of that family is missing
        family.reason = f"modeling module does not import: {type(exc).__name__}: {exc}"[:200]
        return family
    reasons = []
    block_names = {variant.block for variant in variants_in(module_name)}
    for cls in _classes(module):
        if cls.__name__ in block_names:
            block = match_block(cls)
            if block is None:
                reasons.append(f"{cls.__name__}: its forward, or its router's or experts', is not the source "
                               "moe_kernels.hf.blocks was written against")
            else:
                family.blocks[cls.__name__] = block.name
        elif is_experts_class(cls):
            family.experts_classes.append(cls.__name__)
            reason = experts_unsupported_reason(cls)
            if reason:
                reasons.append(reason)
        elif _ROUTER_NAME.search(cls.__name__):
            variant = match_variant(cls)
            if variant is None:
                family.unmatched_routers.append(cls.__name__)
            else:
                family.routers[cls.__name__] = variant.name
        elif _GATE_NAME.search(cls.__name__) and (variant := match_variant(cls)) is not None:
            family.routers[cls.__name__] = variant.name
    if reasons:
        family.reason = "; ".join(reasons)
    elif not family.experts_classes and not family.blocks:
        family.reason = "no experts class uses @use_experts_implementation"
    elif family.routers and not family.unmatched_routers:
        family.status = "experts+router"
    else:
        family.status = "experts"
        family.reason = ("router forward matches no exact route() variant: "
                         + (", ".join(family.unmatched_routers) or "no *Router class") + " kept as in transformers")
    return family


@functools.lru_cache(maxsize=1)
def scan() -> dict[str, Family]:
    """model_type -> :class:`Family`, for every MoE family of the installed transformers that uses
    ``ExpertsInterface``. Imports those modeling modules (a few seconds, cached)."""
    from transformers.models.auto.configuration_auto import (CONFIG_MAPPING, CONFIG_MAPPING_NAMES,
                                                             model_type_to_module_name)

    families = {}
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        package = model_type_to_module_name(model_type)
        module_name = f"transformers.models.{package}.modeling_{package}"
        try:
            uses = _module_uses_experts_interface(module_name) or bool(variants_in(module_name))
        except (ImportError, ValueError, OSError):
            continue
        if uses and _config_has_moe(CONFIG_MAPPING[model_type]):
            families[model_type] = scan_family(model_type, module_name)
    return families


def family_of(model_type: str) -> Family:
    """The family record of ``model_type``; raises ValueError listing the supported model types."""
    families = scan()
    family = families.get(model_type)
    if family is None or family.status == "unsupported":
        why = f" ({family.reason})" if family is not None else ""
        raise ValueError(f"model_type {model_type!r} is not supported by moe_kernels.hf{why}. "
                         f"Supported model types: {', '.join(supported_model_types())}")
    return family


def supported_model_types() -> list[str]:
    """Model types whose experts (and, where matched, routers) moe_kernels patches exactly."""
    return [name for name, family in scan().items() if family.status != "unsupported"]


def families_table() -> list[dict]:
    """One dict per candidate family (supported or not): model_type, status, experts, router_variant,
    routers_patched, routers_kept, parity_tested, experts_parity_tested, reason. For ``moe-kernels info``."""
    return [family.as_dict() for family in scan().values()]


__all__ = ["Family", "PARITY_TESTED", "EXPERTS_PARITY_TESTED", "families_table", "family_of", "scan", "supported_model_types",
           "is_experts_class", "experts_flags"]
