"""UltraFuser on Hugging Face causal LMs: fuse specialists token by token through a shared gate."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def fuse_specialists(models: Sequence[nn.Module] | dict[str, nn.Module], gate_hidden: int = 512,
                     tokenizers: Sequence | None = None):
    """Fuse specialist causal LMs (a list, or a dict {name: model}) into one
    :class:`moe_kernels.models.UltraFuserForCausalLM` (a Hugging Face model: ``generate`` and
    ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` work on it).

    The specialists must share one vocabulary (checked on the LM heads and configs, and on the
    tokenizers' vocabularies when ``tokenizers`` are given, one per model) and one hidden size; the error
    for a mismatched pair names both specialists and exactly which dimension differs.
    The gate (H -> gate_hidden -> ReLU -> 1) is new and placed on the first specialist's device
    and dtype. The fused model shares the specialists' modules (no copies).
    """
    from ..models.ultrafuser import UltraFuserConfig, UltraFuserForCausalLM, check_fusable

    names = None
    if isinstance(models, dict):
        names, models = list(models.keys()), list(models.values())
    models = list(models)
    if not models:
        raise ValueError("models must list at least one specialist")
    if names is None:
        names = [f"specialist_{j}" for j in range(len(models))]
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    check_fusable(models, names)
    if tokenizers is not None:
        tokenizers = list(tokenizers)
        if len(tokenizers) != len(models):
            raise ValueError(f"tokenizers must give one tokenizer per model ({len(models)}), got {len(tokenizers)}")
        reference_vocab = tokenizers[0].get_vocab()
        for j, tokenizer in enumerate(tokenizers[1:], start=1):
            if tokenizer.get_vocab() != reference_vocab:
                label = names[j]
                raise ValueError(f"the tokenizer of {label} has a different vocabulary from the first model's; "
                                 "token-level fusion needs one shared vocabulary")
    config = UltraFuserConfig(specialists=[m.config for m in models], specialist_names=names, gate_hidden=gate_hidden)
    fused = UltraFuserForCausalLM(config, specialists=models)
    return fused.train(models[0].training)
