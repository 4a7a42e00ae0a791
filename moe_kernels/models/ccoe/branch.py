"""CCoE's expert branches on Hugging Face decoder layers, and taking expert models apart.

A *branch* (:class:`ExpertBranch`) is one expert's upper decoder layers (any depth), its final norm and
its LM head: the modules of :class:`moe_kernels.layers.CoELayer`, which routes whole sequences to them.
The decoder layers are the Hugging Face modules themselves (Llama, Qwen2, Mistral, ... decoder layers of
transformers 5.x); masks are built with transformers' own mask functions (:func:`build_attention_masks`)
so a branch computes exactly what the expert's full model computes for those sequences.
:func:`run_decoder_layers` runs such layers, for a branch and for the coupled model's shared backbone.

Coupling experts also needs :func:`decoder_parts` (the decoder and head of a causal LM),
:func:`modules_equal` (is a part the same in two experts) and :func:`unique_param_bytes` (memory with
shared parts counted once). Used by :class:`moe_kernels.models.CcoeForCausalLM` and
:class:`moe_kernels.hf.couple.CoupledExperts`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def attention_types(config, num_layers: int) -> list[str]:
    """Attention type of each decoder layer index of a model with ``config`` (full or sliding window).

    Follows transformers: ``config.layer_types`` when the family has it (Qwen2), else every layer is
    sliding when ``config.sliding_window`` is set (Mistral), else full attention (Llama).
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)[:num_layers]
    if getattr(config, "sliding_window", None) is not None:
        return [SLIDING_ATTENTION] * num_layers
    return [FULL_ATTENTION] * num_layers


def build_attention_masks(config, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                          cache, position_ids: torch.Tensor, layer_indices: list[int],
                          layer_types: list[str]) -> dict:
    """One mask per attention type used by the layers ``layer_indices`` (transformers' mask functions).

    ``hidden_states`` [B, L, H] gives batch size, query length and dtype; ``attention_mask`` [B, S] is
    the 2-D padding mask over cached + new tokens. The cache is asked for the key/value length at the
    first layer of each type that these layers own, so a cache that holds only some layers (a branch)
    reports the right sizes.
    """
    from ...hf.compat import cache_kwargs  # not at import time: moe_kernels.hf imports this package as it starts

    masks = {}
    for index in layer_indices:
        kind = layer_types[index]
        if kind in masks:
            continue
        make = create_sliding_window_causal_mask if kind == SLIDING_ATTENTION else create_causal_mask
        masks[kind] = make(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                           position_ids=position_ids, layer_idx=index, **cache_kwargs(cache))
    return masks


def run_decoder_layers(layers, layer_indices: list[int], layer_types: list[str], hidden_states: torch.Tensor,
                       masks: dict, position_embeddings, position_ids: torch.Tensor, cache,
                       use_cache: bool) -> torch.Tensor:
    """Run Hugging Face decoder layers in order, each with the mask of its attention type."""
    from ...hf.compat import cache_kwargs

    for layer, index in zip(layers, layer_indices):
        hidden_states = layer(hidden_states, attention_mask=masks[layer_types[index]],
                              position_embeddings=position_embeddings, position_ids=position_ids,
                              use_cache=use_cache, **cache_kwargs(cache))
    return hidden_states


class ExpertBranch(nn.Module):
    """One expert's upper part: decoder layers ``first_layer .. first_layer + len(layers) - 1``, final
    norm and LM head. The modules are the expert model's own (shared by reference, not copied).

    ``config`` is the expert's config (its depth and layer types); ``first_layer`` is the CoE layer
    index (the coupled model's ``split_layer``), which is also the layer index the attention modules
    use in their KV cache.
    """

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, lm_head: nn.Module, config, first_layer: int):
        super().__init__()
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.config = config
        self.first_layer = first_layer
        self.layer_indices = list(range(first_layer, first_layer + len(layers)))
        self.layer_types = attention_types(config, first_layer + len(layers))

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def new_cache(self):
        """An empty KV cache for this branch (a DynamicCache shaped by the expert's config; only this
        branch's layer indices are ever filled)."""
        return DynamicCache(config=self.config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                position_embeddings, cache=None, use_cache: bool = False) -> torch.Tensor:
        """hidden_states [b, L, H] at the CoE layer -> logits [b, L, V] (the head's dtype)."""
        masks = build_attention_masks(self.config, hidden_states, attention_mask, cache, position_ids,
                                      self.layer_indices, self.layer_types)
        hidden_states = run_decoder_layers(self.layers, self.layer_indices, self.layer_types, hidden_states,
                                           masks, position_embeddings, position_ids, cache, use_cache)
        return self.lm_head(self.norm(hidden_states))


# ----- taking expert models apart -----


def modules_equal(a: nn.Module, b: nn.Module) -> bool:
    """Same parameter names, shapes and values (wherever each lives): two experts' copies of a shared part."""
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    if params_a.keys() != params_b.keys():
        return False
    return all(params_a[k].shape == params_b[k].shape and torch.equal(params_a[k], params_b[k].to(params_a[k].device))
               for k in params_a)


def unique_param_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters of ``modules``, each storage counted once (shared parts count once)."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            key = (p.data_ptr(), p.numel())
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


def decoder_parts(model: nn.Module, what: str):
    """(decoder, output head) of a Llama/Mistral/Qwen2-style causal LM, or a TypeError naming what it lacks."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    missing = [part for part in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, part)]
    if decoder is None or head is None or missing:
        raise TypeError(f"{what} must be a Hugging Face decoder-only causal LM whose decoder has embed_tokens, "
                        f"layers, norm and rotary_emb (Llama/Mistral/Qwen2 style); got {type(model).__name__}"
                        + (f" (missing {missing})" if decoder is not None and missing else ""))
    return decoder, head


__all__ = ["ExpertBranch", "attention_types", "build_attention_masks", "run_decoder_layers", "decoder_parts",
           "modules_equal", "unique_param_bytes", "FULL_ATTENTION", "SLIDING_ATTENTION"]
