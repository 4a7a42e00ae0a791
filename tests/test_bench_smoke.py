"""Smoke test of the benchmark runner (moe_kernels.bench): one tiny shape per suite, one repeat.

Checks the outputs' form (CSV columns, providers present, summary printed, plots written) and that every
provider computes the same layer as the reference oracle. No timing is asserted anywhere.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

import moe_kernels
from moe_kernels import bench

# One shape per suite, scaled down hard: H = 2048/64 = 32 for OLMoE, 40 for GPT-OSS, 112 for DeepSeek-V3.
SMOKE_ARGS = ["--shape", "olmoe_1b_7b", "--shape", "gpt_oss_20b", "--shape", "deepseek_v3_like",
              "--shape", "pesc_llama2_7b_r64", "--shape", "selfmoe_gemma_7b",
              "--tokens", "8", "--dtype", "fp32", "--scale", "64", "--repeats", "1", "--budget", "0",
              "--threads", "1", "--bandwidth-mb", "8",
              "--device", "cpu"]  # the CPU runner's smoke test; benchmarks/gpu_bench.py --dry-run covers the GPU one

# Providers that must agree with the oracle, and how closely (fp32 outputs of size O(1)).
FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        status = bench.bench_main(SMOKE_ARGS + ["--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the runner sets the thread count process-wide
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    return status, out, header, rows


def test_runner_exits_cleanly_and_writes_every_output(smoke_run, capsys):
    status, out, _, _ = smoke_run
    assert status == 0
    for name in ("bench.csv", "roofline.csv", "summary.md", "moe.png", "adapter.png", "lora.png", "route.png",
                 "plan.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "### MoE block" in summary and "hf:grouped_mm / mk" in summary
    assert "### Memory (forward+backward)" in summary
    assert "H100 peaks assumed: 989 TFLOP/s" in summary


def test_csv_has_the_expected_columns(smoke_run):
    _, _, header, rows = smoke_run
    assert header == bench.CSV_COLUMNS
    assert rows
    for row in rows:
        assert row["machine"] and row["torch"] == torch.__version__ and row["moe_kernels"] == moe_kernels.__version__


def test_every_suite_and_pass_has_rows(smoke_run):
    _, _, _, rows = smoke_run
    suites = {r["suite"] for r in rows}
    assert suites == {"moe", "adapter", "lora", "route", "plan"}
    for suite in ("moe", "adapter", "lora"):
        assert {r["pass"] for r in rows if r["suite"] == suite} == {"fwd", "bwd", "fwdbwd"}


def test_moe_suite_has_every_provider(smoke_run):
    _, _, _, rows = smoke_run
    headline = bench.headline_provider(torch.device("cpu"))
    expected = {headline, "mk:reference", "hf:eager", "hf:grouped_mm", "hf:batched_mm", "cpu_ideal"}
    for shape in ("olmoe_1b_7b", "gpt_oss_20b", "deepseek_v3_like"):
        timed = {r["provider"] for r in rows if r["suite"] == "moe" and r["shape"] == shape and r["median_ms"]}
        assert expected <= timed, (shape, expected - timed)


def test_no_provider_failed(smoke_run):
    _, _, _, rows = smoke_run
    failures = [(r["suite"], r["shape"], r["pass"], r["provider"], r["note"]) for r in rows
                if r["note"].startswith("failed")]
    assert not failures


def test_providers_agree_with_the_reference(smoke_run):
    _, _, _, rows = smoke_run
    compared = [r for r in rows if r["pass"] == "fwd" and r["max_abs_err"] != ""]
    # every non-baseline provider of every suite was compared (dense-only baselines compute another layer)
    providers = {(r["suite"], r["provider"]) for r in compared}
    for suite, provider in (("moe", "hf:eager"), ("moe", "hf:grouped_mm"), ("moe", "hf:batched_mm"),
                            ("adapter", "pesc_loop"), ("lora", "all_experts"), ("route", "hf:router"),
                            ("plan", "torch:sort")):
        assert (suite, provider) in providers, (suite, provider)
    for r in compared:
        assert float(r["max_abs_err"]) <= FP32_TOLERANCE, (r["suite"], r["shape"], r["provider"], r["max_abs_err"])


def test_ratios_and_quartiles_are_consistent(smoke_run):
    _, _, _, rows = smoke_run
    timed = [r for r in rows if r["median_ms"]]
    assert timed
    for r in timed:
        assert float(r["q1_ms"]) <= float(r["median_ms"]) <= float(r["q3_ms"])
        if r["ratio_vs_mk"]:
            assert float(r["ratio_vs_mk"]) > 0
    headline = bench.headline_provider(torch.device("cpu"))
    for r in timed:
        if r["provider"] == headline:
            assert math.isclose(float(r["ratio_vs_mk"]), 1.0)


def test_memory_columns_filled_for_training_passes(smoke_run):
    _, _, _, rows = smoke_run
    fwdbwd = [r for r in rows if r["suite"] == "moe" and r["pass"] == "fwdbwd" and r["median_ms"]
              and r["provider"] != "cpu_ideal"]
    assert fwdbwd
    for r in fwdbwd:
        assert float(r["peak_mb"]) > 0 and float(r["saved_mb"]) >= 0


def test_saved_activation_bytes_counts_saved_tensors_once():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 32, requires_grad=True)
    # relu saves its output (64*32 fp32 = 8 KiB); x and w are inputs and do not count
    saved = bench.saved_activation_bytes(lambda: (x @ w).relu(), exclude=[x, w])
    assert saved == 64 * 32 * 4


def test_peak_memory_sees_native_allocations():
    def run():
        a = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, allocated inside ATen
        b = a + 1
        return b.sum()
    assert bench.peak_memory_bytes(run) >= 2 * 4 * 2**20


def test_roofline_numbers_for_mixtral_decode():
    rows = {(r["shape"], r["tokens"]): r for r in bench.roofline_rows(tokens_list=(1,))}
    r = rows[("mixtral_8x7b", 1)]
    flops = 2 * 2 * 3 * 4096 * 14336  # T=1, k=2, gate+up+down
    assert math.isclose(r["gflops"], flops / 1e9)
    assert r["bound"] == "memory"
    weight_bytes = 2 * 3 * 4096 * 14336 * 2  # two experts, bf16
    assert math.isclose(r["h100_us"], (weight_bytes + 2 * 4096 * 2) / bench.H100_HBM_BYTES_PER_S * 1e6)


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    for argv, message in ((["--shape", "no_such_model"], "unknown --shape ['no_such_model']"),
                          (["--threads", "0"], "--threads must be >= 1"),
                          (["--suite", "nope"], "invalid choice: 'nope'")):
        with pytest.raises(SystemExit) as info:
            bench.bench_main(argv + ["--out", str(tmp_path)])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_timing_log_names_the_slowest_tests_and_those_a_kill_cut(tmp_path):
    """conftest.py's MOE_TEST_TIMING_LOG and benchmarks/pytest_timings.py, as gpu_check.sh uses them: a child pytest
    killed by its time limit inside a test leaves a log that names the finished tests with their times and the test
    it was in."""
    import os
    import subprocess
    import sys
    import time

    from moe_testing import benchmark_script

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "test_child.py").write_text(
        "import time\n"
        "def test_quick():\n    pass\n"
        "def test_slow():\n    time.sleep(0.5)\n"
        "def test_hangs():\n    time.sleep(600)\n")
    (tmp_path / "conftest.py").write_text(open(os.path.join(root, "conftest.py")).read())
    log = tmp_path / "timings.log"
    # not an xdist worker itself, even when this test runs in one (conftest.py: only the controller writes)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, "MOE_TEST_TIMING_LOG": str(log)}
    child = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_child.py"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while "test_hangs" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    child.kill()  # as `timeout` ends the GPU check's pytest
    child.wait()
    slowest, unfinished = benchmark_script("pytest_timings").summarise(log.read_text().splitlines(), top=5)
    assert [nodeid.split("::")[1] for _, _, nodeid in slowest] == ["test_slow", "test_quick"]
    assert slowest[0][0] >= 0.5 and slowest[0][1] == "passed"
    assert [nodeid.split("::")[1] for nodeid in unfinished] == ["test_hangs"]


def test_gpu_bench_graph_replays_leave_out_what_cannot_be_captured():
    """benchmarks/gpu_bench.py's decode timings replayed from CUDA graphs, with a stand-in capture (no GPU here): one
    replay per provider and input set, a provider whose capture raises gets a note and no replay, transformers' eager
    experts are never tried; the Markdown table gives each replay's share of the floor."""
    from moe_testing import benchmark_script

    gpu_bench = benchmark_script("gpu_bench")
    ran = []

    def capture(call, set_index):
        if call is calls["liger:fused_moe"]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return lambda: ran.append((call(set_index)))

    calls = {"moe_kernels:triton": lambda i: ("triton", i), "liger:fused_moe": lambda i: ("liger", i),
             "hf:eager": lambda i: ("eager", i)}
    notes = {}
    replays = gpu_bench.graph_replay_calls(calls, 3, notes, capture=capture)
    assert set(replays) == {"moe_kernels:triton"}
    replays["moe_kernels:triton"](2)
    assert ran == [("triton", 2)]
    assert "not permitted" in next(iter(notes["liger:fused_moe"])) and "hf:eager" not in notes

    rows = [{"suite": "moe", "case": "Qwen3", "tokens": 1, "provider": "moe_kernels:triton", "pass": "fwd_graph",
             "ms": 0.03, "floor_ms": 0.018},
            {"suite": "moe", "case": "Qwen3", "tokens": 1, "provider": "hf:grouped_mm", "pass": "fwd_graph",
             "ms": 0.09, "floor_ms": 0.018},
            {"suite": "moe", "case": "Qwen3", "tokens": 1, "provider": "hf:grouped_mm", "pass": "fwd",
             "ms": 0.5, "floor_ms": 0.018}]
    table = gpu_bench._graph_table(rows)
    assert table[0].startswith("### moe decode forward replayed from CUDA graphs")
    assert table[-2] == "| Qwen3 | 1 | 0.018 | 0.03 (60%) | 0.09 (20%) |"
    assert gpu_bench._graph_table([r for r in rows if r["pass"] == "fwd"]) == []


def test_gpu_bench_times_the_fused_down_backward_where_the_split_one_is_the_default():
    """triton[down_bwd=fused] (gpu_bench and kernel_breakdown) runs where the config entry in force splits the
    backward through the down GEMM: configs.json's class of the most rows per expert (Qwen3-30B-A3B T=16384: 1024 rows
    per expert; Mixtral T=4096 likewise), not at T=64 or T=4096 on Qwen3 (4 and 256 rows per expert)."""
    from moe_testing import benchmark_script

    gpu_bench = benchmark_script("gpu_bench")
    shapes = {shape.name: shape for shape in gpu_bench.MOE_SHAPES}
    qwen3 = next(shape for name, shape in shapes.items() if name.startswith("Qwen3"))
    mixtral = next(shape for name, shape in shapes.items() if name.startswith("Mixtral"))
    assert gpu_bench.split_down_backward_applies(qwen3, 16384) and gpu_bench.split_down_backward_applies(mixtral, 4096)
    assert not gpu_bench.split_down_backward_applies(qwen3, 64)
    assert not gpu_bench.split_down_backward_applies(qwen3, 4096)
    assert "triton[down_bwd=fused]" in benchmark_script("kernel_breakdown").BACKWARD_ONLY
    # its Markdown cell: no forward, the fwd+bwd time and its ratio to grouped_mm
    rows = [{"suite": "moe", "case": "Qwen3", "tokens": 16384, "provider": provider, "pass": pass_name, "ms": ms,
             "floor_ms": 1.0, "vs_grouped_mm": ratio}
            for provider, pass_name, ms, ratio in (("moe_kernels:triton", "fwd", 4.0, 1.5),
                                                   ("moe_kernels:triton", "fwdbwd", 12.0, 1.3),
                                                   ("moe_kernels:triton[down_bwd=fused]", "fwdbwd", 15.0, 1.0))]
    markdown = gpu_bench.render_markdown(rows, {"gpu": "none"}, {"copy_bytes_per_s": 1e12, "matmul_flops": 1e15}, {})
    row = next(line for line in markdown.splitlines() if line.startswith("| Qwen3 | 16384 |"))
    assert row.endswith("| 4 / 12 (1.5× / 1.3×) | - / 15 (-× / 1×) |"), row


def test_kernel_breakdown_attributes_each_call_to_its_operators(tmp_path, capsys):
    """benchmarks/kernel_breakdown.py and bench.timing.kernel_times, without a GPU: the profiled events of one call
    are counted per call (two matmuls and an add, three calls), ranked by time, and the Markdown lists them with an
    "others" row past --top; the dry run profiles moe_mlp on the triton backend (interpreter) and writes both files;
    bad arguments are clear errors."""
    from moe_testing import benchmark_script

    from moe_kernels.bench.timing import kernel_times

    breakdown = benchmark_script("kernel_breakdown")
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    result = kernel_times(lambda i: torch.mm(a, b) + torch.mm(b, a), 3, torch.device("cpu"))
    assert result["kernels"]["aten::mm"][0] == 2 and result["kernels"]["aten::add"][0] == 1
    assert result["wall_ms"] > 0 and result["gpu_idle"] is None
    assert math.isclose(result["kernel_ms"], sum(ms for _, ms in result["kernels"].values()))
    result.update(case="two matmuls", tokens=64, backend="torch", pass_name="fwd", floor_ms=1e-3)
    markdown = breakdown.render([result], "cpu", top=1)
    assert "## two matmuls T=64 torch fwd" in markdown and "gpu idle -" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    top_name = max(result["kernels"], key=lambda name: result["kernels"][name][1])
    assert table[2].startswith(f"| `{top_name}` |")  # after the header and its rule
    assert table[3].startswith(f"| {len(result['kernels']) - 1} others |")

    if "triton" not in moe_kernels.available_backends():
        return
    out = tmp_path / "breakdown"
    assert breakdown.main(["--dry-run", "--out", str(out), "--tokens", "1,48", "--passes", "fwd", "--iters", "1",
                           "--backends", "triton,triton[group_m=0],triton[down_bwd=fused]"]) == 0
    with open(out / "kernel_breakdown.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cases = {(r["case"], r["tokens"], r["backend"], r["pass"]) for r in rows}
    # the launch-order variant only where it changes something: above 16 rows per expert (48 * 2 > 16 * 5); the fused
    # down backward (backward only) neither at this size nor in a forward-only run
    assert rows and cases == {("tiny", "1", "triton", "fwd"), ("tiny", "48", "triton", "fwd"),
                              ("tiny", "48", "triton[group_m=0]", "fwd")}
    assert any(r["kernel"].startswith("moe_kernels_triton::") for r in rows)
    assert "## tiny T=1 triton fwd" in (out / "kernel_breakdown.md").read_text()
    capsys.readouterr()
    for argv, message in ((["--passes", "bwd"], "--passes takes fwd and/or fwdbwd"),
                          (["--iters", "0"], "--iters and --top must be at least 1"),
                          (["--shapes", "nope"], "matches none of"),
                          (["--backends", "triton,trition"], "--backends: unknown ['trition']")):
        with pytest.raises(SystemExit) as info:
            breakdown.main(["--dry-run", "--out", str(out)] + argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
