"""Shared pieces of the composed models (PESC, Self-MoE, CCoE, UltraFuser) as Hugging Face models.

Each composed model is a ``PreTrainedModel`` + ``GenerationMixin`` with its own config class and a
``model_type`` of its own (``moe_kernels_*``). transformers does not know these types until
``import moe_kernels.hf`` registers them, so loading a composed checkpoint without the package fails
with transformers' "unrecognized model type" error instead of building a dense model with random weights.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel


def config_from_dict(config) -> PreTrainedConfig:
    """A transformers config from a config or its ``to_dict()`` form (which carries ``model_type``)."""
    if isinstance(config, PreTrainedConfig):
        return config
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"expected a transformers config or a dict with 'model_type', got {type(config).__name__}")
    values = dict(config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def config_to_dict(config) -> dict:
    """The JSON-able dict of a config (``model_type`` included); dicts pass through."""
    if isinstance(config, dict):
        return dict(config)
    values = config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        values.pop(key, None)
    return values


def keep_sub_attention(config, kwargs: dict, super_post_init) -> None:
    """Run a composite config's ``__post_init__`` without resetting the attention implementation of a
    ``text_config`` given as a config object (transformers' setter would overwrite it with None)."""
    sub = getattr(config, "text_config", None)
    saved = getattr(sub, "_attn_implementation", None) if isinstance(sub, PreTrainedConfig) else None
    explicit = "attn_implementation" in kwargs
    super_post_init(**kwargs)
    if saved is not None and not explicit:
        config.text_config._attn_implementation_internal = saved


class ComposedPreTrainedModel(PreTrainedModel):
    """Common base: nested transformers models are initialised by their own ``_init_weights``; the
    modules of the composed model itself get transformers' generic initialisation. Subclasses list
    ``GenerationMixin`` among their direct bases (transformers checks the direct bases)."""

    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def post_init(self):
        super().post_init()
        # transformers gathers the tied weights (e.g. lm_head = embed_tokens) of direct children only; the
        # composed models nest transformers models deeper (in ModuleLists, in plain modules): gather them all.
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
