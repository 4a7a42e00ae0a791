"""UltraFuser in one page: fuse text/code/math specialists token by token, train the gate, generate.

Tiny random Llama, Qwen2 and Mistral specialists sharing one character vocabulary, on the CPU:

    python integration/example_ultrafuser.py

1. ``fuse_specialists`` puts a shared gate MLP (H -> 512 -> ReLU -> 1) over the specialists' last
   hidden states; per token the logits are the softmax-weighted sum of the specialists' logits.
2. Training: a batch sampler gives every batch the same share of each domain; stage 1 trains the
   gate only, stage 2 everything; the loss is the fused gated cross-entropy (no N full logit tensors).
3. Blended greedy decoding with one KV cache per specialist, and the gate's choice per token.
4. The fused model saves and loads as a Hugging Face model (UltraFuserForCausalLM); generate() samples.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM)

from moe_kernels.hf import fuse_specialists  # noqa: E402
from moe_kernels.models.ultrafuser import DomainBalancedBatchSampler, train_stage  # noqa: E402

torch.manual_seed(0)
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789+-*/=():_.,'"
LENGTH = 16


def encode(text):
    ids = [CHARS.index(c) + 1 for c in text.lower() if c in CHARS][:LENGTH]
    return ids + [0] * (LENGTH - len(ids))


def decode(ids):
    return "".join(CHARS[i - 1] for i in ids if 0 < i <= len(CHARS))


DATA = {
    "text": ["the cat sat on the mat", "a dog ran in the park", "the sun is bright today", "we read a good book"],
    "code": ["def f(x): return x+1", "for i in range(3):", "print('hello')", "import os, sys"],
    "math": ["12+30=42", "7*6=42", "100-58=42", "84/2=42"],
}
examples = [(encode(t), domain) for domain, texts in DATA.items() for t in texts]
input_ids = torch.tensor([e for e, _ in examples])
domains = [d for _, d in examples]

common = dict(vocab_size=len(CHARS) + 1, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=None)
specialists = {
    "text": LlamaForCausalLM(LlamaConfig(**common)),
    "code": Qwen2ForCausalLM(Qwen2Config(**common)),
    "math": MistralForCausalLM(MistralConfig(**common, sliding_window=8)),
}

# Each specialist first learns its own domain a little (stands in for real domain fine-tuning).
for name, model in specialists.items():
    rows = input_ids[[i for i, d in enumerate(domains) if d == name]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(6):
        loss = model(rows, labels=rows.masked_fill(rows == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

print("1. fusing", list(specialists), "(Llama, Qwen2, Mistral; one vocabulary)")
fuser = fuse_specialists(specialists, gate_hidden=512)

print("2. training with domain-balanced batches")
sampler = DomainBalancedBatchSampler(domains, batch_size=6, num_batches=6, seed=0)
batches = [{"input_ids": x, "labels": x.masked_fill(x == 0, -100)}
           for (x,) in DataLoader(TensorDataset(input_ids), batch_sampler=sampler)]
print("  domains of the first batch:", sorted(domains[i] for i in next(iter(sampler))))
labels = input_ids.masked_fill(input_ids == 0, -100)


def full_loss():
    with torch.no_grad():
        return fuser(input_ids, labels=labels).loss.item()


print(f"  loss before training:    {full_loss():.3f}")
train_stage(fuser, batches, stage=1, lr=1e-2)
print(f"  after stage 1 (gate):    {full_loss():.3f}")
train_stage(fuser, batches, stage=2, lr=3e-3)
print(f"  after stage 2 (all):     {full_loss():.3f}")

print("3. blended greedy decoding, one KV cache per specialist")
fuser.eval()
for prompt in ["the cat", "def g(", "6*7="]:
    ids = torch.tensor([encode(prompt)[:len(prompt)]])
    with torch.no_grad():
        generated = fuser.generate(ids, max_new_tokens=10)
        weights = fuser(generated).gate_weights[0, ids.shape[1] - 1:-1]  # the gate at each generated token
    favourite = [fuser.names[i] for i in weights.argmax(-1).tolist()]
    share = {name: round(weights[:, j].mean().item(), 2) for j, name in enumerate(fuser.names)}
    print(f"  {prompt!r:>10} -> {decode(generated[0, ids.shape[1]:].tolist())!r:<14} mean gate {share}, "
          f"top per token {favourite[:4]}...")

# With the gate forced one-hot, the fused model is exactly that specialist.
with torch.no_grad():
    forced = fuser(input_ids[:2], force_specialist="code").logits
    alone = specialists["code"](input_ids[:2]).logits
print("  one-hot gate on 'code' equals the code specialist:", torch.allclose(forced, alone, atol=1e-6))

print("4. save_pretrained -> AutoModelForCausalLM.from_pretrained, then top-p sampling with generate()")
with tempfile.TemporaryDirectory() as path:
    fuser.save_pretrained(path)
    restored = AutoModelForCausalLM.from_pretrained(path)
with torch.no_grad():
    print(f"  {type(restored).__name__} {restored.names}: identical logits",
          torch.equal(restored(input_ids[:2]).logits, fuser(input_ids[:2]).logits))
    torch.manual_seed(0)
    prompt = torch.tensor([encode("the cat")[:7]])
    sampled = restored.generate(prompt, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=0.7)
print(f"  'the cat' -> {decode(sampled[0, 7:].tolist())!r}")
