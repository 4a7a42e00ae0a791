"""Helpers shared by the integration suites and examples (imported by name: pytest, and Python running a script
of this folder, put this folder on sys.path)."""

import argparse

import torch


def tiny_llama_example(doc: str):
    """The start of the PESC and Self-MoE examples: their ``--backend`` flag, seed 0, a tiny Llama with random
    weights (eval mode) and a batch of 4 x 16 random tokens. Returns (args, config, model, tokens)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--backend", default=None, help="moe_kernels backend (default: chosen by device)")
    args = parser.parse_args()
    from moe_kernels.backends import BackendError, resolve_backend

    try:  # the model stays on the CPU: refuse a backend that cannot run there now, not in a traceback mid-run
        resolve_backend(args.backend, torch.device("cpu"))
    except BackendError as exc:
        parser.error(f"--backend {args.backend}: {exc}")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, config.vocab_size, (4, 16))
    return args, config, model, tokens


def left_padded_prompts(lengths, vocab: int, pad: int = 0, seed: int = 0):
    """Left-padded random prompts [B, max(lengths)] (token ids in [1, vocab)) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask
