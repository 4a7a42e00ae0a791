"""PESC sparsity crafting, end to end on a tiny Llama (random weights, runs in seconds on a CPU).

    python integration/example_pesc.py [--backend reference|cpu]
    TRITON_INTERPRET=1 python integration/example_pesc.py --backend triton   (Triton interpreted: a minute or two)

1. craft: every MLP becomes a shared FFN + 8 routed bottleneck adapters (top-2); logits unchanged.
2. train router + adapters only (the base is frozen); the model's loss includes the load-balancing loss.
3. save_pretrained -> AutoModelForCausalLM.from_pretrained (a PescForCausalLM): identical logits; generate().
The same crafting on a local checkpoint from the shell: moe-kernels craft SRC_DIR DST_DIR --experts 8 --top-k 2
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from integration.hf_testing import tiny_llama_example  # noqa: E402  (this folder, via the checkout root)
from transformers import AutoModelForCausalLM  # noqa: E402

import moe_kernels.hf  # noqa: E402,F401  (registers the composed model types with AutoModelForCausalLM)

from moe_kernels.hf import craft_sparsity, load_crafted  # noqa: E402
from moe_kernels.hf.craft import crafted_aux_loss  # noqa: E402


def main():
    # --backend, seed 0, a tiny Llama (2 layers, hidden 64, vocab 128, random weights) and 4 x 16 random tokens
    args, config, model, tokens = tiny_llama_example(__doc__)
    with torch.no_grad():
        dense_logits = model(tokens).logits

    # 1. craft (in place); Up is zero-initialised so nothing changes yet
    model = craft_sparsity(model, num_experts=8, top_k=2, adapter_dim=16, freeze_base=True, backend=args.backend)
    with torch.no_grad():
        print("logits unchanged after crafting:", torch.equal(model(tokens).logits, dense_logits))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable (routers + adapters): {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    # 2. train; out.loss = cross-entropy + 0.01 * ONE load-balancing loss over all layers' routing (official PESC)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(30):
        out = model(tokens, labels=tokens)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 29:
            aux = crafted_aux_loss(model).item()
            print(f"step {step:2d}  loss {out.loss.item():.4f}  (load-balancing part {aux:.4f})")

    # 3. save and load
    model.eval()
    with torch.no_grad():
        trained_logits = model(tokens).logits
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        restored = AutoModelForCausalLM.from_pretrained(path)
        restored.set_backend(args.backend)  # the backend is a run-time choice, not part of the checkpoint
        with torch.no_grad():
            print(f"from_pretrained gives a {type(restored).__name__} with identical logits:",
                  torch.equal(restored(tokens).logits, trained_logits))
            print("load_crafted too:", torch.equal(load_crafted(path, backend=args.backend)(tokens).logits,
                                                   trained_logits))
    prompt, options = tokens[:2, :6], dict(attention_mask=torch.ones(2, 6, dtype=torch.long), pad_token_id=0)
    greedy = restored.generate(prompt, max_new_tokens=8, do_sample=False, **options)
    print("generate (greedy) equals the trained model's:", torch.equal(greedy, model.generate(
        prompt, max_new_tokens=8, do_sample=False, **options)))
    print("beam search:", restored.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False,
                                            **options)[:, 6:].tolist())


if __name__ == "__main__":
    main()
