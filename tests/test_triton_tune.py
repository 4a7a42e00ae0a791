"""Per-GPU Triton configs (moe_kernels/triton/configs.py) and their tuner (moe_kernels/triton/tune.py): lookup
order and bounds, the coordinate descent's choices and refusals, the table merge, and a small tuning run under
the interpreter. Runs without a GPU (a GPU model is named by hand where a lookup needs one)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from moe_kernels.triton import configs, tune

FAKE_GPU = "Fake GPU 80GB"


@pytest.fixture
def tables(monkeypatch, tmp_path):
    """A user cache and a shipped per-GPU folder under tmp_path; both empty until a test writes them."""
    monkeypatch.delenv("MOE_KERNELS_TRITON_CONFIGS", raising=False)
    monkeypatch.setenv("MOE_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(configs, "SHIPPED_DEVICE_DIR", tmp_path / "shipped")
    configs.clear_cache()
    yield tmp_path
    configs.clear_cache()


def _entry(block_m, **bounds):
    gemm = {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    dw = {"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_P": 16, "num_warps": 4, "num_stages": 2}
    return dict(bounds, up=gemm, down=gemm, down_bwd=gemm, dx=gemm, dw=dw)


def _write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table))


def test_device_file_name():
    assert configs.device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert configs.device_file_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB.json"
    assert configs.device_file_name(" a/b\\c ") == "a_b_c.json"


def test_tuned_entries_apply_within_their_bounds_only(tables):
    _write(configs.user_configs_path(FAKE_GPU),
           {"device": FAKE_GPU, "mlp": [_entry(32, min_inter=1025, max_inter=4096, max_rows_per_expert=16)]})
    base = configs._pick("mlp", None, rows_per_expert=8, inter=2048)
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=8, inter=2048)["up"]["BLOCK_M"] == 32
    for rows, inter in [(8, 1024), (8, 4097), (17, 2048)]:  # outside a bound: the base table's entry
        assert configs._pick("mlp", FAKE_GPU, rows_per_expert=rows, inter=inter) == \
            configs._pick("mlp", None, rows_per_expert=rows, inter=inter)
    assert configs._pick("mlp", "Another GPU", rows_per_expert=8, inter=2048) == base


def test_tuned_decode_entry_applies_to_its_width_class(tables):
    tuned = {"min_inter": 4097, "max_inter": None, "BLOCK_M": 64, "up": {"BLOCK_N": 64}, "down": {"BLOCK_N": 16}}
    _write(configs.user_configs_path(FAKE_GPU), {"device": FAKE_GPU, "mlp_decode": [tuned]})
    assert configs._pick("mlp_decode", FAKE_GPU, inter=14336) == tuned
    assert configs._pick("mlp_decode", FAKE_GPU, inter=768) == configs.load_table()["mlp_decode"][0]
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=1, inter=14336) == \
        configs._pick("mlp", None, rows_per_expert=1, inter=14336)  # a table may hold one family only


def test_tuned_one_token_entry_applies_on_its_gpu_and_width_class(tables, monkeypatch):
    """A per-GPU 'mlp_one_token' entry drives bf16/fp16 one-token calls on that GPU model at its widths; other widths,
    other GPUs and fp32 keep configs.json's entries, and no entry (Mixtral's I = 14336) still means the decode
    tiles. configs.base_table_only() (the benchmark's configs.json column) ignores it."""
    tuned = {"min_inter": None, "max_inter": 1024, "up": tune._decode(8, 512, 4, 3), "down": tune._decode(32, 128, 4, 3)}
    _write(configs.user_configs_path(FAKE_GPU), {"device": FAKE_GPU, "mlp_one_token": [tuned]})
    fake_gpu = torch.device("cuda", 0)
    monkeypatch.setitem(configs._device_names, 0, FAKE_GPU)
    base = configs.load_table()["mlp_one_token"][0]
    assert configs.one_token_config(False, 768, fake_gpu) == tuned
    assert configs.one_token_config(False, 2048, fake_gpu) == base
    assert configs.one_token_config(False, 14336, fake_gpu) is None
    assert configs.one_token_config(False, 768) == base  # a CPU tensor: no GPU model
    assert configs.one_token_config(True, 768, fake_gpu) == configs.load_table()["mlp_one_token_fp32"][0]
    with configs.base_table_only():
        assert configs.one_token_config(False, 768, fake_gpu) == base
    with configs.override("mlp_one_token", base):
        assert configs.one_token_config(False, 768, fake_gpu) == base


def test_user_table_comes_before_the_shipped_one(tables):
    _write(configs.SHIPPED_DEVICE_DIR / configs.device_file_name(FAKE_GPU),
           {"device": FAKE_GPU, "mlp": [_entry(64)]})
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=100, inter=768)["up"]["BLOCK_M"] == 64
    _write(configs.user_configs_path(FAKE_GPU), {"device": FAKE_GPU, "mlp": [_entry(128, max_inter=1024)]})
    configs.clear_cache()
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=100, inter=768)["up"]["BLOCK_M"] == 128
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=100, inter=2048)["up"]["BLOCK_M"] == 64
    # the compile check covers the shipped per-GPU tables, not the user's
    base = configs.load_table()["mlp"]
    assert configs.entries("mlp")[:len(base)] == base
    assert [entry["up"]["BLOCK_M"] for entry in configs.entries("mlp")[len(base):]] == [64]


def test_base_table_only_ignores_the_per_gpu_tables(tables):
    _write(configs.user_configs_path(FAKE_GPU), {"device": FAKE_GPU, "mlp": [_entry(128)]})
    with configs.base_table_only():
        assert configs._pick("mlp", FAKE_GPU, rows_per_expert=8, inter=768) == \
            configs._pick("mlp", None, rows_per_expert=8, inter=768)
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=8, inter=768)["up"]["BLOCK_M"] == 128


def test_triton_configs_variable_replaces_the_per_gpu_tables(tables, monkeypatch):
    _write(configs.user_configs_path(FAKE_GPU), {"device": FAKE_GPU, "mlp": [_entry(128)]})
    monkeypatch.setenv("MOE_KERNELS_TRITON_CONFIGS", str(configs.TABLE_PATH))
    configs.clear_cache()
    assert configs.device_tables(FAKE_GPU) == ()


def test_malformed_per_gpu_table_is_refused_by_name(tables):
    path = configs.user_configs_path(FAKE_GPU)
    _write(path, {"device": FAKE_GPU, "route": []})
    with pytest.raises(ValueError, match="unknown keys.*route"):
        configs._pick("mlp", FAKE_GPU, rows_per_expert=1, inter=1)
    assert str(path) in str(pytest.raises(ValueError, configs.device_tables, FAKE_GPU).value)


def test_cpu_tensors_never_read_a_per_gpu_table():
    assert configs.device_name_of(torch.device("cpu")) is None
    assert configs.device_name_of(None) is None


def test_override_forces_one_entry_and_restores():
    forced = _entry(16)
    with configs.override("mlp", forced):
        assert configs.mlp_config(10 ** 6, 8, 14336) is forced
        assert configs.mlp_config(1, 8, 64, fp32=True) is not forced  # another family
    assert configs.mlp_config(10 ** 6, 8, 14336) is not forced


def test_rows_classes_tile_the_base_table():
    classes = tune.rows_classes()
    assert classes[0][0] is None and classes[-1][1] is None
    for (low, high), (next_low, _) in zip(classes, classes[1:]):
        assert next_low == high + 1
    for low, high in classes:
        for rows in tune.timing_rows(low, high):
            assert (low is None or rows >= low) and (high is None or rows <= high)
            assert configs.mlp_config(rows * 8, 8, 768) is configs._pick("mlp", None, rows_per_expert=rows, inter=768)
    assert len(tune.CANDIDATES) == len(classes)


@pytest.mark.parametrize("experts,top_k", [(7, 3), (5, 2), (128, 8), (8, 2), (3, 3), (257, 9)])
def test_tuning_tokens_fall_in_their_rows_class(experts, top_k, monkeypatch):
    """tune_shape times each class at T = rows*E//k tokens for its timing rows: the lookup (ceil(T*k/E) rows per
    expert) must pick that class's entry, or the candidates would replace another class's tiles."""
    seen = []
    monkeypatch.setattr(tune, "descend", lambda base, candidates, measure, deadline, log, **kw: seen.append(base) or
                        {"entry": dict(base), "times": {}, "rejected": {}, "complete": True})
    monkeypatch.setattr(tune, "Case", lambda *args, **kwargs: None)
    tuned = tune.tune_shape((64, 32, experts, top_k), torch.device("cpu"), log=lambda *a: None)
    assert seen[:-2] == configs.load_table()["mlp"]
    assert seen[-2] == configs.load_table()["mlp_decode"][0]  # then the decode path, at T*k <= its BLOCK_M
    assert tuned["mlp_decode"][0]["tuned_at"]["T"] == [t for t in tune.DECODE_TOKENS if t * top_k <= 64]
    assert seen[-1] == configs.load_table()["mlp_one_token"][0]  # then the one-token GEMVs (I = 32 takes them)
    assert tuned["mlp_one_token"][0]["tuned_at"]["T"] == [1]
    seen.clear()  # Mixtral's width takes the decode tiles for one token: no one-token descent
    assert tune.tune_shape((64, 14336, experts, top_k), torch.device("cpu"), log=lambda *a: None)["mlp_one_token"] == []


@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 100, 4096, 4097, 8191])
def test_warm_tokens_keep_the_specialisation(tokens, top_k):
    small = tune.warm_tokens(tokens, top_k)
    assert small <= 64
    assert ((small * top_k) % 16 == 0) == ((tokens * top_k) % 16 == 0)
    assert (small * top_k == 1) == (tokens * top_k == 1)


def _fake_measure(times: dict, wrong=(), broken=()):
    """measure(entry, kernel) for descend(): the time of the kernel's config label; outputs equal to a fixed
    reference, or off by 10% for the labels in ``wrong``; ``broken`` labels raise (a compile failure)."""
    reference = torch.linspace(1, 2, 64)
    calls = []

    def measure(entry, kernel):
        label = tune._label(entry[kernel])
        calls.append((kernel, label))
        if label in broken:
            raise RuntimeError("out of resource: shared memory")
        return times[label], (reference * (1.1 if label in wrong else 1.0),)

    return measure, calls


def test_descend_keeps_the_fastest_agreeing_candidate():
    base = configs.mlp_config(4096 * 8, 128, 768)
    gemm = tune.CANDIDATES[1]["gemm"]
    labels = [tune._label(cfg) for cfg in [base["up"], *gemm[:3]]]
    times = {label: 1.0 for label in [tune._label(c) for c in (*gemm, *tune.CANDIDATES[1]["dw"])]}
    times.update({labels[0]: 1.0, labels[1]: 0.5, labels[2]: 0.2, labels[3]: 0.7})
    times[tune._label(base["dw"])] = 1.0
    for kernel in tune.BACKWARD_KERNELS + ("down",):
        times.setdefault(tune._label(base[kernel]), 1.0)
    measure, calls = _fake_measure(times, wrong={labels[2]}, broken={labels[3]})
    result = tune.descend(base, {"up": gemm[:3]}, measure, log=lambda *a: None)
    assert result["entry"]["up"] == gemm[0]  # labels[2] was faster but disagreed; labels[3] did not compile
    assert "disagrees" in result["rejected"]["up"][labels[2]]
    assert "shared memory" in result["rejected"]["up"][labels[3]]
    assert result["complete"] and calls[0] == ("up", labels[0])  # the entry in force runs first: the reference
    for kernel in ("down", *tune.BACKWARD_KERNELS):
        assert result["entry"][kernel] == base[kernel]


def test_descend_keeps_the_entry_in_force_when_the_budget_is_spent():
    base = configs.mlp_config(4096 * 8, 128, 768)
    result = tune.descend(base, {"up": tune.CANDIDATES[1]["gemm"]}, lambda entry, kernel: (1.0, ()), deadline=0.0,
                          log=lambda *a: None)
    assert not result["complete"] and result["entry"]["up"] == base["up"] and "up" not in result["times"]


def test_merge_replaces_the_width_classes_tuned_and_keeps_the_others():
    old = {"device": FAKE_GPU, "mlp": [_entry(16, min_inter=None, max_inter=1024), _entry(32, min_inter=4097)]}
    new = [_entry(64, min_inter=None, max_inter=1024, min_rows_per_expert=17),
           _entry(128, min_inter=None, max_inter=1024, min_rows_per_expert=None)]
    decode = {"min_inter": 4097, "max_inter": None, "BLOCK_M": 64, "up": {}, "down": {}}
    table = tune.merge(old, {"mlp": new, "mlp_decode": [decode]}, FAKE_GPU, {"measured": True})
    assert [entry["up"]["BLOCK_M"] for entry in table["mlp"]] == [128, 64, 32]
    assert table["mlp_decode"] == [decode] and table["device"] == FAKE_GPU
    assert "mlp_decode" not in tune.merge(old, {"mlp": new}, FAKE_GPU, {})  # no empty family written


def test_shape_list_refuses_two_shapes_in_one_width_class_and_bad_sizes():
    assert tune._shape_list("qwen3-30b-a3b,mixtral-8x7b", []) == [tune.SHAPES["qwen3-30b-a3b"],
                                                                  tune.SHAPES["mixtral-8x7b"]]
    with pytest.raises(SystemExit, match="one width class"):
        tune._shape_list("qwen3-30b-a3b,olmoe", [])
    with pytest.raises(SystemExit, match="unknown shape"):
        tune._shape_list("llama", [])
    with pytest.raises(SystemExit, match="k <= E"):
        tune._shape_list("", ["64,32,2,4"])


def test_tune_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert tune.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_small_tuning_run_under_the_interpreter(monkeypatch):
    """tune_shape end to end on CPU tensors (the interpreter): one rows class, one alternative per kernel. Every
    kernel times its candidates and the entry it returns is one of them."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (no GPU)")
    monkeypatch.setattr(tune, "rows_classes", lambda: [(None, 16)])
    monkeypatch.setattr(tune, "DRY_RUN_CANDIDATES", {"gemm": [tune._gemm(32, 16, 16, 4, 2)],
                                                     "dw": [tune._outer(16, 16, 16, 4, 2)]})
    monkeypatch.setattr(tune, "DRY_RUN_DECODE_CANDIDATES", [tune._decode(16, 16, 4, 2)])
    lines = []
    tuned = tune.tune_shape((32, 24, 3, 2), torch.device("cpu"), dry_run=True, repeats=1, log=lines.append)
    (entry,) = tuned["mlp"]
    assert entry["min_rows_per_expert"] is None and entry["max_rows_per_expert"] == 16
    assert entry["max_inter"] == 1024 and entry["tuned_at"]["I"] == 24
    base = configs.mlp_config(16 * 3, 3, 24)
    for kernel in (*tune.FORWARD_KERNELS, *tune.BACKWARD_KERNELS):
        assert len(entry["relative"]) == 2 and entry["relative"]["after"][kernel] is not None, lines
        alternative = tune.DRY_RUN_CANDIDATES["dw" if kernel == "dw" else "gemm"][0]
        assert entry[kernel] in (base[kernel], alternative)
    assert entry["complete"] and not entry["rejected"]
    (one_token,) = tuned["mlp_one_token"]
    assert one_token["max_inter"] == 1024 and one_token["tuned_at"]["T"] == [1]
    for kernel in ("up", "down"):
        assert one_token["ms"]["after"][kernel] is not None, lines
        assert one_token[kernel] in (configs.one_token_config(False, 24)[kernel], *tune.DRY_RUN_ONE_TOKEN_CANDIDATES)
    (decode,) = tuned["mlp_decode"]
    assert decode["tuned_at"]["T"] == [1, 2] and decode["BLOCK_M"] == configs.decode_config(1)["BLOCK_M"]
    for kernel in ("up", "down"):
        assert decode["ms"]["after"][kernel] is not None, lines
        assert decode[kernel] in (configs.decode_config(1)[kernel], tune._decode(16, 16, 4, 2))


def test_compile_warm_up_pool_runs_jobs_in_spawned_workers():
    """The warm-up pool's plumbing (spawned workers, pickled jobs, errors reported per job) on CPU tensors under the
    interpreter: a good job of each mode passes, a job with a broken entry reports its error."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (no GPU)")
    shape = (32, 24, 3, 2, 2)
    entry = tune._kernel_entry(configs.mlp_config(4, 3, 24))
    broken = dict(entry, up={"BLOCK_M": 16})  # no BLOCK_N: a KeyError in the launcher
    jobs = [(shape, "mlp", entry, "forward"), (shape, "mlp", entry, "backward"),
            (shape, "mlp_decode", configs.decode_config(1), "decode"), (shape, "mlp", broken, "forward"),
            (shape[:4] + (1,), "mlp_one_token", configs.one_token_config(False, 24), "one_token")]
    lines = []
    failures = tune.warm_compile(jobs, 2, lines.append, device_type="cpu")
    assert list(failures) == [3] and "KeyError" in failures[3], (failures, lines)
    assert "compiled 5 candidate runs in 2 processes" in lines[-1]


def test_a_table_the_tuner_writes_is_read_back(tables):
    """merge()'s output, written where the tuner writes it, is what the lookups then return (both families)."""
    base = configs.mlp_config(64 * 8, 8, 14336)
    tuned_mlp = dict({"min_inter": 4097, "max_inter": None, "min_rows_per_expert": 17, "max_rows_per_expert": 256},
                     **tune._kernel_entry(base), tuned_at={"T": 512}, ms={"before": {}, "after": {}}, complete=True,
                     rejected={})
    tuned_mlp["up"] = tune._gemm(32, 64, 64, 4, 3)
    tuned_decode = {"min_inter": 4097, "max_inter": None, "BLOCK_M": 64, "up": tune._decode(64, 64, 4, 4),
                    "down": tune._decode(16, 256, 4, 4), "tuned_at": {"T": [1, 8]}}
    table = tune.merge(None, {"mlp": [tuned_mlp], "mlp_decode": [tuned_decode]}, FAKE_GPU, {"measured": True})
    tune._write(str(configs.user_configs_path(FAKE_GPU)), table)
    configs.clear_cache()
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=100, inter=14336)["up"] == tune._gemm(32, 64, 64, 4, 3)
    assert configs._pick("mlp", FAKE_GPU, rows_per_expert=300, inter=14336) == \
        configs._pick("mlp", None, rows_per_expert=300, inter=14336)
    assert configs._pick("mlp_decode", FAKE_GPU, inter=14336)["down"] == tune._decode(16, 256, 4, 4)


def test_each_rows_class_is_timed_near_both_ends():
    """The shipped classes (<= 16, 17..256, >= 257 rows per expert) are timed at two points inside each, and the
    token counts the tuner derives from them look up the class they tune."""
    classes = tune.rows_classes()
    assert classes == [(None, 16), (17, 256), (257, None)]
    assert [tune.timing_rows(low, high) for low, high in classes] == [(4, 16), (32, 256), (512, 1024)]
    for low, high in classes:
        for rows in tune.timing_rows(low, high):
            for experts, top_k in ((128, 8), (8, 2), (256, 8), (5, 2)):
                tokens = max(1, rows * experts // top_k)
                seen = -(-tokens * top_k // experts)
                assert (low or 1) <= seen <= (high or seen), (low, high, rows, experts, top_k)
    assert tune.timing_rows(1, 1) == (1, 1) and tune.timing_rows(None, 2) == (1, 2)


def test_program_orders_are_tried_beside_the_tiles_above_the_first_class(monkeypatch):
    """From the second rows class on, every kernel that takes a program order (GROUP_M) is offered the entry in
    force's tile in the other orders before the class's tiles; the first class (launch order, about one row tile per
    expert) and the weight-gradient kernel are not. The orders are told apart by the label the descent keys on."""
    tile = tune._gemm(64, 64, 64, 8, 3)
    assert [v["GROUP_M"] for v in tune.order_variants("up", tile)] == [0, 16]  # no GROUP_M: the default 8
    assert [v["GROUP_M"] for v in tune.order_variants("dx", dict(tile, GROUP_M=0))] == [8, 16]
    assert tune.order_variants("dw", tune._outer(64, 64, 32, 4, 3)) == []
    assert len(tune.order_variants("up", tile, dry_run=True)) == 1
    assert len({tune._label(tile), *(tune._label(v) for v in tune.order_variants("up", tile))}) == 3
    offered = []

    def recording_descend(base, candidates, measure, deadline=None, log=print, unit="ms"):
        offered.append((base, candidates))
        return {"entry": base, "times": {}, "rejected": {}, "complete": True}

    monkeypatch.setattr(tune, "descend", recording_descend)
    monkeypatch.setattr(tune, "rows_classes", lambda: [(None, 16), (17, None)])
    tune.tune_shape((32, 24, 3, 2), torch.device("cpu"), dry_run=True, repeats=1, log=lambda *a: None)
    (first_base, first), (second_base, second), _decode, _one_token = offered
    assert first == {kernel: tune.candidates_for(kernel, 0, True) for kernel in first}
    for kernel, cfgs in second.items():
        variants = tune.order_variants(kernel, second_base[kernel], dry_run=True)
        assert cfgs == variants + tune.candidates_for(kernel, 1, True)
        assert bool(variants) == (kernel in tune.ORDER_KERNELS)
    # compile-check --tune-candidates compiles the shipped tiles in every order too
    shipped = [entry["up"] for entry in configs.load_table()["mlp"][1:]]
    compiled = [entry["up"] for entry in tune.candidate_entries()]
    for cfg in shipped:
        for order in tune.GROUP_ORDERS:
            assert dict(cfg, GROUP_M=order) in compiled


def test_decode_cases_run_the_tiles_the_decode_entries_drive(monkeypatch):
    """The decode descent times the decode path's tiles ('mlp_decode') at every token count, one token included,
    where the one-token GEMVs would otherwise run and time nothing those entries drive; the switch is put back. The
    timer without a GPU is the plain one (replayed from a CUDA graph on a GPU: tests/test_gpu_no_sync.py)."""
    from moe_testing import on_triton_launch

    from moe_kernels.bench import timing

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (no GPU)")
    names = []
    on_triton_launch(monkeypatch, lambda name, args: names.append(name))
    monkeypatch.delenv("MOE_KERNELS_ONE_TOKEN", raising=False)
    case = tune.Case(32, 24, 3, 2, 1, torch.device("cpu"), torch.float32)
    ms, y = timing.replayed_median_ms(case.decode, 1, False)
    assert ms > 0 and y.shape == (1, 32)
    assert "_gate_up_kernel" in names and "_one_token_gate_up_kernel" not in names, names
    assert "MOE_KERNELS_ONE_TOKEN" not in os.environ
    names.clear()
    with torch.no_grad():
        case._run()  # outside the tuner's case: the one-token path, as a user's batch-1 decode
    assert names[0] == "_one_token_gate_up_kernel", names


def test_class_measure_scores_every_timing_point_alike():
    """Two timing points, the second ten times slower: a candidate 20% slower at the first and 10% faster at the
    second scores 1.2 + 0.9 = 2.1 against the entry in force's 2.0 (summed milliseconds would have preferred it)."""
    times = {("in force", 0): 1.0, ("in force", 1): 10.0, ("other", 0): 1.2, ("other", 1): 9.0}

    class FakeCase:
        def __init__(self, index):
            self.index = index

        def forward(self):
            return torch.zeros(1)

    current = {}

    def fake_median(fn, repeats, gpu):
        return times[(current["label"], fn.__self__.index)], fn()

    import moe_kernels.triton.tune as module
    original = module.median_call_ms
    module.median_call_ms = fake_median
    try:
        measure = tune._class_measure([FakeCase(0), FakeCase(1)], 3, False)
        scores = {}
        for label in ("in force", "other"):
            current["label"] = label
            scores[label] = measure({"up": {}}, "up")[0]
    finally:
        module.median_call_ms = original
    assert scores == pytest.approx({"in force": 2.0, "other": 2.1})


# ---- benchmarks/tuned_vs_shipped.py: which tuned entries beat the shipped tiles in a benchmark run ---------------

def _tuned_vs_shipped():
    from moe_testing import benchmark_script

    return benchmark_script("tuned_vs_shipped")


def _bench_row(case, tokens, pass_, provider, ms):
    return {"suite": "moe", "case": case, "tokens": str(tokens), "pass": pass_, "provider": provider, "ms": str(ms)}


def test_tuned_vs_shipped_maps_cells_to_entries_and_ships_only_clear_wins(tmp_path):
    tvs = _tuned_vs_shipped()
    qwen, mixtral = "Qwen3-30B-A3B", "Mixtral-8x7B"
    rows = []
    for case, tokens, pass_, tuned, shipped in [
            (qwen, 1, "fwd", 0.1, 1.0),  # T = 1 eager: left out (bound by the host's time to issue it)
            (qwen, 1, "fwd_graph", 0.8, 1.0),  # T = 1 replayed: the one-token GEMVs' entry (one cell: not shipped)
            (qwen, 8, "fwd", 0.9, 1.0),  # decode path, I <= 1024: with its CUDA-graph replay below, 2 cells
            (qwen, 8, "fwd_graph", 1.2, 1.0),  # ... of which this one loses: not shipped
            (qwen, 8, "fwdbwd", 0.9, 1.0), (qwen, 64, "fwd", 0.9, 1.0), (qwen, 64, "fwdbwd", 0.95, 1.0),  # <= 16 rows
            (qwen, 4096, "fwd", 0.8, 1.0), (qwen, 4096, "fwdbwd", 1.1, 1.0),  # 17..256 rows: one cell 10% slower
            (mixtral, 4096, "fwd", 1.0, 1.0), (mixtral, 4096, "fwdbwd", 1.0, 1.0)]:  # > 256 rows: no gain
        rows += [_bench_row(case, tokens, pass_, tvs.TUNED, tuned),
                 _bench_row(case, tokens, pass_, tvs.SHIPPED, shipped)]
    found = tvs.verdicts(rows)
    small = ("mlp", (None, 1024), (None, 16))
    assert set(found) == {("mlp_decode", (None, 1024)), small, ("mlp", (None, 1024), (17, 256)),
                          ("mlp", (4097, None), (257, None)), ("mlp_one_token", (None, 1024))}
    assert found[("mlp_one_token", (None, 1024))]["cells"] == [(qwen, 1, "fwd_graph", 0.8)]
    assert [cell[:3] for cell in found[small]["cells"]] == [(qwen, 8, "fwdbwd"), (qwen, 64, "fwd"),
                                                            (qwen, 64, "fwdbwd")]
    assert [cell[2] for cell in found[("mlp_decode", (None, 1024))]["cells"]] == ["fwd", "fwd_graph"]
    assert [key for key, verdict in found.items() if verdict["ship"]] == [small]
    tuned_table = {"device": "Fake GPU", "how": {}, "mlp": [
        {"min_inter": None, "max_inter": 1024, "min_rows_per_expert": None, "max_rows_per_expert": 16, "up": {}},
        {"min_inter": None, "max_inter": 1024, "min_rows_per_expert": 17, "max_rows_per_expert": 256, "up": {}}],
        "mlp_decode": [{"min_inter": None, "max_inter": 1024, "up": {}}],
        "mlp_one_token": [{"min_inter": None, "max_inter": 1024, "up": {}}]}
    kept = tvs.filtered_table(tuned_table, found)
    assert kept["mlp"] == tuned_table["mlp"][:1] and "mlp_decode" not in kept and kept["device"] == "Fake GPU"
    assert "mlp_one_token" not in kept
    # Mixtral's width takes the decode tiles for one token: its replayed T = 1 cells are the decode entry's
    assert tvs.entry_key(next(s for s in tvs.gpu_bench.MOE_SHAPES if s.name == mixtral), 1, "fwd_graph") == \
        ("mlp_decode", (4097, None))


def test_tuned_vs_shipped_writes_the_winners_into_a_folder_not_made_yet(tmp_path):
    """The lease plan's command writes into moe_kernels/triton/configs/, which holds no table yet: the script makes
    the folder, and the file holds the winning entry only."""
    tvs = _tuned_vs_shipped()
    qwen = "Qwen3-30B-A3B"
    rows = []
    for tokens, pass_, tuned in [(64, "fwd", 0.9), (64, "fwdbwd", 0.92), (4096, "fwd", 1.1), (4096, "fwdbwd", 1.1)]:
        rows += [_bench_row(qwen, tokens, pass_, tvs.TUNED, tuned), _bench_row(qwen, tokens, pass_, tvs.SHIPPED, 1.0)]
    bench_csv = tmp_path / "gpu_bench.csv"
    with open(bench_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    small = {"min_inter": None, "max_inter": 1024, "min_rows_per_expert": None, "max_rows_per_expert": 16,
             "up": {"BLOCK_M": 16}}
    middle = dict(small, min_rows_per_expert=17, max_rows_per_expert=256)
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"device": "Fake GPU", "how": {}, "mlp": [small, middle]}))
    out = tmp_path / "configs" / "Fake GPU.json"
    assert tvs.main([str(bench_csv), "--tuned", str(tuned), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mlp"] == [small]


def test_tuned_vs_shipped_on_the_h200_run_3_ships_nothing(tmp_path, capsys):
    """Run 3's tuned table lost to the shipped tiles in every entry with two or more cells (the reason it was not
    shipped): the script says so from the recorded run."""
    tvs = _tuned_vs_shipped()
    results = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_results")
    out = tmp_path / "filtered.json"
    assert tvs.main([os.path.join(results, "2026-11-27_h200_run3.csv"), "--tuned",
                     os.path.join(results, "2026-11-27_h200_run3_tuned_triton_configs.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SHIP " not in printed and "no entry won" in printed
    assert not out.exists()
