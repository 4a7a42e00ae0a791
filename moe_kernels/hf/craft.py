"""PESC sparsity crafting on Hugging Face causal LMs (Llama, Mistral, Qwen2, Qwen3).

``craft_sparsity(model)`` replaces every decoder layer's MLP by :class:`moe_kernels.layers.AdapterMoE`
(the MLP becomes the shared FFN; router + zero-initialised adapters are added), so the crafted model's
logits equal the dense model's until the adapters are trained.

Training loss. Each AdapterMoE stores its Switch load-balancing loss of the last forward. The crafted
model's forward adds ``crafted_aux_loss(model) = sum over layers of aux_loss_coef * aux_loss`` to the
``loss`` it returns whenever ``labels`` are given (turn off with ``add_aux_loss=False``); a training loop
that computes its own loss from the logits adds ``crafted_aux_loss(model)`` itself.

Save / load. ``model.save_pretrained(dir)`` (the usual Hugging Face call) writes safetensors plus
``config.json``, which carries the crafting settings under ``moe_kernels_pesc``;
``load_crafted(dir)`` rebuilds the model from that config, crafts it and loads the weights (strict: every
saved tensor must be used and every parameter filled). ``AutoModelForCausalLM.from_pretrained`` alone
does not know the crafted layout; use ``load_crafted``. With PEFT LoRA (``lora=``), merge first:
``model.merge_and_unload().save_pretrained(dir)``.

CLI: ``moe-kernels craft SRC_DIR DST_DIR --experts 8 --top-k 2 --adapter-dim 64`` (see :func:`craft_main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from typing import Iterable

import torch
from torch import nn

from ..layers.adapter_moe import AdapterMoE

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CONFIG_KEY = "moe_kernels_pesc"  # config.json entry holding the crafting settings
_HOOK_FLAG = "_moe_kernels_aux_hook"


def _dense_mlps(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
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


def crafted_aux_loss(model: nn.Module) -> torch.Tensor:
    """sum over AdapterMoE layers of ``aux_loss_coef * aux_loss`` from the last forward (fp32 scalar).

    Differentiable w.r.t. the routers. Raises RuntimeError if the model has not run a forward yet.
    """
    layers = crafted_layers(model)
    if not layers:
        raise ValueError("model has no AdapterMoE layers; craft it with craft_sparsity first")
    terms = []
    for layer in layers:
        if layer.aux_loss is None:
            raise RuntimeError("crafted_aux_loss needs a forward pass first (no layer has an aux_loss yet)")
        terms.append(layer.aux_loss_coef * layer.aux_loss)
    return torch.stack(terms).sum()


def _add_aux_loss_hook(module, args, kwargs, output):
    """Forward hook on the crafted causal LM: loss += crafted_aux_loss when the call computed a loss."""
    if kwargs.get("labels") is None:
        return output
    aux = crafted_aux_loss(module)
    if isinstance(output, tuple):  # return_dict=False: loss first
        return (output[0] + aux.to(output[0].dtype),) + output[1:]
    if getattr(output, "loss", None) is not None:
        output.loss = output.loss + aux.to(output.loss.dtype)
    return output


def _lora_config(lora):
    """A peft.LoraConfig from a LoraConfig or dict; keeps PEFT off the routers (they stay full-rank trainable)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lora= needs PEFT: pip install peft") from exc
    if isinstance(lora, dict):
        lora = LoraConfig(**lora)
    if not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a peft.LoraConfig or a dict of its arguments, got {type(lora).__name__}")
    if lora.exclude_modules is None:
        lora.exclude_modules = r".*\.mlp\.router"
    return lora


def craft_sparsity(model: nn.Module, num_experts: int = 8, top_k: int = 2, adapter_dim: int = 64, *,
                   scale: float = 1.0, activation: str = "gelu", dropout: float = 0.1, aux_loss_coef: float = 0.01,
                   freeze_base: bool = False, lora=None, add_aux_loss: bool = True, backend: str | None = None,
                   progress: bool = False):
    """Turn every MLP of a Llama/Mistral/Qwen2/Qwen3 causal LM into a PESC adapter MoE, in place.

    Args:
        model: a transformers ``*ForCausalLM`` (or its base ``*Model``) of a supported family.
        num_experts, top_k, adapter_dim, scale, activation, dropout, aux_loss_coef: see
            :class:`moe_kernels.layers.AdapterMoE`.
        freeze_base: freeze every parameter except the routers and adapters (train router + adapters only).
        lora: a ``peft.LoraConfig`` (or dict of its arguments): also freeze the base and put PEFT LoRA on
            its ``target_modules`` (attention and/or the shared FFN's linears); routers and adapters stay
            trainable. Returns the ``PeftModel`` in that case.
        add_aux_loss: the model's forward adds the load-balancing loss to ``loss`` when labels are given.
        backend: moe_kernels backend for the layers' ops (None: chosen by device).
        progress: show a tqdm progress bar over the layers.

    Returns the crafted model (the same object, or a PeftModel around it when ``lora`` is given). Its
    config gains ``moe_kernels_pesc`` so ``save_pretrained`` + :func:`load_crafted` round-trip.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model must be a transformers model of type {list(SUPPORTED_MODEL_TYPES)}, "
                         f"got model_type={model_type!r} ({type(model).__name__})")
    if crafted_layers(model):
        raise ValueError("model is already crafted (it has AdapterMoE layers)")
    targets = _dense_mlps(model)
    if not targets:
        raise ValueError(f"found no gated MLP (gate_proj/up_proj/down_proj) in {type(model).__name__}")
    settings = {"num_experts": num_experts, "top_k": top_k, "adapter_dim": adapter_dim, "scale": float(scale),
                "activation": activation, "dropout": float(dropout), "aux_loss_coef": float(aux_loss_coef),
                "add_aux_loss": bool(add_aux_loss)}
    layer_args = {k: v for k, v in settings.items() if k != "add_aux_loss"}
    lora_config = _lora_config(lora) if lora is not None else None

    from tqdm.auto import tqdm
    for parent, attribute, mlp in tqdm(targets, desc="crafting MLPs", unit="layer", disable=not progress):
        hidden = mlp.gate_proj.in_features
        layer = AdapterMoE(mlp, hidden, backend=backend, **layer_args)
        setattr(parent, attribute, layer.train(mlp.training))  # keep the model's train/eval mode
    setattr(config, CONFIG_KEY, settings)  # serialised into config.json by save_pretrained

    if add_aux_loss and not getattr(model, _HOOK_FLAG, False):
        model.register_forward_hook(_add_aux_loss_hook, with_kwargs=True)
        setattr(model, _HOOK_FLAG, True)

    if freeze_base or lora_config is not None:
        for p in model.parameters():
            p.requires_grad_(False)
    if lora_config is not None:
        from peft import get_peft_model
        model = get_peft_model(model, lora_config)
    if freeze_base or lora_config is not None:
        for layer in crafted_layers(model):
            for p in (layer.router.weight, layer.adapter_down, layer.adapter_up):
                p.requires_grad_(True)
    return model


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


def load_crafted(path: str, *, dtype: torch.dtype | None = None, device=None, backend: str | None = None,
                 progress: bool = False):
    """Restore a crafted model written by ``save_pretrained`` (safetensors + config.json with ``moe_kernels_pesc``).

    dtype: parameter dtype (default: the checkpoint's floating dtype). device: where to put the model.
    Returns the model in eval mode, with logits identical to the saved model's.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path!r} is not a crafted checkpoint: its config.json has no {CONFIG_KEY!r} entry "
                         "(craft it with moe_kernels.hf.craft_sparsity and save with save_pretrained)")
    state = _read_checkpoint(path)
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    try:  # skip the random init of weights the checkpoint overwrites anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips the tying of e.g. lm_head to the embeddings
    model = craft_sparsity(model, backend=backend, progress=progress, **settings)
    _load_strict(model, state)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that tolerates only missing keys tied to a loaded parameter (e.g. lm_head)."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has tensors the crafted model does not: {result.unexpected_keys[:8]}")
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    loaded_ids = {id(named[k]) for k in state if k in named}
    untied = [k for k in result.missing_keys if id(named.get(k)) not in loaded_ids]
    if untied:
        raise ValueError(f"checkpoint lacks tensors of the crafted model: {untied[:8]}")


def _copy_side_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer and other non-weight files (weights and config are written by save_pretrained)."""
    copied = []
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if not os.path.isfile(full) or name == "config.json" or name.endswith(
                (".safetensors", ".bin", ".pt", ".pth", ".index.json")):
            continue
        if not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(full, os.path.join(dst, name))
            copied.append(name)
    return copied


def craft_main(argv: Iterable[str] | None = None) -> int:
    """``moe-kernels craft SRC_DIR DST_DIR [options]``: craft a local HF checkpoint and save it. Returns 0."""
    parser = argparse.ArgumentParser(
        prog="moe-kernels craft",
        description="PESC sparsity crafting: turn every MLP of a local Llama/Mistral/Qwen2/Qwen3 checkpoint "
                    "into a shared FFN plus routed adapter experts, and save the result (load it with "
                    "moe_kernels.hf.load_crafted).")
    parser.add_argument("src", metavar="SRC_DIR", help="local Hugging Face checkpoint directory")
    parser.add_argument("dst", metavar="DST_DIR", help="output directory")
    parser.add_argument("--experts", type=int, default=8, help="adapter experts per layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--adapter-dim", type=int, default=64, help="adapter bottleneck width (default 64)")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter output scale (default 1.0)")
    parser.add_argument("--activation", default="gelu", help="adapter activation (default gelu)")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter-input dropout in training (default 0.1)")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing coefficient (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router/adapter initialisation")
    args = parser.parse_args(None if argv is None else list(argv))
    if not os.path.isdir(args.src):
        parser.error(f"SRC_DIR {args.src!r} is not a directory")

    from transformers import AutoModelForCausalLM
    torch.manual_seed(args.seed)
    print(f"loading {args.src}")
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype="auto")
    try:
        model = craft_sparsity(model, args.experts, args.top_k, args.adapter_dim, scale=args.scale,
                               activation=args.activation, dropout=args.dropout, aux_loss_coef=args.aux_loss_coef,
                               progress=True)
    except ValueError as exc:
        parser.error(str(exc))
    os.makedirs(args.dst, exist_ok=True)
    model.save_pretrained(args.dst)
    copied = _copy_side_files(args.src, args.dst)
    added = sum(layer.router.weight.numel() + layer.adapter_down.numel() + layer.adapter_up.numel()
                for layer in crafted_layers(model))
    print(f"crafted {len(crafted_layers(model))} layers ({args.experts} experts, top-{args.top_k}, "
          f"adapter dim {args.adapter_dim}; {added:,} new parameters) -> {args.dst}"
          + (f" (copied {', '.join(copied)})" if copied else ""))
    return 0


__all__ = ["craft_sparsity", "load_crafted", "crafted_aux_loss", "crafted_layers", "craft_main",
           "SUPPORTED_MODEL_TYPES"]
