"""Expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs): each rank owns E / world_size
experts; tokens are routed locally, exchanged with ``all_to_all_single`` (uneven splits, dropless, no
capacity), run through the same grouped kernels on the owning rank, sent back and combined.

* :func:`expert_parallel_moe_mlp` / :func:`expert_parallel_adapter_moe` -- the functional forms
* :class:`ExpertParallelMoE` -- a :class:`~moe_kernels.layers.SparseMoE` with its experts sharded
* :class:`ExpertParallelExperts` / :func:`shard_hf_experts` -- the same for a Hugging Face model's
  experts modules (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3 ... any ``experts(hidden, top_k_index, top_k_weights)``)
* :func:`full_state_dict` / :func:`load_full_state_dict` -- checkpoints: the unsharded model's state dict gathered
  from the shards, and an unsharded state dict loaded into the shards

Run ``python -m moe_kernels.distributed.check --world-size 4`` to compare against the single-process layer.
"""

from .expert_parallel import (ExpertParallelExperts, ExpertParallelMoE, all_to_all_rows, expert_parallel_adapter_moe,
                              expert_parallel_moe_mlp, full_state_dict, load_full_state_dict, shard_hf_experts)

__all__ = ["ExpertParallelMoE", "ExpertParallelExperts", "shard_hf_experts", "expert_parallel_moe_mlp",
           "expert_parallel_adapter_moe", "all_to_all_rows", "full_state_dict", "load_full_state_dict"]
