"""Self-MoE (MiXSE): compose PEFT LoRA adapters into routed LoRA experts with one shared router
(tiny Llama, random weights; runs in seconds on a CPU).

    python integration/example_self_moe.py [--backend reference|cpu]      (needs: pip install peft)
    TRITON_INTERPRET=1 python integration/example_self_moe.py --backend triton   (Triton interpreted: a minute or two)

1. make three LoRA "expert" adapters with PEFT (different ranks) and save them as adapter directories;
2. compose them: every adapted linear becomes a LoRAMoE, one router shared by all layers;
3. check against PEFT: forcing the router to expert i gives the base model with adapter i merged;
4. train the router only (base and experts frozen) and show how tokens are routed;
5. save_pretrained -> AutoModelForCausalLM.from_pretrained (a SelfMoEForCausalLM) and generate().
The whole recipe from seed examples (synthetic data, one expert per domain, router) is
moe_kernels.hf.self_specialize; moe_kernels.hf.merge_adapters_baseline builds the weight-merging baseline.
"""

import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from integration.hf_testing import tiny_llama_example  # noqa: E402  (this folder, via the checkout root)
from transformers import AutoModelForCausalLM  # noqa: E402

from moe_kernels.hf import compose_lora_experts, merge_adapters_baseline  # noqa: E402


def main():
    # --backend, seed 0, a tiny Llama (2 layers, hidden 64, vocab 128, random weights) and 4 x 16 random tokens
    args, config, base, tokens = tiny_llama_example(__doc__)

    with tempfile.TemporaryDirectory() as workdir:
        adapter_dirs = []
        for i, rank in enumerate([4, 8, 2]):  # 1. stand-ins for adapters trained on different skills
            lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
            expert = get_peft_model(copy.deepcopy(base), lora)
            with torch.no_grad():
                for name, param in expert.named_parameters():
                    if "lora_B" in name:
                        param.normal_(std=0.1)
            expert.save_pretrained(f"{workdir}/expert{i}")
            adapter_dirs.append(f"{workdir}/expert{i}")

        # 2. compose (in place on a copy of the base); router input = hidden state entering each decoder layer
        model = compose_lora_experts(copy.deepcopy(base), adapter_dirs, top_k=1, names=["math", "code", "chat"],
                                     backend=args.backend)
        print("trainable:", [n for n, p in model.named_parameters() if p.requires_grad])

        # 3. forced routing == PEFT's merged adapter
        with torch.no_grad():
            for i, path in enumerate(adapter_dirs):
                model.self_moe_router.forced_expert = i
                merged = PeftModel.from_pretrained(copy.deepcopy(base), path).merge_and_unload()
                diff = (model(tokens).logits - merged(tokens).logits).abs().max().item()
                print(f"expert {i} forced vs PEFT merged: max |diff| = {diff:.2e}")
        model.self_moe_router.forced_expert = None
        baseline = merge_adapters_baseline(base, adapter_dirs, combination_type="cat")  # one merged adapter
        with torch.no_grad():
            print("weight-merging baseline (PEFT, equal weights) loss:",
                  round(baseline(tokens, labels=tokens).loss.item(), 4))

    # 4. train the router
    optimizer = torch.optim.AdamW(model.self_moe_router.parameters(), lr=5e-2)
    model.train()
    for step in range(20):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        model(tokens)
        picks = model.self_moe_router.last_logits.argmax(dim=-1)  # routing of the last decoder layer
    print("tokens per expert (last layer):", torch.bincount(picks, minlength=3).tolist())

    # 5. save and load as a Hugging Face model, then generate
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        restored = AutoModelForCausalLM.from_pretrained(path)
    restored.set_backend(args.backend)
    with torch.no_grad():
        print(f"from_pretrained gives a {type(restored).__name__} ({restored.expert_names}) with identical logits:",
              torch.equal(restored(tokens).logits, model(tokens).logits))
    print("generate:", restored.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False)[0, 5:].tolist())


if __name__ == "__main__":
    main()
