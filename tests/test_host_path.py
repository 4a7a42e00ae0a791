"""The public ops' host path (moe_kernels/ops.py, validation.py, backends.py): the shortcuts that keep a decode call
cheap return exactly what the full path returns, and every check still fires with its message."""

import pytest
import torch

import moe_kernels
from moe_kernels import backends, ops

E, H, I, T, K = 4, 8, 6, 5, 2


def test_routing_already_in_shape_is_passed_through():
    weights, ids = torch.rand(T, K), torch.randint(0, E, (T, K), dtype=torch.int32)
    got_weights, got_ids = backends.fp32_int32_routing(weights, ids)
    assert got_weights is weights and got_ids is ids


@pytest.mark.parametrize("weights,ids", [
    (torch.rand(T, K, dtype=torch.bfloat16), torch.randint(0, E, (T, K))),  # other dtypes
    (torch.rand(K, T).t(), torch.randint(0, E, (K, T), dtype=torch.int32).t()),  # right dtypes, strided
    (torch.rand(K, T, dtype=torch.float16).t(), torch.randint(0, E, (K, T)).t()),  # both
])
def test_routing_is_converted_as_before(weights, ids):
    got_weights, got_ids = backends.fp32_int32_routing(weights, ids)
    for got, want in ((got_weights, weights.float().contiguous()), (got_ids, ids.to(torch.int32).contiguous())):
        assert got.dtype == want.dtype and got.is_contiguous() and torch.equal(got, want)
    assert ops._ids_int32(ids).dtype == torch.int32


def test_weights_check_keeps_its_message():
    x = torch.randn(T, H, dtype=torch.bfloat16)
    args = dict(x=x, gate_up_proj=torch.randn(E, 2 * I, H, dtype=torch.bfloat16),
                down_proj=torch.randn(E, H, I, dtype=torch.bfloat16),
                ids=torch.randint(0, E, (T, K), dtype=torch.int32))
    allowed = ", ".join(str(d).replace("torch.", "") for d in tuple({torch.float32, torch.bfloat16}))
    with pytest.raises(TypeError, match=rf"weights must have dtype in \({allowed}\), got float16"):
        moe_kernels.moe_mlp(weights=torch.rand(T, K, dtype=torch.float16), **args)
    with pytest.raises(ValueError, match="weights must have 2 dimensions"):
        moe_kernels.moe_mlp(weights=torch.rand(T, K, 1), **args)
    with pytest.raises(TypeError, match="weights must be a torch.Tensor, got list"):
        moe_kernels.moe_mlp(weights=[[1.0] * K] * T, **args)
    for dtype in (torch.float32, torch.bfloat16):  # both accepted
        assert moe_kernels.moe_mlp(weights=torch.rand(T, K, dtype=dtype), backend="reference", **args).shape == (T, H)


def test_device_check_names_the_first_tensor_given():
    meta = torch.randn(E, 2 * I, H, device="meta")
    with pytest.raises(ValueError, match="up is on meta but h is on cpu"):
        moe_kernels.adapter_moe(torch.randn(T, H), torch.randn(E, 3, H), torch.randn(E, H, 3, device="meta"),
                                torch.rand(T, K), torch.randint(0, E, (T, K)))
    from moe_kernels.validation import check_same_device

    assert check_same_device(a=None, b=torch.zeros(1), c=None) == torch.device("cpu")
    with pytest.raises(ValueError, match="c is on meta but b is on cpu"):
        check_same_device(a=None, b=torch.zeros(1), c=meta)


def test_default_backend_per_device_is_cached_and_cleared(monkeypatch):
    monkeypatch.setattr(backends, "_default_by_device", {})
    cpu = torch.device("cpu")
    name = backends.default_backend_name(cpu)
    assert name == ("cpu" if "cpu" in backends.available_backends() else "reference")
    assert backends._default_by_device == {cpu: name}
    backends.clear_caches()
    assert backends._default_by_device == {}
    assert backends.resolve_backend(None, cpu).name == name


@pytest.mark.parametrize("backend", [None, "auto"])
def test_default_and_auto_choice_trace_under_torch_compile(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g)
    router = torch.randn(H, E, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3

    def block(x):
        weights, ids = moe_kernels.route(x @ router, K, backend=backend)
        return moe_kernels.moe_mlp(x, gate_up, down, weights, ids, backend=backend)

    want = block(x)  # also loads the backends eagerly
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
