"""Decoding helpers of the composed causal LMs that keep one KV cache per branch or specialist (the
plain-module CCoE decoder :class:`moe_kernels.hf.couple.CoupledExperts` and
:class:`moe_kernels.models.ultrafuser.TokenFuser`).

* :func:`decode_with_cache`: the step-by-step decoding loop (greedy, or sampling) over the model's own cache;
* :func:`positions_from_mask`: position ids of padded sequences, as transformers' ``generate`` makes them;
* :func:`generation_defaults`: eos/pad ids from a Hugging Face model's generation config.

Pure torch (nothing here imports transformers); the composed Hugging Face models themselves
(:mod:`moe_kernels.models`) decode with transformers' ``generate``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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


__all__ = ["decode_with_cache", "generation_defaults", "positions_from_mask"]
