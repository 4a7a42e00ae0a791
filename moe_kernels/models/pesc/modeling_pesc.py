"""A PESC-crafted causal LM as a Hugging Face model: :class:`PescForCausalLM`.

The wrapped dense model (``language_model``, a Llama/Mistral/Qwen2/Qwen3 ``*ForCausalLM``) has every MLP
replaced by :class:`moe_kernels.layers.AdapterMoE`: the MLP becomes the shared FFN, a router and
zero-initialised bottleneck adapters are added. ``save_pretrained`` writes safetensors and a config of
type ``moe_kernels_pesc``; ``AutoModelForCausalLM.from_pretrained`` (after ``import moe_kernels.hf``)
rebuilds exactly that model.

Training loss (the official PESC/Camelidae code): with ``labels``, ``loss = cross-entropy +
aux_loss_coef * aux_loss`` where ``aux_loss`` is ONE Switch load-balancing loss over the router logits
and chosen experts of all layers concatenated (:func:`pesc_load_balancing_loss`), not a sum of per-layer
losses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from ... import ops
from ...layers.adapter_moe import AdapterMoE
from .._common import ComposedPreTrainedModel, WrapsLanguageModel
from .configuration_pesc import PescConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def dense_mlps(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, mlp) for every gated dense MLP (gate_proj/up_proj/down_proj) named ``*.mlp``."""
    found = []
    for name, module in model.named_modules():
        if not name.endswith("mlp") or isinstance(module, AdapterMoE):
            continue
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            parent_name, _, attribute = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attribute, module))
    return found


def crafted_layers(model: nn.Module) -> list[AdapterMoE]:
    """The AdapterMoE layers of a crafted model, in module order."""
    return [m for m in model.modules() if isinstance(m, AdapterMoE)]


def craft_mlps(model: nn.Module, settings: dict, backend: str | None = None, progress: bool = False) -> int:
    """Replace every gated MLP of ``model`` by an AdapterMoE (in place). Returns the number replaced."""
    targets = dense_mlps(model)
    if not targets:
        raise ValueError(f"found no gated MLP (gate_proj/up_proj/down_proj) in {type(model).__name__}")
    from tqdm.auto import tqdm
    for parent, attribute, mlp in tqdm(targets, desc="crafting MLPs", unit="layer", disable=not progress):
        layer = AdapterMoE(mlp, mlp.gate_proj.in_features, backend=backend, **settings)
        setattr(parent, attribute, layer.train(mlp.training))  # keep the model's train/eval mode
    return len(targets)


def pesc_load_balancing_loss(layers: list[AdapterMoE]) -> torch.Tensor:
    """One Switch load-balancing loss over the routing of all ``layers`` (unscaled, fp32 scalar).

    The router logits [T, E] and chosen experts [T, k] of every layer's last forward are concatenated
    along the tokens (L layers -> [L*T, E]) and one loss ``E * sum_e f_e * P_e`` is computed on them, as
    the official PESC code does (``f_e``: share of the L*T*k choices that went to expert e times k, i.e.
    choices / (L*T); ``P_e``: mean router probability of e over the L*T rows). Differentiable w.r.t. every
    router. Raises RuntimeError before the first forward.
    """
    if not layers:
        raise ValueError("model has no AdapterMoE layers; craft it with craft_sparsity first")
    if any(layer.router_logits is None or layer.router_ids is None for layer in layers):
        raise RuntimeError("the load-balancing loss needs a forward pass first (a layer has no routing yet)")
    num_experts = layers[0].num_experts
    if any(layer.num_experts != num_experts for layer in layers):
        raise ValueError("all crafted layers must have the same number of experts for one joint loss")
    device = layers[0].router_logits.device
    logits = torch.cat([layer.router_logits.float().to(device) for layer in layers], dim=0)
    ids = torch.cat([layer.router_ids.long().to(device) for layer in layers], dim=0)
    return ops.load_balancing_loss(logits, ids, num_experts)


class PescForCausalLM(WrapsLanguageModel, ComposedPreTrainedModel, GenerationMixin):
    """A causal LM whose MLPs are PESC adapter MoEs (see the module docstring).

    ``PescForCausalLM(config)`` builds the crafted architecture (new adapters: Up zero, so the logits equal
    the dense model's); :func:`moe_kernels.hf.craft_sparsity` wraps an existing dense model instead.
    Forward takes the dense model's arguments and returns :class:`MoeCausalLMOutputWithPast` (``aux_loss``:
    the unscaled joint load-balancing loss, computed in training or when labels are given).
    """

    config_class = PescConfig

    def __init__(self, config: PescConfig, language_model: nn.Module | None = None, backend: str | None = None):
        super().__init__(config)
        text_config = config.text_config
        if text_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"PESC crafting supports model types {list(SUPPORTED_MODEL_TYPES)}, "
                             f"got {text_config.model_type!r}")
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(text_config)
            craft_mlps(language_model, config.settings, backend=backend)
        self.language_model = language_model
        if getattr(language_model, "generation_config", None) is not None:  # eos/pad/sampling defaults of the base
            self.generation_config = copy.deepcopy(language_model.generation_config)
        self.post_init()

    @property
    def crafted_layers(self) -> list[AdapterMoE]:
        return crafted_layers(self)

    def set_backend(self, backend: str | None) -> None:
        """moe_kernels backend of every crafted layer (None: chosen by device)."""
        for layer in crafted_layers(self):
            layer.backend = backend

    def load_balancing_loss(self) -> torch.Tensor:
        """The joint (all layers) load-balancing loss of the last forward, unscaled."""
        return pesc_load_balancing_loss(crafted_layers(self))

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        from ...hf.compat import CACHE_KWARG, cache_kwargs  # not at import: moe_kernels.hf imports this module

        if "past_key_values" in kwargs:  # the pre-5.24 name of the cache argument
            cache = kwargs.pop("past_key_values") if cache is None else cache
        out = self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  **cache_kwargs(cache), inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
        loss, aux_loss = out.loss, None
        if labels is not None or self.training:
            aux_loss = self.load_balancing_loss()
            if loss is not None and self.config.add_aux_loss:
                loss = loss + (self.config.aux_loss_coef * aux_loss).to(loss.dtype)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=out.logits,
                                         **cache_kwargs(getattr(out, CACHE_KWARG, None)),
                                         hidden_states=out.hidden_states, attentions=out.attentions)


__all__ = ["PescForCausalLM", "pesc_load_balancing_loss", "crafted_layers", "craft_mlps", "dense_mlps"]
