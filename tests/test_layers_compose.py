"""Unit tests of the model-composition layers: the CoE layer's sequence dispatch, the fused gated
cross-entropy against its naive form, the domain-balanced batch sampler, and their input errors.
(End-to-end checks on Hugging Face models live in integration/test_ccoe.py and test_ultrafuser.py.)"""

import pytest
import torch
from moe_testing import DTYPES, assert_close_rel, backends_for
from transformers import LlamaConfig, LlamaForCausalLM

from moe_kernels.layers import CoELayer
from moe_kernels.losses import fused_gated_cross_entropy, naive_gated_cross_entropy
from moe_kernels.models.ccoe import ExpertBranch
from moe_kernels.models.generation import decode_with_cache, positions_from_mask
from moe_kernels.models.ultrafuser import DomainBalancedBatchSampler


# ----- fused gated cross-entropy -----

def _gated_ce_inputs(num_tokens, vocab, hidden, num_specialists, bias, ignored, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hiddens = [torch.randn(num_tokens, hidden, generator=g).to(dtype).requires_grad_() for _ in range(num_specialists)]
    heads = [(torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype).requires_grad_()
             for _ in range(num_specialists)]
    biases = ([torch.randn(vocab, generator=g).to(dtype).requires_grad_() for _ in range(num_specialists)]
              if bias else None)
    gate = torch.softmax(torch.randn(num_tokens, num_specialists, generator=g), -1).requires_grad_()
    labels = torch.randint(0, vocab, (num_tokens,), generator=g)
    if ignored == "some":
        labels[::3] = -100
    elif ignored == "all":
        labels[:] = -100
    return hiddens, heads, biases, gate, labels


def _loss_and_grads(fn, hiddens, heads, biases, gate, labels, **kwargs):
    inputs = [gate] + hiddens + heads + (biases or [])
    loss = fn(hiddens, heads, gate, labels, head_biases=biases, **kwargs)
    return loss, torch.autograd.grad(loss, inputs)


# (T, V, H, N, chunk, bias, ignored): one token and one specialist, T smaller than a chunk with odd H
# and prime V, chunk of one token, uneven last chunk, many specialists.
CE_GRID = [
    (1, 7, 5, 1, None, False, "none"),
    (5, 31, 9, 3, 16, True, "some"),
    (37, 50, 16, 4, 1, False, "some"),
    (40, 64, 8, 2, 7, True, "none"),
    (23, 97, 12, 6, 8, False, "some"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CE_GRID, ids=lambda c: "T{}-V{}-H{}-N{}-chunk{}-bias{}-{}".format(*c))
def test_fused_gated_ce_equals_naive_fp32(case, reduction):
    num_tokens, vocab, hidden, n, chunk, bias, ignored = case
    inputs = _gated_ce_inputs(num_tokens, vocab, hidden, n, bias, ignored)
    fused, fused_grads = _loss_and_grads(fused_gated_cross_entropy, *inputs, reduction=reduction, chunk_size=chunk)
    naive, naive_grads = _loss_and_grads(naive_gated_cross_entropy, *inputs, reduction=reduction)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, naive, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_fused_gated_ce_low_precision_matches_fp32_oracle(dtype):
    low = _gated_ce_inputs(29, 61, 16, 3, True, "some", dtype=dtype)
    high = [[t.detach().float().requires_grad_() for t in group] if isinstance(group, list) else
            (group.detach().float().requires_grad_() if group.is_floating_point() else group) for group in low]
    fused, fused_grads = _loss_and_grads(fused_gated_cross_entropy, *low, chunk_size=8)
    oracle, oracle_grads = _loss_and_grads(naive_gated_cross_entropy, *high)
    assert_close_rel(fused, oracle, dtype, "loss")
    for index, (a, b) in enumerate(zip(fused_grads, oracle_grads)):
        assert a.dtype == low[3].dtype if index == 0 else a.dtype == dtype
        assert_close_rel(a.float(), b, dtype, f"grad {index}", factor=2.0)


def test_fused_gated_ce_chunking_does_not_change_the_result():
    inputs = _gated_ce_inputs(19, 40, 8, 3, False, "some")
    reference_loss, reference_grads = _loss_and_grads(fused_gated_cross_entropy, *inputs, chunk_size=None)
    for chunk in (1, 3, 19, 64):
        loss, grads = _loss_and_grads(fused_gated_cross_entropy, *inputs, chunk_size=chunk)
        torch.testing.assert_close(loss, reference_loss)
        for a, b in zip(grads, reference_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_gated_ce_gate_only_gradients():
    hiddens, heads, _, gate, labels = _gated_ce_inputs(13, 30, 8, 3, False, "none")
    hiddens = [h.detach() for h in hiddens]
    heads = [w.detach() for w in heads]
    fused = fused_gated_cross_entropy(hiddens, heads, gate, labels, chunk_size=4)
    (fused_grad,) = torch.autograd.grad(fused, [gate])
    (naive_grad,) = torch.autograd.grad(naive_gated_cross_entropy(hiddens, heads, gate, labels), [gate])
    torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-5, atol=1e-7)


def test_fused_gated_ce_all_ignored_is_zero_with_zero_gradients():
    inputs = _gated_ce_inputs(6, 11, 4, 2, True, "all")
    loss, grads = _loss_and_grads(fused_gated_cross_entropy, *inputs)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_fused_gated_ce_backward_scales_with_the_upstream_gradient():
    hiddens, heads, biases, gate, labels = _gated_ce_inputs(9, 17, 6, 2, False, "none")
    (grad_once,) = torch.autograd.grad(fused_gated_cross_entropy(hiddens, heads, gate, labels), [heads[0]])
    loss = fused_gated_cross_entropy(hiddens, heads, gate, labels)
    (grad_scaled,) = torch.autograd.grad(3.5 * loss, [heads[0]], retain_graph=True)
    torch.testing.assert_close(grad_scaled, 3.5 * grad_once)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(loss, [heads[0]])


def test_fused_gated_ce_errors():
    hiddens, heads, _, gate, labels = _gated_ce_inputs(5, 11, 4, 2, False, "none")
    with pytest.raises(ValueError, match="gate_weights must have shape"):
        fused_gated_cross_entropy(hiddens, heads, gate[:, :1], labels)
    with pytest.raises(ValueError, match="vocabulary size"):
        fused_gated_cross_entropy(hiddens, [heads[0], torch.randn(12, 4)], gate, labels)
    with pytest.raises(ValueError, match="head_weights must be a list of 2"):
        fused_gated_cross_entropy(hiddens, heads[:1], gate, labels)
    with pytest.raises(ValueError, match="labels must be a 1-D"):
        fused_gated_cross_entropy(hiddens, heads, gate, labels.float())
    with pytest.raises(ValueError, match="hidden_states\\[1\\]"):
        fused_gated_cross_entropy([hiddens[0], hiddens[1][:3]], heads, gate, labels)
    with pytest.raises(ValueError, match="reduction"):
        fused_gated_cross_entropy(hiddens, heads, gate, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_gated_cross_entropy(hiddens, heads, gate, labels, chunk_size=0)
    with pytest.raises(ValueError, match="non-empty list"):
        fused_gated_cross_entropy([], [], gate, labels)


# ----- CoE layer: sequence-level dispatch -----

def _tiny_llama(depth, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=depth)
    return LlamaForCausalLM(config).eval()


def _coe_layer(backend=None, split=1):
    models = [_tiny_llama(depth, seed) for seed, depth in enumerate((2, 3, 1))]
    layer = CoELayer(backend=backend)
    for name, model in zip(("a", "b", "c"), models):
        layer.add_branch(name, ExpertBranch(model.model.layers[split:], model.model.norm, model.lm_head,
                                            model.config, split))
    return layer, models[0].model.rotary_emb


# expert-id patterns: mixed, all sequences on one expert, an expert with no sequences, one sequence.
DISPATCH_CASES = [[2, 0, 1, 0, 2, 1], [1, 1, 1, 1], [0, 2, 0, 2, 2], [1]]


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("expert_ids", DISPATCH_CASES, ids=lambda ids: "-".join(map(str, ids)))
def test_coe_layer_gives_each_sequence_its_branch_in_batch_order(expert_ids, backend):
    layer, rotary = _coe_layer(backend)
    batch, length = len(expert_ids), 5
    hidden = torch.randn(batch, length, 16)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding on one sequence
    positions = positions_from_mask(mask)
    cos_sin = rotary(hidden, positions)
    with torch.no_grad():
        out = layer(hidden, torch.tensor(expert_ids), mask, positions, cos_sin)
        assert out.shape == (batch, length, 41)
        for row, expert in enumerate(expert_ids):
            branch = layer.branches[layer.names[expert]]
            single = branch(hidden[row:row + 1], mask[row:row + 1], positions[row:row + 1],
                            tuple(t[row:row + 1] for t in cos_sin))
            torch.testing.assert_close(out[row], single[0], rtol=1e-5, atol=1e-6)


def test_coe_layer_errors():
    layer, rotary = _coe_layer()
    hidden = torch.randn(2, 3, 16)
    positions = torch.arange(3)[None]
    with pytest.raises(ValueError, match="expert_ids must have shape"):
        layer(hidden, torch.tensor([0, 1, 2]), None, positions, rotary(hidden, positions))
    with pytest.raises(ValueError, match="already attached"):
        layer.add_branch("a", layer.branches["b"])
    other_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                               num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2))
    with pytest.raises(ValueError, match="vocabulary"):
        layer.add_branch("d", ExpertBranch(other_vocab.model.layers[1:], other_vocab.model.norm, other_vocab.lm_head,
                                           other_vocab.config, 1))
    with pytest.raises(TypeError, match="ExpertBranch"):
        layer.add_branch("e", torch.nn.Linear(2, 2))
    with pytest.raises(KeyError, match="no expert named"):
        layer.remove_branch("zzz")
    assert isinstance(layer.remove_branch("c"), ExpertBranch) and layer.names == ["a", "b"]
    with pytest.raises(RuntimeError, match="no experts"):
        CoELayer()(hidden, torch.tensor([0, 0]), None, positions, rotary(hidden, positions))


def test_positions_from_mask_and_decode_errors():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 0]]
    model = _tiny_llama(1, 0)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_with_cache(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        decode_with_cache(model, ids, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="temperature"):
        decode_with_cache(model, ids, do_sample=True, temperature=0.0)


# ----- domain-balanced sampler -----

def test_domain_balanced_sampler_gives_every_batch_an_equal_share():
    domains = ["text"] * 10 + ["code"] * 4 + ["math"] * 7
    sampler = DomainBalancedBatchSampler(domains, batch_size=6, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # one pass over the largest domain, 2 per batch
    for batch in batches:
        assert len(batch) == 6
        assert sorted(domains[i] for i in batch) == ["code", "code", "math", "math", "text", "text"]
    text_seen = [i for b in batches for i in b if domains[i] == "text"]
    assert sorted(text_seen) == list(range(10))  # the largest domain: each example exactly once
    assert list(sampler) == batches  # deterministic for a seed and epoch
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_domain_balanced_sampler_errors():
    with pytest.raises(ValueError, match="multiple of the number of domains"):
        DomainBalancedBatchSampler(["a", "b", "c"], batch_size=4)
    with pytest.raises(ValueError, match="at least one example"):
        DomainBalancedBatchSampler([], batch_size=2)
    with pytest.raises(ValueError, match="num_batches"):
        DomainBalancedBatchSampler(["a", "b"], batch_size=2, num_batches=-1)
