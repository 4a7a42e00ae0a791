"""Configuration of a Self-MoE (MiXSE) model (:class:`SelfMoEForCausalLM`)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .._common import keep_sub_attention


class SelfMoEConfig(PreTrainedConfig):
    """A causal LM (``text_config``) whose LoRA-adapted linears hold N routed LoRA experts.

    expert_names: the N experts (domains) in id order; num_experts_per_tok: experts per token (softmax over all N, top-k
    kept, no renormalisation); router: ``"shared"`` (one router for all decoder layers) or ``"per_layer"``;
    lora_ranks: {module path: [rank of each expert]} for every adapted linear (paths relative to the
    causal LM, e.g. ``model.layers.0.self_attn.q_proj``).
    """

    model_type = "moe_kernels_self_moe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    expert_names: list | None = None
    num_experts_per_tok: int = 1
    router: str = "shared"
    lora_ranks: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        keep_sub_attention(self, kwargs, super().__post_init__)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.expert_names is None:
            self.expert_names = []
        if self.lora_ranks is None:
            self.lora_ranks = {}

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)


__all__ = ["SelfMoEConfig"]
