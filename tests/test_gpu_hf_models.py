"""Whole patched Hugging Face models on the GPU backends, on the device those run on.

With a GPU: tiny Qwen3-MoE and GPT-OSS models (real transformers classes, random weights) on CUDA, patched with
``moe_kernels.hf.apply`` for each GPU backend (triton, cuda, auto), against the same unpatched model on CUDA:
logits and every parameter's gradient (fp32 and bf16), and greedy decoding (bf16) through transformers' own
compiled static-cache ``generate`` (its default compile config on CUDA: inductor, CUDA graphs) against eager
unpatched decoding. Without a GPU the triton backend runs in the interpreter on CPU tensors (fp32, and ``generate``'s
compile forced onto the CPU with the aot_eager backend), so the file is checked in CI before a GPU ever runs it.
The integration suite (``integration/test_hf_families.py``) covers every family on the CPU backends.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe_kernels  # noqa: E402
import moe_kernels.hf as mkhf  # noqa: E402
from moe_testing import GPU, rel_err  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
BACKENDS = ([b for b in ("triton", "cuda", "auto") if b == "auto" or b in moe_kernels.available_backends()] if GPU
            else ["triton"] if "triton" in moe_kernels.available_backends() else [])
DTYPES = [torch.float32, torch.bfloat16] if GPU else [torch.float32]
# relative error of logits / gradients against the unpatched model on the same device
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (3e-2, 1e-1)}  # as integration/test_hf_families.py
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.0)),
}

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no GPU backend can run here (triton not installed)")


def build(family: str, dtype: torch.dtype) -> torch.nn.Module:
    config_name, model_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**COMMON, **kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "bias" in name:
                param.normal_(0.0, 0.2)  # routing far from uniform, activations of realistic size
    return model.to(DEVICE, dtype)


def patched(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    import copy

    return mkhf.apply(copy.deepcopy(model), backend=backend)


def tokens(seed: int, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=generator).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_model_matches_transformers(backend, family, dtype):
    """Logits (one token: the decode paths; 2 x 24 tokens: the planned ones) and every gradient of a training
    step, against the unpatched model on the same device."""
    logits_tol, grad_tol = TOL[dtype]
    base = build(family, dtype)
    model = patched(base, backend)
    with torch.no_grad():
        for ids in (tokens(1, 1, 1), tokens(2, 2, 24)):
            err = rel_err(model(ids).logits.float(), base(ids).logits.float())
            assert err <= logits_tol, f"logits of {ids.numel()} tokens: relative error {err:.2e}"
    grads = []
    for run in (base, model):
        run.train().zero_grad()
        ids = tokens(3, 2, 16)
        run(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float() for n, p in run.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    for name, want in grads[0].items():
        err = rel_err(grads[1][name], want)
        assert err <= grad_tol, f"grad {name}: relative error {err:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_static_cache_generate(backend, family, monkeypatch, greedy_parity):
    """transformers' compiled decoding (static cache; on CUDA its default compile config: inductor with CUDA graphs,
    which needs every MoE layer free of host syncs and graph breaks) gives the greedy tokens of eager unpatched
    decoding. On CUDA in bf16 (what serving runs; the cuda backend's fp32 experts fall back to a loop that reads
    the offsets on the host, which a CUDA graph cannot hold), a divergence is accepted only where bf16 noise between
    the two models' next-token logits explains it (conftest.py, ``_greedy_parity``); on the CPU in fp32, exactly."""
    dtype = torch.bfloat16 if GPU else torch.float32
    base = build(family, dtype).eval()
    model = patched(base, backend)
    prompt = tokens(4, 1, 5)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    compile_config = transformers.CompileConfig(fullgraph=True)  # inductor, reduce-overhead: as generate's default
    if not GPU:  # generate compiles on accelerators only; the interpreter needs no inductor: trace with aot_eager
        compile_config = transformers.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
        compile_config._compile_all_devices = True
    real_compile, compiled = torch.compile, []
    torch._dynamo.reset()
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(torch, "compile", lambda *a, **kw: compiled.append(kw) or real_compile(*a, **kw))
        want = base.generate(prompt, **kwargs)
        try:
            got = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
        except Exception as error:
            torch._dynamo.reset()
            try:  # ours, or transformers' own? The unpatched model decodes the same way.
                base.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
            except Exception as own:
                pytest.skip(f"transformers' own compiled static-cache generate fails here too: {own!r}"[:500])
            raise error
    assert compiled, "generate did not compile the forward"
    want_tokens, got_tokens = want[0, 5:], got[0, 5:]
    assert got_tokens.numel() == want_tokens.numel() == 8
    greedy_parity(base, model, prompt, want_tokens, got_tokens, dtype)
