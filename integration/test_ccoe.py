"""CCoE end to end on real Hugging Face causal-LM classes (tiny random Llama / Qwen2 / Mistral, CPU).

A request routed to expert j must give exactly what expert j's full model gives on its own: logits
of a mixed, padded batch, and greedy generations with per-branch KV caches. Plus routing (rules,
learned classifier), push/pop, the memory report, a short training run, and the error cases.
"""

import copy

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from moe_kernels.hf import couple_experts
from moe_kernels.hf.couple import ClassifierRouter, KeywordRouter
from hf_testing import left_padded_prompts  # noqa: E402

VOCAB = 101
PAD = 0
SPLIT = 2
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              pad_token_id=PAD, max_position_embeddings=256)
# Qwen2 with mixed full/sliding layers and Mistral with a sliding window shorter than the prompts:
# the branch masks must follow each layer's attention type.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=4)),
}
EXPERT_DEPTHS = {"code": 3, "math": 5, "law": 2}  # own depths: deeper, and no layer of its own past the split


def tiny_model(family: str, depth: int, seed: int):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(num_hidden_layers=depth, **COMMON, **extra)).eval()


def fine_tuned_copy(base, family: str, depth: int, seed: int):
    """An expert as CCoE trains one: the base's embeddings and lower layers, its own upper layers/head."""
    expert = tiny_model(family, depth, seed)
    base_state = base.state_dict()
    shared = {k: v for k, v in base_state.items()
              if k.startswith("model.embed_tokens") or any(k.startswith(f"model.layers.{i}.") for i in range(SPLIT))}
    expert.load_state_dict(shared, strict=False)
    return expert


def build(family: str, router=None):
    base = tiny_model(family, 3, seed=0)
    experts = {name: fine_tuned_copy(base, family, depth, seed=i + 1)
               for i, (name, depth) in enumerate(EXPERT_DEPTHS.items())}
    return base, experts, couple_experts(base, experts, split_layer=SPLIT, router=router)


def padded_batch(lengths, seed=0):
    return left_padded_prompts(lengths, VOCAB, PAD, seed)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routed_logits_equal_the_experts_full_model(family):
    _, experts, coupled = build(family)
    ids, mask = padded_batch([7, 4, 9, 9, 2, 6])
    route = ["math", "law", "math", "code", "law", "math"]
    out = coupled(ids, attention_mask=mask, expert=route)
    assert out.expert_names == route
    for name, expert in experts.items():
        rows = [i for i, r in enumerate(route) if r == name]
        with torch.no_grad():
            expected = expert(ids, attention_mask=mask).logits[rows]
        actual = out.logits[rows]
        valid = mask[rows].bool()  # padded positions carry no meaning
        torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_the_experts_generate(family):
    _, experts, coupled = build(family)
    ids, mask = padded_batch([6, 3, 8, 5], seed=1)
    route = ["code", "math", "law", "math"]
    with torch.no_grad():
        generated = coupled.generate(ids, attention_mask=mask, expert=route, max_new_tokens=7)
    assert coupled.last_routing == route
    for name, expert in experts.items():
        rows = [i for i, r in enumerate(route) if r == name]
        with torch.no_grad():
            expected = expert.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
                                       pad_token_id=PAD)
        assert torch.equal(generated[rows], expected[rows]), name


def test_cached_steps_equal_a_full_recompute():
    _, _, coupled = build("llama")
    ids, mask = padded_batch([5, 8, 3], seed=2)
    route = ["law", "code", "math"]
    with torch.no_grad():
        out = coupled(ids[:, :-2], attention_mask=mask[:, :-2], expert=route, use_cache=True)
        step = coupled(ids[:, -2:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        full = coupled(ids, attention_mask=mask, expert=route)
    assert step.expert_names == route  # routing kept from the prompt
    torch.testing.assert_close(step.logits, full.logits[:, -2:], rtol=1e-5, atol=1e-5)


def test_keyword_router_routes_and_reports_its_choice():
    vocab_text = {i: chr(ord("a") + i % 26) for i in range(VOCAB)}  # a toy "tokenizer": one letter per id

    def decode(token_ids):
        return "".join(vocab_text[t] for t in token_ids)

    router = KeywordRouter({"code": [r"def"], "math": ["sum", r"\d+\+\d+"]}, default="law", decode=decode)
    assert router.route_texts(["def f(): pass", "the SUM of", "1+2", "a contract"]) == ["code", "math", "math", "law"]
    _, experts, coupled = build("llama", router=router)
    encode = {v: k for k, v in vocab_text.items() if k < 26}
    prompts = ["xxdefy", "thesum", "contract"]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + [encode[c] for c in p] for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = coupled(ids, attention_mask=mask)
    assert out.expert_names == ["code", "math", "law"]
    generated = coupled.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert coupled.last_routing == ["code", "math", "law"]
    with torch.no_grad():
        expected = experts["math"].generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                            pad_token_id=PAD)
    assert torch.equal(generated[1], expected[1])


def test_classifier_router_learns_domains_from_labelled_prompts():
    _, _, coupled = build("qwen2")
    names = coupled.expert_names
    g = torch.Generator().manual_seed(3)
    # Each domain draws its tokens from its own third of the vocabulary.
    labels = [names[i % 3] for i in range(24)]
    ids = torch.stack([torch.randint(1 + 33 * names.index(n), 33 * (names.index(n) + 1), (6,), generator=g)
                       for n in labels])
    router = ClassifierRouter(coupled.config.text_config.hidden_size, names)
    losses = router.fit(coupled, ids, labels, steps=60)
    assert losses[-1] < losses[0] * 0.5
    coupled.router = router
    assert coupled.route(ids) == labels
    out = coupled(ids)
    assert out.expert_names == labels
    assert torch.equal(out.expert_ids, torch.tensor([names.index(n) for n in labels]))


def test_push_pop_and_memory_report():
    base, experts, coupled = build("mistral")
    ids, mask = padded_batch([5, 5], seed=4)
    before = coupled(ids, attention_mask=mask, expert=["code", "law"]).logits
    report = coupled.memory_report()
    assert report["experts"] == 3 and report["saved_bytes"] > 0
    assert report["coupled_bytes"] < report["separate_bytes"]
    coupled.pop_expert("math")
    assert coupled.expert_names == ["code", "law"]
    assert coupled.memory_report()["experts"] == 2
    extra = fine_tuned_copy(base, "mistral", 4, seed=9)
    coupled.push_expert("sql", extra)
    after = coupled(ids, attention_mask=mask, expert=["code", "law"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the others are untouched
    out = coupled(ids, attention_mask=mask, expert="sql")
    with torch.no_grad():
        torch.testing.assert_close(out.logits, extra(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already attached"):
        coupled.push_expert("sql", extra)
    with pytest.raises(KeyError, match="no expert named"):
        coupled.pop_expert("math")
    with pytest.raises(ValueError, match="not attached"):
        coupled(ids, expert="math")


def test_backbone_is_shared_and_branches_are_the_experts_own_modules():
    base, experts, coupled = build("llama")
    assert all(a is b for a, b in zip(coupled.backbone, base.model.layers[:SPLIT]))
    assert coupled.embed_tokens is base.model.embed_tokens
    branch = coupled.branch("math")
    assert branch.lm_head is experts["math"].lm_head  # its own (trained) head
    assert all(a is b for a, b in zip(branch.layers, experts["math"].model.layers[SPLIT:]))
    # final norms equal to another expert's (here all are still at their initial value) are kept once
    assert branch.norm is coupled.branch("code").norm is experts["code"].model.norm
    assert coupled.config.shared_parts == {"math.norm": "code.norm", "law.norm": "code.norm"}
    # no tensor is held twice (safetensors saves each once): coupling the base itself as an expert copies
    # the parts the backbone already holds
    again = couple_experts(base, {"base": base, "code": experts["code"]}, split_layer=SPLIT)
    tied = again.all_tied_weights_keys  # declared sharing (equal norms/heads), saved once and tied on load
    pointers = [p.data_ptr() for n, p in again.named_parameters(remove_duplicate=False) if n not in tied]
    assert len(pointers) == len(set(pointers))


def test_training_one_branch_leaves_everything_else_unchanged():
    _, _, coupled = build("llama")
    ids, mask = padded_batch([8, 8, 8, 8], seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    route = ["code", "math", "law", "math"]
    with torch.no_grad():
        before = coupled(ids, attention_mask=mask, expert=route).logits
    others = {n: p.detach().clone() for n, p in coupled.named_parameters() if ".branches.code." not in n}
    trainable = coupled.freeze_all_but_expert("code")
    assert {id(p) for p in trainable} == {id(p) for p in coupled.branch("code").parameters()}
    losses = coupled.train_expert("code", [{"input_ids": ids, "attention_mask": mask, "labels": labels}] * 15,
                                  lr=1e-2)
    assert losses[-1] < losses[0] - 0.1
    for name, value in others.items():
        assert torch.equal(coupled.get_parameter(name), value), name
    with torch.no_grad():
        after = coupled(ids, attention_mask=mask, expert=route).logits
    assert torch.equal(after[1:], before[1:])  # the other experts' outputs are bit-identical
    assert not torch.equal(after[0], before[0])


def test_errors_for_mismatched_experts_and_bad_arguments():
    base = tiny_model("llama", 3, seed=0)
    with pytest.raises(ValueError, match="architecture"):
        couple_experts(base, {"q": tiny_model("qwen2", 3, seed=1)}, split_layer=SPLIT)
    wider = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **{**COMMON, "hidden_size": 48}))
    with pytest.raises(ValueError, match="hidden_size"):
        couple_experts(base, {"wide": wider}, split_layer=SPLIT)
    with pytest.raises(ValueError, match="fewer than split_layer"):
        couple_experts(base, {"short": fine_tuned_copy(base, "llama", 1, seed=1)}, split_layer=SPLIT)
    with pytest.raises(ValueError, match="embeddings that differ"):
        couple_experts(base, {"other": tiny_model("llama", 3, seed=5)}, split_layer=SPLIT)
    drifted = copy.deepcopy(base)
    with torch.no_grad():
        drifted.model.layers[1].self_attn.q_proj.weight.add_(0.01)  # a shared layer was not kept frozen
    with pytest.raises(ValueError, match="layer 1 .* differs"):
        couple_experts(base, {"drifted": drifted}, split_layer=SPLIT)
    with pytest.raises(ValueError, match="split_layer"):
        couple_experts(base, {"a": fine_tuned_copy(base, "llama", 3, seed=1)}, split_layer=7)
    with pytest.raises(ValueError, match="non-empty dict"):
        couple_experts(base, {}, split_layer=SPLIT)
    coupled = couple_experts(base, {"a": fine_tuned_copy(base, "llama", 3, seed=1)}, split_layer=SPLIT)
    ids = torch.randint(1, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="no router"):
        coupled(ids)
    with pytest.raises(ValueError, match="2 sequences"):
        coupled(ids, expert=["a", "a", "a"])
    with pytest.raises(ValueError, match="no routing rule"):
        KeywordRouter({"a": ["zzz"]}).route_text("hello")


def test_keyword_router_is_saved_with_its_rules_and_push_pop_rules(tmp_path):
    from transformers import AutoModelForCausalLM

    router = KeywordRouter({"code": [r"\bdef\b"], "math": ["sum"]}, default="law")
    base, experts, coupled = build("llama", router=router)
    coupled.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.router, KeywordRouter) and loaded.router.default == "law"
    assert loaded.router.route_texts(["def f", "a sum", "other"]) == ["code", "math", "law"]
    ids, mask = padded_batch([4, 4], seed=6)
    with pytest.raises(ValueError, match="decode="):  # token ids need the tokenizer's decode, set after loading
        loaded(ids, attention_mask=mask)
    # a cache made before a push/pop is refused; a CoE layer deeper than the backbone is refused
    out = coupled(ids, attention_mask=mask, expert="code", use_cache=True)
    coupled.pop_expert("law")
    with pytest.raises(ValueError, match="experts changed"):
        coupled(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), cache=out.cache)
    with pytest.raises(ValueError, match="depth"):
        coupled.push_expert("deep", fine_tuned_copy(base, "llama", 4, seed=8), coe_layer=3)
    coupled.push_expert("law", experts["law"])
    assert coupled.expert_names == ["code", "math", "law"]


def test_shared_norms_and_heads_are_kept_once_saved_once_and_unshared_for_training(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model("qwen2", 3, seed=0)
    experts = {name: copy.deepcopy(base) for name in ("a", "b", "c")}
    with torch.no_grad():  # each changes one upper layer; head and norm stay the base's
        for i, expert in enumerate(experts.values()):
            expert.model.layers[2].mlp.down_proj.weight.add_(0.1 * (i + 1))
        experts["c"].lm_head.weight.add_(0.5)  # c's head is its own
    coupled = couple_experts(base, experts, split_layer=SPLIT)
    assert coupled.config.shared_parts == {"b.norm": "a.norm", "c.norm": "a.norm", "b.lm_head": "a.lm_head"}
    assert coupled.branch("b").lm_head is coupled.branch("a").lm_head
    ids, mask = padded_batch([5, 5, 5], seed=7)
    route = ["a", "b", "c"]
    with torch.no_grad():
        before = coupled(ids, attention_mask=mask, expert=route).logits
    coupled.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # strict: every tensor accounted for
    assert loaded.branch("b").lm_head is loaded.branch("a").lm_head
    assert loaded.branch("c").norm is loaded.branch("a").norm
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask, expert=route).logits, before)
    # training "a" alone: its norm and head become its own copies; b and c keep theirs, bit-identical
    loaded.train_expert("a", [{"input_ids": ids, "attention_mask": mask, "labels": ids}] * 3, lr=1e-2)
    assert loaded.branch("b").lm_head is not loaded.branch("a").lm_head
    assert loaded.config.shared_parts == {"c.norm": "b.norm"}
    with torch.no_grad():
        after = loaded(ids, attention_mask=mask, expert=route).logits
    assert torch.equal(after[1:], before[1:]) and not torch.equal(after[0], before[0])
    # an owner attached after an unrelated expert still loads (experts attach one by one in from_pretrained)
    extra = copy.deepcopy(experts["c"])
    with torch.no_grad():
        extra.model.norm.weight.add_(1.0)
        extra.lm_head.weight.add_(1.0)
    late = couple_experts(base, {"x": extra, "b": experts["b"], "c": experts["c"]}, split_layer=SPLIT)
    assert late.config.shared_parts == {"c.norm": "b.norm"}
    late.save_pretrained(tmp_path / "late")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "late").branch("c").norm is not None
    # popping an owner hands its shared modules on; a save/load round trip still holds
    coupled.pop_expert("a")
    assert coupled.config.shared_parts == {"c.norm": "b.norm"}
    coupled.save_pretrained(tmp_path / "popped")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "popped")
    with torch.no_grad():
        reloaded = again(ids, attention_mask=mask, expert=["b", "b", "c"]).logits
        assert torch.equal(reloaded, coupled(ids, attention_mask=mask, expert=["b", "b", "c"]).logits)  # nothing lost
        # rows 1 and 2 keep their experts: the logits from before the pop, up to rounding, since row 0 now joins b's
        # rows and a GEMM over 2 rows may block (and round) otherwise than over 1 (seen on an AVX-512 CPU)
        torch.testing.assert_close(reloaded[1:], before[1:], rtol=1e-5, atol=1e-5)
