"""The four research systems as Hugging Face models, on tiny random Llama / Mistral / Qwen2 / Qwen3 configs:

* ``save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained`` gives back the same model, bit-identical
  logits (also sharded, and with ``device_map``); without ``import moe_kernels.hf`` loading fails loudly;
* ``generate()`` (greedy) equals the earlier decoders' output (the experts' / specialists' own models and
  the plain-module decoders ``CoupledExperts`` / ``TokenFuser``), beam search, top-p sampling and a streamer
  run with the KV cache;
* CCoE with CoE layers at two depths in every family.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)
from transformers.generation.streamers import BaseStreamer

import moe_kernels.hf as mkh
from moe_kernels.hf.couple import ClassifierRouter, CoupledExperts
from moe_kernels.models.ultrafuser import TokenFuser
from moe_kernels.models import CcoeForCausalLM, PescForCausalLM, SelfMoEForCausalLM, UltraFuserForCausalLM
from hf_testing import left_padded_prompts  # noqa: E402

VOCAB = 97
PAD = 0
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              pad_token_id=PAD, max_position_embeddings=128, initializer_range=0.2)
FAMILIES = {
    "llama": lambda depth, **kw: LlamaConfig(num_hidden_layers=depth, **{**COMMON, **kw}),
    "mistral": lambda depth, **kw: MistralConfig(num_hidden_layers=depth, **{**COMMON, "sliding_window": 5, **kw}),
    "qwen2": lambda depth, **kw: Qwen2Config(num_hidden_layers=depth, **{**COMMON, "tie_word_embeddings": True, **kw}),
    "qwen3": lambda depth, **kw: Qwen3Config(num_hidden_layers=depth, **{**COMMON, "head_dim": 8, **kw}),
}
NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (root conftest.py)


def tiny(family, depth=2, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](depth, **overrides)).eval()


def prompts(lengths=(7, 4, 9), seed=0):
    return left_padded_prompts(lengths, VOCAB, PAD, seed)


def greedy(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
                              **kwargs)


def round_trip(model, tmp_path, **load_kwargs):
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if load_kwargs.pop("sharded", False) else {}))
    return AutoModelForCausalLM.from_pretrained(tmp_path, **load_kwargs)


def assert_same_logits(a, b, ids, mask, **kwargs):
    with torch.no_grad():
        assert torch.equal(a(ids, attention_mask=mask, **kwargs).logits, b(ids, attention_mask=mask, **kwargs).logits)


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def check_generation_modes(model, ids, mask, **kwargs):
    """Beam search, top-p sampling and a streamer run with the model's KV cache."""
    with torch.no_grad():
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                               pad_token_id=PAD, **kwargs)
        assert beams.shape == (ids.shape[0], ids.shape[1] + 4)
        torch.manual_seed(0)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_p=0.9,
                                 temperature=0.8, pad_token_id=PAD, **kwargs)
        assert sampled.shape[0] == ids.shape[0] and int(sampled.max()) < VOCAB
        streamer = Collector()
        one, one_mask = ids[:1], mask[:1]
        streamed = model.generate(one, attention_mask=one_mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                                  streamer=streamer, **{k: (v[:1] if isinstance(v, list) else v) for k, v in kwargs.items()})
    assert streamer.chunks[-1] is None
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]]), streamed[0, one.shape[1]:])


# ----------------------------------------------------------------------------------------------------------------
# PESC


def crafted(family):
    model = mkh.craft_sparsity(tiny(family), num_experts=4, top_k=2, adapter_dim=8, backend="reference")
    with torch.no_grad():  # as after training: non-zero adapters, a router that prefers some experts
        for layer in model.crafted_layers:
            layer.adapter_up.normal_(std=0.5)
            layer.router.weight.normal_(std=1.0)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pesc_round_trip_and_generate(tmp_path, family):
    model = crafted(family)
    ids, mask = prompts()
    loaded = round_trip(model, tmp_path)
    assert isinstance(loaded, PescForCausalLM) and loaded.config.model_type == "moe_kernels_pesc"
    loaded.set_backend("reference")
    assert_same_logits(model, loaded, ids, mask)
    expected = greedy(model.language_model, ids, mask)  # the crafted transformers model's own generate
    assert torch.equal(greedy(model, ids, mask), expected)
    assert torch.equal(greedy(loaded, ids, mask), expected)
    check_generation_modes(loaded, ids, mask)


def test_pesc_sharded_and_device_map_and_legacy_checkpoint(tmp_path):
    model = crafted("qwen2")
    ids, mask = prompts()
    sharded = round_trip(model, tmp_path / "sharded", sharded=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded.set_backend("reference")
    assert_same_logits(model, sharded, ids, mask)
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", device_map="cpu")
    placed.set_backend("reference")
    assert_same_logits(model, placed, ids, mask)
    # the earlier checkpoint format (a dense config carrying the settings) still loads through load_crafted
    legacy = tmp_path / "legacy"
    model.language_model.config.moe_kernels_pesc = {**model.config.settings, "add_aux_loss": True}
    model.language_model.save_pretrained(legacy)
    del model.language_model.config.moe_kernels_pesc
    restored = mkh.load_crafted(str(legacy), backend="reference")
    assert isinstance(restored, PescForCausalLM)
    assert_same_logits(model, restored, ids, mask)


# ----------------------------------------------------------------------------------------------------------------
# Self-MoE


def self_moe_model(family, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny(family)
    dirs = []
    for i, rank in enumerate([2, 4]):
        torch.manual_seed(10 + i)
        adapted = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.3)
        adapted.save_pretrained(tmp_path / f"adapter{i}")
        dirs.append(str(tmp_path / f"adapter{i}"))
    model = mkh.compose_lora_experts(base, dirs, names=["math", "code"], backend="reference")
    with torch.no_grad():
        model.self_moe_router.linear.weight.normal_(std=1.0)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_self_moe_round_trip_and_generate(tmp_path, family):
    model = self_moe_model(family, tmp_path)
    ids, mask = prompts()
    loaded = round_trip(model, tmp_path / "saved")
    assert isinstance(loaded, SelfMoEForCausalLM) and loaded.expert_names == ["math", "code"]
    loaded.set_backend("reference")
    assert_same_logits(model, loaded, ids, mask)
    expected = greedy(model.language_model, ids, mask)
    assert torch.equal(greedy(model, ids, mask), expected)
    assert torch.equal(greedy(loaded, ids, mask), expected)
    check_generation_modes(loaded, ids, mask)
    loaded.force_expert("code")
    model.force_expert(1)
    assert_same_logits(model, loaded, ids, mask)


# ----------------------------------------------------------------------------------------------------------------
# CCoE


def expert_of(base, family, depth, seed, shared_layers):
    """An expert as CCoE trains one: the base's embeddings and lower layers, its own upper layers and head."""
    expert = tiny(family, depth, seed)
    state = base.state_dict()
    expert.load_state_dict({k: v for k, v in state.items() if k.startswith("model.embed_tokens")
                            or any(k.startswith(f"model.layers.{i}.") for i in range(shared_layers))}, strict=False)
    return expert


def coupled_two_depths(family):
    """Experts branching off at depth 1 ("code") and depth 2 ("math", "law"): two CoE layers."""
    base = tiny(family, 3)
    experts = {"code": expert_of(base, family, 3, 1, 1), "math": expert_of(base, family, 4, 2, 2),
               "law": expert_of(base, family, 2, 3, 2)}
    model = mkh.couple_experts(base, experts, coe_layers={"code": 1, "math": 2, "law": 2})
    return base, experts, model


ROUTE = ["math", "code", "law"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ccoe_two_depths_round_trip_and_generate(tmp_path, family):
    base, experts, model = coupled_two_depths(family)
    assert model.config.depths == [1, 2]
    ids, mask = prompts()
    out = model(ids, attention_mask=mask, expert=ROUTE)
    for row, name in enumerate(ROUTE):  # each sequence gets exactly its expert's full model
        with torch.no_grad():
            expected = experts[name](ids[row:row + 1], attention_mask=mask[row:row + 1]).logits[0]
        valid = mask[row].bool()
        torch.testing.assert_close(out.logits[row][valid], expected[valid], rtol=1e-5, atol=1e-5)
    generated = greedy(model, ids, mask, expert=ROUTE)
    assert model.last_routing == ROUTE
    for row, name in enumerate(ROUTE):
        assert torch.equal(generated[row], greedy(experts[name], ids, mask)[row]), name
    loaded = round_trip(model, tmp_path)
    assert isinstance(loaded, CcoeForCausalLM) and loaded.expert_names == model.expert_names
    assert_same_logits(model, loaded, ids, mask, expert=ROUTE)
    assert torch.equal(greedy(loaded, ids, mask, expert=ROUTE), generated)
    check_generation_modes(loaded, ids, mask, expert=ROUTE)
    beams = loaded.generate(ids, attention_mask=mask, expert=ROUTE, max_new_tokens=4, num_beams=3, do_sample=False,
                            pad_token_id=PAD)
    for row, name in enumerate(ROUTE):  # beam search with per-branch caches = the expert's own beam search
        own = experts[name].generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                                     pad_token_id=PAD)
        assert torch.equal(beams[row], own[row]), name


def test_ccoe_every_request_to_the_shallowest_expert():
    """All sequences routed to the expert at the shallower CoE layer: the deeper backbone stage is not run (it was,
    on no rows, and crashed reshaping an empty batch); the logits and greedy tokens are that expert's own."""
    _, experts, model = coupled_two_depths("llama")
    ids, mask = prompts()
    for route in ("code", ["code"] * ids.shape[0]):
        out = model(ids, attention_mask=mask, expert=route)
        with torch.no_grad():
            expected = experts["code"](ids, attention_mask=mask).logits
        valid = mask.bool()
        torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(model, ids, mask, expert=route), greedy(experts["code"], ids, mask))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ccoe_generate_equals_the_earlier_decoder(family):
    base = tiny(family, 3)
    experts = {"code": expert_of(base, family, 3, 1, 2), "math": expert_of(base, family, 4, 2, 2)}
    model = mkh.couple_experts(base, experts, split_layer=2)
    earlier = CoupledExperts(base, 2)
    for name, expert in experts.items():
        earlier.push_expert(name, expert)
    ids, mask = prompts(seed=4)
    route = ["math", "code", "math"]
    with torch.no_grad():
        expected = earlier.generate(ids, attention_mask=mask, expert=route, max_new_tokens=NEW_TOKENS,
                                    pad_token_id=PAD)
    assert torch.equal(greedy(model, ids, mask, expert=route), expected)


def test_ccoe_router_saved_with_the_model_and_multi_expert_per_step(tmp_path):
    _, experts, model = coupled_two_depths("llama")
    ids, mask = prompts(lengths=(6, 6, 6, 6, 6, 6), seed=5)
    names = model.expert_names
    router = ClassifierRouter(COMMON["hidden_size"], names)
    router.fit(model, ids, [names[i % 3] for i in range(6)], attention_mask=mask, steps=20)
    model.router = router
    routed = model(ids, attention_mask=mask).expert_names
    loaded = round_trip(model, tmp_path)
    assert isinstance(loaded.router, ClassifierRouter)
    assert loaded(ids, attention_mask=mask).expert_names == routed
    # multi-expert: both experts run; each position takes the logits of the expert the router scores highest
    # on the running mean backbone state; cached decoding equals a full recompute
    active = [["code", "math"], ["law", "math"], ["code", "law"], ["math"], ["code", "math", "law"], ["law"]]
    out = loaded(ids, attention_mask=mask, expert=active)
    assert out.expert_names == [sorted(a, key=names.index) for a in active]
    choice = out.step_expert_ids
    for row, allowed in enumerate(active):
        assert {names[i] for i in choice[row].tolist()} <= set(allowed)
        for position in (0, ids.shape[1] - 1):
            name = names[int(choice[row, position])]
            with torch.no_grad():
                own = experts[name](ids[row:row + 1], attention_mask=mask[row:row + 1]).logits[0, position]
            torch.testing.assert_close(out.logits[row, position], own, rtol=1e-5, atol=1e-5)
    generated = greedy(loaded, ids, mask, expert=active)
    full_mask = torch.cat([mask, torch.ones(len(active), generated.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        recomputed = loaded(generated, attention_mask=full_mask, position_ids=positions, expert=active).logits
    assert torch.equal(recomputed[:, ids.shape[1] - 1:-1].argmax(-1), generated[:, ids.shape[1]:])
    beams = loaded.generate(ids, attention_mask=mask, expert=active, max_new_tokens=3, num_beams=2, do_sample=False,
                            pad_token_id=PAD)
    assert beams.shape == (len(active), ids.shape[1] + 3)
    loaded.config.multi_expert = 2  # the router's top 2 per request
    assert all(len(a) == 2 for a in loaded(ids, attention_mask=mask).expert_names)


# ----------------------------------------------------------------------------------------------------------------
# UltraFuser


def specialists(families):
    return {name: tiny(family, 2 + i % 2, seed=i + 1) for i, (name, family) in
            enumerate(zip(["text", "code", "math"], families))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ultrafuser_round_trip_and_generate(tmp_path, family):
    models = specialists([family, family, "llama"])
    fused = mkh.fuse_specialists(models, gate_hidden=16)
    ids, mask = prompts()
    loaded = round_trip(fused, tmp_path)
    assert isinstance(loaded, UltraFuserForCausalLM) and loaded.names == ["text", "code", "math"]
    assert_same_logits(fused, loaded, ids, mask)
    earlier = TokenFuser(list(models.values()), gate_hidden=16, names=list(models))
    earlier.gate.load_state_dict(fused.gate.state_dict())
    with torch.no_grad():
        expected = earlier.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert torch.equal(greedy(fused, ids, mask), expected)
    assert torch.equal(greedy(loaded, ids, mask), expected)
    check_generation_modes(loaded, ids, mask)
    # a forced one-hot gate is that specialist, generate included
    assert torch.equal(greedy(loaded, ids, mask, force_specialist="code"), greedy(models["code"], ids, mask))


# ----------------------------------------------------------------------------------------------------------------
# loud failure without the package


def test_loading_without_moe_kernels_fails_loudly(tmp_path):
    crafted("llama").save_pretrained(tmp_path)
    script = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
              "assert 'moe_kernels' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                            timeout=120)
    assert result.returncode != 0
    assert "moe_kernels_pesc" in result.stderr


def test_sharded_checkpoints_and_device_map_for_every_system(tmp_path):
    ids, mask = prompts()
    _, _, ccoe = coupled_two_depths("qwen3")
    fused = mkh.fuse_specialists(specialists(["mistral", "qwen2", "llama"]), gate_hidden=16)
    for name, model, kwargs in (("ccoe", ccoe, {"expert": ROUTE}), ("fused", fused, {})):
        loaded = round_trip(model, tmp_path / name, sharded=True)
        assert (tmp_path / name / "model.safetensors.index.json").exists()
        assert_same_logits(model, loaded, ids, mask, **kwargs)
        placed = AutoModelForCausalLM.from_pretrained(tmp_path / name, device_map="cpu")
        assert_same_logits(model, placed, ids, mask, **kwargs)


def drop_tensor(path, key):
    """Rewrite the (unsharded) checkpoint in ``path`` without tensor ``key``."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    del state[key]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file

    model = crafted("llama")
    model.save_pretrained(tmp_path)
    drop_tensor(tmp_path, next(k for k in load_file(tmp_path / "model.safetensors") if k.endswith("adapter_up")))
    with pytest.raises(ValueError, match="missing_keys.*adapter_up"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, strict=False)  # transformers' behaviour, on request
    assert isinstance(loaded, PescForCausalLM)


@pytest.mark.parametrize("key", ["embed_tokens.weight", "coe_layers.1.branches.code.norm.weight"])
def test_a_checkpoint_missing_a_shared_tensor_is_refused(tmp_path, key):
    """CCoE keeps a shared part once: the heads tied to the embeddings (Qwen2) and the norm the experts share are one
    module. A checkpoint lacking that tensor is refused too; transformers dropped it from the missing keys (it flags
    a tie target as loaded, and the target is the same tensor), so the model came back with it unloaded, on meta."""
    _, _, model = coupled_two_depths("qwen2")
    assert {"code.lm_head": "embed_tokens", "math.norm": "code.norm"}.items() <= model.config.shared_parts.items()
    model.save_pretrained(tmp_path)
    drop_tensor(tmp_path, key)
    with pytest.raises(ValueError, match=f"missing_keys.*{key}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert key in info["missing_keys"]
    assert not any(p.is_meta for p in loaded.parameters())  # transformers' random init, as for any missing tensor


def test_bfloat16_models_round_trip_in_bfloat16(tmp_path):
    """Models built in bf16 come back in bf16, bit-identical. (A float32 model cast with .to(bfloat16) does
    not, for any transformers model: the cast also rounds the rotary inv_freq buffer, which loading
    recomputes in float32.)"""
    def bf16(family, depth=2, seed=0):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(FAMILIES[family](depth), dtype=torch.bfloat16).eval()

    ids, mask = prompts()
    base = bf16("mistral", 3)
    experts = {}
    for name, depth, seed, shared in (("code", 3, 1, 1), ("math", 4, 2, 2)):
        expert = bf16("mistral", depth, seed)
        expert.load_state_dict({k: v for k, v in base.state_dict().items() if k.startswith("model.embed_tokens")
                                or any(k.startswith(f"model.layers.{i}.") for i in range(shared))}, strict=False)
        experts[name] = expert
    ccoe = mkh.couple_experts(base, experts, coe_layers={"code": 1, "math": 2})
    fused = mkh.fuse_specialists({"a": bf16("qwen2", seed=1), "b": bf16("llama", seed=2)}, gate_hidden=16)
    for name, model, kwargs in (("ccoe", ccoe, {"expert": ["code", "math", "code"]}), ("fused", fused, {})):
        loaded = round_trip(model, tmp_path / name)
        assert next(loaded.parameters()).dtype == torch.bfloat16
        assert_same_logits(model, loaded, ids, mask, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# resize_token_embeddings: every embedding and every head of the composed model resized together


def vocab_parts(model):
    """[(input embedding, [the output heads that go with it])] through each model's public attributes."""
    if isinstance(model, CcoeForCausalLM):
        return [(model.embed_tokens, [model.branch(name).lm_head for name in model.expert_names])]
    if isinstance(model, UltraFuserForCausalLM):
        return [(m.get_input_embeddings(), [m.get_output_embeddings()]) for m in model.specialists]
    return [(model.get_input_embeddings(), [model.get_output_embeddings()])]


def resizable(system, family, tmp_path):
    if system == "pesc":
        return crafted(family), {}
    if system == "self_moe":
        model = self_moe_model(family, tmp_path)
        model.set_backend("reference")
        return model, {}
    if system == "ccoe":
        base = tiny(family, 3)
        experts = {"code": expert_of(base, family, 3, 1, 1), "math": expert_of(base, family, 4, 2, 2),
                   "law": expert_of(base, family, 2, 3, 2)}
        experts["law"].lm_head.load_state_dict(experts["math"].lm_head.state_dict())  # kept once: one module
        return mkh.couple_experts(base, experts, coe_layers={"code": 1, "math": 2, "law": 2}), {"expert": ROUTE}
    return mkh.fuse_specialists(specialists([family, "llama", family]), gate_hidden=16), {}


RESIZES = {"grow_padded": (dict(new_num_tokens=VOCAB + 4, pad_to_multiple_of=8), 104),
           "grow_random_rows": (dict(new_num_tokens=VOCAB + 5, mean_resizing=False), VOCAB + 5),
           "shrink": (dict(new_num_tokens=VOCAB - 9), VOCAB - 9)}


@pytest.mark.parametrize("resize", sorted(RESIZES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied heads; heads tied to the embeddings
@pytest.mark.parametrize("system", ["pesc", "self_moe", "ccoe", "ultrafuser"])
def test_resize_token_embeddings(tmp_path, system, family, resize):
    """As for any transformers causal LM: input embeddings and output heads (CCoE: one per expert; UltraFuser: one
    pair per specialist) take the new size together, keep their old rows, start new rows as transformers does,
    keep their ties (a head tied to the embeddings, a head module shared by experts), the config records the size,
    and the resized model runs, generates, saves and loads back bit-identically. (CCoE used to resize the
    embeddings only, UltraFuser raised NotImplementedError.)"""
    model, kwargs = resizable(system, family, tmp_path)
    resize_kwargs, size = RESIZES[resize]
    kept = min(VOCAB, size)
    ids, mask = prompts()
    ids[ids >= kept] = 1  # tokens both vocabularies have
    before_parts = vocab_parts(model)
    old = [(e.weight.detach().clone(), [h.weight.detach().clone() for h in heads]) for e, heads in before_parts]
    tied = [[h.weight is e.weight for h in heads] for e, heads in before_parts]
    assert any(any(t) for t in tied) == (family == "qwen2")
    with torch.no_grad():
        old_logits = model(ids, attention_mask=mask, **kwargs).logits

    returned = model.resize_token_embeddings(**resize_kwargs)
    assert returned is model.get_input_embeddings() and returned.weight.shape[0] == size
    assert model.config.get_text_config().vocab_size == size
    parts = vocab_parts(model)
    for (embedding, heads), (old_embedding, old_heads), was_tied in zip(parts, old, tied):
        assert embedding.weight.shape == (size, old_embedding.shape[1]) and embedding.num_embeddings == size
        assert torch.equal(embedding.weight[:kept], old_embedding[:kept])
        for head, old_head, is_tied in zip(heads, old_heads, was_tied):
            assert head.weight.shape == (size, old_head.shape[1]) and head.out_features == size
            assert torch.equal(head.weight[:kept], old_head[:kept])
            assert (head.weight.data_ptr() == embedding.weight.data_ptr()) == is_tied
        for weight, old_weight in [(embedding.weight, old_embedding), *zip([h.weight for h in heads], old_heads)]:
            added = weight[VOCAB:].detach()
            if resize == "grow_padded":  # mean resizing: each matrix's new rows start at its own old rows' mean
                torch.testing.assert_close(added, old_weight.mean(0).expand_as(added), rtol=0, atol=1e-3)
            elif resize == "grow_random_rows":  # transformers' init of the owner model: N(0, initializer_range)
                assert 0.1 < float(added.std()) < 0.35, float(added.std())
    if system in ("pesc", "self_moe"):
        assert model.get_output_embeddings().weight.shape[0] == size
        assert model.language_model.config.vocab_size == size
    if system == "ccoe":
        assert model.config.shared_parts.get("law.lm_head") == ("embed_tokens" if family == "qwen2" else "math.lm_head")
        assert model.branch("law").lm_head is model.branch("math").lm_head or family == "qwen2"
        assert all(values["vocab_size"] == size for values in model.config.expert_configs.values())
    if system == "ultrafuser":
        assert model.config.vocab_size == size
        assert all(values["vocab_size"] == size for values in model.config.specialists)
        assert all(m.config.vocab_size == size for m in model.specialists)

    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **kwargs).logits
    assert logits.shape == (*ids.shape, size)
    valid = mask.bool()  # the old tokens' logits did not move
    torch.testing.assert_close(logits[..., :kept][valid], old_logits[..., :kept][valid], rtol=1e-5, atol=1e-5)
    new_ids = ids.clone()
    new_ids[:, -1] = size - 1  # a token only the resized vocabulary has (the last row, when shrunk)
    with torch.no_grad():  # the training loss sees the new vocabulary too (UltraFuser's fused loss reads the heads)
        assert torch.isfinite(model(new_ids, attention_mask=mask, labels=new_ids, **kwargs).loss)
    generated = greedy(model, new_ids, mask, **kwargs)
    assert generated.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS) and int(generated.max()) < size

    loaded = round_trip(model, tmp_path / "resized")
    if system in ("pesc", "self_moe"):
        loaded.set_backend("reference")
    assert loaded.config.get_text_config().vocab_size == size
    for (embedding, heads), (loaded_embedding, loaded_heads), was_tied in zip(parts, vocab_parts(loaded), tied):
        assert torch.equal(loaded_embedding.weight, embedding.weight)
        for head, loaded_head, is_tied in zip(heads, loaded_heads, was_tied):
            assert torch.equal(loaded_head.weight, head.weight)
            assert (loaded_head.weight.data_ptr() == loaded_embedding.weight.data_ptr()) == is_tied
    if system == "ccoe" and family == "llama":
        assert loaded.branch("law").lm_head is loaded.branch("math").lm_head
    assert_same_logits(model, loaded, new_ids, mask, **kwargs)
    assert torch.equal(greedy(loaded, new_ids, mask, **kwargs), generated)
