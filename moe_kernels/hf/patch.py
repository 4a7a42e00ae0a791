"""One call to run a transformers MoE model on moe_kernels: :func:`apply`, :func:`apply_to`, :func:`revert`.

* ``apply(model)`` patches a built model in place: its experts go through the ``"moe_kernels"``
  experts implementation (``model.set_experts_implementation``) and every router whose forward matches
  a :data:`moe_kernels.hf.routers.VARIANTS` template gets the fused ``moe_kernels.route`` forward on
  the instance; a MoE block that runs its experts itself (Llama 4's, :mod:`moe_kernels.hf.blocks`) gets a forward
  that runs them through ``moe_kernels.moe_mlp``. Returns the model.
* ``apply_to(model_type)`` patches the *classes* of a family before a model is built (experts, block and
  router ``forward``), so every model of that type built afterwards runs on moe_kernels.
* ``revert(model)`` / ``revert(model_type)`` undo either.

``backend=`` (or ``MOE_KERNELS_BACKEND``) picks the moe_kernels backend of the patched modules.
What is patched per ``config.model_type`` is :func:`moe_kernels.hf.families.families_table`.
"""

from __future__ import annotations

import importlib
import types

import torch.nn as nn

from ..backends import AUTO, get_backend
from . import blocks as _blocks
from .experts import (BACKEND_ATTRIBUTE, EXPERTS_IMPLEMENTATION, activation_name, describe_experts,
                      moe_kernels_experts_forward)
from .families import family_of, is_experts_class
from .families import supported_model_types as _supported_model_types
from .routers import ORIGINAL_FORWARD, VARIANTS_BY_NAME

_MODEL_STATE = "_moe_kernels_patch_state"
# Class patches of apply_to. Model types can share classes (gemma4 / gemma4_text, llama4 / llama4_text): a class is
# patched once and restored when the last model type that asked for it is reverted.
_class_patches: dict[str, list[type]] = {}  # model_type -> the classes it asked for
_class_originals: dict[type, object] = {}  # patched class -> its original forward


def supported_model_types() -> list[str]:
    """``config.model_type`` values :func:`apply` accepts (see :func:`moe_kernels.hf.families.families_table`)."""
    return _supported_model_types()


def _check_backend(backend: str | None) -> None:
    # "auto" is a per-shape choice made at each call, not a backend to load
    if backend is not None and backend != AUTO:
        get_backend(backend)  # raises BackendError naming the backend if it is not built


def _is_experts_module(module: nn.Module) -> bool:
    return any(is_experts_class(cls) for cls in type(module).__mro__ if cls is not nn.Module)


def _patched_modules(model: nn.Module, family):
    """(experts modules, [(router module, variant)], [(MoE block module, block variant)]) of ``model`` that
    ``family`` patches."""
    experts, routers, blocks = [], [], []
    for module in model.modules():
        name = type(module).__name__
        if _is_experts_module(module):
            experts.append(module)
        elif name in family.routers:
            routers.append((module, VARIANTS_BY_NAME[family.routers[name]]))
        elif name in family.blocks:
            blocks.append((module, _blocks.VARIANTS_BY_NAME[family.blocks[name]]))
    return experts, routers, blocks


def apply(model: nn.Module, *, backend: str | None = None, routers: bool = True) -> nn.Module:
    """Patch a built transformers model in place to run its MoE layers on moe_kernels; returns ``model``.

    Raises ValueError (listing the supported model types) for an unsupported ``config.model_type``, and
    :class:`moe_kernels.hf.experts.UnsupportedExpertsError` for an experts configuration moe_kernels cannot
    run exactly (e.g. an unknown activation). ``routers=False`` patches only the experts.
    Applying twice is allowed (the second call updates the backend).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"model must be a transformers PreTrainedModel with a config, got {type(model).__name__}")
    family = family_of(model_type)
    _check_backend(backend)
    experts, router_modules, block_modules = _patched_modules(model, family)
    if not experts and not block_modules:
        raise ValueError(f"model of type {model_type!r} has no experts module built with @use_experts_implementation")
    for module, _ in block_modules:
        activation_name(module.experts.act_fn)  # fail now on an activation moe_mlp lacks
    for module in experts:
        describe_experts(module)  # fail now, not in the middle of a forward
        if module.config._experts_implementation is None:
            raise ValueError(f"{type(module).__name__}: its config has no experts implementation to switch")

    state = getattr(model, _MODEL_STATE, None)
    if state is None:
        state = {"experts_implementation": model.get_experts_implementation() if experts else None,
                 "experts_overridden": [], "routers": [], "blocks": []}
    if experts:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for module in experts:
        setattr(module, BACKEND_ATTRIBUTE, backend)
        if module.config._experts_implementation != EXPERTS_IMPLEMENTATION and "forward" not in module.__dict__:
            # a sub-model config that set_experts_implementation did not reach: patch the instance
            module.forward = types.MethodType(moe_kernels_experts_forward, module)
            state["experts_overridden"].append(module)
    if routers:
        for module, variant in router_modules:
            setattr(module, BACKEND_ATTRIBUTE, backend)
            if "forward" not in module.__dict__:
                module.forward = types.MethodType(variant.forward, module)
                state["routers"].append(module)
    for module, variant in block_modules:  # its router and experts run inside the block's forward
        setattr(module, BACKEND_ATTRIBUTE, backend)
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(variant.forward, module)
            state["blocks"].append(module)
    object.__setattr__(model, _MODEL_STATE, state)  # plain attribute, not a submodule or parameter
    return model


def _revert_model(model: nn.Module) -> nn.Module:
    state = model.__dict__.pop(_MODEL_STATE, None)
    if state is None:
        raise ValueError("revert: this model was not patched by moe_kernels.hf.apply")
    if state["experts_implementation"] is not None:
        model.set_experts_implementation(state["experts_implementation"])
    for module in state["experts_overridden"] + state["routers"] + state["blocks"]:
        module.__dict__.pop("forward", None)
    for module in model.modules():
        module.__dict__.pop(BACKEND_ATTRIBUTE, None)
    return model


def _experts_class_forward(original):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return moe_kernels_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    forward._moe_kernels_original = original
    forward.__doc__ = "moe_kernels experts forward (class patched by moe_kernels.hf.apply_to)"
    return forward


def apply_to(model_type: str, *, backend: str | None = None, routers: bool = True) -> list[str]:
    """Patch the classes of ``model_type`` (experts, MoE blocks and matched routers) so that models built afterwards
    run on moe_kernels whatever their ``experts_implementation``. Returns the patched class names.
    Idempotent; :func:`revert` with the same ``model_type`` undoes it. Model types that share classes share their
    backend (the last call's), and a shared class stays patched until every model type that asked for it is
    reverted."""
    family = family_of(model_type)
    _check_backend(backend)
    module = importlib.import_module(family.module)
    asked = _class_patches.setdefault(model_type, [])
    names = []
    for name in family.experts_classes:
        cls = getattr(module, name)
        if not hasattr(cls.__dict__["forward"], "_moe_kernels_original"):
            original = cls.__dict__["forward"]
            cls.forward = _experts_class_forward(original)
            _class_originals[cls] = original
        if cls not in asked:
            asked.append(cls)
        setattr(cls, BACKEND_ATTRIBUTE, backend)
        names.append(name)
    replaced = [(name, _blocks.VARIANTS_BY_NAME[variant].forward) for name, variant in family.blocks.items()]
    if routers:
        replaced += [(name, VARIANTS_BY_NAME[variant].forward) for name, variant in family.routers.items()]
    for name, forward in replaced:
        cls = getattr(module, name)
        if ORIGINAL_FORWARD not in cls.__dict__:
            original = cls.__dict__["forward"]
            setattr(cls, ORIGINAL_FORWARD, original)
            cls.forward = forward
            _class_originals[cls] = original
        if cls not in asked:
            asked.append(cls)
        setattr(cls, BACKEND_ATTRIBUTE, backend)
        names.append(name)
    return names


def _revert_classes(model_type: str) -> None:
    if model_type not in _class_patches:
        raise ValueError(f"revert: model_type {model_type!r} was not patched by moe_kernels.hf.apply_to")
    asked = _class_patches.pop(model_type)
    still_asked = {cls for classes in _class_patches.values() for cls in classes}  # shared with other model types
    for cls in asked:
        if cls in still_asked:
            continue
        original = _class_originals.pop(cls, None)
        if original is not None:
            cls.forward = original
        for attribute in (ORIGINAL_FORWARD, BACKEND_ATTRIBUTE):
            if attribute in cls.__dict__:
                delattr(cls, attribute)
    family = family_of(model_type)
    module = importlib.import_module(family.module)
    for name in family.experts_classes + list(family.routers) + list(family.blocks):
        cls = getattr(module, name)
        if BACKEND_ATTRIBUTE in cls.__dict__ and cls not in still_asked:
            delattr(cls, BACKEND_ATTRIBUTE)


def revert(target):
    """Undo :func:`apply` (pass the model; returns it) or :func:`apply_to` (pass the model_type)."""
    if isinstance(target, str):
        _revert_classes(target)
        return None
    if isinstance(target, nn.Module):
        return _revert_model(target)
    raise TypeError(f"revert: expected a patched model or a model_type string, got {type(target).__name__}")


__all__ = ["apply", "apply_to", "revert", "supported_model_types"]
