"""PESC sparsity crafting on Hugging Face causal LMs (Llama, Mistral, Qwen2, Qwen3).

``craft_sparsity(model)`` replaces every decoder layer's MLP by :class:`moe_kernels.layers.AdapterMoE`
(the MLP becomes the shared FFN; router + zero-initialised adapters are added) and returns a
:class:`moe_kernels.models.PescForCausalLM` around the model, so the crafted model's logits equal the
dense model's until the adapters are trained.

Training loss. With ``labels`` the crafted model's ``loss`` is cross-entropy + ``aux_loss_coef`` times ONE
Switch load-balancing loss over the routing of all layers together (the official PESC code; not a sum of
per-layer losses); turn it off with ``add_aux_loss=False``. A loop that computes its own loss from the
logits adds :func:`crafted_aux_loss` itself.

Save / load. ``model.save_pretrained(dir)`` writes safetensors and a config of type ``moe_kernels_pesc``;
``AutoModelForCausalLM.from_pretrained(dir)`` (after ``import moe_kernels.hf``) rebuilds the crafted
model, bit-identical. :func:`load_crafted` does the same and also reads checkpoints of the earlier format
(a dense config with a ``moe_kernels_pesc`` entry). With PEFT LoRA (``lora=``), merge first:
``model.merge_and_unload().save_pretrained(dir)``.

Quantized frozen base (QLoRA-style, as the paper trains): :func:`load_quantized_base` loads a local
checkpoint in 4 or 8 bits through bitsandbytes (a clear ImportError where it is not installed), then
``craft_sparsity(base, ..., lora=...)`` crafts on it; the routers and adapters stay in full precision.

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

from ..models.pesc.modeling_pesc import (SUPPORTED_MODEL_TYPES, craft_mlps, crafted_layers,  # noqa: F401
                                         pesc_load_balancing_loss)

CONFIG_KEY = "moe_kernels_pesc"  # config.json entry of the earlier checkpoint format (read by load_crafted)
MODEL_TYPE = "moe_kernels_pesc"


def crafted_aux_loss(model: nn.Module) -> torch.Tensor:
    """``aux_loss_coef`` times the joint load-balancing loss of the last forward (fp32 scalar).

    One Switch loss over the router logits / chosen experts of all crafted layers concatenated, as in the
    official PESC code (see :func:`moe_kernels.models.pesc.pesc_load_balancing_loss`). Differentiable
    w.r.t. the routers. Raises RuntimeError if the model has not run a forward yet.
    """
    layers = crafted_layers(model)
    if not layers:
        raise ValueError("model has no AdapterMoE layers; craft it with craft_sparsity first")
    return layers[0].aux_loss_coef * pesc_load_balancing_loss(layers)


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


def _config_settings(settings: dict) -> dict:
    """AdapterMoE arguments -> PescConfig fields (top_k is num_experts_per_tok there: a config field named
    top_k would become a sampling default of generate)."""
    values = dict(settings)
    values["num_experts_per_tok"] = values.pop("top_k")
    return values


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def craft_sparsity(model: nn.Module, num_experts: int = 8, top_k: int = 2, adapter_dim: int = 64, *,
                   scale: float = 1.0, activation: str = "gelu", dropout: float = 0.1, aux_loss_coef: float = 0.01,
                   freeze_base: bool = False, lora=None, add_aux_loss: bool = True, backend: str | None = None,
                   progress: bool = False):
    """Turn every MLP of a Llama/Mistral/Qwen2/Qwen3 causal LM into a PESC adapter MoE.

    Args:
        model: a transformers ``*ForCausalLM`` of a supported family (crafted in place and wrapped), possibly
            loaded quantized (:func:`load_quantized_base`).
        num_experts, top_k, adapter_dim, scale, activation, dropout, aux_loss_coef: see
            :class:`moe_kernels.layers.AdapterMoE`.
        freeze_base: freeze every parameter except the routers and adapters (train router + adapters only).
            A quantized base is always frozen.
        lora: a ``peft.LoraConfig`` (or dict of its arguments): also freeze the base and put PEFT LoRA on
            its ``target_modules`` (attention and/or the shared FFN's linears); routers and adapters stay
            trainable. Returns the ``PeftModel`` in that case.
        add_aux_loss: the model's forward adds the joint load-balancing loss to ``loss`` when labels are given.
        backend: moe_kernels backend for the layers' ops (None: chosen by device).
        progress: show a tqdm progress bar over the layers.

    Returns a :class:`moe_kernels.models.PescForCausalLM` holding ``model`` as ``language_model`` (or a
    PeftModel around it when ``lora`` is given); ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained``
    round-trip it. The PeftModel's own ``save_pretrained`` raises (it would keep the LoRA weights and drop the
    trained routers and adapters): save ``model.merge_and_unload()``.
    """
    from ..models.pesc import PescConfig, PescForCausalLM

    if isinstance(model, PescForCausalLM) or crafted_layers(model):
        raise ValueError("model is already crafted (it has AdapterMoE layers)")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model must be a transformers model of type {list(SUPPORTED_MODEL_TYPES)}, "
                         f"got model_type={model_type!r} ({type(model).__name__})")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a causal LM (*ForCausalLM) with an LM head, got {type(model).__name__}")
    settings = {"num_experts": num_experts, "top_k": top_k, "adapter_dim": adapter_dim, "scale": float(scale),
                "activation": activation, "dropout": float(dropout), "aux_loss_coef": float(aux_loss_coef)}
    lora_config = _lora_config(lora) if lora is not None else None
    quantized = _is_quantized(model)
    craft_mlps(model, settings, backend=backend, progress=progress)
    if quantized:  # the new router/adapter parameters: on the compute device, in the compute dtype (that of the
        # embeddings); the quantized FFN weights themselves are left as bitsandbytes holds them
        reference = model.get_input_embeddings().weight
        for layer in crafted_layers(model):
            layer.router.to(device=reference.device, dtype=reference.dtype)
            for name in ("adapter_down", "adapter_up"):
                param = getattr(layer, name)
                param.data = param.data.to(device=reference.device, dtype=reference.dtype)
    pesc_config = PescConfig(text_config=config, add_aux_loss=bool(add_aux_loss), **_config_settings(settings))
    crafted = PescForCausalLM(pesc_config, language_model=model, backend=backend)
    crafted.train(model.training)

    if freeze_base or lora_config is not None or quantized:
        for p in crafted.parameters():
            p.requires_grad_(False)
    if lora_config is not None:
        from peft import get_peft_model
        crafted = get_peft_model(crafted, lora_config)
        crafted.save_pretrained = _refuse_lora_only_save  # it would write the LoRA weights and drop the experts
    if freeze_base or lora_config is not None or quantized:
        for layer in crafted_layers(crafted):
            for p in (layer.router.weight, layer.adapter_down, layer.adapter_up):
                p.requires_grad_(True)
    return crafted


def _refuse_lora_only_save(*args, **kwargs):
    """The instance save_pretrained of the PeftModel ``craft_sparsity(..., lora=...)`` returns."""
    raise RuntimeError(
        "save_pretrained on the PeftModel of craft_sparsity(..., lora=...) would write only the LoRA weights: PEFT "
        "does not know the routers and adapters, which are trained too, and they would be lost. Save the whole "
        "crafted model instead: model.merge_and_unload().save_pretrained(dir) (then "
        "AutoModelForCausalLM.from_pretrained(dir) after import moe_kernels.hf).")


def load_quantized_base(path: str, bits: int = 4, *, compute_dtype: torch.dtype = torch.bfloat16,
                        device_map="auto", **kwargs):
    """Load a local dense checkpoint with its linear weights quantized (bitsandbytes, 4 or 8 bits), ready
    for ``craft_sparsity(base, ..., lora=...)`` (the QLoRA set-up of the PESC paper).

    Raises ImportError with the install command where bitsandbytes is not installed (it needs a CUDA GPU
    for most of its kernels).
    """
    import importlib.util
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("a quantized frozen base needs bitsandbytes (pip install bitsandbytes; most of its "
                          "kernels need a CUDA GPU); without it, craft the full-precision base and freeze it "
                          "(freeze_base=True) or use lora=")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if bits == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map=device_map,
                                                 dtype=compute_dtype, **kwargs)
    try:
        from peft import prepare_model_for_kbit_training
    except ImportError:  # pragma: no cover - depends on the environment
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


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
    """Restore a crafted model written by ``save_pretrained`` -> :class:`PescForCausalLM` in eval mode.

    A checkpoint of type ``moe_kernels_pesc`` loads through ``AutoModelForCausalLM.from_pretrained``; one of
    the earlier format (a dense config with a ``moe_kernels_pesc`` entry, written by moe_kernels before the
    PESC model class existed) is rebuilt and loaded strictly (every tensor used, every parameter filled).
    dtype: parameter dtype (default: the checkpoint's). device: where to put the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import register
    from ..models.pesc import PescConfig, PescForCausalLM
    register()
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") == MODEL_TYPE:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
        if not isinstance(model, PescForCausalLM):  # pragma: no cover - registration guarantees it
            raise TypeError(f"{path!r} loaded as {type(model).__name__}, not PescForCausalLM")
        model.set_backend(backend)
    else:
        config = AutoConfig.from_pretrained(path)
        settings = getattr(config, CONFIG_KEY, None)
        if not isinstance(settings, dict):
            raise ValueError(f"{path!r} is not a crafted checkpoint: its config has model_type "
                             f"{raw.get('model_type')!r}, not {MODEL_TYPE!r}, and no {CONFIG_KEY!r} entry "
                             "(craft it with moe_kernels.hf.craft_sparsity and save with save_pretrained)")
        settings = dict(settings)
        delattr(config, CONFIG_KEY)
        add_aux_loss = settings.pop("add_aux_loss", True)
        state = _read_checkpoint(path)
        if dtype is None:
            dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        try:  # skip the random init of weights the checkpoint overwrites anyway
            from transformers.initialization import no_init_weights
        except ImportError:  # pragma: no cover - older transformers
            no_init_weights = contextlib.nullcontext
        with no_init_weights():
            dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
        dense.tie_weights()  # no_init_weights skips the tying of e.g. lm_head to the embeddings
        craft_mlps(dense, settings, backend=backend, progress=progress)
        model = PescForCausalLM(PescConfig(text_config=config, add_aux_loss=add_aux_loss, **_config_settings(settings)),
                                language_model=dense, backend=backend)
        _load_strict(model.language_model, state)
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
                    "AutoModelForCausalLM.from_pretrained after import moe_kernels.hf, or moe_kernels.hf.load_crafted).")
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
    # before loading the checkpoint (minutes for a real one), not after: AdapterMoE checks these again
    from ..ops import MAX_ADAPTER_RANK
    from ..validation import check_int
    try:
        check_int("--experts", args.experts)
        check_int("--top-k", args.top_k, 1, args.experts)
        check_int("--adapter-dim", args.adapter_dim, 1, MAX_ADAPTER_RANK)
    except ValueError as exc:
        parser.error(str(exc))

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


__all__ = ["craft_sparsity", "load_crafted", "load_quantized_base", "crafted_aux_loss", "crafted_layers",
           "craft_main", "SUPPORTED_MODEL_TYPES"]
