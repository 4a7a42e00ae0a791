"""Pure-torch nn.Modules built on the moe_kernels ops (imported on first use; nothing here imports
transformers):

* :class:`SparseMoE`  -- router + routed expert MLPs (the MoE block)
* :class:`AdapterMoE` -- PESC: shared dense FFN, experts that differ by bottleneck adapters
* :class:`LoRAMoE`    -- Self-MoE: a linear with routed LoRA experts
* :class:`CoELayer`   -- CCoE: sequence-level dispatch to whole expert branches coupled on a shared backbone

Also importable from here, though it lives with the UltraFuser model because it runs Hugging Face
specialists (importing it imports transformers):

* :class:`TokenFuser` -- UltraFuser: token-level gated fusion of specialist models
  (:mod:`moe_kernels.models.ultrafuser.fuser`; its chunked loss is :mod:`moe_kernels.losses`)

The branch CoELayer dispatches to on Hugging Face decoder layers, ``ExpertBranch``, is in
:mod:`moe_kernels.models.ccoe.branch`.
"""

from .._lazy import lazy_attributes

_LAZY = {
    "SparseMoE": ".sparse_moe",
    "AdapterMoE": ".adapter_moe",
    "LoRAMoE": ".lora_moe",
    "CoELayer": ".coe",
    "TokenFuser": "moe_kernels.models.ultrafuser.fuser",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
