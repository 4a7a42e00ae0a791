#!/usr/bin/env bash
# Downloads into .whl/ the wheels a lent GPU machine lacks (it has no network), for gpu_check.sh to install:
# liger-kernel (a peer in the benchmark), pytest-xdist and execnet (parallel GPU tests), expecttest (opcheck), and
# the pinned transformers with the huggingface_hub set it needs (the lent machines have transformers 5.17, below
# the supported floor). Versions come from constraints.txt where it pins them. Run it from a machine with network
# before the lease, then pass carry: [".whl"] to the device tool's run (64 MiB for everything carried).
#
#   bash benchmarks/carried_wheels.sh            # download, ignore .whl/ in git, print the total size
#   bash benchmarks/carried_wheels.sh --list     # print the requirements only
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { sed -n "s/^$1==//p" constraints.txt; }
requirements=(liger-kernel==0.8.5 expecttest==0.3.0 pytest-xdist execnet "transformers==$(pinned transformers)")
# transformers' hub client and its own dependencies, at the pinned versions
while read -r line; do requirements+=("$line"); done < <(
  grep -E '^(huggingface_hub|hf-xet|httpx2|httpcore2|h11|anyio|idna|click|truststore)==' constraints.txt)
if [ "${1:-}" = "--list" ]; then printf '%s\n' "${requirements[@]}"; exit 0; fi
[ -n "$(pinned transformers)" ] || { echo "carried_wheels: constraints.txt pins no transformers" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d .whl "${requirements[@]}"
size=$(du -sm .whl | cut -f1)
echo "carried_wheels: $(ls .whl/*.whl | wc -l) wheels in .whl/, ${size} MiB (the lent machine's Python is 3.12)"
[ "$size" -lt 56 ] || { echo "carried_wheels: over 56 MiB, near the 64 MiB a run may carry" >&2; exit 1; }
