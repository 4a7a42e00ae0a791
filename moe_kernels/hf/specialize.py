"""The whole Self-MoE (MiXSE) recipe on any Hugging Face causal LM, and the weight-merging baselines.

:func:`self_specialize` runs the four stages of self-specialization:

1. **synthetic data** -- for each domain the base model itself writes new examples: each prompt shows a few
   of the domain's seed examples (sampled, separated by ``separator``) and the model continues with a new
   one (sampling, ``temperature`` / ``top_p``); continuations are cut at the separator, empty ones,
   duplicates and copies of a seed are dropped (:func:`generate_domain_data`);
2. **one LoRA expert per domain** -- PEFT LoRA on the base, trained on the domain's seeds + synthetic data
   (causal-LM loss); each adapter is saved as a PEFT adapter directory;
3. **compose** -- :func:`moe_kernels.hf.compose_lora_experts` turns the adapters into routed LoRA experts
   on the shared frozen base (a :class:`moe_kernels.models.SelfMoEForCausalLM`);
4. **router** -- only the router trains, on the union of all domains' data.

Seeds are strings with a ``tokenizer``, or token-id lists without one (tiny test models).

:func:`merge_adapters_baseline` builds the baseline the paper compares with: the same LoRA experts merged
into one adapter by PEFT's ``add_weighted_adapter`` (linear / cat / TIES / DARE / magnitude pruning).
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class SelfSpecializeReport:
    """What each stage did: synthetic examples per domain, the expert training losses per domain, the
    router losses, adapter directories and the seconds each stage took."""

    synthetic: dict = field(default_factory=dict)
    expert_losses: dict = field(default_factory=dict)
    router_losses: list = field(default_factory=list)
    adapter_dirs: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _encode(example, tokenizer) -> list[int]:
    if tokenizer is None:
        if isinstance(example, str) or not all(isinstance(t, int) for t in example):
            raise TypeError("without a tokenizer, seeds must be lists of token ids; pass tokenizer= for text seeds")
        return list(example)
    if not isinstance(example, str):
        raise TypeError("with a tokenizer, seeds must be strings")
    return tokenizer(example, add_special_tokens=False)["input_ids"]


def _decode(ids: list[int], tokenizer):
    return list(ids) if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True).strip()


def _pad_id(model, tokenizer) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(value, int):
            return value
    eos = getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else (eos if isinstance(eos, int) else 0)


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def generate_domain_data(model: nn.Module, seeds: Sequence, num_examples: int = 16, *, tokenizer=None,
                         separator=None, demos_per_prompt: int = 3, max_new_tokens: int = 32,
                         temperature: float = 0.9, top_p: float = 0.95, batch_size: int = 8, max_rounds: int = 4,
                         seed: int = 0) -> list:
    """New examples of a domain written by ``model`` from its ``seeds`` (stage 1 of self-specialization).

    Each prompt is ``demos_per_prompt`` seeds (random, without replacement) joined by ``separator`` (text,
    or token ids without a tokenizer; default: a blank line, or the eos token) and ending with it; the
    continuation up to the next separator (or eos) is one new example. Returns up to ``num_examples``
    distinct examples that are not seeds (fewer if ``max_rounds`` of generation could not find them).
    """
    if not seeds:
        raise ValueError("a domain needs at least one seed example")
    rng = random.Random(seed)
    pad = _pad_id(model, tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else []))
    if separator is None:
        separator = "\n\n" if tokenizer is not None else ([min(eos_ids)] if eos_ids else [pad])
    separator_ids = _encode(separator, tokenizer) if tokenizer is not None else list(separator)
    encoded_seeds = [_encode(s, tokenizer) for s in seeds]
    known = {tuple(s) for s in encoded_seeds}
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    found: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_rounds):
            if len(found) >= num_examples:
                break
            prompts = []
            for _ in range(batch_size):
                demos = rng.sample(encoded_seeds, min(demos_per_prompt, len(encoded_seeds)))
                prompt = []
                for demo in demos:
                    prompt += demo + separator_ids
                prompts.append(prompt)
            ids, mask = _left_padded(prompts, pad, device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_p=top_p, pad_token_id=pad)
            for row in out[:, ids.shape[1]:].tolist():
                example = []
                for i, token in enumerate(row):
                    if token in eos_ids or row[i:i + len(separator_ids)] == separator_ids:
                        break
                    example.append(token)
                key = tuple(example)
                if example and key not in known:
                    known.add(key)
                    found.append(example)
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    decoded = [_decode(e, tokenizer) for e in found]
    return [e for e in decoded if len(e)][:num_examples]  # (a text can decode empty: special tokens only)


def _lm_batches(examples: list[list[int]], pad: int, batch_size: int, device, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # right padding for training
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, :len(r)] = 1
        yield ids, mask, ids.masked_fill(mask == 0, -100)


def _train(model, params, examples, pad, steps, lr, batch_size, seed, desc="training", progress=False) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        while len(losses) < steps:
            for ids, mask, labels in _lm_batches(examples, pad, batch_size, device, rng):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update()
                if len(losses) >= steps:
                    break
    model.eval()
    return losses


def self_specialize(base: nn.Module, domains: dict[str, Sequence], *, tokenizer=None, output_dir: str | None = None,
                    examples_per_domain: int = 16, lora_rank: int = 8, lora_alpha: int = 16,
                    target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"),
                    expert_steps: int = 30, expert_lr: float = 1e-3, router_steps: int = 30, router_lr: float = 1e-2,
                    top_k: int = 1, batch_size: int = 8, generation_kwargs: dict | None = None, seed: int = 0,
                    backend: str | None = None, progress: bool = True):
    """Self-specialize ``base`` into a Self-MoE model (MiXSE), end to end. Returns (model, report).

    Args:
        base: a Hugging Face causal LM (not a PEFT model). It is frozen, gains the routed experts in place
            and becomes the returned model's ``language_model``.
        domains: {domain name: seed examples} (strings with ``tokenizer``, token-id lists without).
        output_dir: where the experts' PEFT adapter directories go (``<output_dir>/experts/<domain>``);
            default: a temporary directory, removed at the end.
        examples_per_domain: synthetic examples to generate per domain (:func:`generate_domain_data`;
            ``generation_kwargs`` go to it).
        lora_rank, lora_alpha, target_modules, expert_steps, expert_lr: the LoRA expert of each domain.
        router_steps, router_lr, top_k: the router (trained alone on all domains' data).
        progress: tqdm bars (stderr) for each stage: data generation per domain, each expert's and the
            router's training steps with the latest loss. ``False`` for silence.
    The report (:class:`SelfSpecializeReport`) holds the synthetic data, losses and stage timings.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("self_specialize needs PEFT: pip install peft") from exc
    from .self_moe import compose_lora_experts

    if not isinstance(domains, dict) or not domains:
        raise ValueError("domains must be a non-empty dict {name: seed examples}")
    if type(base).__name__.startswith("Peft"):
        raise TypeError("base must be the plain transformers model, not a PEFT wrapper")
    report = SelfSpecializeReport()
    pad = _pad_id(base, tokenizer)
    device = next(base.parameters()).device
    torch.manual_seed(seed)

    # 1. synthetic data from the seeds, written by the base model itself
    start = time.perf_counter()
    data: dict[str, list[list[int]]] = {}
    # generation is the slowest stage on a real model: one bar step per domain, named as it starts
    bar = tqdm(list(domains.items()), desc="self_specialize: synthetic data", unit="domain", disable=not progress)
    for index, (name, seeds) in enumerate(bar):
        bar.set_postfix(domain=name)
        synthetic = generate_domain_data(base, seeds, examples_per_domain, tokenizer=tokenizer, seed=seed + index,
                                         **(generation_kwargs or {}))
        report.synthetic[name] = synthetic
        data[name] = [ids for ids in (_encode(s, tokenizer) for s in list(seeds) + list(synthetic)) if ids]
    report.seconds["synthetic_data"] = time.perf_counter() - start

    # 2. one LoRA expert per domain, saved as a PEFT adapter directory
    start = time.perf_counter()
    temporary = tempfile.TemporaryDirectory() if output_dir is None else None
    root = os.path.join(temporary.name if temporary else output_dir, "experts")
    for p in base.parameters():
        p.requires_grad_(False)
    try:
        dirs = []
        for index, (name, examples) in enumerate(data.items()):
            torch.manual_seed(seed + 100 + index)
            lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules)
                              if not isinstance(target_modules, str) else target_modules, lora_dropout=0.0)
            adapted = get_peft_model(base, lora)
            params = [p for p in adapted.parameters() if p.requires_grad]
            report.expert_losses[name] = _train(adapted, params, examples, pad, expert_steps, expert_lr, batch_size,
                                                seed + index, f"self_specialize: expert {name!r}", progress)
            path = os.path.join(root, name)
            adapted.save_pretrained(path)
            base = adapted.unload()  # the base without LoRA layers (not merged)
            dirs.append(path)
            report.adapter_dirs[name] = path
        report.seconds["experts"] = time.perf_counter() - start

        # 3. compose the experts on the shared frozen base
        start = time.perf_counter()
        model = compose_lora_experts(base, dirs, top_k=top_k, names=list(domains), backend=backend)
        report.seconds["compose"] = time.perf_counter() - start
    finally:
        if temporary is not None:
            report.adapter_dirs = {}
            temporary.cleanup()

    # 4. the router, trained alone on all domains' data
    start = time.perf_counter()
    routers = [p for r in model.routers() for p in r.parameters()]
    everything = [e for examples in data.values() for e in examples]
    report.router_losses = _train(model, routers, everything, pad, router_steps, router_lr, batch_size, seed,
                                  "self_specialize: router", progress)
    report.seconds["router"] = time.perf_counter() - start
    model.to(device)
    return model.eval(), report


COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


def merge_adapters_baseline(base: nn.Module, adapters: Sequence, weights: Sequence[float] | None = None,
                            combination_type: str = "cat", density: float | None = None, merge: bool = False,
                            **kwargs):
    """The weight-merging baseline: the LoRA experts merged into ONE adapter by PEFT's
    ``add_weighted_adapter`` (no routing), to compare a Self-MoE model against.

    adapters: PEFT adapter directories (the experts, e.g. ``report.adapter_dirs`` of :func:`self_specialize`
    with an ``output_dir``). weights: one per adapter (default: equal, 1/N). combination_type: PEFT's
    (``"cat"`` gives exactly the weighted sum of the experts' updates; ``"linear"`` needs equal ranks;
    ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` need ``density``, e.g. 0.5).
    Returns the PeftModel with the merged adapter active, or the plain model with it merged into the weights
    (``merge=True``). ``base`` is deep-copied, never modified.
    """
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("merge_adapters_baseline needs PEFT: pip install peft") from exc
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {list(COMBINATIONS)}, got {combination_type!r}")
    adapters = [os.fspath(a) for a in adapters]
    if not adapters:
        raise ValueError("adapters must list at least one PEFT adapter directory")
    if weights is None:
        weights = [1.0 / len(adapters)] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"weights must give one weight per adapter ({len(adapters)}), got {len(weights)}")
    needs_density = combination_type.startswith(("ties", "dare", "magnitude"))
    if needs_density and density is None:
        raise ValueError(f"combination_type={combination_type!r} needs density= (the fraction of weights kept)")
    names = [f"expert_{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    extra = {"density": density} if needs_density else {}
    model.add_weighted_adapter(names, list(weights), adapter_name="merged", combination_type=combination_type,
                               **extra, **kwargs)
    model.set_adapter("merged")
    for name in names:
        model.delete_adapter(name)
    model.eval()
    return model.merge_and_unload() if merge else model


__all__ = ["self_specialize", "generate_domain_data", "merge_adapters_baseline", "SelfSpecializeReport"]
