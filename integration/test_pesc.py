"""PESC sparsity crafting on tiny Llama / Mistral / Qwen2 / Qwen3 models (random weights, no downloads):
exact logits after crafting, training of router + adapters, load-balancing gradient, save/load, PEFT LoRA,
the `craft` CLI entry point, and built backends against the reference."""

import os

import torch

if not torch.cuda.is_available():  # the triton backend runs in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config,  # noqa: E402
                          Qwen3Config)

import moe_kernels  # noqa: E402
from moe_kernels.hf import craft_sparsity, load_crafted  # noqa: E402
from moe_kernels.hf.craft import craft_main, crafted_aux_loss, crafted_layers  # noqa: E402
from moe_kernels.layers import AdapterMoE  # noqa: E402
from moe_kernels.models import PescForCausalLM  # noqa: E402

VOCAB = 96
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              initializer_range=0.2)  # activations of realistic size (0.02 makes the MLP output tiny)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (root conftest.py)


def dense_model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=dtype).eval()


def toy_batch(batch=4, length=12):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def randomise_adapters(model):
    """Non-zero Up (as after training) so save/load and backend checks see the adapters."""
    with torch.no_grad():
        for layer in crafted_layers(model):
            layer.adapter_up.normal_(std=0.5)
            layer.router.weight.normal_(std=1.0)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_crafting_preserves_logits_exactly(family):
    model = dense_model(family)
    tokens = toy_batch()
    with torch.no_grad():
        dense_logits = model(tokens).logits
    crafted = craft_sparsity(model, num_experts=4, top_k=2, adapter_dim=8, backend="reference")
    assert isinstance(crafted, PescForCausalLM) and crafted.language_model is model  # crafted in place, wrapped
    layers = crafted_layers(crafted)
    assert len(layers) == model.config.num_hidden_layers
    assert all(isinstance(decoder.mlp, AdapterMoE) for decoder in model.model.layers)
    with torch.no_grad():
        assert torch.equal(crafted(tokens).logits, dense_logits)
        assert torch.equal(crafted.train()(tokens).logits, dense_logits)  # dropout acts on the adapters only


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_router_and_adapter_training_lowers_loss(family):
    model = craft_sparsity(dense_model(family), num_experts=4, top_k=2, adapter_dim=8, freeze_base=True,
                           backend="reference")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("mlp.router.weight", "adapter_down", "adapter_up")) for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokens = toy_batch(2, 8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        out = model(tokens, labels=tokens)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, value in frozen_before.items():
        assert torch.equal(model.get_parameter(name), value), name


def official_pesc_aux_loss(router_logits_per_layer, num_experts, top_k):
    """The load-balancing loss of the official PESC (Camelidae) code, written out by hand: the router logits
    of ALL layers concatenated, softmax, top-k, one-hot [T, k, E]; tokens_per_expert = mean over tokens
    [k, E]; router_prob_per_expert = mean probability [E]; E * sum(tokens_per_expert * router_prob)."""
    logits = torch.cat([g.float() for g in router_logits_per_layer], dim=0)
    routing_weights = torch.softmax(logits, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_experts).float()
    tokens_per_expert = expert_mask.mean(dim=0)
    router_prob_per_expert = routing_weights.mean(dim=0)
    return num_experts * torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_load_balancing_loss_is_one_loss_over_all_layers(family):
    """Equal to the official form (one loss over the concatenated routing of all layers), not the sum
    of per-layer losses (with L layers that sum is about L times larger)."""
    model = craft_sparsity(dense_model(family), num_experts=4, top_k=2, adapter_dim=8, aux_loss_coef=0.05,
                           backend="reference")
    randomise_adapters(model)
    tokens = toy_batch()
    out = model(tokens, labels=tokens)
    layers = crafted_layers(model)
    expected = official_pesc_aux_loss([layer.router_logits for layer in layers], 4, 2)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(crafted_aux_loss(model), 0.05 * expected, rtol=1e-6, atol=1e-7)
    per_layer_sum = sum(moe_kernels.load_balancing_loss(layer.router_logits, layer.router_ids, 4) for layer in layers)
    assert not torch.allclose(per_layer_sum, expected)  # the earlier (wrong) form differs
    cross_entropy = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, cross_entropy + 0.05 * expected, rtol=1e-6, atol=1e-6)


def test_model_loss_includes_load_balancing_loss_with_gradient():
    model = craft_sparsity(dense_model("llama"), num_experts=4, top_k=2, adapter_dim=8, aux_loss_coef=0.05,
                           backend="reference")
    tokens = toy_batch()
    out = model(tokens, labels=tokens)
    cross_entropy = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    aux = crafted_aux_loss(model)
    expected_aux = 0.05 * official_pesc_aux_loss([layer.router_logits for layer in crafted_layers(model)], 4, 2)
    assert torch.allclose(aux, expected_aux)
    assert aux.item() > 0
    assert torch.allclose(out.loss, cross_entropy + aux, atol=1e-6)
    aux.backward()
    for layer in crafted_layers(model):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    # without labels no loss is touched; add_aux_loss=False leaves the loss alone
    assert model(tokens).loss is None
    plain = craft_sparsity(dense_model("llama"), 4, 2, 8, add_aux_loss=False, backend="reference")
    out = plain(tokens, labels=tokens)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)))


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                          ("mistral", torch.bfloat16)])
def test_save_and_load_round_trip(tmp_path, family, dtype):
    model = craft_sparsity(dense_model(family, dtype), num_experts=4, top_k=2, adapter_dim=8, scale=0.5,
                           activation="relu", dropout=0.2, backend="reference")
    randomise_adapters(model)
    tokens = toy_batch()
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_crafted(str(tmp_path), backend="reference")
    assert isinstance(loaded, PescForCausalLM)
    assert not loaded.training
    layer = crafted_layers(loaded)[0]
    assert (layer.num_experts, layer.top_k, layer.adapter_dim, layer.scale, layer.activation) == (4, 2, 8, 0.5, "relu")
    assert layer.adapter_dropout.p == 0.2
    assert next(loaded.parameters()).dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)


def test_load_crafted_rejects_a_dense_checkpoint(tmp_path):
    dense_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a crafted checkpoint"):
        load_crafted(str(tmp_path))


def test_crafting_with_peft_lora_on_the_rest(tmp_path):
    LoraConfig = pytest.importorskip("peft").LoraConfig
    model = craft_sparsity(dense_model("llama"), num_experts=4, top_k=2, adapter_dim=8, backend="reference",
                           lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any(n.endswith("mlp.router.weight") for n in trainable)
    assert all("lora_" in n or n.endswith(("mlp.router.weight", "adapter_down", "adapter_up")) for n in trainable)
    assert not any("router.lora" in n for n in trainable)  # the routers stay out of PEFT
    assert any("ffn.gate_proj.lora_A" in n for n in trainable)  # the shared FFN gets LoRA
    tokens = toy_batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # PEFT's own save would keep the LoRA weights and silently drop the trained routers and adapters
    with pytest.raises(RuntimeError, match="routers and adapters"):
        model.save_pretrained(tmp_path / "lora_only")
    assert not (tmp_path / "lora_only").exists()
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        expected = merged(tokens).logits
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(load_crafted(str(tmp_path), backend="reference")(tokens).logits, expected)


def test_craft_cli_entry_point(tmp_path, capsys):
    src, dst = tmp_path / "dense", tmp_path / "crafted"
    dense = dense_model("qwen3")
    dense.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    tokens = toy_batch()
    with torch.no_grad():
        expected = dense(tokens).logits
    assert craft_main([str(src), str(dst), "--experts", "4", "--top-k", "1", "--adapter-dim", "4"]) == 0
    assert "crafted 2 layers" in capsys.readouterr().out
    assert (dst / "tokenizer_config.json").exists()
    loaded = load_crafted(str(dst), backend="reference")
    assert crafted_layers(loaded)[0].top_k == 1
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)
    with pytest.raises(SystemExit):
        craft_main([str(tmp_path / "missing"), str(dst)])


def test_craft_cli_checks_its_numbers_before_loading(tmp_path, capsys, monkeypatch):
    import transformers
    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    for bad, named in ((["--experts", "4", "--top-k", "5"], "--top-k"), (["--experts", "0"], "--experts"),
                       (["--adapter-dim", "0"], "--adapter-dim")):
        with pytest.raises(SystemExit):
            craft_main([str(tmp_path), str(tmp_path / "out"), *bad])
        assert named in capsys.readouterr().err
    assert loads == []  # refused before the checkpoint was read


def test_craft_rejects_unsupported_models_and_double_crafting():
    from transformers import GPT2Config
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="model_type"):
        craft_sparsity(gpt2)
    model = craft_sparsity(dense_model("llama"), 4, 2, 8)
    with pytest.raises(ValueError, match="already crafted"):
        craft_sparsity(model)
    with pytest.raises(ValueError, match="already crafted"):
        craft_sparsity(model.language_model)
    with pytest.raises(ValueError, match="top_k"):
        craft_sparsity(dense_model("llama"), num_experts=4, top_k=5)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in moe_kernels.available_backends()]
                         or [pytest.param("none", marks=pytest.mark.skip(reason="cpu/triton not built here"))])
def test_crafted_model_backend_matches_reference(backend):
    model = craft_sparsity(dense_model("llama"), num_experts=4, top_k=2, adapter_dim=8, backend="reference")
    randomise_adapters(model)
    tokens = toy_batch(2, 6)
    with torch.no_grad():
        expected = model(tokens).logits
        for layer in crafted_layers(model):
            layer.backend = backend
        try:
            got = model(tokens).logits
        except moe_kernels.BackendError as exc:
            pytest.skip(f"backend lacks an op the layer uses: {exc}")
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in moe_kernels.available_backends()]
                         or [pytest.param("none", marks=pytest.mark.skip(reason="cpu/triton not built here"))])
def test_crafted_model_compiles_fullgraph(backend):
    """A crafted model traces whole under torch.compile(fullgraph=True) and matches its eager self: no-gradient
    forwards of one token (triton's adapter decode path) and 24 tokens (the planned path), and a training step's
    loss and adapter gradients. Before, triton's no-gradient forward chose its path in traced Python (data
    pointers, the config table) and Dynamo refused it."""
    model = craft_sparsity(dense_model("llama"), num_experts=4, top_k=2, adapter_dim=8, backend=backend,
                           dropout=0.0)  # training is compared step for step: no random masks
    randomise_adapters(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for tokens in (toy_batch(1, 1), toy_batch(2, 12)):
            expected = model(tokens).logits
            got = compiled(tokens).logits
            assert ((got - expected).norm() / expected.norm()).item() < 1e-5, f"{tokens.numel()} tokens"
    model.train()
    tokens = toy_batch(2, 6)
    losses, grads = [], []
    for run in (model, compiled):
        model.zero_grad()
        loss = run(tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    assert grads[0].keys() == grads[1].keys() and any("adapter" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert ((grads[1][name] - grad).norm() / grad.norm().clamp_min(1e-12)).item() < 1e-4, name


def test_quantized_frozen_base_where_bitsandbytes_is_installed(tmp_path):
    """QLoRA-style crafting (the paper trains PESC on a quantized frozen base): needs bitsandbytes and,
    for its kernels, a CUDA GPU; skipped with the reason otherwise."""
    import importlib.util

    from moe_kernels.hf import load_quantized_base
    dense_model("llama").save_pretrained(tmp_path)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            load_quantized_base(str(tmp_path))
        pytest.skip("bitsandbytes is not installed: the quantized-base option raises a clear ImportError here")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes is installed but its 4-bit kernels need a CUDA GPU")
    base = load_quantized_base(str(tmp_path), bits=4, device_map={"": 0})
    LoraConfig = pytest.importorskip("peft").LoraConfig
    model = craft_sparsity(base, num_experts=4, top_k=2, adapter_dim=8, lora=LoraConfig(r=4, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("mlp.router.weight") for n in trainable) and any("lora_A" in n for n in trainable)
    tokens = toy_batch().cuda()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
