"""Helpers shared by the integration suites (imported by name: pytest puts this folder on sys.path)."""

import torch


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
