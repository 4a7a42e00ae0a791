"""Self-MoE (MiXSE) on tiny Llama / Mistral / Qwen2 / Qwen3 models: N PEFT LoRA adapters composed into routed LoRA experts,
checked against PEFT itself (merged adapters), router-only training, generation, errors, backends."""

import copy
import os

import torch

if not torch.cuda.is_available():  # the triton backend runs in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels.hf import compose_lora_experts  # noqa: E402
from moe_kernels.hf.self_moe import self_moe_routers  # noqa: E402
from moe_kernels.layers import LoRAMoE  # noqa: E402

VOCAB = 80
COMMON = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2)
CONFIGS = {"llama": lambda: LlamaConfig(**COMMON), "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
           "qwen2": lambda: Qwen2Config(**COMMON), "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (rank, alpha, rsLoRA): different ranks and scalings per adapter
ADAPTER_SPECS = [(4, 8, False), (2, 3, False), (8, 16, True)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (root conftest.py)


def base_model(family="llama"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def make_adapters(base, tmp_path, specs=ADAPTER_SPECS, targets=TARGETS):
    """PEFT LoRA adapters with random (non-zero) B, saved as adapter directories."""
    dirs = []
    for i, (rank, alpha, rslora) in enumerate(specs):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora,
                                                                    target_modules=targets))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.2)
        path = tmp_path / f"adapter{i}"
        peft_model.save_pretrained(path)
        dirs.append(str(path))
    return dirs


def toy_batch(batch=2, length=8):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def merged_by_peft(base, adapter_dir):
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_forced_routing_equals_peft_merged_adapter(tmp_path, family):
    base = base_model(family)
    dirs = make_adapters(base, tmp_path)
    # mix the two accepted forms: a directory and a loaded PeftModel
    as_peft_model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[1])
    model = compose_lora_experts(copy.deepcopy(base), [dirs[0], as_peft_model, dirs[2]], backend="reference")
    assert sum(isinstance(m, LoRAMoE) for m in model.modules()) == len(TARGETS) * COMMON["num_hidden_layers"]
    tokens = toy_batch()
    with torch.no_grad():
        base_logits = base(tokens).logits
        for i, adapter_dir in enumerate(dirs):
            model.self_moe_router.forced_expert = i
            got = model(tokens).logits
            expected = merged_by_peft(base, adapter_dir)(tokens).logits
            assert rel_err(expected, base_logits) > 1e-2  # the adapter changes the model
            assert rel_err(got, expected) < 1e-5, (i, rel_err(got, expected))


def test_uniform_router_top_n_equals_average_of_merged_adapters(tmp_path):
    """Unforced routing: a zero router gives softmax weights 1/N; with top_k = N every expert is used."""
    base = base_model()
    dirs = make_adapters(base, tmp_path)
    model = compose_lora_experts(copy.deepcopy(base), dirs, top_k=3, backend="reference")
    with torch.no_grad():
        model.self_moe_router.linear.weight.zero_()
        averaged = copy.deepcopy(base)
        merged_states = [merged_by_peft(base, d).state_dict() for d in dirs]
        state = averaged.state_dict()
        for name in state:
            state[name] = state[name] + sum((m[name] - state[name]) / 3 for m in merged_states)
        averaged.load_state_dict(state)
        tokens = toy_batch()
        assert rel_err(model(tokens).logits, averaged(tokens).logits) < 1e-5


def test_only_the_router_trains(tmp_path):
    base = base_model()
    adapters = make_adapters(base, tmp_path, targets=["q_proj", "v_proj", "down_proj"])
    model = compose_lora_experts(copy.deepcopy(base), adapters, backend="reference")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["self_moe_router.linear.weight"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    router_before = model.self_moe_router.linear.weight.detach().clone()
    optimizer = torch.optim.Adam([model.self_moe_router.linear.weight], lr=5e-2)
    tokens = toy_batch()
    model.train()
    losses = []
    for _ in range(10):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not torch.equal(model.self_moe_router.linear.weight, router_before)
    for name, value in frozen.items():
        assert torch.equal(model.get_parameter(name), value), name


def test_per_layer_routers_and_generation(tmp_path):
    base = base_model()
    dirs = make_adapters(base, tmp_path, specs=[(2, 4, False), (4, 4, False)], targets=["q_proj", "down_proj"])
    model = compose_lora_experts(copy.deepcopy(base), dirs, router="per_layer", backend="reference")
    assert len(self_moe_routers(model)) == COMMON["num_hidden_layers"]
    tokens = toy_batch(1, 5)
    out = model.generate(tokens, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    for router in self_moe_routers(model):
        router.forced_expert = 1
    with torch.no_grad():
        expected = merged_by_peft(base, dirs[1])(tokens).logits
        assert rel_err(model(tokens).logits, expected) < 1e-5


def test_compose_rejects_bad_input(tmp_path):
    base = base_model()
    q_only = make_adapters(base, tmp_path / "q", specs=[(2, 4, False)], targets=["q_proj"])
    v_only = make_adapters(base, tmp_path / "v", specs=[(2, 4, False)], targets=["v_proj"])
    with pytest.raises(ValueError, match="targets other modules"):
        compose_lora_experts(copy.deepcopy(base), q_only + v_only)
    with pytest.raises(ValueError, match="top_k"):
        compose_lora_experts(copy.deepcopy(base), q_only + q_only, top_k=3)
    with pytest.raises(ValueError, match="router"):
        compose_lora_experts(copy.deepcopy(base), q_only, router="global")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        compose_lora_experts(copy.deepcopy(base), [str(tmp_path)])
    with pytest.raises(TypeError, match="plain transformers model"):
        compose_lora_experts(PeftModel.from_pretrained(copy.deepcopy(base), q_only[0]), q_only)
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        compose_lora_experts(copy.deepcopy(base), [dora])
    # a config whose LoRA paths name a module that is not a Linear: the clear error, not an AttributeError
    from moe_kernels.models.self_moe import SelfMoEConfig, SelfMoEForCausalLM

    config = SelfMoEConfig(text_config=base.config, expert_names=["a"], lora_ranks={"model.layers.0.input_layernorm": [4]})
    with pytest.raises(ValueError, match="only nn.Linear is supported"):
        SelfMoEForCausalLM(config)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in moe_kernels.available_backends()]
                         or [pytest.param("none", marks=pytest.mark.skip(reason="cpu/triton not built here"))])
def test_composed_model_backend_matches_reference(tmp_path, backend):
    base = base_model()
    dirs = make_adapters(base, tmp_path)
    model = compose_lora_experts(copy.deepcopy(base), dirs, top_k=2, backend="reference")
    tokens = toy_batch(1, 6)
    with torch.no_grad():
        expected = model(tokens).logits
        for module in model.modules():
            if isinstance(module, LoRAMoE) or module in self_moe_routers(model):
                module.backend = backend
        try:
            got = model(tokens).logits
        except moe_kernels.BackendError as exc:
            pytest.skip(f"backend lacks an op the layer uses: {exc}")
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in moe_kernels.available_backends()]
                         or [pytest.param("none", marks=pytest.mark.skip(reason="cpu/triton not built here"))])
def test_composed_model_compiles_fullgraph(tmp_path, backend):
    """A composed Self-MoE model traces whole under torch.compile(fullgraph=True) and matches its eager self: one
    token (triton's adapter decode path) and 2 x 8 tokens (the planned path), and the router's gradient."""
    model = compose_lora_experts(base_model(), make_adapters(base_model(), tmp_path), top_k=2, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for tokens in (toy_batch(1, 1), toy_batch(2, 8)):
            assert rel_err(compiled(tokens).logits, model(tokens).logits) < 1e-5, f"{tokens.numel()} tokens"
    tokens = toy_batch(2, 6)
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        run(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert rel_err(grads[1][name], grad) < 1e-4, name
