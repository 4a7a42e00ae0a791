"""UltraFuser on Hugging Face causal LMs: fuse specialists token by token through a shared gate."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..layers.fuser import TokenFuser


def fuse_specialists(models: Sequence[nn.Module] | dict[str, nn.Module], gate_hidden: int = 512,
                     tokenizers: Sequence | None = None) -> TokenFuser:
    """Fuse specialist causal LMs (a list, or a dict {name: model}) into one :class:`TokenFuser`.

    The specialists must share one vocabulary (checked on the LM heads and configs, and on the
    tokenizers' vocabularies when ``tokenizers`` are given, one per model) and one hidden size.
    The gate (H -> gate_hidden -> ReLU -> 1) is new and placed on the first specialist's device
    and dtype. The fused model shares the specialists' modules (no copies).
    """
    names = None
    if isinstance(models, dict):
        names, models = list(models.keys()), list(models.values())
    models = list(models)
    if tokenizers is not None:
        tokenizers = list(tokenizers)
        if len(tokenizers) != len(models):
            raise ValueError(f"tokenizers must give one tokenizer per model ({len(models)}), got {len(tokenizers)}")
        reference_vocab = tokenizers[0].get_vocab()
        for j, tokenizer in enumerate(tokenizers[1:], start=1):
            if tokenizer.get_vocab() != reference_vocab:
                label = names[j] if names else f"model {j}"
                raise ValueError(f"the tokenizer of {label} has a different vocabulary from the first model's; "
                                 "token-level fusion needs one shared vocabulary")
    return TokenFuser(models, gate_hidden=gate_hidden, names=names)
