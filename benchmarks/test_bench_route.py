"""Routing alone (moe_kernels.route vs transformers' router math) and the dispatch plan alone
(moe_kernels.plan vs transformers' torch.sort + histc + cumsum), fp32 logits, forward."""

import pytest

from conftest import CPU, mk_providers, run_pass
from moe_kernels import bench

ROUTE_SHAPES = ("olmoe_1b_7b", "deepseek_v3_like", "gpt_oss_20b")


def pytest_generate_tests(metafunc):
    if "route_point" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full")
        tokens = (64,) + bench.TRAIN_TOKENS if full else bench.QUICK["route_tokens"]
        point_list = [(name, t) for name in ROUTE_SHAPES for t in tokens]
        metafunc.parametrize("route_point", point_list, ids=[f"{n}-T{t}" for n, t in point_list], scope="module")


@pytest.fixture(scope="module")
def route_case(route_point):
    return bench.build_route_case(bench.MOE_SHAPES[route_point[0]], route_point[1], CPU)


@pytest.fixture(scope="module")
def plan_case(route_point):
    return bench.build_plan_case(bench.MOE_SHAPES[route_point[0]], route_point[1], CPU)


@pytest.mark.parametrize("provider", mk_providers() + ["hf:router"])
def test_route(benchmark, route_point, route_case, provider):
    benchmark.group = f"route {route_point[0]} T={route_point[1]}"
    run_pass(benchmark, route_case, provider, "fwd", rounds=20)


@pytest.mark.parametrize("provider", mk_providers() + ["torch:sort"])
def test_plan(benchmark, route_point, plan_case, provider):
    benchmark.group = f"plan {route_point[0]} T={route_point[1]}"
    run_pass(benchmark, plan_case, provider, "fwd", rounds=20)
