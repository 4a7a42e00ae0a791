"""Shared fixtures of the pytest-benchmark suites (``pytest benchmarks/``; not part of ``pytest tests integration``).

The cases come from :mod:`moe_kernels.bench` (one place for shapes, providers and the CPU scaling), so
``moe-kernels bench`` and these suites time exactly the same code. Options:

    --bench-threads N   torch threads (default 2)
    --bench-full        every shape and token count (default: the --quick set)

Example: ``pytest benchmarks/test_bench_moe.py --benchmark-columns=median,iqr --benchmark-group-by=param:case``
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

try:
    from moe_kernels import bench
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_kernels import bench


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=2, help="torch threads for the benchmarks")
    parser.addoption("--bench-full", action="store_true", help="all shapes and token counts, not the quick set")


@pytest.fixture(autouse=True, scope="session")
def _bench_threads(pytestconfig):
    previous = torch.get_num_threads()
    torch.set_num_threads(pytestconfig.getoption("--bench-threads"))
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=1)
def copy_bandwidth() -> float:
    return bench.measure_copy_bandwidth()


def run_pass(benchmark, case: bench.Case, provider: str, pass_name: str, rounds: int = 5) -> None:
    """Time one provider of ``case`` on one pass ("fwd" under no_grad, "bwd" alone, or "fwdbwd")."""
    if provider == "cpu_ideal":
        # Timed here: the dense chain of equal FLOPs. The ideal is max(this, bandwidth_floor_ms in extra_info).
        if case.ideal is None:
            pytest.skip("the CPU ideal is defined on the CPU only")
        benchmark.extra_info["bandwidth_floor_ms"] = case.ideal.bandwidth_floor_ms[pass_name]
        chain = case.ideal.dense_chain
        fn, leaves, grads = (lambda: chain()), list(case.ideal.leaves), case.ideal.grads
    else:
        if provider not in case.providers:
            pytest.skip(case.notes.get(provider, f"{provider} is not available here"))
        if provider in case.notes:
            benchmark.extra_info["note"] = case.notes[provider]
        fn = case.providers[provider]
        leaves = [p for p in case.params if p.is_floating_point()]
        grads = None
    if pass_name == "fwd":
        def forward():
            with torch.no_grad():
                fn()
        benchmark.pedantic(forward, rounds=rounds, warmup_rounds=1)
        return
    for p in leaves:
        p.requires_grad_(True)
    try:
        outs = fn()
        grads = grads or (torch.randn_like(outs),)

        def backward(outputs):
            torch.autograd.backward(outputs, grads)

        def clear():
            for p in leaves:
                p.grad = None

        if pass_name == "fwdbwd":
            def setup():
                clear()
                return (), {}
            benchmark.pedantic(lambda: backward(fn()), setup=setup, rounds=rounds, warmup_rounds=1)
        else:
            def setup():
                clear()
                return (fn(),), {}
            benchmark.pedantic(backward, setup=setup, rounds=rounds, warmup_rounds=1)
    finally:
        for p in leaves:
            p.grad = None
            if provider != "cpu_ideal":  # the ideal's own tensors always require grad
                p.requires_grad_(False)


CPU = torch.device("cpu")
TIMING = {"min_repeats": 5, "max_repeats": 20, "budget_s": 0.5}  # for the CPU ideal's dense chain


def mk_providers() -> list[str]:
    return [f"mk:{name}" for name in bench.mk_backends(CPU)]


def points(config, shapes: dict, quick_shapes, quick_tokens, full_tokens, dtypes=None) -> list[tuple]:
    """(shape name, tokens on the CPU, dtype) of a suite: the --quick set, or everything with --bench-full."""
    full = config.getoption("--bench-full")
    names = list(shapes) if full or quick_shapes is None else quick_shapes
    result = []
    for name in names:
        for tokens in full_tokens if full else quick_tokens:
            for dtype in dtypes or bench.QUICK["dtypes"]:
                point = (name, bench.cpu_tokens(tokens, shapes[name].cpu_scale), dtype)
                if point not in result:
                    result.append(point)
    return result


def parametrize_points(metafunc, fixture_name: str, point_list: list[tuple]) -> None:
    """Module-scoped parametrization, so pytest runs every test of one point before building the next."""
    if fixture_name in metafunc.fixturenames:
        metafunc.parametrize(fixture_name, point_list, ids=[f"{n}-T{t}-{d}" for n, t, d in point_list],
                             scope="module")
