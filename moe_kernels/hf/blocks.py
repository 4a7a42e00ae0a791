"""MoE blocks whose experts transformers runs without its experts interface, with a forward on moe_kernels.

Most families route tokens to ``@use_experts_implementation`` experts, which :mod:`moe_kernels.hf.experts` serves.
A few run the experts inside the MoE block itself. Llama 4's ``Llama4TextMoe`` is one: it runs every expert on
every token, the input scaled by the token's sigmoid router score (0 for the experts it did not choose), with one
``bmm`` per projection, which is E / k times the FLOPs of the routed slots. Its forward here runs only the routed
slots, through :func:`moe_kernels.moe_mlp`:

    out = shared_expert(x) + sum_j expert_{ids[t, j]}(x_t * score[t, j])

It keeps transformers' router module (its output is recorded for ``output_router_logits``). The chosen ids are
that router's own ``topk`` of the same logits, and the scores are its sigmoid values. Each chosen slot is one row
scaled as transformers scales it, run with routing weight 1, and the k rows of a token are summed.

Each :class:`BlockVariant` was written against one transformers source of the block, its router and its experts.
:func:`match_block` accepts a class only when those three forwards still have that source (their hash), so a
changed transformers leaves the family unsupported instead of silently different.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .experts import BACKEND_ATTRIBUTE, _as_hf_v5_layout, activation_name, expert_per_choice, source_hash
from .routers import ORIGINAL_FORWARD


def llama4_text_moe_forward(self, hidden_states):
    """Llama4TextMoe: (shared_expert(x) + the routed experts on their scaled inputs, router_logits)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # [T, E]: sigmoid at the chosen experts, else 0
    ids = torch.topk(router_logits, self.top_k, dim=1).indices  # the router's choice: its topk of these logits
    scores = router_scores.gather(1, ids)
    num_tokens, k = ids.shape
    rows = (hidden_states.unsqueeze(1) * scores.unsqueeze(-1)).reshape(num_tokens * k, self.hidden_dim)
    experts = self.experts
    routed = expert_per_choice(rows, _as_hf_v5_layout(experts.gate_up_proj, True),
                               _as_hf_v5_layout(experts.down_proj, True), ids,
                               activation=activation_name(experts.act_fn),
                               backend=getattr(self, BACKEND_ATTRIBUTE, None))
    out = self.shared_expert(hidden_states)
    out.add_(routed.view(num_tokens, k, -1).sum(dim=1) if k > 1 else routed)
    return out, router_logits


@dataclass(frozen=True)
class BlockVariant:
    """A MoE block class of one family, the forward that replaces its own, and what that forward relies on: the
    block's router and experts classes (attribute name -> class name) and the hash of the three forwards' source it
    was written against."""

    name: str
    module: str  # inside transformers.models
    block: str
    parts: dict
    source_hash: str
    forward: Callable

    def classes(self):
        module = importlib.import_module(f"transformers.models.{self.module}")
        return getattr(module, self.block), {attr: getattr(module, name) for attr, name in self.parts.items()}


VARIANTS: tuple[BlockVariant, ...] = (
    # written against transformers 5.21-5.24 (the same source in both)
    BlockVariant("llama4", "llama4.modeling_llama4", "Llama4TextMoe",
                 {"router": "Llama4Router", "experts": "Llama4TextExperts"}, "0b469f8dd770fcf6",
                 llama4_text_moe_forward),
)


def variants_in(module_name: str) -> list[BlockVariant]:
    """The block variants of the transformers modeling module ``module_name``."""
    return [variant for variant in VARIANTS if module_name.endswith(variant.module)]


def match_block(block_class: type) -> BlockVariant | None:
    """The variant written for ``block_class``, when its forward and its parts' forwards still have the source the
    variant was written against (else None: the block keeps transformers' forward)."""
    for variant in VARIANTS:
        if block_class.__name__ != variant.block or not block_class.__module__.endswith(variant.module):
            continue
        original = block_class.__dict__.get(ORIGINAL_FORWARD) or block_class.__dict__.get("forward")
        try:
            _, parts = variant.classes()
        except (ImportError, AttributeError):
            return None
        if source_hash(original, *(cls.__dict__.get("forward") for cls in parts.values())) == variant.source_hash:
            return variant
    return None


VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}

__all__ = ["BlockVariant", "VARIANTS", "VARIANTS_BY_NAME", "match_block", "variants_in", "llama4_text_moe_forward"]
