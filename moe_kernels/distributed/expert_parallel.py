"""Expert-parallel MoE over torch.distributed: dropless token exchange with all_to_all_single.

Placement: rank r owns the contiguous experts ``[r * E_local, (r + 1) * E_local)``, ``E_local = E / world``.
Per layer and rank, with T local tokens choosing k experts each:

1. ``plan`` (the same counting sort as the single-GPU path) orders the T*k slots by expert, hence by
   destination rank; per-expert counts are exchanged (one small all_to_all) to size the transfer.
2. The token rows, gathered in that order, go to their owners (all_to_all_single, uneven splits).
3. Each rank runs its local experts on what it received with the grouped kernels (weight 1, k = 1).
4. Results travel back by the reverse exchange and are combined with the routing weights in fp32.

The exchange is differentiable (its backward is the reverse exchange), so expert weights receive
gradients from every rank's tokens and inputs receive gradients from every owner. Rows travel as
bytes, so gloo carries bf16/fp16 too. Parameters outside the experts (routers, attention) are
replicated: reduce their gradients as data parallelism does (DDP, FSDP, or an all_reduce).
"""

from __future__ import annotations

import copy
import zlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

import moe_kernels
from moe_kernels.layers.sparse_moe import SparseMoE
from moe_kernels.validation import check_dim, check_hidden, check_routing, check_tensor


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised (dist.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def local_expert_count(num_experts: int, group=None) -> int:
    """E / world_size; a clear error when the experts cannot be split evenly over the ranks."""
    world, _ = _world(group)
    if num_experts % world:
        raise ValueError(f"num_experts = {num_experts} is not divisible by the world size {world}: expert "
                         "parallelism places E / world_size experts on every rank (choose a world size that "
                         "divides the number of experts)")
    return num_experts // world


def check_same_config(group=None, **config) -> None:
    """All ranks must agree on the layer's configuration; raises ValueError on every rank otherwise."""
    world, _ = _world(group)
    values = torch.tensor([zlib.crc32(repr(v).encode()) for v in config.values()], dtype=torch.int64)  # stable across processes
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values, group=group)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, values):
            differing = [name for name, a, b in zip(config, values.tolist(), other.tolist()) if a != b]
            raise ValueError(f"ranks disagree on the expert-parallel configuration: rank {rank} differs in "
                             f"{differing} (this rank has {config})")


class _AllToAllRows(torch.autograd.Function):
    """rows [sum(send_splits), ...] -> [sum(recv_splits), ...]; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits = (send_splits, recv_splits, group)
        return _exchange(rows, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        # The reverse exchange, itself differentiable: the exchange is linear, so every order of gradient is exact.
        send_splits, recv_splits, group = ctx.splits
        return _AllToAllRows.apply(grad, recv_splits, send_splits, group), None, None, None


def _exchange(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    rows = rows.contiguous()
    row_shape = rows.shape[1:]
    row_numel = 1
    for size in row_shape:
        row_numel *= size
    as_bytes = rows.reshape(rows.shape[0], row_numel).view(torch.uint8)  # dtype-agnostic transport (gloo lacks bf16)
    out = as_bytes.new_empty((sum(recv_splits), as_bytes.shape[1]))
    dist.all_to_all_single(out, as_bytes, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out.view(rows.dtype).reshape(out.shape[0], *row_shape)


def all_to_all_rows(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable all_to_all_single of rows with uneven splits (any dtype, any backend)."""
    return _AllToAllRows.apply(rows, list(send_splits), list(recv_splits), group)


def _check_local_experts(num_experts: int, group, **tensors: torch.Tensor) -> None:
    """The functional forms take this rank's experts only: passing the full [E, ...] weights would run experts
    0 .. E/W-1 on every rank (silently wrong outputs on every rank but 0), so dim 0 must be E / world_size."""
    num_local = local_expert_count(num_experts, group)
    for name, t in tensors.items():
        check_dim(name, t.shape[0], num_local, f"this rank's experts (dim 0, num_experts / world_size = "
                  f"{num_experts} / {num_experts // num_local}; pass the local shard, not the full weights)")


def _expert_parallel(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int, group,
                     run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     backend: str | None = None, local_params=()) -> torch.Tensor:
    """Shared exchange around ``run_local(rows [M,H], local_ids [M] int32) -> [M,H]`` (see module docstring).
    ``local_params``: this rank's expert parameters, kept in the graph when the rank receives no rows."""
    world, _ = _world(group)
    num_local = local_expert_count(num_experts, group)
    # The combine below broadcasts weights against the k slots ([T,1] would pass and weight every slot alike) and
    # takes T from ids: check the routing as moe_mlp does.
    check_tensor("x", x, 2)
    check_routing(weights, ids, x.shape[0], num_experts, x.dtype)
    num_tokens, k = ids.shape
    plan = moe_kernels.plan(ids, num_experts, backend=backend)
    counts = plan.expert_offsets.diff().to(torch.int64)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # [world * E_local]: what each rank sends me
    send_splits = counts.view(world, num_local).sum(1).tolist()
    recv_splits = recv_counts.view(world, num_local).sum(1).tolist()

    rows = x[plan.sorted_slots.long() // k]
    received = all_to_all_rows(rows, send_splits, recv_splits, group)
    local_ids = torch.arange(num_local, dtype=torch.int32, device=x.device).repeat(world)
    local_ids = local_ids.repeat_interleave(recv_counts.to(x.device))
    if received.shape[0] > 0:
        processed = run_local(received, local_ids)
    else:
        # Nothing to run, but backward must still take part in the reverse exchange whenever the ranks that ran
        # their experts do: they do whenever their expert weights need grad, even when x does not (frozen inputs,
        # experts trained), so join this rank's expert weights too (zero gradients), else backward hangs.
        processed = received * 0
        for param in local_params:
            if param.requires_grad:
                processed = processed + param.narrow(0, 0, 0).sum().to(processed.dtype)
    returned = all_to_all_rows(processed, recv_splits, send_splits, group)
    per_slot = returned[plan.slot_positions.long()].view(num_tokens, k, x.shape[1])
    out = (per_slot.float() * weights.float().unsqueeze(-1)).sum(dim=1)
    return out.to(x.dtype)


def expert_parallel_moe_mlp(x, gate_up_local, down_local, weights, ids, num_experts: int, *, group=None,
                            activation: str = "silu", gated: bool = True,
                            backend: str | None = None) -> torch.Tensor:
    """:func:`moe_kernels.moe_mlp` with the experts spread over the ranks of ``group``.

    x [T,H] (this rank's tokens), gate_up_local [E/W,2I,H] ([E/W,I,H] with gated=False) and down_local [E/W,H,I]
    (this rank's experts), weights/ids [T,k] with global expert ids in [0, num_experts). Returns [T,H].
    """
    _check_local_experts(num_experts, group, gate_up_local=gate_up_local, down_local=down_local)

    def run_local(rows, local_ids):
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        return moe_kernels.moe_mlp(rows, gate_up_local, down_local, ones, local_ids[:, None],
                                   activation=activation, gated=gated, backend=backend)
    return _expert_parallel(x, weights, ids, num_experts, group, run_local, backend, (gate_up_local, down_local))


def expert_parallel_adapter_moe(h, down_local, up_local, weights, ids, num_experts: int, *, group=None,
                                activation: str = "gelu", scale: float = 1.0,
                                backend: str | None = None) -> torch.Tensor:
    """:func:`moe_kernels.adapter_moe` with the adapter experts spread over the ranks of ``group``."""
    _check_local_experts(num_experts, group, down_local=down_local, up_local=up_local)

    def run_local(rows, local_ids):
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        return moe_kernels.adapter_moe(rows, down_local, up_local, ones, local_ids[:, None],
                                       activation=activation, scale=scale, backend=backend)
    return _expert_parallel(h, weights, ids, num_experts, group, run_local, backend, (down_local, up_local))


class ExpertParallelMoE(nn.Module):
    """A :class:`SparseMoE` whose experts are sharded over ``group``; the router is replicated.

    Build it from a full layer on every rank (same weights everywhere, e.g. same seed or a broadcast)
    with :meth:`from_sparse_moe`; each rank keeps only its experts.
    """

    def __init__(self, layer: SparseMoE, group=None):
        super().__init__()
        world, rank = _world(group)
        num_local = local_expert_count(layer.num_experts, group)
        # dtype too: rows travel as bytes, so ranks in different dtypes would abort inside gloo/NCCL with a size
        # mismatch at the first forward instead of a message naming the cause.
        check_same_config(group, num_experts=layer.num_experts, hidden=layer.hidden_size,
                          intermediate=layer.intermediate_size, top_k=layer.top_k, activation=layer.activation,
                          gated=layer.gated, routing=sorted(layer.routing.items()), dtype=layer.down_proj.dtype)
        self.group, self.num_experts, self.top_k = group, layer.num_experts, layer.top_k
        self.hidden_size, self.activation, self.backend = layer.hidden_size, layer.activation, layer.backend
        self.gated = layer.gated
        self.routing = dict(layer.routing)
        self.router = copy.deepcopy(layer.router)
        mine = slice(rank * num_local, (rank + 1) * num_local)
        first = nn.Parameter(layer.first_proj.detach()[mine].clone())
        if self.gated:
            self.gate_up_proj = first
        else:
            self.up_proj = first
        self.down_proj = nn.Parameter(layer.down_proj.detach()[mine].clone())
        self.expert_offset = rank * num_local
        self.router_logits: torch.Tensor | None = None  # as SparseMoE: kept for the training loop (e.g. a z-loss)
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def from_sparse_moe(cls, layer: SparseMoE, group=None) -> "ExpertParallelMoE":
        return cls(layer, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_hidden(x, self.hidden_size)
        x2d = x.reshape(-1, self.hidden_size)
        logits = self.router(x2d)
        weights, ids = moe_kernels.route(logits, self.top_k, backend=self.backend, **self.routing)
        self.router_logits = logits
        self.aux_loss = moe_kernels.load_balancing_loss(logits, ids, self.num_experts)
        first = self.gate_up_proj if self.gated else self.up_proj
        out = expert_parallel_moe_mlp(x2d, first, self.down_proj, weights, ids, self.num_experts, group=self.group,
                                      activation=self.activation, gated=self.gated, backend=self.backend)
        return out.reshape(x.shape)


_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj", "up_proj_bias")


class ExpertParallelExperts(nn.Module):
    """Shards a Hugging Face experts module (``forward(hidden, top_k_index, top_k_weights)``) over ``group``.

    The local shard is a copy of the original module holding only this rank's experts, so whatever
    experts implementation the model uses (``moe_kernels``, ``grouped_mm``, ``eager``) and every layout
    flag of the family (transposed, biases, interleaved gate/up) are kept as they were.
    """

    def __init__(self, experts: nn.Module, group=None, backend: str | None = None):
        super().__init__()
        num_experts = int(experts.num_experts)
        world, rank = _world(group)
        num_local = local_expert_count(num_experts, group)
        check_same_config(group, cls=type(experts).__name__, num_experts=num_experts,
                          shapes=[tuple(p.shape) for p in experts.parameters()],
                          dtypes=[p.dtype for p in experts.parameters()])  # rows travel as bytes (see above)
        mine = slice(rank * num_local, (rank + 1) * num_local)
        local = copy.copy(experts)
        local._parameters = dict(experts._parameters)
        for name in _EXPERT_PARAMS:
            param = getattr(experts, name, None)
            if isinstance(param, nn.Parameter):
                setattr(local, name, nn.Parameter(param.detach()[mine].clone(), requires_grad=param.requires_grad))
        local.num_experts = num_local
        self.local = local
        self.group, self.num_experts, self.expert_offset = group, num_experts, rank * num_local
        self.backend = backend  # for the dispatch plan; the local experts run as the model's experts do

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        def run_local(rows, local_ids):
            ones = torch.ones(rows.shape[0], 1, dtype=top_k_weights.dtype, device=rows.device)
            return self.local(rows, local_ids.long()[:, None], ones)
        return _expert_parallel(hidden_states, top_k_weights, top_k_index, self.num_experts, self.group, run_local,
                                self.backend, tuple(self.local.parameters()))


def shard_hf_experts(model: nn.Module, group=None, backend: str | None = None) -> nn.Module:
    """Replace every experts module of a Hugging Face MoE model by its expert-parallel shard (in place).

    Call it on every rank with identical weights. Returns the model; raises ValueError if none is found.
    """
    def is_experts(module: nn.Module) -> bool:  # gated experts hold gate_up_proj, those without a gate up_proj
        first = getattr(module, "gate_up_proj", None)
        if first is None and getattr(module, "has_gate", True) is False:
            first = getattr(module, "up_proj", None)
        return hasattr(module, "num_experts") and isinstance(first, torch.Tensor) and first.dim() == 3

    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if is_experts(child)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no experts module with 3-D gate_up_proj (or, without a gate, "
                         "up_proj) weights to shard")
    for parent, name, child in targets:
        setattr(parent, name, ExpertParallelExperts(child, group, backend))
    return model


# ----- checkpoints: one process's state dict from the shards, and back -----
def _unsharded_keys(model: nn.Module, keys) -> dict[str, tuple[str, bool]]:
    """Each of ``keys`` (``model``'s state-dict keys) -> (its key in the unsharded model, whether it is an expert
    shard). An ExpertParallelExperts keeps its module under ``<path>.local.``, the unsharded model under
    ``<path>.``; an ExpertParallelMoE keeps SparseMoE's names."""
    shards, moved = set(), []  # moved: (prefix in the sharded model, prefix in the unsharded one)
    for path, module in model.named_modules():
        head = f"{path}." if path else ""
        if isinstance(module, ExpertParallelMoE):
            shards.update(head + name for name in ("gate_up_proj", "up_proj", "down_proj")
                          if isinstance(getattr(module, name, None), nn.Parameter))
        elif isinstance(module, ExpertParallelExperts):
            shards.update(f"{head}local.{name}" for name in _EXPERT_PARAMS
                          if isinstance(getattr(module.local, name, None), nn.Parameter))
            moved.append((f"{head}local.", head))
    return {key: (next((new + key[len(old):] for old, new in moved if key.startswith(old)), key), key in shards)
            for key in keys}


def _gather_experts(shard: torch.Tensor, group) -> torch.Tensor:
    world, _ = _world(group)
    data = shard.detach().contiguous().view(torch.uint8)  # as bytes, like the token rows: gloo has no bf16 gather
    parts = [torch.empty_like(data) for _ in range(world)]
    dist.all_gather(parts, data, group=group)
    return torch.cat(parts).view(shard.dtype)


def full_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """The state dict of the unsharded model, from a model sharded by :func:`shard_hf_experts` or holding
    :class:`ExpertParallelMoE` layers: every rank's experts gathered in rank order, keys as before sharding (so
    ``unsharded.load_state_dict(...)`` or Hugging Face's ``save_pretrained(dir, state_dict=...)`` takes it).
    A collective: call it on every rank. Replicated tensors are this rank's (equal on every rank when their
    gradients are reduced)."""
    state = model.state_dict()
    return {renamed: _gather_experts(state[key], group) if is_shard else state[key].detach().clone()
            for key, (renamed, is_shard) in _unsharded_keys(model, state).items()}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], group=None, strict: bool = True):
    """Load an unsharded state dict (a checkpoint of the single-process model, or :func:`full_state_dict`'s) into
    a sharded model: each rank takes its experts ``[rank * E_local, (rank + 1) * E_local)``. Returns
    ``load_state_dict``'s result (missing keys under the sharded model's names, unexpected ones as given, raised
    when ``strict``); a full expert tensor whose dim 0 is not the shard's times the world size is refused."""
    world, rank = _world(group)
    own = model.state_dict()
    mapped, used = {}, set()
    for key, (source, is_shard) in _unsharded_keys(model, own).items():
        if source not in state_dict:
            continue  # missing: load_state_dict reports it (strict) or leaves the tensor as it is
        tensor, per_rank = state_dict[source], (own[key].shape[0] if is_shard else 0)
        if is_shard:
            if tensor.dim() == 0 or tensor.shape[0] != per_rank * world:
                raise ValueError(f"{source}: expected the full experts, dim 0 = {per_rank * world} ({per_rank} "
                                 f"per rank x {world} ranks), got shape {tuple(tensor.shape)}")
            tensor = tensor[rank * per_rank:(rank + 1) * per_rank]
        mapped[key] = tensor
        used.add(source)
    mapped.update({key: value for key, value in state_dict.items() if key not in used})  # unexpected: reported
    return model.load_state_dict(mapped, strict=strict)
