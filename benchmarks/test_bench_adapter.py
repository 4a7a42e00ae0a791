"""PESC adapter-MoE layer (dense FFN + routed bottleneck adapters on its output), vs the dense FFN alone and
vs the PESC-style per-expert loop. Llama-2-7B sizes with adapter rank 64 and 512, scaled on the CPU."""

import pytest

from conftest import CPU, mk_providers, parametrize_points, points, run_pass
from moe_kernels import bench

PROVIDERS = mk_providers() + ["dense_ffn", "pesc_loop"]


def pytest_generate_tests(metafunc):
    parametrize_points(metafunc, "adapter_point", points(
        metafunc.config, bench.ADAPTER_SHAPES, None, bench.QUICK["adapter_tokens"], (64,) + bench.TRAIN_TOKENS))


@pytest.fixture(scope="module")
def adapter_case(adapter_point):
    name, tokens, dtype = adapter_point
    shape = bench.ADAPTER_SHAPES[name]
    return bench.build_adapter_case(shape, shape.cpu_scale, tokens, dtype, CPU)


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_adapter_moe_layer(benchmark, adapter_point, adapter_case, provider, pass_name):
    benchmark.group = f"adapter {'-'.join(map(str, adapter_point))} {pass_name}"
    run_pass(benchmark, adapter_case, provider, pass_name)
