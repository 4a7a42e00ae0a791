"""A patched model's steps can be captured in CUDA graphs: traced on fake CUDA tensors (no GPU needed, but a CUDA
build of torch), the decode and prefill graphs of a patched Hugging Face model hold the package's ops and nothing
that makes inductor skip CUDA graphs (``torch.compile(mode="reduce-overhead")``, transformers' compiled
static-cache ``generate``): no cudagraph-unsafe op, no output whose shape depends on data, and no tensor off the
GPU.

Run 3 measured compiled patched decoding at 0.62x the unpatched model's speed (benchmarks/RESULTS_GPU.md) without
a measured cause; a skipped capture would be one. These graphs rule it out for what the package adds to a step.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import backends  # noqa: E402
import moe_kernels.hf as mkhf  # noqa: E402

try:
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
except ImportError:  # pragma: no cover - every torch the package allows has it
    get_first_incompatible_cudagraph_node = None

LAYERS = 2
MODELS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=7, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=7, num_experts_per_tok=3,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
}


def _backends():
    found = ["triton"] if "triton" in moe_kernels.available_backends() else []
    if "cuda" in moe_kernels.available_backends():  # the CUDA build of the extension (CI's newest-torch env)
        found += ["cuda", "auto"]
    return found


def _trace(model_name, backend, tokens, monkeypatch):
    """The aten graph of one no-grad forward of ``tokens`` tokens (batch 2) of the patched model on fake CUDA
    tensors, as an fx GraphModule."""
    # what the backends ask of the GPU model (capability, name for the auto table): an H200's answers
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "NVIDIA H200")
    monkeypatch.setattr(backends, "_capabilities", {})  # answers cached per device stay this test's
    model_class, config = MODELS[model_name]
    before = torch.get_default_dtype()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.set_default_dtype(torch.bfloat16)
            with torch.device("cuda"), no_init_weights():  # the values are never read
                model = model_class(config).eval()
            mkhf.apply(model, backend=backend)
            ids = torch.zeros(2, tokens, dtype=torch.long, device="cuda")

            def step(ids):
                with torch.no_grad():
                    return model(input_ids=ids, use_cache=False).logits

            return make_fx(step, tracing_mode="real")(ids)
    finally:
        torch.set_default_dtype(before)


@pytest.mark.skipif(not torch.backends.cuda.is_built(),
                    reason="fake CUDA tensors need a CUDA build of torch (CI's newest-torch env, GPU machines)")
@pytest.mark.skipif(get_first_incompatible_cudagraph_node is None, reason="this torch lacks inductor's check")
@pytest.mark.parametrize("tokens", [1, 24], ids=["decode", "prefill"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("backend", _backends())
def test_patched_steps_have_nothing_that_stops_cuda_graph_capture(backend, model_name, tokens, monkeypatch):
    gm = _trace(model_name, backend, tokens, monkeypatch)
    ours = [str(node.target) for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("moe_kernels")]
    # the patched router and experts ran: a route op and an expert op per MoE layer
    assert sum("route" in name for name in ours) == LAYERS, ours
    assert len(ours) >= 2 * LAYERS, ours
    assert get_first_incompatible_cudagraph_node(gm) is None
    off_gpu = []
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        for tensor in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "cuda":
                off_gpu.append((str(node.target), str(tensor.device)))
    assert off_gpu == [], off_gpu
