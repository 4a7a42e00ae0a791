"""Self-MoE (MiXSE) on Hugging Face models: N PEFT LoRA adapters become routed experts of one model.

``compose_lora_experts(base_model, adapters)`` replaces every linear the adapters target by a
:class:`moe_kernels.layers.LoRAMoE` holding all N adapters' LoRA matrices, adds one router shared by
all adapted layers (``model.self_moe_router``) and returns a :class:`moe_kernels.models.SelfMoEForCausalLM`
(save_pretrained / AutoModelForCausalLM.from_pretrained round-trip it). The whole MiXSE recipe (synthetic
data from seeds, one LoRA expert per domain, composing, router training) is
:func:`moe_kernels.hf.self_specialize`.

Router input (the choice made here): the hidden state entering each decoder layer (the residual stream,
[T, hidden_size]), routed once per decoder layer; every adapted linear in that decoder layer (attention
and MLP projections alike) uses that routing. One [hidden_size -> N] router therefore serves all layers,
including linears whose own input is not hidden_size wide (down_proj). A forward pre-hook on each
decoder layer runs the router and leaves the routing in a :class:`RoutingSlot` the layer's LoRAMoEs read.

Only the router is trainable; the base model and the experts are frozen. Routing: softmax over all N,
keep the top k, no renormalisation (top-1 by default). ``model.self_moe_router.forced_expert = i`` sends
every token to expert i with weight 1: the model then computes base + adapter i, as PEFT would.

Not supported (clear errors): DoRA, LoRA biases, embedding/conv LoRA, fan_in_fan_out layers. LoRA dropout
is not applied (the experts are frozen).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import torch
from torch import nn

from ..layers.lora_moe import SelfMoERouter
from ..models.self_moe.modeling_self_moe import group_by_decoder_layer

_PEFT_PREFIX = "base_model.model."


def _adapter_scaling(config: dict, module_path: str, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_path):
            alpha = value
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _read_adapter(adapter, index: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoRA config as a dict, PEFT adapter state dict with keys ``base_model.model.<path>.lora_A.weight``)."""
    if isinstance(adapter, (str, os.PathLike)):
        path = os.fspath(adapter)
        config_file = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"adapters[{index}]: {path!r} has no adapter_config.json (not a PEFT adapter dir)")
        with open(config_file) as f:
            config = json.load(f)
        weights_st, weights_bin = (os.path.join(path, n) for n in ("adapter_model.safetensors", "adapter_model.bin"))
        if os.path.isfile(weights_st):
            from safetensors.torch import load_file
            state = load_file(weights_st)
        elif os.path.isfile(weights_bin):
            state = torch.load(weights_bin, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"adapters[{index}]: no adapter_model.safetensors or .bin in {path!r}")
        return config, state
    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TypeError(f"adapters[{index}] is a {type(adapter).__name__}; without PEFT installed only "
                        "adapter directories are accepted") from exc
    if not isinstance(adapter, PeftModel):
        raise TypeError(f"adapters[{index}] must be a PEFT adapter directory or a peft.PeftModel, "
                        f"got {type(adapter).__name__}")
    name = adapter.active_adapter
    config = adapter.peft_config[name].to_dict()
    return config, get_peft_model_state_dict(adapter, adapter_name=name)


def _lora_pairs(config: dict, state: dict[str, torch.Tensor], index: int) -> dict[str, tuple]:
    """module path -> (A [r,in], B [out,r], scaling) for one adapter, with unsupported features rejected."""
    peft_type = str(config.get("peft_type", "LORA")).upper().replace("PEFTTYPE.", "")
    if peft_type != "LORA":
        raise ValueError(f"adapters[{index}] is a {peft_type} adapter; only LoRA adapters are supported")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(flag):
            raise ValueError(f"adapters[{index}] uses {what}, which compose_lora_experts does not support")
    pairs: dict[str, dict] = {}
    for key, tensor in state.items():
        path = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        match = re.match(r"^(.*)\.lora_([AB])\.weight$", path)
        if match is None:
            raise ValueError(f"adapters[{index}]: unsupported tensor {key!r} (only lora_A/lora_B weights of "
                             "linear layers are supported)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    result = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2:
            raise ValueError(f"adapters[{index}]: {path} needs a 2-D lora_A and lora_B pair, got {sorted(ab)}")
        rank = ab["A"].shape[0]
        result[path] = (ab["A"], ab["B"], _adapter_scaling(config, path, rank))
    if not result:
        raise ValueError(f"adapters[{index}] holds no LoRA weights")
    return result


def compose_lora_experts(base_model: nn.Module, adapters: Sequence, top_k: int = 1, router: str = "shared", *,
                         names: Sequence[str] | None = None, backend: str | None = None) -> nn.Module:
    """Build a Self-MoE model from a base model and N LoRA adapters.

    Args:
        base_model: the transformers causal LM the adapters were trained on (not a PeftModel), e.g. a
            LlamaForCausalLM; adapter module paths are relative to it. It is modified in place and becomes
            the returned model's ``language_model``.
        adapters: N >= 1 PEFT LoRA adapter directories or ``peft.PeftModel`` objects, all targeting the
            same modules (ranks and alphas may differ).
        top_k: experts per token (1 <= top_k <= N); weights are softmax probabilities, not renormalised.
        router: "shared" -- one router for all adapted layers (``model.self_moe_router``), or
            "per_layer" -- one router per decoder layer (``model.self_moe_routers``).
        names: the experts' names (default ``expert_0`` ...), kept in the config.
        backend: moe_kernels backend for the routing and the routed LoRA products.

    Returns a :class:`moe_kernels.models.SelfMoEForCausalLM`, called like the base model;
    ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` round-trip it. Trainable parameters: the
    router(s) only.
    """
    from ..models.self_moe import SelfMoEConfig, SelfMoEForCausalLM

    if router not in ("shared", "per_layer"):
        raise ValueError(f"router must be 'shared' or 'per_layer', got {router!r}")
    if type(base_model).__name__.startswith("Peft"):
        raise TypeError("base_model must be the plain transformers model, not a PEFT wrapper")
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or len(adapters) < 1:
        raise ValueError("adapters must be a non-empty list of PEFT adapter directories or PeftModels")
    num_experts = len(adapters)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, number of adapters = {num_experts}], got {top_k!r}")
    names = [f"expert_{i}" for i in range(num_experts)] if names is None else [str(n) for n in names]
    if len(names) != num_experts or len(set(names)) != num_experts:
        raise ValueError(f"names must give {num_experts} distinct names, got {names}")
    experts = [_lora_pairs(*_read_adapter(a, i), i) for i, a in enumerate(adapters)]
    targets = sorted(experts[0])
    for i, expert in enumerate(experts[1:], start=1):
        if sorted(expert) != targets:
            diff = sorted(set(expert) ^ set(targets))
            raise ValueError(f"adapters[{i}] targets other modules than adapters[0] (differ: {diff[:6]})")
    group_by_decoder_layer(base_model, targets)  # clear errors before anything is changed
    if getattr(base_model, "get_output_embeddings", lambda: None)() is None:
        raise TypeError(f"base_model must be a causal LM with an LM head, got {type(base_model).__name__}")

    for p in base_model.parameters():
        p.requires_grad_(False)
    per_path = {path: [expert[path] for expert in experts] for path in targets}
    config = SelfMoEConfig(text_config=base_model.config, expert_names=names, num_experts_per_tok=top_k, router=router,
                           lora_ranks={path: [int(a.shape[0]) for a, _, _ in triples]
                                       for path, triples in per_path.items()})
    model = SelfMoEForCausalLM(config, language_model=base_model, experts=per_path, backend=backend)
    return model.train(base_model.training)


def self_moe_routers(model: nn.Module) -> list[SelfMoERouter]:
    """The distinct SelfMoERouter modules of a composed model."""
    return [m for m in model.modules() if isinstance(m, SelfMoERouter)]


__all__ = ["compose_lora_experts", "self_moe_routers"]
