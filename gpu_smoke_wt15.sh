#!/usr/bin/env bash
# one-shot device check for issue 15 (not committed)
set -u
cd "$(dirname "$0")"
S=$(date +%s); t() { echo "=== $* ($(( $(date +%s) - S ))s)"; }
t env
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_capability())"
nproc
t build
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 MOE_KERNELS_BUILD_CUDA=1
timeout 170 python setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; echo BUILD FAILED; }
grep -ci warning $OUT/build.log
t tests
timeout 80 python -m pytest -q -p no:cacheprovider --maxfail=15 -rfE tests/test_cuda_grouped.py > $OUT/tests.log 2>&1
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -30; tail -3 $OUT/tests.log
t bench
timeout 45 python - <<'PY' 2>&1 | tail -20
import torch, moe_kernels as mk
from moe_kernels import backend_table as bt
dev = torch.device("cuda")
for shape in [dict(T=4096, H=2048, inner=768, E=128, k=8), dict(T=1, H=4096, inner=14336, E=8, k=2)]:
    infer, train = bt._case("moe_mlp", shape, dev)
    for backend in ("cuda", "triton"):
        try:
            print(shape, backend, "fwd %.3f ms" % bt._time_ms(lambda: infer(backend), 5),
                  "fwd+bwd %.3f ms" % bt._time_ms(lambda: train(backend), 5), flush=True)
        except Exception as e:
            print(shape, backend, "ERR", type(e).__name__, str(e)[:300], flush=True)
PY
t tune
cp moe_kernels/backend_table.json $OUT/backend_table.json
remaining=$(( 310 - ($(date +%s) - S) ))
if [ $remaining -gt 40 ]; then
  timeout $remaining python -m moe_kernels.backend_table --write --budget $(( remaining - 30 )) --table $OUT/backend_table.json > $OUT/tune.log 2>&1
  grep -E "ms ->|wrote" $OUT/tune.log | head -60
fi
t done
