"""MoE blocks that run their experts themselves (moe_kernels.hf.blocks): Llama 4's ``Llama4TextMoe``, whose
transformers forward runs every expert on every token (the input scaled by the sigmoid router score, 0 for the
experts not chosen), against moe_kernels' forward, which runs only the chosen slots through ``moe_mlp``.

Block-level parity per backend (on CUDA for triton/cuda with a GPU): the output, the router logits and the
gradients of the hidden states and every parameter, fp32 and bf16, over a grid with k = 1 (as released), k = 2,
k = E, a prime expert count, one token and an expert no token chooses. Then what guards the forward: a block whose
source differs from the one it was written against is not matched, and apply_to / revert on the class."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe_kernels  # noqa: E402
import moe_kernels.hf as mkhf  # noqa: E402
from moe_kernels.hf import blocks  # noqa: E402
from moe_kernels.hf.experts import BACKEND_ATTRIBUTE  # noqa: E402
from moe_kernels.hf.families import families_table, scan  # noqa: E402
from moe_testing import REL_TOL, backends_under_test, device_for, rel_err  # noqa: E402

llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")

HIDDEN = 24
# (experts, k, tokens): top-1 as released, k = 2, k = E, a prime expert count, one token
GRID = [(8, 1, 9), (8, 2, 9), (5, 5, 6), (7, 3, 11), (8, 1, 1)]


def _block(num_experts: int, k: int, dtype: torch.dtype, device) -> torch.nn.Module:
    config = transformers.Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=16, intermediate_size_mlp=32,
                                           num_local_experts=num_experts, num_experts_per_tok=k,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    block = llama4.Llama4TextMoe(config)
    g = torch.Generator().manual_seed(num_experts * 10 + k)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return block.to(device, dtype)


def _run(block, forward, hidden):
    block.zero_grad()
    h = hidden.clone().requires_grad_(True)
    out, logits = forward(block, h)
    cotangent = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    (out * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    return out.detach(), logits.detach(), h.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_experts,k,tokens", GRID)
@pytest.mark.parametrize("backend", backends_under_test())
def test_llama4_block_matches_transformers(backend, num_experts, k, tokens, dtype):
    device = device_for(backend)
    block = _block(num_experts, k, dtype, device)
    setattr(block, BACKEND_ATTRIBUTE, backend)
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, HIDDEN, generator=g).to(device, dtype)
    want = _run(block, type(block).forward, hidden)
    got = _run(block, blocks.llama4_text_moe_forward, hidden)
    assert torch.equal(got[1], want[1]), "router logits differ"
    assert got[0].dtype == want[0].dtype == dtype
    tol = REL_TOL[dtype]
    for what, a, b in (("output", got[0], want[0]), ("grad of the hidden states", got[2], want[2])):
        assert rel_err(a, b) <= tol, f"{what}: relative error {rel_err(a, b):.2e}"
    assert got[3].keys() == want[3].keys() and {"experts.gate_up_proj", "router.weight"} <= set(want[3])
    for name, grad in want[3].items():
        # an expert no token chose has no gradient in either (zero in transformers' dense bmm)
        err = rel_err(got[3][name], grad) if grad.norm() > 0 else got[3][name].norm().item()
        assert err <= tol * 5, f"grad of {name}: relative error {err:.2e}"


def test_a_block_whose_source_changed_is_not_matched():
    """A Llama4TextMoe whose forward is not the one moe_kernels was written against keeps transformers' forward
    (match_block answers None): a transformers release that changes the block leaves it unpatched, never wrong."""
    original = llama4.Llama4TextMoe
    assert blocks.match_block(original) is blocks.VARIANTS_BY_NAME["llama4"]

    def forward(self, hidden_states):  # a changed forward: the scaled input applied after the experts
        return original.forward(self, hidden_states)

    changed = type("Llama4TextMoe", (original,), {"forward": forward, "__module__": original.__module__})
    assert blocks.match_block(changed) is None
    row = next(r for r in families_table() if r["model_type"] == "llama4_text")
    assert row["status"] == "experts" and row["experts"] == "Llama4TextMoe's experts", row
    assert scan()["llama4_text"].blocks == {"Llama4TextMoe": "llama4"}


def test_apply_to_patches_the_block_class_and_revert_restores_it():
    cls = llama4.Llama4TextMoe
    original = cls.__dict__["forward"]
    try:
        names = mkhf.apply_to("llama4_text", backend="reference")
        assert "Llama4TextMoe" in names and cls.forward is blocks.llama4_text_moe_forward
        assert blocks.match_block(cls) is blocks.VARIANTS_BY_NAME["llama4"]  # read from the original forward
        block = _block(8, 1, torch.float32, "cpu")
        out, _ = block(torch.randn(3, HIDDEN))
        assert out.shape == (3, HIDDEN)
    finally:
        mkhf.revert("llama4_text")
    assert cls.__dict__["forward"] is original and BACKEND_ATTRIBUTE not in cls.__dict__


def test_apply_to_model_types_that_share_a_class():
    """llama4 and llama4_text share Llama4TextMoe: reverting one keeps the class patched for the other (it restored
    the class while the other type still counted as patched), and the last revert restores it."""
    cls = llama4.Llama4TextMoe
    original = cls.__dict__["forward"]
    try:
        mkhf.apply_to("llama4", backend="reference")
        mkhf.apply_to("llama4_text", backend="cpu")
        assert getattr(cls, BACKEND_ATTRIBUTE) == "cpu"  # one class: the last call's backend for both types
        mkhf.revert("llama4")
        assert cls.forward is blocks.llama4_text_moe_forward and getattr(cls, BACKEND_ATTRIBUTE) == "cpu"
        with pytest.raises(ValueError, match="was not patched"):
            mkhf.revert("llama4")
    finally:
        for model_type in ("llama4", "llama4_text"):
            try:
                mkhf.revert(model_type)
            except ValueError:
                pass
    assert cls.__dict__["forward"] is original and BACKEND_ATTRIBUTE not in cls.__dict__


def test_llama4_multimodal_model_patches_the_blocks_of_its_language_model():
    """model_type "llama4" (Llama4ForConditionalGeneration): apply() patches the MoE blocks inside its language
    model, whose hidden states then match the unpatched model's (compared on the language model: transformers
    5.24's text-only forward of the whole model fails on its own, reading image_outputs it did not produce)."""
    import copy

    text = dict(vocab_size=96, hidden_size=HIDDEN, intermediate_size=16, intermediate_size_mlp=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=1,
                moe_layers=[0, 1], pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)
    torch.manual_seed(0)
    base = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text,
                                                                                 vision_config=vision)).eval()
    with torch.no_grad():
        for param in base.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    patched = mkhf.apply(copy.deepcopy(base), backend="reference")
    patched_blocks = [m for m in patched.modules() if isinstance(m, llama4.Llama4TextMoe) and "forward" in m.__dict__]
    assert len(patched_blocks) == 2

    def language_model(model):
        return next(m for m in model.modules() if type(m).__name__ == "Llama4TextModel")

    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = language_model(patched)(input_ids=ids).last_hidden_state
        want = language_model(base)(input_ids=ids).last_hidden_state
    assert rel_err(got, want) <= REL_TOL[torch.float32]


def test_patched_block_compiles_whole():
    """The patched block traces under torch.compile(fullgraph=True), as transformers' compiled decoding and training
    scripts compile models: no graph break, and the compiled block matches transformers' eager forward."""
    if "cpu" not in moe_kernels.available_backends():  # the reference backend's Python loop is not traceable whole
        pytest.skip("needs the cpu backend (moe_kernels._C)")
    torch._dynamo.reset()
    block = _block(8, 2, torch.float32, "cpu")
    setattr(block, BACKEND_ATTRIBUTE, "cpu")
    compiled = torch.compile(lambda h: blocks.llama4_text_moe_forward(block, h), fullgraph=True, backend="aot_eager")
    for tokens in (1, 13):
        hidden = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            got, want = compiled(hidden)[0], type(block).forward(block, hidden)[0]
        assert rel_err(got, want) <= REL_TOL[torch.float32], tokens
