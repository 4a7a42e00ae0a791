"""Experts with a norm between each expert's output and its routing weight (``has_post_expert_norm``: MuseSpark):
the MuseSparkExperts module through the moe_kernels experts implementation against transformers' own forward on
every backend that runs here (output and every gradient, the norm's weight included), and the whole MuseSpark text
model patched by moe_kernels.hf.apply (fused router and experts) against the unpatched one, fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_testing import assert_close_rel, backends_under_test, check_hf_experts_against_transformers, device_for

transformers = pytest.importorskip("transformers")
try:
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts, MuseSparkTextModel
except ImportError:
    pytest.skip("this transformers has no muse_spark", allow_module_level=True)

import moe_kernels.hf as mkhf  # noqa: E402
from moe_kernels.hf import routers as fused  # noqa: E402
from moe_kernels.hf.experts import describe_experts, moe_kernels_experts_forward  # noqa: E402

HIDDEN, E, K = 32, 8, 2


def _config(**overrides):
    return transformers.MuseSparkTextConfig(**{**dict(
        vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=32, moe_intermediate_size=16, moe_hidden_size=HIDDEN, num_local_experts=E,
        num_experts_per_tok=K, bos_token_id=1, eos_token_id=2, pad_token_id=0), **overrides})


def _randomise(module, seed):
    """Large random weights (std 0.2; norm weights 0.3 so the norm's scale is not 1), nonzero correction biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * (0.3 if "norm" in name else 0.2))
        for name, buffer in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.1)
    return module


def test_post_expert_norm_is_described():
    info = describe_experts(MuseSparkExperts(_config()))
    assert info["post_expert_norm"] is True and info["activation"] == "silu"


@pytest.mark.parametrize("backend", backends_under_test())
def test_experts_with_post_norm_match_transformers(backend):
    experts = _randomise(MuseSparkExperts(_config()), 0).to(device_for(backend))
    assert "post_expert_norm.weight" in dict(experts.named_parameters())  # its gradient is compared too
    x, ids, weights, want = check_hf_experts_against_transformers(experts, backend, "muse_spark", k=K)
    # the norm matters here: without it the output is another one
    with torch.no_grad():
        experts.has_post_expert_norm = False
        unnormed = moe_kernels_experts_forward(experts, x, ids, weights)
    assert (unnormed - want).norm() > 0.1 * want.norm()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_muse_spark_text_model_parity(backend, dtype, tol):
    if backend not in backends_under_test():
        pytest.skip(f"backend {backend} is not built here")
    base = _randomise(MuseSparkTextModel(_config()), 2).to(dtype)
    patched = mkhf.apply(copy.deepcopy(base), backend=backend)
    routers = [m for m in patched.modules() if type(m).__name__ == "MuseSparkTopkRouter"]
    assert routers and all(r.forward.__func__ is fused.muse_spark_forward for r in routers)  # the fused router
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    outputs = []
    for model in (base, patched):
        out = model(input_ids=ids).last_hidden_state
        out.float().square().mean().backward()
        outputs.append(out)
    assert_close_rel(outputs[1].float(), outputs[0].float(), torch.float32, "hidden states", factor=tol / 2e-5)
    grads = {n: p.grad for n, p in base.named_parameters() if p.grad is not None}
    for name, param in patched.named_parameters():
        if name in grads and dtype == torch.float32:
            assert_close_rel(param.grad, grads[name], torch.float32, f"grad {name}", factor=5.0)
