"""CCoE: whole expert branches (stacks of decoder layers) coupled on a shared backbone.

A *branch* is one expert's upper decoder layers (any depth), its final norm and its LM head. The
:class:`CoELayer` routes whole sequences: every sequence of the batch carries one expert id, the
sequences are grouped by expert with the same dispatch plan as the token path
(:func:`moe_kernels.plan` over ids of shape [B, 1]: a stable counting sort, its inverse permutation
puts the outputs back), and each branch runs once on its contiguous sub-batch.

The decoder layers are the Hugging Face modules themselves (Llama, Qwen2, Mistral, ... decoder
layers of transformers 5.x); masks are built with transformers' own mask functions so a branch
computes exactly what the expert's full model computes for those sequences.

Also here: :func:`decode_with_cache`, the step-by-step decoding loop shared by the coupled CCoE
model and the UltraFuser (both keep one KV cache per branch / specialist).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import ops

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
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from ..hf.compat import cache_kwargs

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
    from ..hf.compat import cache_kwargs

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
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                position_embeddings, cache=None, use_cache: bool = False) -> torch.Tensor:
        """hidden_states [b, L, H] at the CoE layer -> logits [b, L, V] (the head's dtype)."""
        masks = build_attention_masks(self.config, hidden_states, attention_mask, cache, position_ids,
                                      self.layer_indices, self.layer_types)
        hidden_states = run_decoder_layers(self.layers, self.layer_indices, self.layer_types, hidden_states,
                                           masks, position_embeddings, position_ids, cache, use_cache)
        return self.lm_head(self.norm(hidden_states))


def _rows(t, rows: torch.Tensor, batch_size: int):
    """Select batch rows of ``t`` when it has one row per sequence; broadcast tensors (batch 1) pass."""
    if t is None or t.shape[0] != batch_size:
        return t
    return t.index_select(0, rows)


class CoELayer(nn.Module):
    """The CoE layer: named expert branches and sequence-level dispatch to them.

    ``forward(hidden_states [B, L, H], expert_ids [B] (int, index into :attr:`names`), attention_mask
    [B, S] or None, position_ids [B or 1, L], position_embeddings (cos, sin) each [B or 1, L, d],
    caches {name: Cache} or None, use_cache)`` returns logits [B, L, V] in the batch's order. Every
    sequence of a branch's sub-batch is computed by that branch alone, so a sequence routed to expert
    j gets what expert j's full model computes for it. All branches must share the vocabulary size.
    ``backend`` names the moe_kernels backend of the dispatch plan (None: the default for the device).
    """

    def __init__(self, branches: dict[str, ExpertBranch] | None = None, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.branches = nn.ModuleDict()
        for name, branch in (branches or {}).items():
            self.add_branch(name, branch)

    @property
    def names(self) -> list[str]:
        """Expert names in id order (id i is ``names[i]``)."""
        return list(self.branches.keys())

    def add_branch(self, name: str, branch: ExpertBranch) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if name in self.branches:
            raise ValueError(f"an expert named {name!r} is already attached; pop it first")
        if not isinstance(branch, ExpertBranch):
            raise TypeError(f"branch must be an ExpertBranch, got {type(branch).__name__}")
        if len(self.branches):
            vocab = next(iter(self.branches.values())).vocab_size
            if branch.vocab_size != vocab:
                raise ValueError(f"expert {name!r} has vocabulary size {branch.vocab_size}, the attached experts "
                                 f"have {vocab}; all branches must share one vocabulary")
        self.branches[name] = branch

    def remove_branch(self, name: str) -> ExpertBranch:
        if name not in self.branches:
            raise KeyError(f"no expert named {name!r}; attached: {self.names}")
        branch = self.branches[name]
        del self.branches[name]
        return branch

    def new_caches(self) -> dict:
        return {name: branch.new_cache() for name, branch in self.branches.items()}

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor, position_embeddings, caches: dict | None = None,
                use_cache: bool = False) -> torch.Tensor:
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, L, H], got shape {tuple(hidden_states.shape)}")
        batch_size = hidden_states.shape[0]
        if expert_ids.shape != (batch_size,):
            raise ValueError(f"expert_ids must have shape [B] = ({batch_size},), got {tuple(expert_ids.shape)}")
        if not len(self.branches):
            raise RuntimeError("the CoE layer has no experts attached")
        names = self.names
        # Sequence-level dispatch: a plan over one "slot" per sequence groups sequences by expert
        # (stable, so each branch sees its sequences in batch order, which keeps its KV cache rows fixed).
        plan = ops.plan(expert_ids.reshape(-1, 1).to(torch.int32), len(names), backend=self.backend)
        offsets = plan.expert_offsets.tolist()
        sorted_rows = plan.sorted_slots.long()
        outputs = []
        for index, name in enumerate(names):
            start, end = offsets[index], offsets[index + 1]
            if start == end:
                continue
            rows = sorted_rows[start:end]
            cos, sin = position_embeddings
            outputs.append(self.branches[name](
                hidden_states.index_select(0, rows), _rows(attention_mask, rows, batch_size),
                _rows(position_ids, rows, batch_size), (_rows(cos, rows, batch_size), _rows(sin, rows, batch_size)),
                None if caches is None else caches[name], use_cache))
        return torch.cat(outputs, dim=0).index_select(0, plan.slot_positions.long())


def generation_defaults(model: nn.Module, eos_token_id, pad_token_id):
    """eos/pad ids for decoding: the given ones, else the Hugging Face model's generation config."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    if pad_token_id is None and config is not None:
        pad_token_id = config.pad_token_id
    return eos_token_id, pad_token_id


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left- or right-padded sequences, as transformers' ``generate`` makes them:
    cumsum(mask) - 1, with 0 at padding. [B, S] -> [B, S] int64."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def decode_with_cache(model: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                      pad_token_id: int | None = None,
                      generator: torch.Generator | None = None, **prefill_kwargs):
    """Step-by-step decoding with the model's own KV cache object (greedy, or sampling).

    ``model(input_ids, attention_mask=, position_ids=, past_key_values=, use_cache=True, **kwargs)`` must
    return an object with ``.logits`` [B, L, V] and ``.past_key_values``. The prompt runs once
    (``prefill_kwargs`` go to that call only), then one token per step. Position ids follow the
    attention mask like transformers' ``generate`` (left padding works). Sequences that emitted
    ``eos_token_id`` (an id or a list of ids) continue with ``pad_token_id`` (default: the first eos).
    Returns (sequences [B, L + n] int64, prefill output), n <= max_new_tokens (it stops early once every
    sequence has finished).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    eos_ids = None
    if eos_token_id is not None:
        eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                               device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if eos_ids is not None else 0
    position_ids = positions_from_mask(attention_mask)
    output = prefill = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                             **prefill_kwargs)
    sequences = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = output.logits[:, -1, :].float()
        if do_sample:
            scores = scores / temperature
            if top_k is not None:
                kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if eos_ids is not None:
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
            finished = finished | torch.isin(next_tokens, eos_ids)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        output = model(next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=output.past_key_values, use_cache=True)
    return sequences, prefill


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
