"""What every Triton module of the backend decides the same way: whether kernels run in the interpreter, the
``tl.dot`` input precision, and the activation codes the kernels branch on (from :mod:`moe_kernels.spec`).

Imports neither triton nor a kernel module, so :mod:`moe_kernels.triton` can use it without loading Triton.
"""

from __future__ import annotations

import os

import torch

from ..spec import (ADAPTER_ACTIVATIONS, GATED_ACTIVATIONS, TRITON_ADAPTER_ACTIVATION_CODES,
                    TRITON_GATED_ACTIVATION_CODES)

# constexpr ACTIVATION of the expert-MLP kernels (triton/experts.py) and of the adapter kernels
# (triton/adapters.py); each kernel family branches on its own table.
GATED_ACTIVATION_CODES = TRITON_GATED_ACTIVATION_CODES
ADAPTER_ACTIVATION_CODES = TRITON_ADAPTER_ACTIVATION_CODES
assert set(GATED_ACTIVATION_CODES) == set(GATED_ACTIVATIONS), GATED_ACTIVATION_CODES
assert set(ADAPTER_ACTIVATION_CODES) == set(ADAPTER_ACTIVATIONS), ADAPTER_ACTIVATION_CODES


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: CPU tensors, the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of ``tl.dot`` for GEMM inputs of ``dtype``, one rule for every kernel.

    float32 inputs use TF32 only when torch allows it for its own matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), else "ieee"; fp16/bf16 inputs run natively and the value
    is ignored for them ("tf32"). The interpreter ignores the value altogether (it multiplies in numpy), so
    the rule does not depend on :func:`interpreting`.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
