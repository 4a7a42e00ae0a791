"""Configuration of a CCoE coupled model (:class:`CcoeForCausalLM`)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .._common import config_from_dict, config_to_dict, keep_sub_attention


class CcoeConfig(PreTrainedConfig):
    """Expert LLMs coupled on a shared backbone at CoE layers of one or more depths.

    text_config: the base model's config (the backbone: embeddings and decoder layers ``0 .. d-1`` for
    the deepest CoE layer ``d``). expert_names: the experts in id order. expert_configs: {name: the expert
    model's config dict} (its own depth). coe_layers: {name: the depth d at which the expert branches off
    the backbone} (the expert owns its layers ``d ..``, its final norm and LM head). router_config: None,
    ``{"type": "classifier", "names": [...]}`` (a :class:`ClassifierRouter`, weights saved with the model) or
    ``{"type": "keyword", "rules": {name: [patterns]}, "default": name}`` (a :class:`KeywordRouter`; set its
    ``decode`` after loading). multi_expert: experts per request chosen by the router (1: one expert per
    request; m > 1: the router's top m, switched per step, see :class:`CcoeForCausalLM`).
    """

    model_type = "moe_kernels_ccoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    expert_names: list | None = None
    expert_configs: dict | None = None
    coe_layers: dict | None = None
    router_config: dict | None = None
    multi_expert: int = 1
    shared_parts: dict | None = None
    backbone_depth: int = 0
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        keep_sub_attention(self, kwargs, super().__post_init__)
        self.shared_parts = dict(self.shared_parts or {})
        self.tie_word_embeddings = bool(self.shared_parts)  # shared parts are declared as tied weights
        self.expert_names = list(self.expert_names or [])
        self.expert_configs = {k: config_to_dict(v) for k, v in (self.expert_configs or {}).items()}
        self.coe_layers = {k: int(v) for k, v in (self.coe_layers or {}).items()}
        missing = [n for n in self.expert_names if n not in self.expert_configs or n not in self.coe_layers]
        if missing:
            raise ValueError(f"experts {missing} lack an entry in expert_configs or coe_layers")

    def expert_config(self, name: str) -> PreTrainedConfig:
        return config_from_dict(self.expert_configs[name])

    @property
    def depths(self) -> list[int]:
        """The CoE layer depths, ascending."""
        return sorted(set(self.coe_layers[n] for n in self.expert_names))


__all__ = ["CcoeConfig"]
