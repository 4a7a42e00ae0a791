"""Shared pieces of the composed models (PESC, Self-MoE, CCoE, UltraFuser) as Hugging Face models.

Each composed model is a ``PreTrainedModel`` + ``GenerationMixin`` with its own config class and a
``model_type`` of its own (``moe_kernels_*``). transformers does not know these types until
``import moe_kernels.hf`` registers them, so loading a composed checkpoint without the package fails
with transformers' "unrecognized model type" error instead of building a dense model with random weights.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

# The KV-cache keyword and ModelOutput field of the installed transformers: "cache" from 5.24 on,
# "past_key_values" before (the rule of moe_kernels.hf.compat.CACHE_KWARG, repeated here because this
# package is imported while moe_kernels.hf initialises and must not import it back).
CACHE_FIELD = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

# Arguments transformers' generate() may pass that the composed models do not use.
IGNORED_FORWARD_KWARGS = frozenset({"return_dict", "cache_position", "output_attentions", "output_hidden_states"})


def forward_cache(owner: str, cache, kwargs: dict):
    """The KV cache a composed model's forward was given (``cache=``, or ``past_key_values=`` as transformers
    before 5.24 passes it); a TypeError for any other keyword that is set and not harmlessly ignored."""
    if "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values") if cache is None else cache
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in IGNORED_FORWARD_KWARGS)
    if unknown:
        raise TypeError(f"{owner}.forward got unsupported arguments {unknown}")
    return cache


def train_steps(model, batches, optimizer, max_steps: int | None = None, **forward_kwargs) -> list[float]:
    """One optimiser step per batch (a dict with input_ids [B, L], labels [B, L] and optionally
    attention_mask) on ``model(input_ids, attention_mask=, labels=, **forward_kwargs).loss``, at most
    ``max_steps`` steps; returns the loss of each step. The caller sets train mode and what trains."""
    losses = []
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    **forward_kwargs)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


def output_class(name: str, fields: list[str], doc: str) -> type:
    """A ModelOutput dataclass with these fields (all default None); ``"cache"`` is named as the installed
    transformers names the cache (``CACHE_FIELD``), so ``generate`` finds it. The object also answers to
    ``.cache`` whatever the version."""
    names = [CACHE_FIELD if f == "cache" else f for f in fields]
    cls = make_dataclass(name, [(f, object, field(default=None)) for f in names], bases=(ModelOutput,))
    if CACHE_FIELD != "cache":
        cls.cache = property(lambda self: getattr(self, CACHE_FIELD))
    cls.__doc__ = doc
    return cls


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

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """transformers' ``from_pretrained``, strict by default: a checkpoint that lacks a tensor of the
        composed model, or holds one it does not have, raises instead of leaving randomly initialised
        weights (``strict=False`` restores transformers' warning-only behaviour)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if strict and any(problems.values()):
            details = "; ".join(f"{key}: {values[:6]}" + (" ..." if len(values) > 6 else "")
                                for key, values in problems.items() if values)
            raise ValueError(f"{cls.__name__}.from_pretrained: the checkpoint does not match the model ({details}). "
                             "Refusing to return a model with randomly initialised weights; pass strict=False to "
                             "load anyway.")
        return (model, info) if want_info else model

    def mark_tied_weights_as_initialized(self, loading_info):
        # transformers flags every declared tie target as initialised, then (for models outside transformers) drops
        # from the missing keys each tensor that carries the flag, meant for aliases of a loaded tensor. CCoE ties
        # shared norms / heads as one module, so a target's tensor IS its source's: a source missing from the
        # checkpoint got the flag through its target and was dropped, and stayed unloaded (on the meta device)
        # with no missing key reported, past the strict check. Keep missing every tensor none of whose names was
        # in the checkpoint.
        before = set(loading_info.missing_keys)
        super().mark_tied_weights_as_initialized(loading_info)
        dropped = before - loading_info.missing_keys
        if dropped:
            names: dict[int, list[str]] = {}
            for name, tensor in [*self.named_parameters(remove_duplicate=False),
                                 *self.named_buffers(remove_duplicate=False)]:
                names.setdefault(id(tensor), []).append(name)
            loading_info.missing_keys |= {key for key in dropped
                                          if all(n in before for n in names.get(id(self.get_parameter_or_buffer(key)),
                                                                                [key]))}

    def set_backend(self, backend: str | None) -> None:
        """The moe_kernels backend of every moe_kernels layer inside (None: chosen by device). A run-time
        choice, not saved: backends agree to rounding, not bit for bit."""
        for module in self.modules():
            if module is not self and hasattr(module, "backend") and type(module).__module__.startswith("moe_kernels."):
                module.backend = backend

    def post_init(self):
        super().post_init()
        # transformers gathers the tied weights (e.g. lm_head = embed_tokens) of direct children only; the
        # composed models nest transformers models deeper (in ModuleLists, in plain modules): gather them all.
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)

    # ----- vocabulary resizing -----
    def _vocab_groups(self) -> list[tuple[PreTrainedModel, list[nn.Module], list[nn.Module]]]:
        """Every (owner, input embeddings, output heads) that carries the vocabulary. ``owner`` is the
        transformers model whose resize helpers (its config's initializer_range) initialise the new rows.
        A module used in several places may be listed several times; a head whose weight is an embedding's
        tensor is tied to it. Default: this model's one embedding / head pair."""
        head = self.get_output_embeddings()
        return [(self, [self.get_input_embeddings()], [] if head is None else [head])]

    def _set_vocab_size(self, size: int) -> None:
        """Write the new vocabulary size wherever a config records it (so save/load rebuilds these shapes):
        here the text config of this model and of every transformers model nested in it."""
        for module in self.modules():
            if isinstance(module, PreTrainedModel):
                module.config.get_text_config().vocab_size = size

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' ``resize_token_embeddings`` for a model that may hold several embeddings and heads
        (CCoE: one backbone embedding and a head per expert; UltraFuser: a pair per specialist). All grow or
        shrink together to one size: old rows are kept, new rows initialised as transformers does (each by its
        owner model); a head tied to an embedding stays that embedding's tensor, a head module shared by
        several places is resized once and stays shared. Returns the (first) input embeddings."""
        groups = self._vocab_groups()
        first = groups[0][1][0]
        if new_num_tokens is None and pad_to_multiple_of is None:
            return first
        size = first.weight.shape[0] if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) \
                    or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")

        embedding_weights = set()
        for owner, embeddings, _ in groups:
            for embedding in {id(e): e for e in embeddings}.values():
                # in place (transformers' own helper): the module and its Parameter stay, so every head tied
                # to it (holding that Parameter) sees the new rows
                owner._get_resized_embeddings(embedding, size, mean_resizing=mean_resizing)
                embedding_weights.add(id(embedding.weight))
        replaced: dict[int, nn.Module] = {}
        for owner, _, heads in groups:
            for head in heads:
                if id(head) in replaced:
                    continue
                if id(head.weight) in embedding_weights:  # tied: already resized with its embedding
                    self._adjust_bias(head, head.weight)  # pads a bias, if any, to the new rows
                    head.out_features = size
                    replaced[id(head)] = head
                    continue
                new_head = owner._get_resized_lm_head(head, size, mean_resizing=mean_resizing)
                if new_head is not head:
                    new_head.requires_grad_(head.weight.requires_grad)
                    if hasattr(head, "_hf_hook"):
                        from accelerate.hooks import add_hook_to_module
                        add_hook_to_module(new_head, head._hf_hook)
                replaced[id(head)] = new_head
        # put each new head in every place that held the old one (CCoE experts may share one head module)
        for parent in list(self.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in replaced and replaced[id(child)] is not child:
                    setattr(parent, name, replaced[id(child)])
        self._set_vocab_size(size)
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)
        self.tie_weights()
        return self._vocab_groups()[0][1][0]


class WrapsLanguageModel:
    """For a composed model that holds one transformers causal LM as ``self.language_model`` (PESC,
    Self-MoE): embeddings, output head and decoder are that model's."""

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def _vocab_groups(self):
        head = self.language_model.get_output_embeddings()
        return [(self.language_model, [self.get_input_embeddings()], [] if head is None else [head])]
