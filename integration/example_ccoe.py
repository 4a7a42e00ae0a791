"""CCoE in one page: couple domain experts on a shared backbone, route requests, generate.

Tiny random Llama models on the CPU, a character-level toy tokenizer, a few seconds:

    python integration/example_ccoe.py

1. A base model; three experts trained the CCoE way: copies of the base whose lower layers stay
   frozen, each training its own upper layers (the math expert is deeper) on its domain.
2. ``couple_experts`` keeps the shared backbone once and attaches each expert's branch.
3. Requests are routed by keyword rules, or by a classifier learned on the backbone's pooled state.
4. A routed request gives exactly what its expert's full model gives (checked), with KV caches.
5. Experts attach and detach; one branch fine-tunes alone; the coupled model saves and loads as a
   Hugging Face model (CcoeForCausalLM) and transformers' generate() runs on it (beam search here).
"""

import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from moe_kernels.hf import couple_experts  # noqa: E402
from moe_kernels.hf.couple import ClassifierRouter, KeywordRouter  # noqa: E402

torch.manual_seed(0)
SPLIT = 2


class CharTokenizer:
    """One id per character; id 0 pads."""

    chars = " abcdefghijklmnopqrstuvwxyz0123456789+-*/=():_.,'"

    def encode(self, text):
        return [self.chars.index(c) + 1 for c in text.lower() if c in self.chars]

    def decode(self, ids):
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))

    def batch(self, texts):
        """Left-padded ids and attention mask."""
        rows = [self.encode(t) for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        return ids, (ids != 0).long()


tok = CharTokenizer()
config = LlamaConfig(vocab_size=len(tok.chars) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=None,
                     eos_token_id=None)
base = LlamaForCausalLM(config).eval()

DOMAINS = {
    "code": ["def f(x): return x", "print(x)", "def g(): pass", "import os"],
    "math": ["1+2=3", "2*3=6", "sum of 4 and 5 = 9", "7-2=5"],
    "law": ["the court ruled", "the contract is void", "the party shall pay", "the law says"],
}


def train_expert(name, depth, steps=8):
    """A copy of the base (deeper if asked) whose layers below SPLIT stay frozen; the rest trains."""
    expert_config = copy.deepcopy(config)
    expert_config.num_hidden_layers = depth
    expert = LlamaForCausalLM(expert_config)
    expert.load_state_dict(base.state_dict(), strict=False)  # shared prefix (and the base's upper layers)
    frozen = [expert.model.embed_tokens] + list(expert.model.layers[:SPLIT])
    for module in frozen:
        module.requires_grad_(False)
    ids, mask = tok.batch(DOMAINS[name])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in expert.parameters() if p.requires_grad], lr=1e-2)
    expert.train()
    for _ in range(steps):
        loss = expert(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"  expert {name:<5} depth {depth}: final training loss {loss.item():.2f}")
    return expert.eval()


print("1. training the experts alone (shared prefix frozen)")
experts = {"code": train_expert("code", 3), "math": train_expert("math", 4), "law": train_expert("law", 3)}

print("2. coupling them at layer", SPLIT)
router = KeywordRouter({"code": [r"\bdef\b", r"print\(", "import"], "math": [r"\d\s*[-+*/=]\s*\d", r"\bsum\b"]},
                       default="law", decode=tok.decode)
coupled = couple_experts(base, experts, split_layer=SPLIT, router=router)
report = coupled.memory_report()
print(f"  {report['experts']} experts: {report['separate_bytes'] / 1e6:.2f} MB as full models, "
      f"{report['coupled_bytes'] / 1e6:.2f} MB coupled ({100 * report['saved_fraction']:.0f}% saved)")

print("3. routing requests by keyword rules and generating (one KV cache per branch)")
prompts = ["def h(y):", "3+4=", "the judge"]
ids, mask = tok.batch(prompts)
with torch.no_grad():
    generated = coupled.generate(ids, attention_mask=mask, max_new_tokens=10)
for row, (prompt, expert_name) in enumerate(zip(prompts, coupled.last_routing)):
    with torch.no_grad():
        alone = experts[expert_name].generate(ids[row:row + 1, -len(prompt):], max_new_tokens=10, do_sample=False)
    same = tok.decode(alone[0].tolist()) == tok.decode(generated[row].tolist())
    print(f"  {prompt!r:>12} -> {expert_name:<5} {tok.decode(generated[row, ids.shape[1]:].tolist())!r:<16}"
          f" equals the expert's own generate: {same}")
    assert same

print("4. a learned router on the backbone's pooled hidden state")
texts = [t for domain in DOMAINS for t in DOMAINS[domain]]
labels = [domain for domain in DOMAINS for _ in DOMAINS[domain]]
train_ids, train_mask = tok.batch(texts)
classifier = ClassifierRouter(config.hidden_size, coupled.expert_names)
losses = classifier.fit(coupled, train_ids, labels, attention_mask=train_mask, steps=100)
coupled.router = classifier
print(f"  router loss {losses[0]:.2f} -> {losses[-1]:.3f}; training accuracy "
      f"{sum(a == b for a, b in zip(coupled.route(train_ids, train_mask), labels)) / len(labels):.0%}")
out = coupled(ids, attention_mask=mask)
print(f"  routed {prompts} -> {out.expert_names}")

print("5. detaching and attaching an expert without touching the others")
coupled.pop_expert("law")
coupled.push_expert("legal", experts["law"])
classifier.names[classifier.names.index("law")] = "legal"  # the router's law class now routes to "legal"
print(f"  experts now: {coupled.expert_names}")
law_ids, law_mask = tok.batch(DOMAINS["law"])
losses = coupled.train_expert("legal", [{"input_ids": law_ids, "attention_mask": law_mask,
                                         "labels": law_ids.masked_fill(law_mask == 0, -100)}] * 4, lr=1e-3)
print(f"  fine-tuned the 'legal' branch alone (everything else frozen): loss {losses[0]:.2f} -> {losses[-1]:.2f}")

print("6. save_pretrained -> AutoModelForCausalLM.from_pretrained, then transformers' generate()")
with tempfile.TemporaryDirectory() as path:
    coupled.save_pretrained(path)
    restored = AutoModelForCausalLM.from_pretrained(path)  # the router (a ClassifierRouter) comes back too
with torch.no_grad():
    routed = restored(ids, attention_mask=mask)
    same = torch.equal(routed.logits, coupled(ids, attention_mask=mask).logits)
    beams = restored.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
print(f"  {type(restored).__name__}: identical logits {same}; routed {routed.expert_names}")
for prompt, row in zip(prompts, beams):
    print(f"  beam search {prompt!r:>12} -> {tok.decode(row[ids.shape[1]:].tolist())!r}")
