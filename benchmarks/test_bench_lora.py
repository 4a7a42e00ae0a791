"""Self-MoE LoRA-MoE linear (base linear + routed LoRA experts, n=4, r=8, top-1), vs the base linear alone
and vs the MiXSE-style sum over every expert. Gemma-7B-like hidden size, scaled on the CPU."""

import pytest

from conftest import CPU, mk_providers, parametrize_points, points, run_pass
from moe_kernels import bench

PROVIDERS = mk_providers() + ["dense_linear", "all_experts"]


def pytest_generate_tests(metafunc):
    parametrize_points(metafunc, "lora_point", points(
        metafunc.config, bench.LORA_SHAPES, None, bench.QUICK["lora_tokens"], (64,) + bench.TRAIN_TOKENS))


@pytest.fixture(scope="module")
def lora_case(lora_point):
    name, tokens, dtype = lora_point
    shape = bench.LORA_SHAPES[name]
    return bench.build_lora_case(shape, shape.cpu_scale, tokens, dtype, CPU)


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lora_moe_linear(benchmark, lora_point, lora_case, provider, pass_name):
    benchmark.group = f"lora {'-'.join(map(str, lora_point))} {pass_name}"
    run_pass(benchmark, lora_case, provider, pass_name)
