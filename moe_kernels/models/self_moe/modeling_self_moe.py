"""A Self-MoE (MiXSE) model as a Hugging Face model: :class:`SelfMoEForCausalLM`.

The wrapped causal LM (``language_model``) has every LoRA-adapted linear replaced by
:class:`moe_kernels.layers.LoRAMoE` (the frozen linear plus N routed LoRA experts). The router(s) live on
the composed model (``self_moe_router``, or ``self_moe_routers`` with one per decoder layer); a forward
pre-hook on each decoder layer routes the hidden state entering it, and every adapted linear of that layer
uses that routing. ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip the whole
model (experts, scalings, routers) bit-identically.
"""

from __future__ import annotations

import copy

import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin

from ...layers.lora_moe import LoRAMoE, RoutingSlot, SelfMoERouter
from .._common import ComposedPreTrainedModel, WrapsLanguageModel
from .configuration_self_moe import SelfMoEConfig

DECODER_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def _routing_hook(router: SelfMoERouter, slot: RoutingSlot):
    """Pre-hook of a decoder layer: route its input hidden states [B, S, H] into ``slot``."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        slot.value = router(hidden)
    return hook


def group_by_decoder_layer(model: nn.Module, paths) -> dict[str, list[str]]:
    """{decoder layer path: [adapted linear paths inside it]}; errors for paths outside a decoder layer
    or modules that are not nn.Linear."""
    by_layer: dict[str, list[str]] = {}
    for path in sorted(paths):
        match = DECODER_LAYER.match(path)
        if match is None:
            raise ValueError(f"adapted module {path!r} is not inside a decoder layer (*.layers.N.*); the shared "
                             "router routes per decoder layer")
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"adapted module {path!r} is a {type(module).__name__}; only nn.Linear is supported")
        by_layer.setdefault(match.group(1), []).append(path)
    return by_layer


class SelfMoEForCausalLM(WrapsLanguageModel, ComposedPreTrainedModel, GenerationMixin):
    """A causal LM with routed LoRA experts (see the module docstring).

    ``SelfMoEForCausalLM(config)`` builds the architecture with zero experts (loading fills them);
    :func:`moe_kernels.hf.compose_lora_experts` builds one from a base model and PEFT adapters. Only the
    router(s) are trainable after composing; the base and the experts are frozen.
    """

    config_class = SelfMoEConfig

    def __init__(self, config: SelfMoEConfig, language_model: nn.Module | None = None, experts=None,
                 backend: str | None = None):
        super().__init__(config)
        if config.router not in ("shared", "per_layer"):
            raise ValueError(f"router must be 'shared' or 'per_layer', got {config.router!r}")
        num_experts = config.num_experts
        if num_experts < 1:
            raise ValueError("expert_names must name at least one expert")
        if isinstance(config.num_experts_per_tok, bool) or not isinstance(config.num_experts_per_tok, int) or not 1 <= config.num_experts_per_tok <= num_experts:
            raise ValueError(f"top_k must be an int in [1, number of experts = {num_experts}], got {config.num_experts_per_tok!r}")
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        if experts is None:  # the architecture only (zero LoRA matrices of the configured ranks)
            group_by_decoder_layer(language_model, config.lora_ranks)  # clear errors for bad paths, before they are read
            experts = {}
            for path, ranks in config.lora_ranks.items():
                base = language_model.get_submodule(path)
                experts[path] = [(torch.zeros(r, base.in_features), torch.zeros(base.out_features, r), 1.0)
                                 for r in ranks]
        self.language_model = language_model
        if getattr(language_model, "generation_config", None) is not None:  # eos/pad/sampling defaults of the base
            self.generation_config = copy.deepcopy(language_model.generation_config)
        by_layer = group_by_decoder_layer(language_model, experts)
        reference = language_model.get_input_embeddings().weight
        router_args = {"backend": backend, "device": reference.device, "dtype": reference.dtype,
                       "init_std": getattr(config.text_config, "initializer_range", 0.02)}
        hidden_size = config.text_config.hidden_size
        if config.router == "shared":
            self.self_moe_router = SelfMoERouter(hidden_size, num_experts, config.num_experts_per_tok, **router_args)
            layer_routers = {layer: self.self_moe_router for layer in by_layer}
        else:
            self.self_moe_routers = nn.ModuleList(SelfMoERouter(hidden_size, num_experts, config.num_experts_per_tok, **router_args)
                                                  for _ in by_layer)
            layer_routers = dict(zip(by_layer, self.self_moe_routers))
        for layer_path, paths in by_layer.items():
            slot = RoutingSlot()
            language_model.get_submodule(layer_path).register_forward_pre_hook(
                _routing_hook(layer_routers[layer_path], slot), with_kwargs=True)
            for path in paths:
                parent_path, _, attribute = path.rpartition(".")
                triples = experts[path]
                if len(triples) != num_experts:
                    raise ValueError(f"{path}: {len(triples)} experts given, the config names {num_experts}")
                setattr(language_model.get_submodule(parent_path), attribute,
                        LoRAMoE(language_model.get_submodule(path), [t[0] for t in triples], [t[1] for t in triples],
                                [t[2] for t in triples], routing_slot=slot, backend=backend))
        self.post_init()

    @property
    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    def routers(self) -> list[SelfMoERouter]:
        """The distinct routers (one, or one per decoder layer)."""
        return [m for m in self.modules() if isinstance(m, SelfMoERouter)]

    def force_expert(self, expert: int | str | None) -> None:
        """Send every token to one expert (name or id) with weight 1, or None to route normally."""
        if isinstance(expert, str):
            expert = self.expert_names.index(expert)
        for router in self.routers():
            router.forced_expert = expert

    def set_backend(self, backend: str | None) -> None:
        for module in self.modules():
            if isinstance(module, (LoRAMoE, SelfMoERouter)):
                module.backend = backend

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        from ...hf.compat import cache_kwargs  # not at import: moe_kernels.hf imports this module

        if "past_key_values" in kwargs:  # the pre-5.24 name of the cache argument
            cache = kwargs.pop("past_key_values") if cache is None else cache
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **cache_kwargs(cache), inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)


__all__ = ["SelfMoEForCausalLM", "group_by_decoder_layer"]
