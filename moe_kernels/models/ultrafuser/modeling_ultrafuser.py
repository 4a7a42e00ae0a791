"""UltraFuser as a Hugging Face model: :class:`UltraFuserForCausalLM`.

All specialists run on the same tokens, each with its own KV cache (:class:`UltraFuserCache`); per token
the shared gate weighs the specialists' last hidden states and the logits are blended inside ``forward``
(``o = sum_j w_j o_j``), so transformers' ``generate`` (greedy, sampling, top-p, beam search, streamers)
decodes the fused model unchanged. The math lives in :class:`moe_kernels.models.ultrafuser.TokenFuser`
(:mod:`.fuser`, held as ``fuser``); this class adds the config, save/load and the generation interface.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin

from .._common import CACHE_FIELD, ComposedPreTrainedModel, forward_cache, output_class
from .configuration_ultrafuser import UltraFuserConfig
from .fuser import TokenFuser, check_loss_impl


def check_fusable(models, names) -> None:
    """Raise ValueError naming the two specialists and exactly which dimension differs (vocabulary size of
    the LM head or config, hidden size) when ``models`` cannot share one gate and one vocabulary."""
    def dims(model):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise TypeError(f"specialist {type(model).__name__} has no linear LM head")
        config = model.config
        return {"vocabulary size (LM head rows)": head.out_features,
                "vocabulary size (config.vocab_size)": getattr(config, "vocab_size", head.out_features),
                "hidden size (LM head input = final hidden state)": head.in_features,
                "hidden size (config.hidden_size)": getattr(config, "hidden_size", head.in_features)}

    reference = dims(models[0])
    for name, model in zip(names[1:], models[1:]):
        other = dims(model)
        differing = [f"{what}: {names[0]!r} has {reference[what]}, {name!r} has {other[what]}"
                     for what in reference if reference[what] != other[what]]
        if differing:
            raise ValueError(f"specialists {names[0]!r} and {name!r} cannot be fused: " + "; ".join(differing)
                             + ". UltraFuser blends logits token by token, so every specialist needs the same "
                             "vocabulary (same tokenizer) and the shared gate needs the same hidden size.")
    for name, model in zip(names, models):
        own = dims(model)
        if own["vocabulary size (LM head rows)"] != own["vocabulary size (config.vocab_size)"]:
            raise ValueError(f"specialist {name!r}: its LM head has {own['vocabulary size (LM head rows)']} rows "
                             f"but config.vocab_size is {own['vocabulary size (config.vocab_size)']}")


class UltraFuserCache:
    """One KV cache per specialist (transformers ``DynamicCache`` objects), with what ``generate`` needs:
    the sequence length, beam reordering, and no compilation/cropping."""

    is_compileable = False
    is_croppable = False

    def __init__(self, caches: list):
        self.caches = caches

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self.caches:
            cache.reorder_cache(beam_idx)

    def __len__(self) -> int:
        return len(self.caches)


UltraFuserCausalLMOutput = output_class(
    "UltraFuserCausalLMOutput", ["loss", "logits", "cache", "gate_weights"],
    """loss (scalar, with labels); logits [B, L, V] float32 (the blend); cache (:class:`UltraFuserCache`);
    gate_weights [B, L, N] float32.""")


class UltraFuserForCausalLM(ComposedPreTrainedModel, GenerationMixin):
    """Token-level gated fusion of specialist causal LMs (see the module docstring).

    ``forward(input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, use_cache=None,
    force_specialist=None, return_logits=None, loss_impl="fused", chunk_size=None, logits_to_keep=0)``:
    ``force_specialist`` (index or name) sets the gate one-hot; with ``labels`` the loss is the blended
    next-token cross-entropy (fused chunked form by default), and logits are only returned if
    ``return_logits=True``.
    """

    config_class = UltraFuserConfig

    def __init__(self, config: UltraFuserConfig, specialists: list[nn.Module] | None = None):
        super().__init__(config)
        if specialists is None:
            specialists = [AutoModelForCausalLM.from_config(c) for c in config.specialist_configs()]
        if not specialists:
            raise ValueError("an UltraFuser needs at least one specialist")
        check_fusable(specialists, list(config.specialist_names))
        self.fuser = TokenFuser(specialists, gate_hidden=config.gate_hidden, names=config.specialist_names)
        if getattr(specialists[0], "generation_config", None) is not None:  # eos/pad defaults: the first specialist's
            self.generation_config = copy.deepcopy(specialists[0].generation_config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (one per specialist)

    # the TokenFuser's parts, for the training helpers (.training: set_training_stage, train_stage)
    @property
    def specialists(self) -> nn.ModuleList:
        return self.fuser.specialists

    @property
    def gate(self) -> nn.Module:
        return self.fuser.gate

    @property
    def names(self) -> list[str]:
        return self.fuser.names

    @property
    def num_specialists(self) -> int:
        return self.fuser.num_specialists

    def get_input_embeddings(self):
        return self.fuser.specialists[0].get_input_embeddings()

    def get_output_embeddings(self):
        return None  # several heads; the blend happens in forward

    def _vocab_groups(self):
        # each specialist has its own embeddings and head (tied or not, its config says), one shared vocabulary
        return [(m, [m.get_input_embeddings()], [m.get_output_embeddings()]) for m in self.fuser.specialists]

    def _set_vocab_size(self, size: int) -> None:
        super()._set_vocab_size(size)  # config.vocab_size and every specialist's config
        self.config.specialists = [{**values, "vocab_size": size} for values in self.config.specialists]

    def gate_weights(self, hidden_states) -> torch.Tensor:
        return self.fuser.gate_weights(hidden_states)

    def new_cache(self) -> UltraFuserCache:
        from transformers import DynamicCache

        return UltraFuserCache([DynamicCache(config=m.config) for m in self.fuser.specialists])

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: UltraFuserCache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, force_specialist=None,
                return_logits: bool | None = None, loss_impl: str = "fused", chunk_size: int | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> UltraFuserCausalLMOutput:
        cache = forward_cache("UltraFuserForCausalLM", cache, kwargs)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids [B, L] are required (the specialists embed the tokens themselves)")
        check_loss_impl(loss_impl)
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training and labels is None
        if cache is not None and not isinstance(cache, UltraFuserCache):
            raise TypeError(f"cache must be an UltraFuserCache (made by the model), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache()
        hidden = self.fuser.specialist_hidden_states(input_ids, attention_mask, position_ids, cache, use_cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0 and labels is None:
            hidden = [h[:, -logits_to_keep:] for h in hidden]
        elif isinstance(logits_to_keep, torch.Tensor) and labels is None:
            hidden = [h[:, logits_to_keep] for h in hidden]
        weights = self.fuser.gate_weights(hidden)
        if force_specialist is not None:
            weights = self.fuser._forced_weights(force_specialist, weights)
        loss = None
        if labels is not None:
            loss = self.fuser.next_token_loss(hidden, weights, labels, loss_impl, chunk_size)
        if return_logits is None:
            return_logits = labels is None
        logits = self.fuser.blend_logits(hidden, weights) if return_logits else None
        return UltraFuserCausalLMOutput(loss=loss, logits=logits, gate_weights=weights,
                                        **{CACHE_FIELD: cache if use_cache else None})


__all__ = ["UltraFuserForCausalLM", "UltraFuserCache", "UltraFuserCausalLMOutput", "check_fusable"]
