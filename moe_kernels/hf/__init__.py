"""Hugging Face transformers integration.

``import moe_kernels.hf`` registers the experts implementation ``"moe_kernels"`` with transformers'
``ExpertsInterface``. The rest is imported on first use:

* patching:   :func:`apply`, :func:`apply_to`, :func:`revert`, :func:`supported_model_types`
* PESC:       :func:`craft_sparsity`, :func:`load_crafted`, :func:`crafted_aux_loss`
* Self-MoE:   :func:`compose_lora_experts`
* CCoE:       :func:`couple_experts`
* UltraFuser: :func:`fuse_specialists`
"""

import importlib

from . import experts as _experts  # noqa: F401  (registers the "moe_kernels" experts implementation)

_LAZY = {
    "apply": ".patch", "apply_to": ".patch", "revert": ".patch", "supported_model_types": ".patch",
    "craft_sparsity": ".craft", "load_crafted": ".craft", "crafted_aux_loss": ".craft",
    "compose_lora_experts": ".self_moe",
    "couple_experts": ".couple",
    "fuse_specialists": ".fuse",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
