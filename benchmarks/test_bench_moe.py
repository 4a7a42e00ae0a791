"""MoE block (router linear + routing + routed expert MLPs): forward, backward, forward+backward.

moe_kernels on every built backend vs transformers' eager / grouped_mm / batched_mm experts paths (on a real
MixtralExperts / GptOssExperts module), the moe_kernels experts implementation inside transformers, and the
CPU ideal (recorded in extra_info). Shapes are scaled down on the CPU (see moe_kernels.bench.MOE_SHAPES).
"""

import pytest

from conftest import CPU, TIMING, copy_bandwidth, mk_providers, parametrize_points, points, run_pass
from moe_kernels import bench

PROVIDERS = mk_providers() + ["hf:moe_kernels", "hf:eager", "hf:grouped_mm", "hf:batched_mm", "cpu_ideal"]


def pytest_generate_tests(metafunc):
    parametrize_points(metafunc, "moe_point", points(
        metafunc.config, bench.MOE_SHAPES, bench.QUICK["moe_shapes"], bench.QUICK["moe_tokens"],
        bench.DECODE_TOKENS + bench.TRAIN_TOKENS))


@pytest.fixture(scope="module")
def moe_case(moe_point):
    name, tokens, dtype = moe_point
    shape = bench.MOE_SHAPES[name]
    return bench.build_moe_case(shape, shape.cpu_scale, tokens, dtype, CPU, copy_bandwidth(), TIMING)


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_moe_block(benchmark, moe_point, moe_case, provider, pass_name):
    benchmark.group = f"moe {'-'.join(map(str, moe_point))} {pass_name}"
    run_pass(benchmark, moe_case, provider, pass_name)
