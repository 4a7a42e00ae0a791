#!/usr/bin/env bash
# CI step: prove the CUDA sources of moe_kernels still compile and register every op for CUDA.
#
# Runs on a machine without a GPU, from the repository root of a clean clone:
#   1. creates (or reuses) a virtual environment holding the CUDA build of torch;
#   2. builds moe_kernels._C with the CUDA sources (csrc/cuda/*.cu) for sm_80 and sm_90, out of tree, so the
#      checkout's own (CPU) moe_kernels/_C*.so is left alone;
#   3. loads the built library and checks that every moe_kernels::* op schema has a CUDA kernel (and a CPU one);
#   4. prints registers / stack / shared memory per kernel (cuobjdump --dump-resource-usage) and a summary.
# Exits non-zero on any failure. Kernels cannot be launched here (no GPU).
#
# Environment (all optional):
#   MOE_CUDA_TORCH_VERSION  torch version to install (default 2.15.0, the newest release: its PyPI build is CUDA 13.2)
#   MOE_CUDA_VENV           venv path (default $HOME/.cache/moe_kernels/venv-cuda; reused when its torch matches)
#   MOE_CUDA_BUILD_DIR      build folder (default $HOME/.cache/moe_kernels/cuda-build; ninja rebuilds only what
#                           changed, so a warm local rerun is quick; a fresh clone recompiles everything)
#   MOE_CUDA_ARCHS          TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
#   PYTHON                  interpreter that creates the venv (default python3)
#   CUDA_HOME               toolkit root holding bin/nvcc and include/cuda_runtime.h (default: searched)
set -euo pipefail

start_all=$(date +%s)
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
torch_version=${MOE_CUDA_TORCH_VERSION:-2.15.0}
venv=${MOE_CUDA_VENV:-$HOME/.cache/moe_kernels/venv-cuda}
build_dir=${MOE_CUDA_BUILD_DIR:-$HOME/.cache/moe_kernels/cuda-build}
archs=${MOE_CUDA_ARCHS:-8.0;9.0}
python=${PYTHON:-python3}

log() { printf '[cuda-check] %s\n' "$*"; }
fail() { printf '[cuda-check] FAILED: %s\n' "$*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }

cd "$repo_root"
[ -f setup.py ] && [ -d csrc/cuda ] || fail "run from a moe_kernels checkout (no setup.py / csrc/cuda in $repo_root)"
ls csrc/cuda/*.cu > /dev/null 2>&1 || fail "no CUDA sources in csrc/cuda"

# ---- 1. the venv with the CUDA build of torch ------------------------------------------------------------
phase=$(date +%s)
venv_torch() {
  "$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda or "cpu")' 2>/dev/null || true
}
installed=$( [ -x "$venv/bin/python" ] && venv_torch || true )
if [ "${installed%% *}" = "$torch_version" ] && [ "${installed##* }" != "cpu" ]; then
  log "reusing $venv (torch $installed)"
else
  [ -n "$installed" ] && log "venv $venv has torch '$installed', want $torch_version with CUDA: recreating"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv" || fail "could not create the venv with $python"
  log "installing torch==$torch_version (CUDA build) into $venv"
  # PIP_CONSTRAINT=/dev/null: a machine-wide pip constraint (CI's machines cap torch at the release they keep on
  # disk) must not stop the top of the declared range from being tested.
  PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_version" \
    ninja setuptools numpy \
    || fail "pip install torch==$torch_version failed"
  installed=$(venv_torch)
  [ "${installed%% *}" = "$torch_version" ] && [ "${installed##* }" != "cpu" ] \
    || fail "the venv's torch is '$installed', not the CUDA build of $torch_version"
fi
venv_seconds=$(elapsed "$phase")

# ---- 2. build out of tree -----------------------------------------------------------------------------------
# A toolkit root must hold the headers and lib64 too: an `nvcc` wrapper script in /usr/local/bin would make
# /usr/local look like one, and the link then fails to find -lcudart.
is_toolkit() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if [ -z "${CUDA_HOME:-}" ] || ! is_toolkit "$CUDA_HOME"; then
  CUDA_HOME=""
  nvcc_path=$(command -v nvcc || true)
  for candidate in ${nvcc_path:+"$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")"} /usr/local/cuda /usr/local/cuda-*; do
    if is_toolkit "$candidate"; then CUDA_HOME=$candidate; break; fi
  done
  [ -n "$CUDA_HOME" ] || fail "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
fi
export CUDA_HOME
log "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
phase=$(date +%s)
mkdir -p "$build_dir"
build_log="$build_dir/build.log"
log "building moe_kernels._C with CUDA for TORCH_CUDA_ARCH_LIST=$archs into $build_dir (log: $build_log)"
jobs=$(nproc 2> /dev/null || echo 2)
if ! MOE_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS="$jobs" PATH="$venv/bin:$PATH" \
    "$venv/bin/python" setup.py build_ext --build-lib "$build_dir/lib" --build-temp "$build_dir/tmp" \
    > "$build_log" 2>&1; then
  tail -n 60 "$build_log" >&2
  fail "build failed (full log: $build_log)"
fi
build_seconds=$(elapsed "$phase")
so_path=$(ls -t "$build_dir"/lib/moe_kernels/_C*.so 2> /dev/null | head -n 1)
[ -n "$so_path" ] || fail "the build produced no moe_kernels/_C*.so under $build_dir/lib"
warnings=$(grep -c -i 'warning' "$build_log" || true)
log "built $so_path in ${build_seconds}s ($warnings warning lines in the log)"

# ---- 3. every op has a CUDA kernel -------------------------------------------------------------------------
phase=$(date +%s)
"$venv/bin/python" - "$so_path" "$archs" << 'EOF' || fail "op registration check failed"
import ast
import importlib.util
import sys

import torch

so_path, archs = sys.argv[1], sys.argv[2]
# Import it as the package's extension module (PyInit__C), which registers the ops.
spec = importlib.util.spec_from_file_location("moe_kernels._C", so_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

# Ops that are CPU-only by design, as moe_kernels/native.py declares them (CPU_ONLY_OPS; read, not imported,
# so the check needs nothing but torch).
tree = ast.parse(open("moe_kernels/native.py").read())
declared = [node.value for node in tree.body if isinstance(node, ast.Assign)
            and any(getattr(target, "id", None) == "CPU_ONLY_OPS" for target in node.targets)]
if not declared:
    sys.exit("moe_kernels/native.py declares no CPU_ONLY_OPS")
CPU_ONLY = {f"moe_kernels::{name}" for name in ast.literal_eval(declared[0])}
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_kernels::"))
if not names:
    sys.exit("no moe_kernels::* op schemas are registered")
missing = []
print(f"{'op':36s} CPU  CUDA")
for name in names:
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    cuda_text = "yes" if cuda else ("- (cpu-only op)" if name in CPU_ONLY else "NO")
    print(f"{name:36s} {'yes' if cpu else 'NO ':4s} {cuda_text}")
    if not cpu or not (cuda or name in CPU_ONLY):
        missing.append(name)
if missing:
    sys.exit(f"ops without a CPU or CUDA kernel: {missing}")
with_cuda = len(names) - len(CPU_ONLY & set(names))
print(f"{len(names)} moe_kernels ops: all have CPU kernels, {with_cuda} have CUDA kernels, "
      f"{len(names) - with_cuda} are CPU-only by design (torch {torch.__version__}, archs {archs})")
EOF
check_seconds=$(elapsed "$phase")

# ---- 3b. the CUDA build's C++ entry points survive malformed input (CPU tensors) ---------------------------
# tests/backends/fuzz_native.py against this library: a CUDA build registers more ops, so its draws differ from
# the CPU build's (the fuzzer's one crash, on a GPU machine, was reproduced here this way).
phase=$(date +%s)
fuzz_root="$build_dir/fuzz-package"
rm -rf "$fuzz_root" && mkdir -p "$fuzz_root"
cp -r moe_kernels "$fuzz_root/moe_kernels"
rm -f "$fuzz_root"/moe_kernels/_C*.so && cp "$so_path" "$fuzz_root/moe_kernels/"
PYTHONPATH="$fuzz_root" timeout 600 "$venv/bin/python" -X faulthandler tests/backends/fuzz_native.py 200 \
  > "$build_dir/fuzz.log" 2>&1 || { tail -n 40 "$build_dir/fuzz.log" >&2; fail "fuzzing the CUDA build's ops crashed or failed"; }
log "fuzzed the CUDA build's ops with malformed CPU arguments: $(tail -n 1 "$build_dir/fuzz.log") ($(elapsed "$phase")s)"

# ---- 4. per-kernel resources -------------------------------------------------------------------------------
cuobjdump=""
# The toolkit may lack cuobjdump; the triton wheel that torch pins bundles one.
triton_cuobjdump=$("$venv/bin/python" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2> /dev/null || true)
for candidate in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" "$triton_cuobjdump"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; break; fi
done
if [ -n "$cuobjdump" ]; then
  "$venv/bin/python" - "$cuobjdump" "$so_path" << 'EOF' || log "could not read the resource usage"
import re
import subprocess
import sys

cuobjdump, so_path = sys.argv[1], sys.argv[2]
dump = subprocess.run([cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True, check=True).stdout
rows, arch, name = [], "?", "?"
for line in dump.splitlines():
    if m := re.search(r"arch = (sm_\d+)", line):
        arch = m.group(1)
    elif m := re.search(r"Function (\S+):", line):
        name = m.group(1)
    elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
        rows.append((arch, name, *map(int, m.groups())))
pretty = subprocess.run(["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True).stdout
pretty = pretty.split("\n") if pretty else [r[1] for r in rows]
print("arch    REG STACK SHARED LOCAL  kernel (LOCAL > 0 would mean register spills)")
for row, kernel in sorted(zip(rows, pretty), key=lambda item: (item[0][0], item[1])):
    kernel = re.sub(r"moe_kernels::cuda::\(anonymous namespace\)::|c10::|moe_kernels::routing::", "", kernel)
    print(f"{row[0]:6s} {row[2]:4d} {row[3]:5d} {row[4]:6d} {row[5]:5d}  {kernel[:100]}")
spilled = [r for r in rows if r[5] > 0]
print(f"{len(rows)} kernels, {len(spilled)} with local memory (spills)")
EOF
else
  log "cuobjdump not found: skipping the resource table"
fi

log "summary: venv ${venv_seconds}s, build ${build_seconds}s, op check ${check_seconds}s, total $(elapsed "$start_all")s"
log "OK"
