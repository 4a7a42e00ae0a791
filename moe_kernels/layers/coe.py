"""CCoE's CoE layer: whole expert branches (stacks of decoder layers) coupled on a shared backbone.

A *branch* is one expert's upper decoder layers (any depth), its final norm and its LM head. The
:class:`CoELayer` routes whole sequences: every sequence of the batch carries one expert id, the
sequences are grouped by expert with the same dispatch plan as the token path
(:func:`moe_kernels.plan` over ids of shape [B, 1]: a stable counting sort, its inverse permutation
puts the outputs back), and each branch runs once on its contiguous sub-batch.

Pure torch: the layer only dispatches. The branches are modules given to it, called as
``branch(hidden_states, attention_mask, position_ids, position_embeddings, cache, use_cache)``; the
branch on Hugging Face decoder layers (which builds transformers' masks and KV caches) is
:class:`moe_kernels.models.ccoe.ExpertBranch`, in the CCoE model package.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


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

    A branch is an ``nn.Module`` with a ``vocab_size`` (its logits' last dimension) and a ``new_cache()``
    method (an empty KV cache for it), called as above with its own rows: an
    :class:`moe_kernels.models.ccoe.ExpertBranch` on Hugging Face decoder layers, or any module that
    keeps that contract.
    """

    def __init__(self, branches: dict[str, nn.Module] | None = None, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.branches = nn.ModuleDict()
        for name, branch in (branches or {}).items():
            self.add_branch(name, branch)

    @property
    def names(self) -> list[str]:
        """Expert names in id order (id i is ``names[i]``)."""
        return list(self.branches.keys())

    def add_branch(self, name: str, branch: nn.Module) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if name in self.branches:
            raise ValueError(f"an expert named {name!r} is already attached; pop it first")
        if not isinstance(branch, nn.Module) or not hasattr(branch, "vocab_size") or not hasattr(branch, "new_cache"):
            raise TypeError("branch must be an nn.Module with vocab_size and new_cache() (an ExpertBranch, say), "
                            f"got {type(branch).__name__}")
        if len(self.branches):
            vocab = next(iter(self.branches.values())).vocab_size
            if branch.vocab_size != vocab:
                raise ValueError(f"expert {name!r} has vocabulary size {branch.vocab_size}, the attached experts "
                                 f"have {vocab}; all branches must share one vocabulary")
        self.branches[name] = branch

    def remove_branch(self, name: str) -> nn.Module:
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


__all__ = ["CoELayer"]
