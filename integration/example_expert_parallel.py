"""Train a tiny Hugging Face Mixtral with its experts sharded over ranks (expert parallelism).

CPU (gloo):   torchrun --nproc_per_node=2 integration/example_expert_parallel.py [--save DIR]
GPUs (nccl):  torchrun --nproc_per_node=8 integration/example_expert_parallel.py --device cuda

Each rank owns num_experts / world_size experts and trains on its own batches; the routed token rows
travel between ranks with all_to_all_single. Expert gradients are local to their owner; every other
parameter is replicated, so its gradient is all-reduced as data parallelism does (DDP would do the same).
With --save DIR, rank 0 writes the trained model as one ordinary Hugging Face checkpoint (every rank's experts
gathered by full_state_dict), which MixtralForCausalLM.from_pretrained(DIR) loads in one process.
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers import MixtralConfig, MixtralForCausalLM

import moe_kernels.hf  # noqa: F401  (registers the "moe_kernels" experts implementation)
from moe_kernels.distributed import ExpertParallelExperts, full_state_dict, shard_hf_experts
from moe_kernels.distributed.check import exit_clean_rank


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--experts-implementation", default="moe_kernels",
                        help="how each rank runs its local experts: moe_kernels, grouped_mm or eager")
    parser.add_argument("--save", metavar="DIR", help="write the trained model (all experts) here from rank 0")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # a plain `python` start: init_process_group would fail on a missing variable
        parser.error("start it with torchrun, e.g. torchrun --nproc_per_node=2 integration/example_expert_parallel.py")
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if args.device == "cuda" and torch.cuda.device_count() < ranks_here:
        # otherwise NCCL fails inside init_process_group, in a traceback per rank
        parser.error(f"--device cuda needs one CUDA GPU per rank: {ranks_here} ranks on this machine, "
                     f"torch sees {torch.cuda.device_count()} GPUs (leave out --device to run on CPUs with gloo)")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")

    torch.manual_seed(0)  # identical initial weights on every rank
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4 * world,
                           num_experts_per_tok=2, max_position_embeddings=128)
    model = MixtralForCausalLM(config)
    model.set_experts_implementation(args.experts_implementation)
    shard_hf_experts(model).to(device)
    expert_params = {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    torch.manual_seed(1 + rank)  # each rank its own data
    batch = torch.randint(0, config.vocab_size, (4, 32), device=device)
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # replicated parameters: average their gradients over the ranks
            if p.grad is not None and id(p) not in expert_params:
                dist.all_reduce(p.grad)
                p.grad /= world
            elif p.grad is not None:
                p.grad /= world  # same objective: the mean of the ranks' losses
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  mean loss over {world} ranks {mean_loss.item() / world:.4f}")
    if args.save:
        state = {key: value.cpu() for key, value in full_state_dict(model).items()}  # a collective: every rank
        if rank == 0:
            unsharded = MixtralForCausalLM(config)
            unsharded.load_state_dict(state, strict=True)
            unsharded.save_pretrained(args.save)
            print(f"saved the unsharded model to {args.save}")
    if rank == 0:
        local = sum(p.numel() for p in model.parameters() if id(p) in expert_params)
        print(f"done: {config.num_local_experts} experts over {world} ranks, {local} expert parameters per rank")
    dist.destroy_process_group()
    if args.device != "cuda":
        # gloo's worker threads can abort the interpreter's shutdown after a clean run (pytorch#190489);
        # leave without it, as the expert-parallel check does.
        exit_clean_rank()


if __name__ == "__main__":
    main()
