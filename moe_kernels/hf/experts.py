"""The "moe_kernels" experts implementation for transformers' ExpertsInterface (being written: issue 5)."""
