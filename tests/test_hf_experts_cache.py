"""moe_kernels.hf.experts: the experts description cached on the module for the forward. It is recomputed whenever
anything describe_experts reads changes (class, activation, flags), never holds weights, and the forward's result
equals the uncached one."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_kernels.hf import experts as hf_experts  # noqa: E402
from moe_kernels.hf.experts import (BACKEND_ATTRIBUTE, UnsupportedExpertsError, describe_experts,  # noqa: E402
                                    moe_kernels_experts_forward)

H, I, E, K, T = 16, 8, 4, 2, 3


def _qwen3():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                             num_experts_per_tok=K))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def _gpt_oss():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K))


def _routing():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return x, ids, torch.rand(T, K, generator=g)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of describe_experts made by the forward's cache."""
    calls = []

    def counting(module):
        calls.append(module)
        return describe_experts(module)

    monkeypatch.setattr(hf_experts, "describe_experts", counting)
    return calls


def test_described_once_while_nothing_changes(counted):
    experts = _qwen3()
    x, ids, weights = _routing()
    first = moe_kernels_experts_forward(experts, x, ids, weights)
    for _ in range(3):
        torch.testing.assert_close(moe_kernels_experts_forward(experts, x, ids, weights), first)
    assert len(counted) == 1
    assert hf_experts._cached_description(experts) == describe_experts(experts)


@pytest.mark.parametrize("change", [
    lambda m: setattr(m, "is_transposed", True),
    lambda m: setattr(m, "has_bias", True),
    lambda m: setattr(m, "has_gate", False),
    lambda m: setattr(m, "is_concatenated", False),
    lambda m: setattr(m, "has_post_expert_norm", True),
    lambda m: setattr(m, "act_fn", torch.nn.GELU()),
    lambda m: setattr(m, "act_fn", torch.nn.Tanh()),
    lambda m: setattr(m, "__class__", _custom_gate_subclass(type(m))),
])
def test_any_change_is_described_again(counted, change):
    experts = _qwen3()
    hf_experts._cached_description(experts)
    change(experts)
    try:
        want = describe_experts(experts)
    except UnsupportedExpertsError as exc:
        with pytest.raises(UnsupportedExpertsError) as raised:
            hf_experts._cached_description(experts)
        assert str(raised.value) == str(exc)
    else:
        assert hf_experts._cached_description(experts) == want
    assert len(counted) == 2


def _custom_gate_subclass(cls):
    return type("CustomGate" + cls.__name__, (cls,), {"_apply_gate": lambda self, gate_up: gate_up})


def test_activation_changed_in_place_is_described_again():
    experts = _qwen3()
    experts.act_fn = torch.nn.GELU()
    assert hf_experts._cached_description(experts)["activation"] == "gelu"
    experts.act_fn.approximate = "tanh"
    assert hf_experts._cached_description(experts)["activation"] == "gelu_tanh"


def test_gpt_oss_limit_and_alpha():
    experts = _gpt_oss()
    assert hf_experts._cached_description(experts)["swiglu_limit"] == 7.0
    experts.limit = 5.0
    assert hf_experts._cached_description(experts)["swiglu_limit"] == 5.0
    experts.alpha = 1.0
    with pytest.raises(UnsupportedExpertsError, match="alpha"):
        hf_experts._cached_description(experts)
    with pytest.raises(UnsupportedExpertsError, match="alpha"):  # errors are not cached away
        hf_experts._cached_description(experts)


def test_attributes_the_gate_does_not_read_keep_the_cache(counted):
    """A default gate reads no limit or alpha: setting them (under any family's name) describes nothing again."""
    experts = _qwen3()
    hf_experts._cached_description(experts)
    for name in ("limit", "alpha", "swiglu_limit", "swiglu_alpha"):
        setattr(experts, name, 3.0)
        assert hf_experts._cached_description(experts)["swiglu_limit"] is None
    assert len(counted) == 1


def test_flags_held_elsewhere_are_not_cached(counted):
    experts = _gpt_oss()
    del experts.limit
    experts.register_buffer("limit", torch.tensor(7.0))  # getattr finds it: a tensor, which could change in place
    with pytest.raises(UnsupportedExpertsError, match="limit"):  # and moe_mlp takes a number
        hf_experts._cached_description(experts)
    with pytest.raises(UnsupportedExpertsError, match="limit"):
        hf_experts._cached_description(experts)
    assert len(counted) == 2


def test_weights_are_read_on_every_call():
    experts = _qwen3()
    x, ids, weights = _routing()
    before = moe_kernels_experts_forward(experts, x, ids, weights)
    with torch.no_grad():
        experts.down_proj.mul_(2)  # in place
    torch.testing.assert_close(moe_kernels_experts_forward(experts, x, ids, weights), 2 * before)
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach() / 2)  # a new parameter (as PEFT swaps)
    torch.testing.assert_close(moe_kernels_experts_forward(experts, x, ids, weights), before)


def test_backend_from_the_instance_or_the_class(monkeypatch):
    experts = _qwen3()
    x, ids, weights = _routing()
    seen = []
    import moe_kernels

    real = moe_kernels.moe_mlp
    monkeypatch.setattr(moe_kernels, "moe_mlp", lambda *a, backend=None, **kw: seen.append(backend)
                        or real(*a, backend=backend, **kw))
    moe_kernels_experts_forward(experts, x, ids, weights)
    monkeypatch.setattr(type(experts), BACKEND_ATTRIBUTE, "reference", raising=False)
    moe_kernels_experts_forward(experts, x, ids, weights)
    setattr(experts, BACKEND_ATTRIBUTE, None)  # the instance's value, None included, comes first
    moe_kernels_experts_forward(experts, x, ids, weights)
    assert seen == [None, "reference", None]


def test_forward_traces_under_torch_compile():
    experts = _qwen3()
    x, ids, weights = _routing()
    want = moe_kernels_experts_forward(experts, x, ids, weights)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: moe_kernels_experts_forward(experts, x, ids, weights), backend="eager")
    torch.testing.assert_close(compiled(x), want)
