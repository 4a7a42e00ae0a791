"""The four research systems as Hugging Face models, one folder each in transformers' layout
(``<name>/configuration_<name>.py`` + ``<name>/modeling_<name>.py``):

=============  =========================  ==============================  =======================
system         model_type                 config                          model
=============  =========================  ==============================  =======================
PESC           ``moe_kernels_pesc``       :class:`PescConfig`             :class:`PescForCausalLM`
Self-MoE       ``moe_kernels_self_moe``   :class:`SelfMoEConfig`          :class:`SelfMoEForCausalLM`
CCoE           ``moe_kernels_ccoe``       :class:`CcoeConfig`             :class:`CcoeForCausalLM`
UltraFuser     ``moe_kernels_ultrafuser`` :class:`UltraFuserConfig`       :class:`UltraFuserForCausalLM`
=============  =========================  ==============================  =======================

:func:`register` (run by ``import moe_kernels.hf``) registers them with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds a saved composed model.
"""

from __future__ import annotations

import importlib

from .._lazy import lazy_attributes

_SYSTEMS = {  # model_type -> (module, config class, model class)
    "moe_kernels_pesc": (".pesc", "PescConfig", "PescForCausalLM"),
    "moe_kernels_self_moe": (".self_moe", "SelfMoEConfig", "SelfMoEForCausalLM"),
    "moe_kernels_ccoe": (".ccoe", "CcoeConfig", "CcoeForCausalLM"),
    "moe_kernels_ultrafuser": (".ultrafuser", "UltraFuserConfig", "UltraFuserForCausalLM"),
}
_LAZY = {name: module for module, *names in _SYSTEMS.values() for name in names}
_registered = False

__all__ = sorted(_LAZY) + ["register"]


def register() -> None:
    """Register the composed models with AutoConfig / AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type, (module_name, config_name, model_name) in _SYSTEMS.items():
        module = importlib.import_module(module_name, __name__)
        config_class, model_class = getattr(module, config_name), getattr(module, model_name)
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    _registered = True


__getattr__ = lazy_attributes(__name__, _LAZY)
