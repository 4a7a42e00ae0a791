"""Configuration of a PESC-crafted causal LM (:class:`PescForCausalLM`)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .._common import keep_sub_attention


class PescConfig(PreTrainedConfig):
    """A dense causal LM (``text_config``: Llama, Mistral, Qwen2 or Qwen3) whose every MLP is a PESC adapter
    MoE (:class:`moe_kernels.layers.AdapterMoE`).

    num_experts, num_experts_per_tok (the layer's top_k), adapter_dim, scale, activation, dropout: the
    AdapterMoE settings. aux_loss_coef:
    weight of the Switch load-balancing loss, computed once over the routing of all layers (the official
    PESC code) and added to ``loss`` when labels are given and ``add_aux_loss`` is true.
    """

    model_type = "moe_kernels_pesc"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    adapter_dim: int = 64
    scale: float = 1.0
    activation: str = "gelu"
    dropout: float = 0.1
    aux_loss_coef: float = 0.01
    add_aux_loss: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        keep_sub_attention(self, kwargs, super().__post_init__)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def settings(self) -> dict:
        """The AdapterMoE arguments."""
        return {"num_experts": self.num_experts, "top_k": self.num_experts_per_tok, "adapter_dim": self.adapter_dim,
                "scale": float(self.scale), "activation": self.activation, "dropout": float(self.dropout),
                "aux_loss_coef": float(self.aux_loss_coef)}


__all__ = ["PescConfig"]
