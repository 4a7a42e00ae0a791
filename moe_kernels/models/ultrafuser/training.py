"""Training UltraFuser: the two stages (stage 1: gate only; stage 2: everything) and
:class:`DomainBalancedBatchSampler`, which gives every batch an equal share of each domain.

``fuser`` is a :class:`moe_kernels.models.ultrafuser.TokenFuser` or a
:class:`moe_kernels.models.UltraFuserForCausalLM` (both have ``specialists`` and ``gate``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from .._common import train_steps


def set_training_stage(fuser: nn.Module, stage: int) -> list[nn.Parameter]:
    """Stage 1: only the gate trains (specialists frozen); stage 2: everything trains.
    Sets ``requires_grad`` accordingly and returns the parameters to optimise."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (gate only) or 2 (full), got {stage!r}")
    for p in fuser.specialists.parameters():
        p.requires_grad_(stage == 2)
    for p in fuser.gate.parameters():
        p.requires_grad_(True)
    return [p for p in fuser.parameters() if p.requires_grad]


def train_stage(fuser: nn.Module, batches: Iterable[dict], stage: int, lr: float = 1e-3,
                max_steps: int | None = None, optimizer_cls=torch.optim.AdamW, **optimizer_kwargs) -> list[float]:
    """Run one UltraFuser training stage: ``set_training_stage`` then AdamW on the fused loss.

    batches: dicts with input_ids [B, L], labels [B, L] and optionally attention_mask. Returns the loss
    of each step. Stage 1 is cheap: with the specialists frozen, the fused loss computes only the
    gradient into the gate weights.
    """
    params = set_training_stage(fuser, stage)
    fuser.train()
    return train_steps(fuser, batches, optimizer_cls(params, lr=lr, **optimizer_kwargs), max_steps)


class DomainBalancedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices with an equal share of every domain (UltraFuser's balanced sampler).

    domains: the domain label of each example (any hashable); batch_size: a multiple of the number of
    domains, each batch holds batch_size / D examples of each domain, shuffled. Each domain's examples
    are drawn without replacement in a fresh random order per pass; a smaller domain starts a new pass
    when it runs out. num_batches defaults to what one pass over the largest domain needs.
    Use as ``DataLoader(dataset, batch_sampler=sampler)``; :meth:`set_epoch` changes the order.
    """

    def __init__(self, domains: Sequence, batch_size: int, num_batches: int | None = None, seed: int = 0):
        domains = list(domains)
        if not domains:
            raise ValueError("domains must list the domain of at least one example")
        self.groups: dict = {}
        for index, domain in enumerate(domains):
            self.groups.setdefault(domain, []).append(index)
        num_domains = len(self.groups)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 \
                or batch_size % num_domains:
            raise ValueError(f"batch_size must be a positive multiple of the number of domains ({num_domains}: "
                             f"{list(self.groups)}), got {batch_size!r}")
        self.per_domain = batch_size // num_domains
        if num_batches is None:
            num_batches = max(math.ceil(len(g) / self.per_domain) for g in self.groups.values())
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
            raise ValueError(f"num_batches must be a non-negative int, got {num_batches!r}")
        self.batch_size, self.num_batches, self.seed, self.epoch = batch_size, num_batches, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

        def stream(indices):
            while True:
                for i in torch.randperm(len(indices), generator=generator).tolist():
                    yield indices[i]

        streams = [stream(g) for g in self.groups.values()]
        for _ in range(self.num_batches):
            batch = [next(s) for s in streams for _ in range(self.per_domain)]
            yield [batch[i] for i in torch.randperm(len(batch), generator=generator).tolist()]


__all__ = ["DomainBalancedBatchSampler", "set_training_stage", "train_stage"]
