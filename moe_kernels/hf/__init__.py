"""Hugging Face transformers integration.

``import moe_kernels.hf`` registers the experts implementation ``"moe_kernels"`` with transformers'
``ExpertsInterface``, and the four composed model types (``moe_kernels_pesc``, ``moe_kernels_self_moe``,
``moe_kernels_ccoe``, ``moe_kernels_ultrafuser``, see :mod:`moe_kernels.models`) with ``AutoConfig`` /
``AutoModelForCausalLM``. The rest is imported on first use:

* patching:   :func:`apply`, :func:`apply_to`, :func:`revert`, :func:`supported_model_types`
* PESC:       :func:`craft_sparsity`, :func:`load_crafted`, :func:`crafted_aux_loss`, :func:`load_quantized_base`
* Self-MoE:   :func:`compose_lora_experts`, :func:`self_specialize`, :func:`merge_adapters_baseline`
* CCoE:       :func:`couple_experts`
* UltraFuser: :func:`fuse_specialists`
"""

from . import experts as _experts  # noqa: F401  (registers the "moe_kernels" experts implementation)
from .._lazy import lazy_attributes
from ..models import register as _register_models

_register_models()  # AutoConfig / AutoModelForCausalLM know the composed model types from here on

_LAZY = {
    "apply": ".patch", "apply_to": ".patch", "revert": ".patch", "supported_model_types": ".patch",
    "craft_sparsity": ".craft", "load_crafted": ".craft", "crafted_aux_loss": ".craft",
    "load_quantized_base": ".craft",
    "compose_lora_experts": ".self_moe", "self_specialize": ".specialize",
    "merge_adapters_baseline": ".specialize",
    "couple_experts": ".couple",
    "fuse_specialists": ".fuse",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
