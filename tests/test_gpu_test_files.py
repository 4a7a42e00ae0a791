"""tests/gpu_test_files.txt, the list benchmarks/gpu_check.sh runs on a GPU, names every test file that runs a GPU
backend on CUDA tensors when a GPU is present, and only files that exist. A file left out would pass CI under the
interpreter and never run on a GPU (as tests/test_ungated_experts.py and tests/test_spec.py did until this check)."""

from __future__ import annotations

import pathlib
import re

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# What puts a test on a GPU: moe_testing's helpers, or a test's own CUDA check.
GPU_USE = re.compile(r"\b(backends_under_test|device_for|GPU_BACKENDS|needs_cuda_kernels|CUDA_KERNELS)\b"
                     r"|torch\.cuda\.is_available\(\)|from moe_testing import[^\n]*\bGPU\b")
# Files that match GPU_USE without running anything on a GPU, and why.
NOT_GPU = {
    "tests/test_triton_tune.py": "its CUDA check only skips the no-GPU message test on a GPU",
    "tests/test_gpu_test_files.py": "this file (the patterns above)",
}


def listed() -> list[str]:
    lines = (line.split("#")[0].strip() for line in (TESTS / "gpu_test_files.txt").read_text().splitlines())
    return [line for line in lines if line]


def test_every_file_that_runs_a_gpu_backend_is_listed():
    uses_gpu = sorted(str(path.relative_to(ROOT)) for path in TESTS.rglob("test_*.py")
                      if GPU_USE.search(path.read_text()))
    names = set(listed())
    missing = [name for name in uses_gpu if name not in names and name not in NOT_GPU]
    assert not missing, f"add to tests/gpu_test_files.txt (or NOT_GPU with a reason): {missing}"
    assert "tests/test_moe_mlp.py" in uses_gpu  # the pattern still finds the helpers' users


def test_the_list_names_existing_files_once():
    names = listed()
    assert len(names) == len(set(names))
    assert [name for name in names if not (ROOT / name).is_file()] == []
    assert not set(names) & set(NOT_GPU)


def test_gpu_check_runs_the_list():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "tests/gpu_test_files.txt" in script


def test_carried_wheels_follow_the_pinned_versions():
    """benchmarks/carried_wheels.sh (the wheels a lent GPU machine lacks) carries the pinned transformers and hub, and
    the packages gpu_check.sh needs that the machine does not have."""
    import subprocess

    listed = subprocess.run(["bash", str(ROOT / "benchmarks" / "carried_wheels.sh"), "--list"], check=True,
                            capture_output=True, text=True).stdout.split()
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("transformers", "huggingface_hub"):
        assert f"{name}=={pins[name]}" in listed, (name, listed)
    names = {line.split("==")[0] for line in listed}
    assert {"liger-kernel", "pytest-xdist", "execnet", "expecttest"} <= names
