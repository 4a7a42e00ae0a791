"""Fused gated cross-entropy (UltraFuser) vs the naive blended cross-entropy: time and peak memory.

The loss is CE(sum_j w_j * h_j W_j^T, labels) over N specialists (forward + backward into the gate
weights, every hidden state and every head). The naive form holds all N [T, V] logit tensors and
their gradients; the fused form works through chunks of tokens.

* ``pytest benchmarks/bench_fused_gated_ce.py`` -- pytest-benchmark timings of forward+backward.
* ``python benchmarks/bench_fused_gated_ce.py [--tokens 256 1024] [--vocab 32000] ...`` -- a table of
  time and peak memory. Each measurement runs in a fresh child process: peak memory is the rise of
  the process's peak resident set (``ru_maxrss``) over its resident set just before the step, i.e.
  what the step allocates beyond its inputs (CPU; glibc told to return large blocks, see MALLOC_*).
  Both wall time and process CPU time (all threads) are shown: on a shared machine CPU time is the
  steadier of the two. ``BENCH_THREADS`` sets torch's thread count (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from moe_kernels.losses import fused_gated_cross_entropy, naive_gated_cross_entropy  # noqa: E402

IMPLS = {"naive": naive_gated_cross_entropy, "fused": fused_gated_cross_entropy}


def make_inputs(tokens: int, vocab: int, hidden: int, specialists: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hiddens = [torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_() for _ in range(specialists)]
    heads = [(torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype).requires_grad_()
             for _ in range(specialists)]
    gate = torch.softmax(torch.randn(tokens, specialists, generator=g), -1).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return hiddens, heads, gate, labels


def step(impl: str, inputs, chunk_size=None) -> float:
    """One forward + backward; returns the loss."""
    hiddens, heads, gate, labels = inputs
    kwargs = {"chunk_size": chunk_size} if impl == "fused" else {}
    loss = IMPLS[impl](hiddens, heads, gate, labels, **kwargs)
    grads = torch.autograd.grad(loss, [gate] + hiddens + heads)
    del grads
    return loss.item()


# ----- pytest-benchmark -----

@pytest.mark.parametrize("impl", list(IMPLS))
def test_gated_ce_forward_backward(benchmark, impl):
    inputs = make_inputs(tokens=256, vocab=8000, hidden=64, specialists=3)
    benchmark.extra_info.update(tokens=256, vocab=8000, hidden=64, specialists=3)
    loss = benchmark.pedantic(step, args=(impl, inputs), rounds=3, warmup_rounds=1)
    assert loss > 0


# ----- table with peak memory -----

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(impl, tokens, vocab, hidden, specialists, chunk, repeats):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    inputs = make_inputs(tokens, vocab, hidden, specialists)
    before = _rss_bytes()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(impl, inputs, chunk)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_extra_bytes": max(0, peak - before), "median_s": statistics.median(times),
                      "median_cpu_s": statistics.median(cpu_times)}))


def measure(impl, tokens, vocab, hidden, specialists, chunk=None, repeats=3) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(tokens), str(vocab), str(hidden),
           str(specialists), str(chunk or 0), str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--specialists", type=int, nargs="+", default=[3])
    parser.add_argument("--chunk", type=int, nargs="+", default=[0], help="fused chunk sizes (0 = automatic)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"gated CE forward+backward, V={args.vocab}, H={args.hidden}, fp32, "
          f"{os.environ.get('BENCH_THREADS', '2')} threads, CPU")
    header = (f"{'N':>2} {'T':>6} {'impl':>12} {'wall ms':>9} {'cpu ms':>9} {'peak extra MiB':>15} "
              f"{'[T,V] fp32 MiB':>15} {'head grads MiB':>15}")
    print(header)
    print("-" * len(header))
    for n in args.specialists:
        for tokens in args.tokens:
            one_logits = tokens * args.vocab * 4 / 2 ** 20
            head_grads = n * args.vocab * args.hidden * 4 / 2 ** 20  # part of every peak: dL/dW_j, fp32
            rows = [("naive", None)] + [("fused", c or None) for c in args.chunk]
            for impl, chunk in rows:
                r = measure(impl, tokens, args.vocab, args.hidden, n, chunk, args.repeats)
                label = impl if impl == "naive" else f"fused/{chunk or 'auto'}"
                print(f"{n:>2} {tokens:>6} {label:>12} {r['median_s'] * 1e3:>9.1f} {r['median_cpu_s'] * 1e3:>9.1f} "
                      f"{r['peak_extra_bytes'] / 2 ** 20:>15.1f} {one_logits:>15.1f} {head_grads:>15.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, tokens, vocab, hidden, specialists, chunk, repeats = sys.argv[2:9]
        _child(impl, int(tokens), int(vocab), int(hidden), int(specialists), int(chunk) or None, int(repeats))
    else:
        main()
