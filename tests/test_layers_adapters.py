"""AdapterMoE (PESC) and LoRAMoE (Self-MoE) layers against plain per-token PyTorch loops written here,
and every built backend against the reference backend (forward and gradients), on device_for(backend)."""

import os

import torch

if not torch.cuda.is_available():  # the triton backend runs in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels.layers import AdapterMoE, LoRAMoE  # noqa: E402
from moe_kernels.layers.lora_moe import RoutingSlot, SelfMoERouter  # noqa: E402

from moe_testing import REL_TOL, backends_under_test, device_for, rel_err  # noqa: E402

OTHER_BACKENDS = [b for b in backends_under_test() if b != "reference"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (root conftest.py)


class GatedFFN(nn.Module):
    """A Llama-style MLP: down(silu(gate x) * up x)."""

    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_adapter_moe(hidden, num_experts, top_k, adapter_dim, *, pattern="random", dtype=torch.float32,
                     backend="reference", scale=1.0, activation="gelu"):
    """An AdapterMoE with random (non-zero) Up, in eval mode. pattern sets the router so that, for inputs
    x >= 0: "one_expert" -- expert 0 is every token's first choice; "skip_last" -- expert E-1 is never chosen."""
    layer = AdapterMoE(GatedFFN(hidden, 2 * hidden + 1), hidden, num_experts, top_k, adapter_dim, scale=scale,
                       activation=activation, backend=backend)
    with torch.no_grad():
        layer.adapter_down.normal_(std=1.0)  # F is small (~0.05): big adapters make their share visible
        layer.adapter_up.normal_(std=1.0)
        if pattern == "one_expert":
            layer.router.weight.uniform_(0.0, 0.1)
            layer.router.weight[0] = 5.0
        elif pattern == "skip_last":
            layer.router.weight.uniform_(0.1, 1.0)
            layer.router.weight[-1] = -1.0
    return layer.to(dtype).eval()


def pesc_loop(layer: AdapterMoE, x: torch.Tensor) -> torch.Tensor:
    """The PESC forward as a per-token, per-choice loop in float64 (no moe_kernels op involved)."""
    x = x.double()
    ffn = layer.ffn
    gate, up, down = (m.weight.double() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
    shared = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    logits = x @ layer.router.weight.double().t()
    top = torch.sort(logits, dim=-1, descending=True, stable=True)
    chosen_logits, chosen = top.values[:, :layer.top_k], top.indices[:, :layer.top_k]
    weights = torch.softmax(chosen_logits, dim=-1)
    out = shared.clone()
    act = {"gelu": F.gelu, "identity": lambda v: v, "relu": F.relu}[layer.activation]
    for t in range(x.shape[0]):
        for j in range(layer.top_k):
            e = chosen[t, j]
            z = act(layer.adapter_down[e].double() @ shared[t])
            out[t] += weights[t, j] * layer.scale * (layer.adapter_up[e].double() @ z)
    return out


def routed_count(layer: AdapterMoE, x: torch.Tensor) -> torch.Tensor:
    logits = layer.router(x.reshape(-1, layer.hidden_size)).float()
    ids = logits.topk(layer.top_k, dim=-1).indices
    return torch.bincount(ids.reshape(-1), minlength=layer.num_experts)


# (hidden, num_experts, top_k, adapter_dim, tokens, pattern): k=1, k=E, r=1, odd H, prime E, T=1,
# all tokens on one expert, an expert with no tokens.
ADAPTER_CASES = [
    (16, 4, 1, 8, 7, "random"),
    (16, 4, 4, 8, 5, "random"),
    (17, 8, 2, 1, 9, "random"),
    (12, 5, 2, 16, 1, "random"),
    (16, 8, 2, 4, 6, "one_expert"),
    (16, 4, 2, 4, 8, "skip_last"),
    (8, 16, 4, 3, 11, "random"),
]


@pytest.mark.parametrize("hidden,num_experts,top_k,adapter_dim,tokens,pattern", ADAPTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_moe_matches_pesc_loop(hidden, num_experts, top_k, adapter_dim, tokens, pattern, dtype):
    layer = make_adapter_moe(hidden, num_experts, top_k, adapter_dim, pattern=pattern, dtype=dtype, scale=0.7)
    x = torch.rand(tokens, hidden).to(dtype)
    counts = routed_count(layer, x)
    if pattern == "one_expert":
        assert counts[0] == tokens
    if pattern == "skip_last":
        assert counts[-1] == 0
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    expected = pesc_loop(layer, x)
    assert rel_err(y, expected) <= REL_TOL[dtype] * 4, f"relative error {rel_err(y, expected):.2e}"
    # the adapters contribute (the test would pass trivially if they were dropped)
    assert rel_err(layer.ffn(x), expected) > 0.2


def test_adapter_moe_batched_input_and_zero_up_is_exact():
    layer = AdapterMoE(GatedFFN(16, 24), 16, num_experts=4, top_k=2, adapter_dim=8, backend="reference").eval()
    x = torch.randn(2, 3, 16)
    assert torch.equal(layer(x), layer.ffn(x))  # Up starts at zero: output is exactly the dense FFN
    with torch.no_grad():
        layer.adapter_up.normal_()
    y = layer(x)
    assert y.shape == (2, 3, 16)
    assert torch.allclose(y.reshape(6, 16), layer(x.reshape(6, 16)), atol=1e-6)


def test_adapter_moe_dropout_only_in_training_and_only_on_adapter_input():
    layer = AdapterMoE(GatedFFN(16, 24), 16, 4, 2, 8, dropout=0.5, backend="reference")
    x = torch.randn(10, 16)
    assert torch.equal(layer.train()(x), layer.ffn(x))  # Up = 0: dropout never touches the shared path
    with torch.no_grad():
        layer.adapter_up.normal_()
    torch.manual_seed(1)
    train_a = layer.train()(x)
    torch.manual_seed(2)
    train_b = layer(x)
    assert not torch.allclose(train_a, train_b)
    assert torch.equal(layer.eval()(x), layer.eval()(x))


def test_adapter_moe_load_balancing_loss_has_router_gradient():
    layer = make_adapter_moe(16, 8, 2, 4)
    layer(torch.randn(12, 16))
    expected = moe_kernels.reference.load_balancing_loss(
        layer.router_logits, layer.router_logits.float().topk(2, dim=-1).indices, 8)
    assert torch.allclose(layer.aux_loss, expected)
    layer.aux_loss.backward()
    grad = layer.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_adapter_moe_gradients_reach_router_and_adapters():
    layer = make_adapter_moe(16, 4, 2, 8, scale=2.0)
    layer(torch.randn(9, 16)).square().sum().backward()
    for name in ("router.weight", "adapter_down", "adapter_up"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 5}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"adapter_dim": 0}, "adapter_dim"),
    ({"adapter_dim": 1025}, "adapter_dim"),
    ({"activation": "tanh"}, "activation"),
    ({"dropout": 1.0}, "dropout"),
    ({"scale": float("nan")}, "scale"),
    ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
])
def test_adapter_moe_rejects_bad_arguments(kwargs, match):
    args = {"num_experts": 4, "top_k": 2, "adapter_dim": 8} | kwargs
    with pytest.raises(ValueError, match=match):
        AdapterMoE(GatedFFN(8, 8), 8, **args)


def test_adapter_moe_rejects_wrong_hidden_size():
    layer = AdapterMoE(GatedFFN(8, 8), 8, 4, 2, 4, backend="reference")
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(3, 9))


# ---------------------------------------------------------------- LoRAMoE

def make_lora_moe(in_features, out_features, ranks, top_k=1, *, dtype=torch.float32, backend="reference",
                  trainable_experts=False):
    base = nn.Linear(in_features, out_features, bias=True)
    lora_a = [torch.randn(r, in_features) / in_features ** 0.5 for r in ranks]
    lora_b = [torch.randn(out_features, r) for r in ranks]
    scalings = [2.0 / r + 0.1 * i for i, r in enumerate(ranks)]
    layer = LoRAMoE(base, lora_a, lora_b, scalings, top_k=top_k, backend=backend, trainable_experts=trainable_experts)
    with torch.no_grad():  # a decisive router: tokens really go to different experts
        layer.router.linear.weight.normal_(std=1.0)
    return layer.to(dtype), lora_a, lora_b, scalings


def lora_moe_loop(layer: LoRAMoE, x, lora_a, lora_b, scalings):
    """Self-MoE per token in float64: base(x) + sum over the top-k of softmax_i * s_i * B_i A_i x."""
    x = x.double()
    out = x @ layer.base.weight.double().t() + layer.base.bias.double()
    probs = torch.softmax(x @ layer.router.linear.weight.double().t(), dim=-1)
    chosen = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :layer.router.top_k]
    for t in range(x.shape[0]):
        for i in chosen[t].tolist():
            out[t] += probs[t, i] * scalings[i] * (lora_b[i].double() @ (lora_a[i].double() @ x[t]))
    return out


# (in, out, ranks, top_k, tokens): square / wider / narrower outputs, mixed ranks, rank 1, top_k = N, T = 1
LORA_CASES = [
    (16, 16, [4, 4, 4, 4], 1, 7),
    (16, 24, [2, 8, 1], 1, 5),
    (24, 10, [4, 1, 3, 6, 2], 2, 9),
    (12, 12, [1, 1], 2, 1),
    (9, 20, [3, 5, 7], 3, 6),
]


@pytest.mark.parametrize("in_features,out_features,ranks,top_k,tokens", LORA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_moe_matches_self_moe_loop(in_features, out_features, ranks, top_k, tokens, dtype):
    layer, lora_a, lora_b, scalings = make_lora_moe(in_features, out_features, ranks, top_k, dtype=dtype)
    if dtype != torch.float32:  # compare against the rounded parameters the layer really holds
        lora_a = [a.to(dtype) for a in lora_a]
        lora_b = [b.to(dtype) for b in lora_b]
    x = torch.randn(tokens, in_features).to(dtype)
    y = layer(x)
    assert y.shape == (tokens, out_features) and y.dtype == dtype
    expected = lora_moe_loop(layer, x, lora_a, lora_b, scalings)
    assert rel_err(y, expected) <= REL_TOL[dtype] * 4, f"relative error {rel_err(y, expected):.2e}"
    assert rel_err(layer.base(x), expected) > 0.2  # the experts contribute


def test_lora_moe_computes_only_routed_experts():
    layer, *_ = make_lora_moe(16, 16, [4, 4, 4], top_k=1)
    with torch.no_grad():
        layer.lora_up[1] = float("nan")  # would poison every token if all experts were computed (0 * NaN)
        layer.lora_up[2] = float("nan")
    layer.router.forced_expert = 0
    y = layer(torch.randn(5, 16))
    assert torch.isfinite(y).all()


def test_lora_moe_forced_expert_is_base_plus_that_lora():
    layer, lora_a, lora_b, scalings = make_lora_moe(16, 20, [4, 2, 6])
    x = torch.randn(6, 16)
    for i in range(3):
        layer.router.forced_expert = i
        expected = layer.base(x) + scalings[i] * (x @ lora_a[i].t() @ lora_b[i].t())
        assert torch.allclose(layer(x), expected, atol=1e-5), i


def test_lora_moe_rank_and_size_padding_gets_zero_gradient():
    layer, *_ = make_lora_moe(24, 10, [4, 1, 3], top_k=2, trainable_experts=True)
    layer(torch.randn(8, 24)).square().sum().backward()
    down_grad, up_grad = layer.lora_down.grad, layer.lora_up.grad
    assert down_grad[:, :, 24:].abs().sum() == 0 and up_grad[:, 10:, :].abs().sum() == 0  # padded dims
    for i, rank in enumerate([4, 1, 3]):
        assert down_grad[i, rank:].abs().sum() == 0 and up_grad[i, :, rank:].abs().sum() == 0  # padded ranks
    assert layer.router.linear.weight.grad.abs().sum() > 0
    assert up_grad.abs().sum() > 0


def test_lora_moe_with_shared_routing_slot():
    base = nn.Linear(8, 8)
    slot = RoutingSlot()
    layer = LoRAMoE(base, [torch.randn(2, 8)] * 2, [torch.randn(8, 2)] * 2, [1.0, 1.0], routing_slot=slot,
                    backend="reference")
    assert layer.router is None
    with pytest.raises(RuntimeError, match="no routing"):
        layer(torch.randn(3, 8))
    router = SelfMoERouter(8, 2, 1, backend="reference")
    slot.value = router(torch.randn(3, 8))
    assert layer(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(RuntimeError, match="routing covers 3 tokens"):
        layer(torch.randn(4, 8))


def test_lora_moe_rejects_bad_arguments():
    base = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="lora_A"):
        LoRAMoE(base, [torch.randn(2, 7)], [torch.randn(6, 2)], [1.0])
    with pytest.raises(ValueError, match="lora_B"):
        LoRAMoE(base, [torch.randn(2, 8)], [torch.randn(6, 3)], [1.0])
    with pytest.raises(ValueError, match="same positive length"):
        LoRAMoE(base, [torch.randn(2, 8)], [torch.randn(6, 2)], [1.0, 2.0])
    with pytest.raises(ValueError, match="top_k"):
        LoRAMoE(base, [torch.randn(2, 8)], [torch.randn(6, 2)], [1.0], top_k=2)
    with pytest.raises(TypeError, match="base"):
        LoRAMoE(nn.Conv1d(8, 6, 1), [torch.randn(2, 8)], [torch.randn(6, 2)], [1.0])


def test_layers_refuse_an_input_of_another_width():
    """reshape(-1, H) would regroup a [4, 64] input into 8 tokens of width 32 and return a wrong result of the right
    size: every layer checks the last dim first. SparseMoE also refuses an unknown activation when built."""
    from moe_kernels.layers import SparseMoE

    sparse = SparseMoE(32, 16, 4, 2, backend="reference")
    adapter = AdapterMoE(nn.Linear(32, 32), 32, num_experts=4, top_k=2, adapter_dim=4, backend="reference")
    router = SelfMoERouter(32, 4, 2, backend="reference")
    for layer in (sparse, adapter, router):
        for x in (torch.randn(4, 64), torch.randn(64)):
            with pytest.raises(ValueError, match="hidden_size = 32"):
                layer(x)
    assert sparse(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseMoE(32, 16, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseMoE(32, 16, 4, 2, activation="swiglu_oai_typo", gated=False)



@pytest.mark.parametrize("args,match", [
    ((0, 16, 4, 2), "hidden_size must be an int >= 1"),  # was ZeroDivisionError in reset_parameters
    ((32, 0, 4, 2), "intermediate_size must be an int >= 1"),
    ((32, 16, 4, 1.5), r"top_k must be an int in \[1, 4\]"),  # was accepted, refused only at the first forward
    ((32, 16, 4, True), r"top_k must be an int in \[1, 4\]"),
    ((32, 16, 4, 5), r"top_k must be an int in \[1, 4\]"),
])
def test_sparse_moe_checks_its_sizes_when_built(args, match):
    from moe_kernels.layers import SparseMoE

    with pytest.raises(ValueError, match=match):
        SparseMoE(*args)

# ---------------------------------------------------------------- backends against the reference

def _run_or_skip(fn):
    try:
        return fn()
    except moe_kernels.BackendError as exc:
        pytest.skip(f"backend lacks an op the layer uses: {exc}")


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", OTHER_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no backend besides reference is built here"))])
@pytest.mark.parametrize("hidden,num_experts,top_k,adapter_dim,tokens,pattern", ADAPTER_CASES[:6])
def test_adapter_moe_backend_matches_reference(backend, hidden, num_experts, top_k, adapter_dim, tokens, pattern):
    device = device_for(backend)  # the reference runs on the same device
    layer = make_adapter_moe(hidden, num_experts, top_k, adapter_dim, pattern=pattern).to(device)
    x = torch.rand(tokens, hidden).to(device).requires_grad_(True)
    layer.backend = "reference"
    expected = layer(x)
    expected.square().sum().backward()
    expected_grads, expected_x_grad = _grads(layer), x.grad.clone()
    layer.zero_grad()
    x.grad = None
    layer.backend = backend
    got = _run_or_skip(lambda: layer(x))
    got.square().sum().backward()
    assert rel_err(got, expected) <= REL_TOL[torch.float32] * 4
    assert rel_err(x.grad, expected_x_grad) <= REL_TOL[torch.float32] * 10
    for name, grad in _grads(layer).items():
        assert rel_err(grad, expected_grads[name]) <= REL_TOL[torch.float32] * 10, name


@pytest.mark.parametrize("backend", OTHER_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no backend besides reference is built here"))])
@pytest.mark.parametrize("in_features,out_features,ranks,top_k,tokens", LORA_CASES)
def test_lora_moe_backend_matches_reference(backend, in_features, out_features, ranks, top_k, tokens):
    device = device_for(backend)  # the reference runs on the same device
    layer = make_lora_moe(in_features, out_features, ranks, top_k)[0].to(device)
    x = torch.randn(tokens, in_features).to(device).requires_grad_(True)
    layer.backend = layer.router.backend = "reference"
    expected = layer(x)
    expected.square().sum().backward()
    expected_grads, expected_x_grad = _grads(layer), x.grad.clone()
    layer.zero_grad()
    x.grad = None
    layer.backend = layer.router.backend = backend
    got = _run_or_skip(lambda: layer(x))
    got.square().sum().backward()
    assert rel_err(got, expected) <= REL_TOL[torch.float32] * 4
    assert rel_err(x.grad, expected_x_grad) <= REL_TOL[torch.float32] * 10
    for name, grad in _grads(layer).items():
        assert rel_err(grad, expected_grads[name]) <= REL_TOL[torch.float32] * 10, name
