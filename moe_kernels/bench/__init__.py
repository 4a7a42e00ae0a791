"""Benchmark runner behind ``moe-kernels bench``: side-by-side timings of moe_kernels against
transformers' experts paths, loop-over-experts references and the machine's ideal.

One run measures every suite asked for and writes, under ``--out``:

* ``bench.csv``     one row per (suite, shape, tokens, dtype, pass, provider): machine, versions, median
                    and quartiles in ms, ratio to moe_kernels, peak memory and saved-activation bytes,
                    max abs error against the reference oracle;
* ``<suite>.png``   one plot per suite (time of each provider relative to moe_kernels, log scale);
* ``roofline.csv``  minimum FLOPs/bytes of each full-size shape and the H100 time they imply;
* ``summary.md``    the printed side-by-side tables, ready to paste into benchmarks/RESULTS.md.

Suites
  moe      the MoE block (router linear + routing + routed expert MLPs): forward, backward, fwd+bwd.
           Providers: moe_kernels on every built backend that runs on the device ("mk:cpu",
           "mk:reference" = the loop-over-experts oracle, "mk:triton" on GPUs); transformers'
           ``eager``, ``grouped_mm`` and ``batched_mm`` experts paths called on a real experts module
           (MixtralExperts / GptOssExperts) with transformers' router math; "cpu_ideal" (CPU) =
           max(one dense MLP of the same FLOPs, reading every touched expert's weights once at the
           measured copy bandwidth); on GPUs vLLM's fused_moe where installed.
  adapter  PESC adapter-MoE layer: dense FFN + moe_kernels.adapter_moe, vs the dense FFN alone and vs a
           PESC-style per-expert loop.
  lora     Self-MoE LoRA-MoE linear: base linear + routed LoRA experts (adapter_moe, identity), vs the
           base linear alone and vs the MiXSE-style "every expert on every token" sum.
  route    routing alone: moe_kernels.route vs transformers' router math.
  plan     dispatch plan alone: moe_kernels.plan vs the torch.sort + histc + cumsum of transformers.
  roofline printed only: minimum bytes/FLOPs and H100 time for the full-size shapes.

On the CPU, shapes are scaled down: H, I (and adapter rank) and training token counts are divided by
the shape's stated factor; E and k are kept. Timings are wall-clock medians of repeated runs with
``torch.set_num_threads(--threads)``.

Modules: :mod:`.shapes` (shapes, token counts, CSV columns), :mod:`.timing` (machine, timings, memory),
:mod:`.providers` (the Case record, backends, transformers' router and experts, CPU ideal, GPU peers),
:mod:`.cases` (one case builder per suite), :mod:`.runner` (running cases), :mod:`.report` (tables,
goals, roofline, plots, CSV), :mod:`.cli` (``bench_main``). The names callers use are re-exported here.
"""

from __future__ import annotations

from .cases import build_adapter_case, build_lora_case, build_moe_case, build_plan_case, build_route_case
from .cli import bench_main
from .providers import (Case, cpu_ideal, dense_mlp, headline_provider, hf_experts_module, hf_router_math,
                        mk_backends, op_backend)
from .report import (GOAL_ADAPTER_OVER_DENSE, GOAL_GROUPED_MM_FWD, GOAL_GROUPED_MM_FWDBWD, GOAL_IDEAL_FWD,
                     format_goals, format_memory, format_notes, format_roofline, format_table, headline_name,
                     plot_suite, render_summary, roofline_rows, write_csv)
from .runner import run_benchmarks, run_case
from .shapes import (ADAPTER_SHAPES, BATCHED_MM_MAX_BYTES, CSV_COLUMNS, DECODE_TOKENS, DTYPES, H100_BF16_FLOPS,
                     H100_HBM_BYTES_PER_S, LORA_SHAPES, MOE_SHAPES, PASSES, QUICK, SUITES, TRAIN_TOKENS,
                     AdapterShape, LoRAShape, MoEShape, cpu_tokens, expected_touched_experts)
from .timing import (Timing, cpu_model_name, machine_info, measure, measure_copy_bandwidth, measure_interleaved,
                     peak_memory_bytes, saved_activation_bytes)

__all__ = [
    "ADAPTER_SHAPES", "AdapterShape", "BATCHED_MM_MAX_BYTES", "CSV_COLUMNS", "Case", "DECODE_TOKENS", "DTYPES",
    "GOAL_ADAPTER_OVER_DENSE", "GOAL_GROUPED_MM_FWD", "GOAL_GROUPED_MM_FWDBWD", "GOAL_IDEAL_FWD",
    "H100_BF16_FLOPS", "H100_HBM_BYTES_PER_S", "LORA_SHAPES", "LoRAShape", "MOE_SHAPES", "MoEShape", "PASSES",
    "QUICK", "SUITES", "TRAIN_TOKENS", "Timing", "bench_main", "build_adapter_case", "build_lora_case",
    "build_moe_case", "build_plan_case", "build_route_case", "cpu_ideal", "cpu_model_name", "cpu_tokens",
    "dense_mlp", "expected_touched_experts", "format_goals", "format_memory", "format_notes", "format_roofline",
    "format_table", "headline_name", "headline_provider", "hf_experts_module", "hf_router_math", "machine_info",
    "measure", "measure_copy_bandwidth", "measure_interleaved", "mk_backends", "op_backend",
    "peak_memory_bytes", "plot_suite", "render_summary", "roofline_rows", "run_benchmarks", "run_case",
    "saved_activation_bytes", "write_csv",
]
