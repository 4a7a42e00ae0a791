"""UltraFuser end to end on real Hugging Face causal-LM classes (tiny random Llama / Qwen2 / Mistral, CPU).

With the gate forced one-hot the fused model is exactly that specialist (logits and greedy
generation); the fused gated cross-entropy gives the naive blended loss and the same gradients in
every parameter; cached blended decoding equals a full recompute; the two training stages lower
the loss (stage 1 touching only the gate); mismatched vocabularies are refused.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from moe_kernels.hf import fuse_specialists
from moe_kernels.models.generation import positions_from_mask
from moe_kernels.models.ultrafuser import DomainBalancedBatchSampler, train_stage
from hf_testing import left_padded_prompts  # noqa: E402

VOCAB = 89
PAD = 0
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              pad_token_id=PAD, max_position_embeddings=256)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=4)),
}
NAMES = ["text", "code", "math"]


def tiny_model(family: str, depth: int, seed: int, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(num_hidden_layers=depth, **{**COMMON, **extra, **overrides})).eval()


def specialists(families):
    return {name: tiny_model(family, depth=2 + i % 2, seed=i + 1)
            for i, (name, family) in enumerate(zip(NAMES, families))}


def padded_batch(lengths, seed=0):
    return left_padded_prompts(lengths, VOCAB, PAD, seed)


FAMILY_SETS = [("llama",) * 3, ("qwen2",) * 3, ("mistral",) * 3, ("llama", "qwen2", "mistral")]


@pytest.mark.parametrize("families", FAMILY_SETS, ids="-".join)
def test_one_hot_gate_equals_that_specialist(families):
    models = specialists(families)
    fuser = fuse_specialists(models, gate_hidden=64)
    ids, mask = padded_batch([6, 9, 3], seed=1)
    valid = mask.bool()
    for index, (name, model) in enumerate(models.items()):
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits
            fused = fuser(ids, attention_mask=mask, force_specialist=name)
            expected_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                             pad_token_id=PAD)
            generated = fuser.generate(ids, attention_mask=mask, max_new_tokens=5, force_specialist=index)
        torch.testing.assert_close(fused.logits[valid], expected[valid], rtol=1e-6, atol=1e-6)
        assert torch.equal(generated, expected_tokens), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_blended_logits_and_cached_decoding(family):
    models = specialists((family,) * 3)
    fuser = fuse_specialists(models, gate_hidden=16)
    ids, mask = padded_batch([7, 4], seed=2)
    with torch.no_grad():
        out = fuser(ids, attention_mask=mask)
        torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(ids.shape))
        manual = sum(out.gate_weights[..., j:j + 1] * m(ids, attention_mask=mask).logits
                     for j, m in enumerate(models.values()))
        torch.testing.assert_close(out.logits, manual, rtol=1e-5, atol=1e-5)
        generated = fuser.generate(ids, attention_mask=mask, max_new_tokens=6)
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
        recomputed = fuser(generated, attention_mask=full_mask, position_ids=positions_from_mask(full_mask)).logits
    width = ids.shape[1]
    assert torch.equal(recomputed[:, width - 1:-1].argmax(-1), generated[:, width:])


@pytest.mark.parametrize("families", [("llama",) * 3, ("llama", "qwen2", "mistral")], ids="-".join)
def test_fused_loss_and_gradients_equal_the_naive_blend(families):
    models = specialists(families)
    fuser = fuse_specialists(models, gate_hidden=24)
    ids, mask = padded_batch([8, 5, 8], seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    params = [p for p in fuser.parameters()]
    losses, grads = {}, {}
    for impl in ("fused", "naive"):
        loss = fuser(ids, attention_mask=mask, labels=labels, loss_impl=impl, chunk_size=5).loss
        losses[impl] = loss.detach()
        grads[impl] = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(losses["fused"], losses["naive"], rtol=1e-6, atol=1e-6)
    for p, a, b in zip(params, grads["fused"], grads["naive"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _domain_data(num_per_domain=8, length=10, seed=4):
    """Token sequences of three domains; each domain repeats its own short pattern (learnable)."""
    g = torch.Generator().manual_seed(seed)
    rows, domains = [], []
    for d in range(3):
        for _ in range(num_per_domain):
            pattern = torch.randint(1 + 29 * d, 29 * (d + 1), (3,), generator=g)
            rows.append(pattern.repeat(length // 3 + 1)[:length])
            domains.append(NAMES[d])
    return torch.stack(rows), domains


def test_two_stage_training_lowers_the_loss():
    models = specialists(("llama", "qwen2", "mistral"))
    fuser = fuse_specialists(models, gate_hidden=32)
    data, domains = _domain_data()
    sampler = DomainBalancedBatchSampler(domains, batch_size=6, num_batches=12, seed=0)
    loader = DataLoader(TensorDataset(data), batch_sampler=sampler)
    batches = [{"input_ids": x, "labels": x} for (x,) in loader]
    for batch_indices in sampler:
        assert sorted(domains[i] for i in batch_indices) == sorted(NAMES * 2)

    def loss_on_all():
        with torch.no_grad():
            return fuser(data, labels=data).loss.item()

    frozen_before = [p.detach().clone() for p in fuser.specialists.parameters()]
    start = loss_on_all()
    stage1 = train_stage(fuser, batches, stage=1, lr=2e-2)
    after_stage1 = loss_on_all()
    assert after_stage1 < start
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, fuser.specialists.parameters()))
    assert len(stage1) == len(batches)
    train_stage(fuser, batches, stage=2, lr=3e-3)
    after_stage2 = loss_on_all()
    assert after_stage2 < after_stage1 - 0.1
    assert not all(torch.equal(a, b) for a, b in zip(frozen_before, fuser.specialists.parameters()))


class _FakeTokenizer:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return dict(self._vocab)


def test_mismatched_vocabularies_are_refused():
    llama = tiny_model("llama", 2, seed=1)
    other_vocab = tiny_model("qwen2", 2, seed=2, vocab_size=VOCAB + 3)
    with pytest.raises(ValueError, match="vocabulary size"):
        fuse_specialists([llama, other_vocab])
    wider = tiny_model("mistral", 2, seed=3, hidden_size=48)
    with pytest.raises(ValueError, match="hidden size"):
        fuse_specialists([llama, wider])
    same = tiny_model("mistral", 2, seed=3)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    shuffled = {**vocab, "t1": 2, "t2": 1}
    fuse_specialists({"a": llama, "b": same}, tokenizers=[_FakeTokenizer(vocab), _FakeTokenizer(vocab)])
    with pytest.raises(ValueError, match="tokenizer of b"):
        fuse_specialists({"a": llama, "b": same}, tokenizers=[_FakeTokenizer(vocab), _FakeTokenizer(shuffled)])
    fuser = fuse_specialists([llama, same])
    with pytest.raises(ValueError, match="force_specialist"):
        fuser(torch.ones(1, 3, dtype=torch.long), force_specialist=2)


def test_mismatch_error_names_the_differing_dimension():
    text = tiny_model("llama", 2, seed=1)
    with pytest.raises(ValueError) as info:
        fuse_specialists({"text": text, "code": tiny_model("qwen2", 2, seed=2, vocab_size=VOCAB + 3)})
    message = str(info.value)
    assert "'text' and 'code'" in message and f"vocabulary size (LM head rows): 'text' has {VOCAB}, 'code' has " \
        f"{VOCAB + 3}" in message and "hidden size" not in message.split(". UltraFuser")[0]
    with pytest.raises(ValueError) as info:
        fuse_specialists({"text": text, "math": tiny_model("mistral", 2, seed=3, hidden_size=48)})
    message = str(info.value).split(". UltraFuser")[0]
    assert "hidden size (LM head input = final hidden state): 'text' has 32, 'math' has 48" in message
    assert "vocabulary" not in message
