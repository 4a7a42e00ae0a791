"""PEFT LoRA through ``target_parameters`` on the fused experts of a patched model.

PEFT wraps the experts module and substitutes ``W + B A`` for the targeted 3-D parameters during the
forward; the "moe_kernels" experts implementation reads the weights at call time, so it must see the
adapted weights. Checked against the unpatched model: logits, gradients of every LoRA parameter, and
the losses of a few AdamW steps that train only the adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moe_kernels
import moe_kernels.hf as mkhf
from test_hf_families import assert_rel, batch, build

peft = pytest.importorskip("peft")

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_model(model, seed: int = 0):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero; make the adapters matter from step 0
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return wrapped


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # concatenated, and transposed + interleaved + bias
def test_lora_on_experts_matches_unpatched(family, backend, monkeypatch, require_hf_backend):
    require_hf_backend(backend)
    base = build(family, torch.float32)
    patched = mkhf.apply(copy.deepcopy(base), backend=backend)
    calls = []
    original_moe_mlp = moe_kernels.moe_mlp
    monkeypatch.setattr(moe_kernels, "moe_mlp", lambda *a, **k: calls.append(1) or original_moe_mlp(*a, **k))

    ids = batch(7)
    results = []
    for model in (base, patched):
        wrapped = lora_model(model)
        trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        out = wrapped(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in trainable.items()}
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
        losses = []
        for step in range(5):
            optimizer.zero_grad()
            loss = wrapped(batch(200 + step), labels=batch(200 + step)).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        results.append((out.logits.detach(), grads, losses))
    assert calls, "the patched model never reached moe_kernels.moe_mlp under PEFT"
    (ref_logits, ref_grads, ref_losses), (logits, grads, losses) = results
    assert_rel(logits, ref_logits, 1e-5, "logits")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_rel(grad, ref_grads[name], 1e-4, f"grad of {name}")
    assert losses[-1] < losses[0]
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"


def test_lora_adapter_saved_from_a_patched_model_is_the_unpatched_one(tmp_path):
    """The adapter files PEFT writes from a patched model equal those from the unpatched model, and each loads onto
    the other kind of base with the same logits (apply changes forwards, not the modules PEFT wraps and names)."""
    from safetensors.torch import load_file

    base = build("mixtral", torch.float32)
    ids = batch(7)
    plain = lora_model(copy.deepcopy(base))
    patched = lora_model(mkhf.apply(copy.deepcopy(base), backend="reference"))
    plain.save_pretrained(tmp_path / "plain")
    patched.save_pretrained(tmp_path / "patched")
    states = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "patched")]
    assert states[0].keys() == states[1].keys() and any("experts" in k for k in states[0])
    assert all(torch.equal(states[1][k], v) for k, v in states[0].items())
    with torch.no_grad():
        expected = plain(ids).logits
        on_plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "patched")(ids).logits
        on_patched = peft.PeftModel.from_pretrained(mkhf.apply(copy.deepcopy(base), backend="reference"),
                                                    tmp_path / "plain")(ids).logits
    assert torch.equal(on_plain, expected)
    assert_rel(on_patched, expected, 1e-5, "adapter loaded onto a patched base")
