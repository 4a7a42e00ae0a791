"""nn.Modules built on the moe_kernels ops (imported on first use).

* :class:`SparseMoE`  -- router + routed expert MLPs (the MoE block)
* :class:`AdapterMoE` -- PESC: shared dense FFN, experts that differ by bottleneck adapters
* :class:`LoRAMoE`    -- Self-MoE: a linear with routed LoRA experts
* :class:`CoELayer`   -- CCoE: whole expert branches coupled on a shared backbone
* :class:`TokenFuser` -- UltraFuser: token-level gated fusion of specialist models
"""

import importlib

_LAZY = {
    "SparseMoE": ".sparse_moe",
    "AdapterMoE": ".adapter_moe",
    "LoRAMoE": ".lora_moe",
    "CoELayer": ".coe",
    "TokenFuser": ".fuser",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
