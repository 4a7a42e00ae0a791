"""UltraFuser's :class:`TokenFuser`: token-level gated fusion of specialist Hugging Face causal LMs.

All specialists run on the same tokens. Per token, a shared gate MLP (H -> gate_hidden -> ReLU -> 1)
scores each specialist's last hidden state h_j (after its final norm); w = softmax over the
specialists; the fused logits are o = sum_j w_j * o_j with o_j = head_j(h_j). Training uses the
chunked :func:`moe_kernels.losses.fused_gated_cross_entropy`, which never holds all N [T, V] logit
tensors at once.

The specialists are Hugging Face models (their decoders, heads, configs and ``DynamicCache`` KV
caches), and the output is a transformers ``ModelOutput`` (:class:`FusedCausalLMOutput`), so this
module lives with the UltraFuser model: :class:`moe_kernels.models.UltraFuserForCausalLM` holds a
TokenFuser as ``fuser`` and adds the config, save/load and transformers' ``generate``. The two-stage
training helpers are in :mod:`moe_kernels.models.ultrafuser.training`. Also importable as
``moe_kernels.layers.TokenFuser``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from ...losses import fused_gated_cross_entropy, naive_gated_cross_entropy
from ..generation import decode_with_cache, generation_defaults

LOSS_IMPLS = ("fused", "naive")


def check_loss_impl(loss_impl: str) -> None:
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be 'fused' or 'naive', got {loss_impl!r}")


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """loss (scalar, when labels were given); logits [B, L, V] float32 (None when only the loss was
    asked for); cache (:class:`FuserCache`, also readable as ``past_key_values``); gate_weights [B, L, N] float32.

    The field is ``cache``, not ``past_key_values``: transformers >= 5.24 rewrites ``past_key_values=`` into
    ``cache=`` in every ModelOutput's constructor (moe_kernels.hf.compat)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    gate_weights: torch.Tensor | None = None

    @property
    def past_key_values(self):
        return self.cache


class FuserCache:
    """One KV cache per specialist."""

    def __init__(self, caches: list):
        self.caches = caches

    def get_seq_length(self) -> int:
        return self.caches[0].get_seq_length()


def _specialist_parts(model: nn.Module, index: int):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or not isinstance(head, nn.Linear):
        raise TypeError(f"specialist {index} must be a Hugging Face causal LM with a decoder and a linear LM head, "
                        f"got {type(model).__name__}")
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"specialist {index} ({type(model).__name__}) transforms its logits ({attr}); "
                             "TokenFuser supports plain linear heads only")
    return decoder, head


class TokenFuser(nn.Module):
    """Specialist causal LMs fused token by token through a shared gate, called like a causal LM.

    specialists: causal LMs sharing one vocabulary and one hidden size (depth and family may differ);
    gate_hidden: width of the gate MLP (H -> gate_hidden -> ReLU -> 1); names: optional names.

    ``forward(input_ids [B, L], attention_mask=None, position_ids=None, past_key_values=None,
    use_cache=False, labels=None, force_specialist=None, return_logits=None, loss_impl="fused",
    chunk_size=None)``. ``force_specialist`` (index or name) sets the gate weights one-hot.
    With ``labels`` the loss is the blended next-token cross-entropy (labels shifted inside, -100
    ignored), computed by :func:`fused_gated_cross_entropy` ("fused") or the naive form ("naive");
    logits are then only returned if ``return_logits=True``.
    """

    def __init__(self, specialists: Sequence[nn.Module], gate_hidden: int = 512, names: Sequence[str] | None = None):
        super().__init__()
        specialists = list(specialists)
        if not specialists:
            raise ValueError("specialists must list at least one model")
        if isinstance(gate_hidden, bool) or not isinstance(gate_hidden, int) or gate_hidden < 1:
            raise ValueError(f"gate_hidden must be a positive int, got {gate_hidden!r}")
        heads = [_specialist_parts(m, j)[1] for j, m in enumerate(specialists)]
        vocab, hidden = heads[0].out_features, heads[0].in_features
        for j, head in enumerate(heads[1:], start=1):
            if head.out_features != vocab:
                raise ValueError(f"specialist {j} has vocabulary size {head.out_features} but specialist 0 has "
                                 f"{vocab}; fusion needs one shared vocabulary (different tokenizers are not "
                                 "supported)")
            if head.in_features != hidden:
                raise ValueError(f"specialist {j} has hidden size {head.in_features} but specialist 0 has {hidden}; "
                                 "the shared gate needs one hidden size")
        for j, model in enumerate(specialists):
            config_vocab = getattr(model.config, "vocab_size", vocab)
            if config_vocab != vocab:
                raise ValueError(f"specialist {j} has config.vocab_size {config_vocab} but its head has {vocab} rows")
        if names is None:
            names = [f"specialist_{j}" for j in range(len(specialists))]
        names = list(names)
        if len(names) != len(specialists) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(specialists)} distinct names, got {names}")
        self.names = names
        self.specialists = nn.ModuleList(specialists)
        reference = heads[0].weight
        self.gate = nn.Sequential(nn.Linear(hidden, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 1)).to(
            device=reference.device, dtype=reference.dtype)

    @property
    def num_specialists(self) -> int:
        return len(self.specialists)

    @property
    def device(self) -> torch.device:
        return self.gate[0].weight.device

    def _heads(self) -> list[nn.Linear]:
        return [m.get_output_embeddings() for m in self.specialists]

    def specialist_hidden_states(self, input_ids, attention_mask=None, position_ids=None,
                                 cache: FuserCache | None = None, use_cache: bool = False) -> list[torch.Tensor]:
        """Each specialist's last hidden state (after its final norm) [B, L, H]."""
        from ...hf.compat import cache_kwargs  # not at import time: moe_kernels.hf imports this package as it starts

        outputs = []
        for j, model in enumerate(self.specialists):
            out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=use_cache, **cache_kwargs(None if cache is None else cache.caches[j]))
            outputs.append(out.last_hidden_state)
        return outputs

    def gate_weights(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Softmax over specialists of the shared gate's score of each hidden state -> [B, L, N] float32."""
        scores = torch.stack([self.gate(h).squeeze(-1) for h in hidden_states], dim=-1)
        return torch.softmax(scores.float(), dim=-1)

    def _forced_weights(self, force_specialist, like: torch.Tensor) -> torch.Tensor:
        index = self.names.index(force_specialist) if isinstance(force_specialist, str) and \
            force_specialist in self.names else force_specialist
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_specialists:
            raise ValueError(f"force_specialist must be a name in {self.names} or an index in "
                             f"[0, {self.num_specialists}), got {force_specialist!r}")
        return F.one_hot(torch.full(like.shape[:-1], index, device=like.device), self.num_specialists).float()

    def blend_logits(self, hidden_states: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """sum_j w_j * head_j(h_j) -> [B, L, V] float32, one specialist's logits at a time."""
        blended = None
        for j, (head, h) in enumerate(zip(self._heads(), hidden_states)):
            term = weights[..., j:j + 1] * head(h).float()
            blended = term if blended is None else blended + term
        return blended

    def next_token_loss(self, hidden_states: Sequence[torch.Tensor], weights: torch.Tensor, labels: torch.Tensor,
                        loss_impl: str = "fused", chunk_size: int | None = None) -> torch.Tensor:
        """The blended next-token cross-entropy: hidden states [B, L, H] and gate weights [B, L, N] at
        positions 0..L-2 against labels [B, L] at 1..L-1 (-100 ignored), by
        :func:`~moe_kernels.losses.fused_gated_cross_entropy` ("fused", chunks of ``chunk_size`` tokens) or
        :func:`~moe_kernels.losses.naive_gated_cross_entropy` ("naive")."""
        check_loss_impl(loss_impl)
        if labels.shape != hidden_states[0].shape[:2]:
            raise ValueError(f"labels must have the shape of input_ids {tuple(hidden_states[0].shape[:2])}, "
                             f"got {tuple(labels.shape)}")
        heads = self._heads()
        shifted = [h[:, :-1].flatten(0, 1) for h in hidden_states]
        loss_fn = fused_gated_cross_entropy if loss_impl == "fused" else naive_gated_cross_entropy
        extra = {"chunk_size": chunk_size} if loss_impl == "fused" else {}
        biases = [hd.bias for hd in heads]
        return loss_fn(shifted, [hd.weight for hd in heads], weights[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                       head_biases=None if biases[0] is None else biases, **extra)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: FuserCache | None = None,
                use_cache: bool = False, labels: torch.Tensor | None = None, force_specialist=None,
                return_logits: bool | None = None, loss_impl: str = "fused",
                chunk_size: int | None = None) -> FusedCausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        check_loss_impl(loss_impl)
        cache = past_key_values
        if cache is None and use_cache:
            cache = FuserCache([DynamicCache(config=m.config) for m in self.specialists])
        hidden = self.specialist_hidden_states(input_ids, attention_mask, position_ids, cache, use_cache)
        weights = self.gate_weights(hidden)
        if force_specialist is not None:
            weights = self._forced_weights(force_specialist, weights)
        loss = None
        if labels is not None:
            loss = self.next_token_loss(hidden, weights, labels, loss_impl, chunk_size)
        if return_logits is None:
            return_logits = labels is None
        logits = self.blend_logits(hidden, weights) if return_logits else None
        return FusedCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                   gate_weights=weights)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, force_specialist=None, eos_token_id=None, pad_token_id=None,
                 **decode_kwargs) -> torch.Tensor:
        """Blended decoding, one token per step, one KV cache per specialist (greedy by default; see
        :func:`moe_kernels.models.generation.decode_with_cache` for sampling). eos/pad default to the first
        specialist's generation config. Returns [B, L + n]."""
        eos_token_id, pad_token_id = generation_defaults(self.specialists[0], eos_token_id, pad_token_id)
        decode_kwargs.update(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if force_specialist is not None:
            def step(*args, **kwargs):
                return self(*args, force_specialist=force_specialist, **kwargs)
        else:
            step = self
        return decode_with_cache(step, input_ids, attention_mask, max_new_tokens=max_new_tokens, **decode_kwargs)[0]


__all__ = ["TokenFuser", "FusedCausalLMOutput", "FuserCache", "LOSS_IMPLS", "check_loss_impl"]
