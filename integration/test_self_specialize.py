"""Self-MoE's self-specialization end to end (synthetic data from seeds -> one LoRA expert per domain with
PEFT -> composed routed experts -> router), on tiny random Llama / Qwen3 models on the CPU, and the
weight-merging baselines through PEFT's add_weighted_adapter."""

import copy
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

import moe_kernels.hf as mkh  # noqa: E402
from moe_kernels.hf.specialize import generate_domain_data  # noqa: E402
from moe_kernels.models import SelfMoEForCausalLM  # noqa: E402

VOCAB = 64
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, eos_token_id=1, bos_token_id=None, pad_token_id=0, initializer_range=0.2)
CONFIGS = {"llama": lambda: LlamaConfig(**COMMON), "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8)}
DOMAINS = ["math", "code", "law"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (root conftest.py)


def base_model(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def seeds():
    """Each domain's seed examples draw their tokens from its own part of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    return {d: [torch.randint(2 + 20 * i, 2 + 20 * (i + 1), (6,), generator=g).tolist() for _ in range(4)]
            for i, d in enumerate(DOMAINS)}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_self_specialize_shows_progress(capsys):
    """Each stage reports on stderr as it goes (on a real model they take minutes), and progress=False is silent."""
    kwargs = dict(examples_per_domain=1, lora_rank=2, target_modules=["q_proj"], expert_steps=2, router_steps=2,
                  batch_size=4, backend="reference")
    domains = {name: examples[:2] for name, examples in list(seeds().items())[:2]}
    mkh.self_specialize(base_model("llama"), domains, **kwargs)
    err = capsys.readouterr().err
    for stage in ("self_specialize: synthetic data", "self_specialize: expert 'math'",
                  "self_specialize: expert 'code'", "self_specialize: router"):
        assert stage in err, err
    assert "2/2" in err and "loss=" in err, err
    mkh.self_specialize(base_model("llama"), domains, progress=False, **kwargs)
    assert "self_specialize" not in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_self_specialize_end_to_end(tmp_path, family):
    base = base_model(family)
    reference = copy.deepcopy(base)
    domains = seeds()
    start = time.perf_counter()
    model, report = mkh.self_specialize(base, domains, output_dir=str(tmp_path), examples_per_domain=6, lora_rank=4,
                                        lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                        expert_steps=12, expert_lr=1e-2, router_steps=12, router_lr=5e-2,
                                        batch_size=4, backend="reference")
    assert time.perf_counter() - start < 120
    assert isinstance(model, SelfMoEForCausalLM) and model.expert_names == DOMAINS
    # 1. synthetic data: new examples, none a copy of a seed, written by the base model
    for name in DOMAINS:
        synthetic = report.synthetic[name]
        assert 1 <= len(synthetic) <= 6
        assert all(example and example not in domains[name] for example in synthetic)
        assert len({tuple(e) for e in synthetic}) == len(synthetic)
    # 2. each expert trained (its loss fell) and was saved as a PEFT adapter
    for name in DOMAINS:
        losses = report.expert_losses[name]
        assert len(losses) == 12 and losses[-1] < losses[0]
        assert (tmp_path / "experts" / name / "adapter_config.json").exists()
    # 3. composed: forcing expert i is the base with PEFT's adapter i merged
    tokens = torch.tensor([domains["code"][0] + domains["math"][1]])
    with torch.no_grad():
        for index, name in enumerate(DOMAINS):
            model.force_expert(name)
            merged = PeftModel.from_pretrained(copy.deepcopy(reference), report.adapter_dirs[name]).merge_and_unload()
            assert rel_err(model(tokens).logits, merged(tokens).logits) < 1e-5, name
        model.force_expert(None)
    # 4. only the router trained, and its loss fell; the base is untouched
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["self_moe_router.linear.weight"]
    assert report.router_losses[-1] < report.router_losses[0]
    base_state = reference.state_dict()
    for key, value in model.language_model.state_dict().items():
        plain = key.replace(".base.", ".")
        if plain in base_state:
            assert torch.equal(value, base_state[plain]), key
    # the result is an ordinary HF model: generate and a bit-identical save/load round trip
    out = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, tokens.shape[1] + 4)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    loaded.set_backend("reference")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_generate_domain_data_is_seeded_and_filters():
    base = base_model("llama")
    domain_seeds = seeds()["math"]
    first = generate_domain_data(base, domain_seeds, 5, seed=3, max_new_tokens=8)
    assert first == generate_domain_data(base, domain_seeds, 5, seed=3, max_new_tokens=8)
    assert all(e and e not in domain_seeds and 1 not in e for e in first)  # cut at eos, no seed copies
    with pytest.raises(ValueError, match="at least one seed"):
        generate_domain_data(base, [], 2)
    with pytest.raises(TypeError, match="token ids"):
        generate_domain_data(base, ["text needs a tokenizer"], 2)


def test_merge_baselines_through_peft(tmp_path):
    base = base_model("llama")
    dirs = []
    for i in range(3):
        torch.manual_seed(20 + i)
        adapted = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.3)
        adapted.save_pretrained(tmp_path / f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
    tokens = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    # "cat" with weights 1/3: exactly the base plus the average of the three updates
    merged = mkh.merge_adapters_baseline(base, dirs, combination_type="cat", merge=True)
    state = base.state_dict()
    deltas = [PeftModel.from_pretrained(copy.deepcopy(base), d).merge_and_unload().state_dict() for d in dirs]
    averaged = copy.deepcopy(base)
    averaged.load_state_dict({k: v + sum((m[k] - v) / 3 for m in deltas) for k, v in state.items()})
    with torch.no_grad():
        assert rel_err(merged(tokens).logits, averaged(tokens).logits) < 1e-5
    with torch.no_grad():
        base_logits = base(tokens).logits
    for combination in ("ties", "dare_linear"):
        torch.manual_seed(5)  # dare drops weights at random
        model = mkh.merge_adapters_baseline(base, dirs, combination_type=combination, density=0.5)
        assert model.active_adapter == "merged"
        # PEFT's own add_weighted_adapter on the same adapters, weights and density (the same calls from the same
        # seed: the same draws for dare)
        torch.manual_seed(5)
        direct = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="e0")
        for i, d in enumerate(dirs[1:], 1):
            direct.load_adapter(d, adapter_name=f"e{i}")
        direct.add_weighted_adapter(["e0", "e1", "e2"], [1 / 3] * 3, adapter_name="m", combination_type=combination,
                                    density=0.5)
        direct.set_adapter("m")
        direct.eval()
        with torch.no_grad():
            got, want = model(tokens).logits, direct(tokens).logits
        assert rel_err(got, want) < 1e-6, combination
        assert rel_err(got, base_logits) > 1e-3, f"{combination}: the merged adapter changes nothing"
    with pytest.raises(ValueError, match="density"):
        mkh.merge_adapters_baseline(base, dirs, combination_type="ties")
    with pytest.raises(ValueError, match="combination_type"):
        mkh.merge_adapters_baseline(base, dirs, combination_type="average")
    assert torch.equal(base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       state["model.layers.0.self_attn.q_proj.weight"])  # the base is not modified


def char_tokenizer():
    """A character-level tokenizer built locally (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789+-*/=():.; ")
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def test_self_specialize_with_text_seeds_and_a_tokenizer():
    tokenizer = char_tokenizer()
    base = base_model("llama")
    domains = {"math": ["1+2=3", "4*5=20", "9-3=6"], "code": ["def f(x):", "print(x)", "import os"]}
    model, report = mkh.self_specialize(base, domains, tokenizer=tokenizer, examples_per_domain=3, lora_rank=2,
                                        target_modules=["q_proj", "v_proj"], expert_steps=3, router_steps=3,
                                        batch_size=4, generation_kwargs={"separator": ";", "max_new_tokens": 10})
    assert model.expert_names == ["math", "code"]
    for name, seeds in domains.items():
        synthetic = report.synthetic[name]
        assert synthetic and all(isinstance(t, str) and t and t not in seeds and ";" not in t for t in synthetic)
    assert len(report.expert_losses["code"]) == 3 and len(report.router_losses) == 3
    prompt = tokenizer("1+1=", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert isinstance(tokenizer.decode(out[0]), str)
