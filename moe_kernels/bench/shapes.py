"""Benchmark shapes (full-size model layers and their CPU scaling), token counts, suites, passes and the
CSV columns of ``bench.csv``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Peak numbers assumed for the H100 roofline (SXM, dense, no sparsity).
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12

# Largest gathered-weight tensor batched_mm may build before we skip it (it copies one expert weight per slot).
BATCHED_MM_MAX_BYTES = 768 * 2**20


def _shrink(size: int, factor: int) -> int:
    """size / factor, rounded down to a multiple of 8 (torch's CPU grouped_mm needs 16-byte strides)."""
    return max(8, size // factor // 8 * 8)


@dataclass(frozen=True)
class MoEShape:
    """One model's MoE layer. ``family`` picks the router math and expert layout."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    family: str  # "softmax_renorm" | "softmax" | "deepseek_v3" | "gpt_oss"
    cpu_scale: int  # H, I and training token counts are divided by this on the CPU

    def scaled(self, factor: int) -> "MoEShape":
        return dataclasses.replace(self, hidden=_shrink(self.hidden, factor),
                                   intermediate=_shrink(self.intermediate, factor))


@dataclass(frozen=True)
class AdapterShape:
    """PESC: dense SwiGLU FFN (hidden -> intermediate -> hidden) plus routed bottleneck adapters of ``rank``."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    rank: int
    cpu_scale: int

    def scaled(self, factor: int) -> "AdapterShape":
        # The rank shrinks with H and I so the adapter's share of the FLOPs stays that of the full model.
        return dataclasses.replace(self, hidden=_shrink(self.hidden, factor),
                                   intermediate=_shrink(self.intermediate, factor),
                                   rank=max(1, self.rank // factor))


@dataclass(frozen=True)
class LoRAShape:
    """Self-MoE: a square base linear (hidden -> hidden) plus n routed LoRA experts of ``rank``, top-k."""

    name: str
    hidden: int
    num_experts: int
    top_k: int
    rank: int
    cpu_scale: int

    def scaled(self, factor: int) -> "LoRAShape":
        return dataclasses.replace(self, hidden=_shrink(self.hidden, factor))


MOE_SHAPES = {
    "mixtral_8x7b": MoEShape("mixtral_8x7b", 4096, 14336, 8, 2, "softmax_renorm", 8),
    "qwen3_30b_a3b": MoEShape("qwen3_30b_a3b", 2048, 768, 128, 8, "softmax_renorm", 4),
    "olmoe_1b_7b": MoEShape("olmoe_1b_7b", 2048, 1024, 64, 8, "softmax", 4),
    "deepseek_v3_like": MoEShape("deepseek_v3_like", 7168, 2048, 256, 8, "deepseek_v3", 8),
    "gpt_oss_20b": MoEShape("gpt_oss_20b", 2880, 2880, 32, 4, "gpt_oss", 8),
}
ADAPTER_SHAPES = {
    "pesc_llama2_7b_r64": AdapterShape("pesc_llama2_7b_r64", 4096, 11008, 8, 2, 64, 8),
    "pesc_llama2_7b_r512": AdapterShape("pesc_llama2_7b_r512", 4096, 11008, 8, 2, 512, 8),
}
LORA_SHAPES = {
    "selfmoe_gemma_7b": LoRAShape("selfmoe_gemma_7b", 3072, 4, 1, 8, 4),
}

# Token counts at full size: decode (1-64) and training batches (4k-16k); training counts are divided by
# the shape's cpu_scale on the CPU, decode counts are kept.
DECODE_TOKENS = (1, 16, 64)
TRAIN_TOKENS = (4096, 16384)
QUICK = {
    "moe_shapes": ("olmoe_1b_7b", "qwen3_30b_a3b"),
    "moe_tokens": (1, 4096),
    "adapter_tokens": (4096,),
    "lora_tokens": (4096,),
    "route_tokens": (4096,),
    "dtypes": ("fp32", "bf16"),
    "passes": ("fwd", "fwdbwd"),  # the goals' passes; the full run adds backward alone
    # the forward-vs-ideal goal holds "at every shape, decode included": the other shapes at T=1, forward only
    "decode_shapes": ("mixtral_8x7b", "deepseek_v3_like", "gpt_oss_20b"),
    # the oracle is a reference point, not a contender: forward only in the quick run (it is 5-20x slower)
    "fwd_only_providers": ("mk:reference",),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUITES = ("moe", "adapter", "lora", "route", "plan", "roofline")
PASSES = ("fwd", "bwd", "fwdbwd")

CSV_COLUMNS = ["run_id", "machine", "cpu", "threads", "torch", "transformers", "moe_kernels", "device",
               "suite", "shape", "scale", "hidden", "intermediate", "experts", "top_k", "rank", "tokens",
               "dtype", "pass", "provider", "median_ms", "q1_ms", "q3_ms", "repeats", "ratio_vs_mk",
               "peak_mb", "saved_mb", "max_abs_err", "note"]


def expected_touched_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts hit by ``tokens`` uniformly routed tokens."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def cpu_tokens(tokens: int, scale: int) -> int:
    """Decode counts stay; training counts (> 64) shrink with the shape's scale."""
    return tokens if tokens <= 64 else max(1, tokens // scale)
