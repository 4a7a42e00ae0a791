#!/usr/bin/env bash
# The whole GPU check of moe_kernels, from a clean checkout on a machine with torch, triton and nvcc:
#   1. builds moe_kernels._C in place for the local GPU's arch (C++ CPU ops + CUDA sources);
#   2. runs the test suite on the GPU: the C++ crash probes alone first, then every triton/cuda test on CUDA tensors;
#   3. times the host side of each op (benchmarks/host_overhead.py: what the CPU spends issuing a decode step);
#   4. with --tune: tunes the Triton expert-MLP tiles for this GPU (moe-kernels tune --triton);
#   5. runs benchmarks/gpu_bench.py (peers side by side, roofline floor, peak memory, oracle agreement);
#   6. with --breakdown: the kernels of one moe_mlp call, by time (benchmarks/kernel_breakdown.py: why a case is far
#      from its floor);
#   7. with --tune or --table: measures the auto backend table; with --hf-speed: the whole-model example.
# The CPU-only test files are left to CI.
# About 8 minutes on one H100/H200 without --tune; --total-s caps the whole run. Logs, CSV and Markdown go to --out
# (default $OUT when set, else benchmarks/results_gpu); the summary prints last.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--bench-budget-s 200] [--tests-timeout-s 300] [--total-s 0] [--skip-tests]
#                                [--skip-bench] [--tune] [--table] [--breakdown] [--hf-speed] [-- GPU_BENCH_ARGS]
#     --total-s   the whole run's time limit (0: none): each step's timeout shrinks to what is left and steps that no
#                 longer fit are skipped and listed (order: build, tests, host time, Triton tuning, benchmark, kernel
#                 breakdown, auto table, whole model). A lent machine runs one command for at most 600 s: use --total-s 560 there.
#     --tune      tune this GPU before the benchmark: the Triton tile configs (moe-kernels tune --triton, written to
#                 the user cache and copied to --out), then the auto backend table (python -m moe_kernels.backend_table
#                 --write); the benchmark then runs the tuned configs beside the shipped ones
#     --table     measure the auto backend table only (--tune's second half, without the Triton tile tuner)
#     --breakdown after the benchmark, profile the kernels of moe_mlp at Qwen3 T=64/4096/16384 and Mixtral T=1/4096
#                 on cuda and triton, forward and forward+backward (kernel_breakdown.md: time per kernel, launches,
#                 the share of each call the GPU sat idle)
#     --hf-speed  end with integration/example_hf_speed.py in bf16 (patched vs unpatched whole model), eager (with
#                 one decode step of each profiled: kernels, their time, GPU idle share; and the patched decode also
#                 replayed from CUDA graphs, --decode-graphs) and then with transformers' compiled static-cache
#                 decoding (--compile)
#   bash benchmarks/gpu_check.sh --dry-run   # no GPU: CPU build, interpreter, tiny shapes (CI runs this)
# Environment: GPU_TEST_WORKERS (pytest-xdist workers for the GPU tests, default 12), MAX_JOBS (build jobs, default
# 16), PYTHON (the interpreter, default python3), OUT (the default --out).
#
# Wheels missing on the GPU machine (no network there) are installed from .whl/ when that folder exists. The
# lent machines have transformers 5.17, below the supported floor (5.21): carry the pinned one too. Before the
# lease, on a machine with network: `bash benchmarks/carried_wheels.sh` (the list: its --list). If the carried set
# does not import, the machine's own transformers is used and the run says so. (pytest-xdist and execnet let the
# GPU tests run on several workers: the op files also run their CPU backends there.)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results_gpu}
dry=0 skip_tests=0 skip_bench=0 tune=0 table=0 breakdown=0 hf_speed=0 bench_budget=200 tests_timeout=300 total=0 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --bench-budget-s) bench_budget=$2; shift ;;
    --tests-timeout-s) tests_timeout=$2; shift ;;
    --total-s) total=$2; shift ;;
    --skip-tests) skip_tests=1 ;;
    --skip-bench) skip_bench=1 ;;
    --tune) tune=1 ;;
    --table) table=1 ;;
    --breakdown) breakdown=1 ;;
    --hf-speed) hf_speed=1 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
start=$(date +%s)
status=0
step() { echo; echo "=== $* ($(( $(date +%s) - start ))s)"; }
skipped_steps=""
skipped() { skipped_steps="$skipped_steps, $1"; echo; echo "=== skipped (time budget): $1"; }
# cap SECONDS: the step's time limit, SECONDS or less when --total-s leaves less (15 s kept for the summary);
# fails (no output) when under 20 s are left, and the step is skipped
cap() {
  local want=$1 left
  if [ "$total" -gt 0 ]; then
    left=$(( total - ($(date +%s) - start) - 15 ))
    [ $left -lt $want ] && want=$left
  fi
  [ $want -ge 20 ] && echo $want
}
python=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  step "install carried wheels"
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moe_site .whl/*.whl \
    && export PYTHONPATH=/tmp/moe_site${PYTHONPATH:+:$PYTHONPATH}
  # a carried transformers that cannot import (its hub too old, a wheel missing) must not take the run down with it:
  # fall back to the machine's own packages and say so
  if ! $python -c "import transformers" 2> "$out/carried_wheels.log"; then
    tail -3 "$out/carried_wheels.log"
    echo "gpu_check: the carried wheels do not import together; the machine's transformers is used"
    rm -rf /tmp/moe_site
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/moe_site \
      $(ls .whl/*.whl | grep -vE "transformers|huggingface_hub") || true
  fi
fi

step "environment"
$python - <<'EOF'
import importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for m in ("triton", "transformers", "peft", "liger_kernel"):
    try:
        __import__(m)  # importable, and its installed version (liger_kernel has no __version__)
        print(m, importlib.metadata.version(m.replace("_", "-")))
    except Exception as e:
        print(m, "absent", type(e).__name__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
# more than one libstdc++ in one process can break C++ exceptions (tests/backends/test_native_contract.py)
print("libstdc++ loaded:", sorted({line.split()[-1] for line in open("/proc/self/maps") if "libstdc++" in line}))
EOF

if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1 MOE_KERNELS_BUILD_CUDA=0
  if ! $python -c "import moe_kernels._C" 2> /dev/null; then
    step "build (CPU ops only: dry run)"
    $python setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
  fi
  step "tests (dry run: the GPU-only tests skip, the triton adapter opcheck and no-sync files under the interpreter)"
  $python -m pytest -q -p no:cacheprovider tests/test_gpu_no_sync.py tests/test_adapter_moe.py \
    -k "triton_adapter_opcheck or no_sync or graph" \
    2>&1 | tee "$out/tests.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  step "host time per call (dry run: Triton launches stubbed; log: $out/host_overhead.log)"
  $python benchmarks/host_overhead.py --calls 50 > "$out/host_overhead.log" 2>&1 || { tail -30 "$out/host_overhead.log"; status=1; }
  tail -8 "$out/host_overhead.log"
  step "tune the Triton configs (dry run: tiny shape, interpreter; log: $out/tune_triton.log)"
  $python -m moe_kernels.triton.tune --dry-run --out "$out/triton_configs_dry_run.json" > "$out/tune_triton.log" 2>&1 \
    || { tail -30 "$out/tune_triton.log"; status=1; }
  tail -3 "$out/tune_triton.log"
  step "bench (dry run)"
  $python benchmarks/gpu_bench.py --dry-run --out "$out" --suites moe,forms,llama4 --shapes tiny-k1 > "$out/bench.log" 2>&1 \
    || { tail -30 "$out/bench.log"; status=1; }
  tail -12 "$out/bench.log"
  step "kernel breakdown (dry run: CPU operators, not kernels)"
  $python benchmarks/kernel_breakdown.py --dry-run --out "$out" --tokens 1 --iters 2 > "$out/kernel_breakdown.log" 2>&1 \
    || { tail -30 "$out/kernel_breakdown.log"; status=1; }
  grep "^\[kernel_breakdown\]" "$out/kernel_breakdown.log" | tail -3
  step "dry run done: status $status"
  exit $status
fi

arch=$($python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')") || {
  echo "gpu_check: no GPU visible to torch (use --dry-run)" >&2; exit 2; }

step "build moe_kernels._C for sm_${arch/./} (log: $out/build.log)"
export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-16} MOE_KERNELS_BUILD_CUDA=1
if ! $python setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "gpu_check: build failed"; exit 1
fi
$python -c "import moe_kernels; print('backends:', moe_kernels.available_backends())"

if [ $skip_tests = 0 ]; then
  # every test file that runs a GPU backend, in run order (tests/gpu_test_files.txt; the CPU-only files run in CI);
  # -n: pytest-xdist where installed
  gpu_tests=$(sed -e 's/#.*//' tests/gpu_test_files.txt | xargs ls 2>/dev/null)
  # First, alone and in seconds, the checks that a C++ op's error raises instead of crashing (they crashed on the
  # H200 of run 3): their output, native stacks included, must come back even when the whole list runs out of time.
  if t=$(cap 90); then
    step "crash probes: C++ op errors raise, not crash (log: $out/tests_crash_probes.log)"
    timeout "$t" $python -m pytest tests/backends/test_native_contract.py tests/test_errors.py -q -p no:cacheprovider \
      -o addopts="-ra" -k "never_crash or native_stack or traced_float" > "$out/tests_crash_probes.log" 2>&1 \
      || status=1
    grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests_crash_probes.log" | tail -8
  fi
  if t=$(cap "$tests_timeout"); then
    step "tests on the GPU: $(echo $gpu_tests | wc -w) files, at most ${t}s (log: $out/tests.log)"
    # worksteal: an idle worker takes queued tests from a busy one, so a few long tests do not hold the end
    test_workers=${GPU_TEST_WORKERS:-12}
    workers=$($python -c "import xdist" 2>/dev/null && echo "-n $test_workers --dist worksteal" || echo "")
    # One CPU share per worker: each worker's torch would otherwise start as many OpenMP threads as the machine has
    # cores (16 workers x 16 threads on a 16-core machine), and the CPU-side work of every test (the fp32 oracle,
    # the CPU backends, the small index ops) then waits on the others' threads; inductor's compile pool likewise.
    threads=$(( $(nproc) / test_workers )); [ -n "$workers" ] || threads=$(nproc)
    [ "$threads" -ge 1 ] || threads=1
    rm -f "$out/test_timings.log"
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads TORCHINDUCTOR_COMPILE_THREADS=$threads \
    MOE_TEST_TIMING_LOG="$out/test_timings.log" timeout "$t" $python -m pytest $gpu_tests -q -p no:cacheprovider \
      $workers --maxfail=50 -o addopts="-ra" --durations=30 -m "not slow" > "$out/tests.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
    tail -3 "$out/tests.log"
    # from the log each test appended as it ended: complete even when the limit killed pytest before its summary
    [ -f "$out/test_timings.log" ] && $python benchmarks/pytest_timings.py "$out/test_timings.log" --top 15 \
      | tee "$out/test_timings.txt" | head -40
    [ $rc = 0 ] || status=1
  else
    skipped "GPU tests"
  fi
fi

if t=$(cap 60); then
  step "host time per call: validate, choose a backend, issue the launches (log: $out/host_overhead.log)"
  timeout "$t" $python benchmarks/host_overhead.py --calls 500 --csv "$out/host_overhead.csv" > "$out/host_overhead.log" 2>&1 \
    || status=1
  tail -12 "$out/host_overhead.log"
else
  skipped "host time per call"
fi

if [ $tune = 1 ] && [ -f moe_kernels/triton/tune.py ]; then
  if t=$(cap 330); then
    # the timing budget leaves the compile warm-up (about a minute or two) its share of the step's time
    step "tune the Triton expert-MLP configs for this GPU, at most ${t}s (log: $out/tune_triton.log)"
    timeout "$t" $python -m moe_kernels.triton.tune --budget $(( t > 200 ? 100 : t / 2 )) --copy-to "$out" \
      > "$out/tune_triton.log" 2>&1 || status=1
    grep -E "^(tune|wrote|copy|  I |  compiled)|WARNING" "$out/tune_triton.log" | tail -20
  else
    skipped "Triton tuning"
  fi
fi

if [ $skip_bench = 0 ]; then
  if t=$(cap $(( bench_budget + 120 ))); then
    budget=$(( t - 120 < bench_budget ? t - 120 : bench_budget ))
    [ $budget -lt 30 ] && budget=30
    step "benchmark (budget ${budget}s; log: $out/bench.log)"
    timeout "$t" $python benchmarks/gpu_bench.py --out "$out" --budget-s "$budget" \
      "${bench_args[@]}" > "$out/bench.log" 2>&1 || { tail -30 "$out/bench.log"; status=1; }
    grep "^\[gpu_bench\]" "$out/bench.log" | tail -3
    cat "$out/gpu_bench.md" 2>/dev/null
  else
    skipped "benchmark"
  fi
fi

if [ $breakdown = 1 ]; then
  if t=$(cap 90); then
    step "kernel breakdown of moe_mlp (log: $out/kernel_breakdown.log)"
    timeout "$t" $python benchmarks/kernel_breakdown.py --out "$out" > "$out/kernel_breakdown.log" 2>&1 || status=1
    grep "^\[kernel_breakdown\]" "$out/kernel_breakdown.log"
  else
    skipped "kernel breakdown"
  fi
fi

if { [ $tune = 1 ] || [ $table = 1 ]; } && [ -f moe_kernels/backend_table.py ]; then
  if t=$(cap 150); then
    step "measure the auto backend table for this GPU (log: $out/extra.log)"
    timeout "$t" $python -m moe_kernels.backend_table --write --budget $(( t > 120 ? 80 : t / 2 )) >> "$out/extra.log" 2>&1 \
      || status=1
    tail -15 "$out/extra.log"
    cp moe_kernels/backend_table.json "$out/backend_table.json"
  else
    skipped "auto backend table"
  fi
fi

if [ $hf_speed = 1 ]; then
  if t=$(cap 120); then
    step "whole model: integration/example_hf_speed.py --dtype bfloat16 --decode-graphs --breakdown (log: $out/extra.log)"
    timeout "$t" $python integration/example_hf_speed.py --dtype bfloat16 --decode-graphs --breakdown >> "$out/extra.log" \
      2>&1 || status=1
    tail -11 "$out/extra.log"
  else
    skipped "whole-model speed"
  fi
  if t=$(cap 150); then  # transformers' compiled decoding (static cache, inductor + CUDA graphs): both models compile
    step "whole model, compiled static-cache decoding: example_hf_speed.py --dtype bfloat16 --compile (log: $out/extra.log)"
    timeout "$t" $python integration/example_hf_speed.py --dtype bfloat16 --compile >> "$out/extra.log" 2>&1 || status=1
    tail -6 "$out/extra.log"
  else
    skipped "whole-model speed, compiled decoding"
  fi
fi

[ -n "$skipped_steps" ] && echo "gpu_check: skipped for lack of time (--total-s $total):$skipped_steps"
step "gpu_check done: status $status"
exit $status
