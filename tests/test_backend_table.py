"""The ``auto`` backend choice (moe_kernels/backend_table.py): shape classes, the shipped table (unmeasured
defaults, every class present), lookups by GPU model, the rules before the table, overrides, and
`moe-kernels info`'s table. Runs without a GPU (device queries monkeypatched)."""

from __future__ import annotations

import json

import pytest
import torch

import moe_kernels as mk
from moe_kernels import backend_table as bt
from moe_kernels import backends


@pytest.fixture(autouse=True)
def table_state_looked_at_every_call(monkeypatch):
    """These tests change the table's variables and files between calls: the state is looked at every time (the
    1 s recheck interval has its own test)."""
    monkeypatch.setattr(bt, "TABLE_RECHECK_S", 0.0)
    monkeypatch.setitem(bt._state_cache, "until", float("-inf"))


def test_shape_class_buckets():
    assert bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True) == \
        "moe_mlp|bfloat16|E<=128|H<=2048|T>1024|train"
    assert bt.shape_class("adapter_moe", torch.float16, 8, 4096, 1, False) == \
        "adapter_moe|float16|E<=8|H>2048|T<=8|infer"
    assert bt.shape_class("adapter_moe", torch.float16, 8, 4096, 9, False) == \
        "adapter_moe|float16|E<=8|H>2048|T<=64|infer"
    assert bt.shape_class("moe_mlp", torch.bfloat16, 9, 2049, 65, False) == "moe_mlp|bfloat16|E<=32|H>2048|T<=1024|infer"


def test_shipped_table_is_marked_unmeasured_and_complete():
    table = json.load(open(bt.TABLE_PATH))
    assert "UNMEASURED" in table["note"]
    star = [b for b in table["blocks"] if b["device"] == "*"]
    assert len(star) == 1 and star[0]["measured"] is False
    for block in table["blocks"]:
        for key, entry in block["entries"].items():
            assert entry["backend"] in bt.CHOICES, key
            assert entry["measured"] == ("ms" in entry and any(v is not None for v in entry["ms"].values())), key
    expected = {bt.shape_class(op, torch.bfloat16, e, w, t, g) for op in bt.TABLE_OPS for e in (8, 32, 128, 256)
                for w in (2048, 4096) for t in (1, 50, 1000, 5000) for g in (False, True)}
    assert all(bt.entry_for(star[0], key)[1] is not None for key in expected)  # decode: through its T<=64 class


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A table file with a measured block for 'Fake GPU' and a '*' block; the device name and grouped-GEMM
    status monkeypatched so that `choose` runs without a GPU."""
    from moe_kernels import native

    key = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True)
    table = {"format": 1, "note": "test", "blocks": [
        {"device": "*", "measured": False, "default": "triton", "entries": {}},
        {"device": "Fake GPU", "measured": True, "default": "triton",
         "entries": {key: {"backend": "cuda", "measured": True, "ms": {"triton": 2.0, "cuda": 1.0}}}}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("MOE_KERNELS_BACKEND_TABLE", str(path))
    monkeypatch.setattr(bt, "device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(native, "grouped_gemm_status", lambda device, dtype, experts: None)
    monkeypatch.setattr(bt, "_block_by_index", {})
    return torch.device("cuda", 0), path


def test_choose_reads_the_block_of_the_local_gpu(fake_gpu, monkeypatch):
    device, _ = fake_gpu
    both = ["triton", "cuda"]
    name, why = bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=both)
    assert name == "cuda" and "measured" in why
    assert bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, False, built=both)[0] == "triton"
    assert bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=["triton"])[0] == "triton"
    assert bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=["cuda"])[0] == "cuda"
    assert bt.choose("route", device, torch.bfloat16, 128, 2048, 4096, True, built=both)[0] == "triton"
    from moe_kernels import native

    monkeypatch.setattr(native, "grouped_gemm_status", lambda device, dtype, experts: "fp32 (test)")
    name, why = bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=both)
    assert name == "triton" and "no fast grouped GEMM" in why


def test_other_gpu_takes_the_star_block(fake_gpu, monkeypatch):
    device, _ = fake_gpu
    monkeypatch.setattr(bt, "device_name", lambda device=None: "Other GPU")
    monkeypatch.setattr(bt, "_block_by_index", {})
    assert bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=["triton", "cuda"])[0] == "triton"


def test_write_block_replaces_the_local_block(fake_gpu):
    _, path = fake_gpu
    bt.write_block({"device": "Fake GPU", "measured": True, "default": "cuda", "entries": {}}, str(path))
    table = json.loads(path.read_text())
    assert [b["device"] for b in table["blocks"]] == ["*", "Fake GPU"]
    assert table["blocks"][1]["default"] == "cuda"


def test_describe_shows_the_block_in_force(fake_gpu):
    lines = bt.describe()
    assert "Fake GPU" in lines[1] and "measured" in lines[1]
    assert any("cuda" in line and "1.0 ms" in line for line in lines[3:])


@pytest.fixture
def user_cache(monkeypatch, tmp_path):
    """No MOE_KERNELS_BACKEND_TABLE; the user's cache table in a temporary folder; 'Fake GPU' as the local GPU."""
    from moe_kernels import native

    monkeypatch.delenv("MOE_KERNELS_BACKEND_TABLE", raising=False)
    monkeypatch.setenv("MOE_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bt, "device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(native, "grouped_gemm_status", lambda device, dtype, experts: None)
    monkeypatch.setattr(bt, "_block_by_index", {})
    return tmp_path / "cache" / "backend_table.json"


def _measured_block(device, key, backend):
    return {"device": device, "measured": True, "default": "triton",
            "entries": {key: {"backend": backend, "measured": True, "ms": {"triton": 2.0, "cuda": 1.0}}}}


def test_the_users_tuned_table_answers_for_its_gpu_model(user_cache, monkeypatch, tmp_path):
    key = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True)
    device, both = torch.device("cuda", 0), ["triton", "cuda"]
    assert bt.block_in_force("Fake GPU") == (bt.block_for("Fake GPU", bt.load_table(bt.TABLE_PATH)), bt.TABLE_PATH)
    assert bt.write_block(_measured_block("Fake GPU", key, "cuda"), bt.user_table_path()) == str(user_cache)
    assert bt.block_in_force("Fake GPU")[1] == str(user_cache)
    assert bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=both)[0] == "cuda"
    assert bt.describe()[0] == f"backend table {user_cache}"
    # another GPU model: the shipped table
    assert bt.block_in_force("Other GPU")[1] == bt.TABLE_PATH
    # MOE_KERNELS_BACKEND_TABLE names the only table read
    other = tmp_path / "other.json"
    bt.write_block(_measured_block("Fake GPU", key, "triton"), str(other))
    monkeypatch.setenv("MOE_KERNELS_BACKEND_TABLE", str(other))
    monkeypatch.setattr(bt, "_block_by_index", {})
    assert bt.block_in_force("Fake GPU")[1] == str(other)
    assert bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=both)[0] == "triton"


def test_tune_writes_the_users_table(user_cache, monkeypatch, capsys):
    from moe_kernels.cli import main

    key = bt.shape_class("adapter_moe", torch.bfloat16, 8, 4096, 1, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tune"]) == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not user_cache.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(bt, "measure", lambda budget, repeats, ops: calls.append((budget, repeats, ops))
                        or _measured_block("Fake GPU", key, "cuda"))
    assert main(["tune", "--budget", "3", "--ops", "adapter_moe"]) == 0
    assert calls == [(3.0, 5, ("adapter_moe",))]
    assert json.loads(user_cache.read_text())["blocks"][0]["entries"][key]["backend"] == "cuda"
    assert f"backend table {user_cache}" in capsys.readouterr().out


def test_auto_on_cpu_and_overrides(monkeypatch):
    x, router = torch.randn(6, 8), torch.randn(8, 4)
    weights, ids = mk.route(x @ router, 2, backend="auto")
    w1, w2 = torch.randn(4, 6, 8) * 0.3, torch.randn(4, 8, 3) * 0.3
    ref = mk.moe_mlp(x, w1, w2, weights, ids, backend="reference")
    torch.testing.assert_close(mk.moe_mlp(x, w1, w2, weights, ids, backend="auto"), ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "auto")
    torch.testing.assert_close(mk.moe_mlp(x, w1, w2, weights, ids), ref, rtol=1e-4, atol=1e-5)
    assert backends.auto_backend_name(torch.device("cpu"), "moe_mlp", {})[0] == backends.default_backend_name(
        torch.device("cpu"))
    with pytest.raises(mk.BackendError, match="auto"):
        mk.moe_mlp(x, w1, w2, weights, ids, backend="fastest")


def test_info_prints_the_table(capsys):
    from moe_kernels.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend table" in out and "UNMEASURED" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures on a GPU")
def test_measure_writes_a_block(tmp_path):
    """The tuner on a real GPU, with a tiny budget: every class gets an entry, the first ones measured."""
    block = bt.measure(budget_s=1.0, repeats=2, ops=("adapter_moe",))
    assert block["measured"] and block["device"] == torch.cuda.get_device_name()
    assert any(entry["measured"] for entry in block["entries"].values())
    path = bt.write_block(block, str(tmp_path / "t.json"))
    assert json.loads(open(path).read())["blocks"][-1]["device"] == block["device"]


# ---- caches of the auto choice (host time per call): never stale ------------------------------------------------

def _choice(device):
    return bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 4096, True, built=["triton", "cuda"])


def test_choice_cache_follows_the_table_variable_and_the_file(fake_gpu, monkeypatch, tmp_path):
    device, path = fake_gpu
    calls = []
    uncached = bt._choose_uncached
    monkeypatch.setattr(bt, "_choose_uncached", lambda *args: calls.append(args) or uncached(*args))
    assert _choice(device)[0] == "cuda" and _choice(device)[0] == "cuda"
    assert len(calls) == 1  # the second call is answered from the cache
    # another table named by MOE_KERNELS_BACKEND_TABLE: read at once
    key = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": 1, "blocks": [_measured_block("Fake GPU", key, "triton")]}))
    monkeypatch.setenv("MOE_KERNELS_BACKEND_TABLE", str(other))
    assert _choice(device)[0] == "triton"
    monkeypatch.setenv("MOE_KERNELS_BACKEND_TABLE", str(path))
    assert _choice(device)[0] == "cuda"
    # the file rewritten behind the cache's back (another process: no write_block here)
    table = json.loads(path.read_text())
    table["blocks"][1]["entries"][key]["backend"] = "triton"
    table["note"] = "rewritten by another process"  # another size, whatever the file system's mtime resolution
    path.write_text(json.dumps(table))
    assert _choice(device)[0] == "triton"


def test_choice_cache_follows_the_users_table(user_cache, monkeypatch, tmp_path):
    key = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True)
    device = torch.device("cuda", 0)
    assert _choice(device)[0] == "triton"  # no user table yet: the shipped '*' block
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text(json.dumps({"format": 1, "blocks": [_measured_block("Fake GPU", key, "cuda")]}))
    assert _choice(device)[0] == "cuda"  # written by `moe-kernels tune` in another process
    monkeypatch.setenv("MOE_KERNELS_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert _choice(device)[0] == "triton"
    monkeypatch.setenv("MOE_KERNELS_CACHE_DIR", str(user_cache.parent))
    assert _choice(device)[0] == "cuda"


def test_user_table_path_follows_its_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_KERNELS_CACHE_DIR", str(tmp_path / "a"))
    assert bt.user_table_path() == str(tmp_path / "a" / "backend_table.json")
    monkeypatch.delenv("MOE_KERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bt.user_table_path() == str(tmp_path / "xdg" / "moe_kernels" / "backend_table.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bt.user_table_path() == str(tmp_path / "home" / ".cache" / "moe_kernels" / "backend_table.json")
    monkeypatch.setenv("MOE_KERNELS_CACHE_DIR", "")  # empty reads as unset
    assert bt.user_table_path() == str(tmp_path / "home" / ".cache" / "moe_kernels" / "backend_table.json")


def test_choice_is_a_constant_under_torch_compile(fake_gpu):
    device, _ = fake_gpu

    def pick(x):
        name, _ = _choice(device)
        return x + 1 if name == "cuda" else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))


@pytest.fixture
def fake_cuda_auto(fake_gpu, monkeypatch):
    """fake_gpu, with the cuda backend reported as built, so that auto on CUDA chooses between triton and cuda."""
    from moe_kernels import native

    if "triton" not in backends.available_backends():
        pytest.skip("triton not installed")
    monkeypatch.setattr(native, "_CUDA_UNAVAILABLE", None)
    monkeypatch.setattr(backends, "_auto_built_by_device", {})
    monkeypatch.setattr(backends, "_default_by_device", {})
    return fake_gpu[0]


def test_auto_on_cuda_builds_the_shape_only_to_choose_by_it(fake_cuda_auto, monkeypatch):
    device = fake_cuda_auto
    shape = dict(dtype=torch.bfloat16, experts=128, width=2048, tokens=4096, grad=True)
    asked = []

    def lazy():
        asked.append(1)
        return shape

    assert backends.auto_backend_name(device, "moe_mlp", lazy)[0] == "cuda" and asked == [1]
    assert backends.auto_backend_name(device, "moe_mlp", shape)[0] == "cuda"
    assert backends.resolve_backend("auto", device, "moe_mlp", lazy).name == "cuda" and asked == [1, 1]
    assert backends.resolve_backend("triton", device, "moe_mlp", lazy).name == "triton" and asked == [1, 1]
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "cuda")
    assert backends.resolve_backend(None, device, "moe_mlp", lazy).name == "cuda" and asked == [1, 1]
    monkeypatch.setenv("MOE_KERNELS_BACKEND", "auto")
    assert backends.resolve_backend(None, device, "moe_mlp", lazy).name == "cuda" and asked == [1, 1, 1]


def test_built_backends_per_device_are_cached_and_cleared(fake_cuda_auto, monkeypatch):
    device = fake_cuda_auto
    shape = dict(dtype=torch.bfloat16, experts=128, width=2048, tokens=4096, grad=True)
    assert backends.auto_backend_name(device, "moe_mlp", shape)[0] == "cuda"
    assert backends._auto_built_by_device[device] == ("triton", "cuda")
    from moe_kernels import native

    monkeypatch.setattr(native, "_CUDA_UNAVAILABLE", "not built (test)")
    backends.clear_caches()
    assert backends.auto_backend_name(device, "moe_mlp", shape) == ("triton", "one backend built")
    assert backends.default_backend_name(device) == "triton"


def test_auto_routes_on_cuda_where_it_is_built(fake_cuda_auto, monkeypatch):
    """route() has no shape table: auto takes cuda, faster in every routing case measured on the H100 and H200."""
    device = fake_cuda_auto
    assert backends.auto_backend_name(device, "route") == ("cuda", backends.ROUTE_ON_CUDA_WHY)
    assert backends.resolve_backend("auto", device, "route").name == "cuda"
    assert backends.resolve_backend("triton", device, "route").name == "triton"  # backend= still decides
    from moe_kernels import native

    monkeypatch.setattr(native, "_CUDA_UNAVAILABLE", "not built (test)")
    backends.clear_caches()
    assert backends.auto_backend_name(device, "route")[0] == "triton"


# ---- the block written from a gpu_bench.py run (benchmarks/backend_block_from_bench.py) ----------------------

def _bench_module():
    from moe_testing import benchmark_script

    return benchmark_script("backend_block_from_bench")


def _row(provider, case, tokens, pass_, ms, suite="moe", device="Fake GPU"):
    return dict(device=device, torch="2.11.0+cu130", triton="3.6.0", suite=suite, case=case, tokens=str(tokens),
                provider=provider, **{"pass": pass_}, ms=str(ms))


def test_block_from_bench_sums_each_class_and_picks_the_faster():
    fb = _bench_module()
    rows = [_row("moe_kernels:triton", "Qwen3-30B-A3B", 1, "fwd", 1.0),
            _row("moe_kernels:cuda", "Qwen3-30B-A3B", 1, "fwd", 2.0),
            _row("moe_kernels:triton", "OLMoE", 8, "fwd", 2.0), _row("moe_kernels:cuda", "OLMoE", 8, "fwd", 0.5),
            _row("hf:grouped_mm", "OLMoE", 8, "fwd", 0.1),  # a peer decides nothing
            _row("moe_kernels:triton", "Mixtral-8x7B", 4096, "fwdbwd", 9.0),  # one backend only: no entry
            _row("moe_kernels:triton", "LoRA r=64 E=8 k=2", 8192, "fwdbwd", 1.0, suite="adapter"),
            _row("moe_kernels:cuda", "LoRA r=64 E=8 k=2", 8192, "fwdbwd", 1.5, suite="adapter")]
    block = fb.block_from_rows(rows, default="cuda")
    assert block["device"] == "Fake GPU" and block["default"] == "cuda" and block["measured"]
    decode = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 1, False)
    assert decode == bt.shape_class("moe_mlp", torch.bfloat16, 64, 2048, 8, False)  # one class: summed
    assert block["entries"][decode]["ms"] == {"triton": 3.0, "cuda": 2.5}
    assert block["entries"][decode]["backend"] == "cuda"
    lora = bt.shape_class("adapter_moe", torch.bfloat16, 8, 4096, 8192, True)
    assert block["entries"][lora]["backend"] == "triton"
    assert set(block["entries"]) == {decode, lora}
    with pytest.raises(ValueError, match="one device"):
        fb.block_from_rows(rows + [_row("moe_kernels:cuda", "OLMoE", 8, "fwd", 0.5, device="Other GPU")])


def test_block_from_bench_on_the_recorded_h200_run_agrees_with_the_measured_block():
    """The script's block from the H200 run 2 benchmark and the block --write measured on the same card (run 3)
    choose the same backend for Mixtral-size decode (triton) and fine-grained training at large T (cuda); they
    differ in 4 of the 18 classes the benchmark covered, by small margins (benchmarks/RESULTS_GPU.md)."""
    import csv
    import os

    fb = _bench_module()
    here = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_results")
    with open(os.path.join(here, "2026-11-27_h200_run2.csv"), newline="") as f:
        from_bench = fb.block_from_rows(list(csv.DictReader(f)), default="cuda")
    measured = json.load(open(os.path.join(here, "2026-11-27_h200_run3_backend_table_block.json")))
    mixtral_decode = bt.shape_class("moe_mlp", torch.bfloat16, 8, 4096, 1, False)
    qwen_train = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True)
    for block in (from_bench, measured):  # the run-3 block predates the decode bucket: its T<=64 classes answer
        assert bt.entry_for(block, mixtral_decode)[1]["backend"] == "triton"
        assert bt.entry_for(block, qwen_train)[1]["backend"] == "cuda"


def test_shipped_h200_block_is_the_measured_one():
    """The shipped NVIDIA H200 block is the one backend_table --write measured on the H200 (run 3, recorded in
    benchmarks/gpu_results), every class measured; its default is the majority rule's, nothing edited by hand."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_results",
                        "2026-11-27_h200_run3_backend_table_block.json")
    recorded = json.load(open(path))
    shipped = bt.block_for("NVIDIA H200", json.load(open(bt.TABLE_PATH)))
    assert shipped["entries"] == recorded["entries"]
    assert all(row["measured"] for row in shipped["entries"].values()) and len(shipped["entries"]) == 96
    assert shipped["default"] == bt.majority_backend(recorded["entries"]) == "cuda"


def test_majority_backend_counts_measured_classes_only():
    rows = {"a": {"backend": "cuda", "measured": True}, "b": {"backend": "cuda", "measured": True},
            "c": {"backend": "triton", "measured": True}, "d": {"backend": "triton", "measured": False},
            "e": {"backend": "triton", "measured": False}}
    assert bt.majority_backend(rows) == "cuda"
    assert bt.majority_backend({}) == "triton"  # nothing measured: the previous default
    assert bt.majority_backend({"a": rows["a"], "c": rows["c"]}) == "triton"  # a tie


def test_table_state_is_looked_at_again_after_the_recheck_interval(fake_gpu, monkeypatch):
    """auto asks for the table state on every op call: within TABLE_RECHECK_S it is not read again (no variable
    read, no stat), after it a rewritten file or a changed variable is seen."""
    device, path = fake_gpu
    clock = [100.0]
    monkeypatch.setattr(bt.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(bt, "TABLE_RECHECK_S", 1.0)
    stamps = []
    file_stamp = bt._file_stamp
    monkeypatch.setattr(bt, "_file_stamp", lambda p: stamps.append(p) or file_stamp(p))
    assert _choice(device)[0] == "cuda"
    assert _choice(device)[0] == "cuda" and len(stamps) == 1
    key = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 4096, True)
    table = json.loads(path.read_text())
    table["blocks"][1]["entries"][key]["backend"] = "triton"
    table["note"] = "rewritten by another process"
    path.write_text(json.dumps(table))
    clock[0] += 0.5
    assert _choice(device)[0] == "cuda" and len(stamps) == 1  # within the interval: the cached answer
    clock[0] += 0.6
    assert _choice(device)[0] == "triton" and len(stamps) == 2
    monkeypatch.delenv("MOE_KERNELS_BACKEND_TABLE")  # the shipped table: no 'Fake GPU' block, the '*' one
    clock[0] += 1.1
    assert _choice(device)[0] == "triton" and len(stamps) == 3
    bt.write_block({"device": "Fake GPU", "measured": True, "default": "cuda", "entries": {}}, str(path))
    assert bt._state_cache["until"] == float("-inf")  # write_block: looked at again on the next call


def test_a_decode_class_falls_back_to_its_t64_class_then_to_the_default():
    """T <= 8 is its own class (triton's decode path runs there, not at the T = 16 shape that measures T <= 64);
    a block without it, as every block measured before the bucket existed, answers with the T <= 64 class."""
    decode = bt.shape_class("moe_mlp", torch.bfloat16, 8, 4096, 2, False)
    enclosing = bt.shape_class("moe_mlp", torch.bfloat16, 8, 4096, 16, False)
    assert decode.endswith("|T<=8|infer") and enclosing.endswith("|T<=64|infer")
    only_64 = {"entries": {enclosing: {"backend": "cuda", "measured": True}}}
    assert bt.entry_for(only_64, decode) == (enclosing, {"backend": "cuda", "measured": True})
    both = {"entries": {enclosing: {"backend": "cuda"}, decode: {"backend": "triton"}}}
    assert bt.entry_for(both, decode) == (decode, {"backend": "triton"})
    assert bt.entry_for(both, enclosing) == (enclosing, {"backend": "cuda"})
    larger = bt.shape_class("moe_mlp", torch.bfloat16, 8, 4096, 100, False)
    assert bt.entry_for(only_64, larger) == (larger, None)  # only the decode bucket falls back
    assert bt.representative_shape("moe_mlp", "<=128", "<=2048", "<=8")["T"] * 8 <= 64  # decode path at k = 8


def test_choose_takes_the_t64_entry_for_an_unmeasured_decode_class(fake_gpu, monkeypatch):
    device, path = fake_gpu
    decode = bt.shape_class("moe_mlp", torch.bfloat16, 128, 2048, 1, False)
    enclosing = decode.replace("|T<=8|", "|T<=64|")
    table = json.loads(path.read_text())
    table["blocks"][1]["entries"][enclosing] = {"backend": "cuda", "measured": True, "ms": {"triton": 2.0, "cuda": 1.0}}
    path.write_text(json.dumps(table))
    backend, why = bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 1, False, ["triton", "cuda"])
    assert backend == "cuda" and why.startswith(enclosing)
    table["blocks"][1]["entries"][decode] = {"backend": "triton", "measured": True, "ms": {"triton": 1.0, "cuda": 2.0}}
    path.write_text(json.dumps(table))
    backend, why = bt.choose("moe_mlp", device, torch.bfloat16, 128, 2048, 1, False, ["triton", "cuda"])
    assert backend == "triton" and why.startswith(decode)
