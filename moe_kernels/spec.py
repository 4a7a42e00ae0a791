"""The op contracts' shared definitions: the activations and their codes, the routing variants, and the
constants every backend must agree on. Pure Python, imports nothing of the package, so every layer may import it.

Activations
  ``GATED_ACTIVATIONS``   the expert MLP's (``moe_mlp``) gated forms: act(gate) * up, or GPT-OSS's clamped
                          SwiGLU ``(up + 1) * gate * sigmoid(GPT_OSS_ALPHA * gate)``.
  ``ADAPTER_ACTIVATIONS`` the adapter experts' (``adapter_moe``) elementwise activation of the bottleneck.
  The tuples' order is the order error messages list them in.

Codes
  The kernels branch on integer codes. The backends number the activations differently, so each table is
  recorded here under the name of the code that uses it: the Triton modules take theirs from here, and
  ``tests/test_spec.py`` checks ``csrc/common/activations.h`` against :data:`CPP_ACTIVATION_CODES`.

Adding an activation: add it here (its name to the tuple(s), a code to every table of a backend that
runs it), its math to :mod:`moe_kernels.reference`, and a branch to each backend's kernels (the Triton
``_activation*`` helpers, ``csrc/common/activations.h`` and the C++ name parser). ``tests/test_spec.py``
fails while a backend lacks it.
"""

from __future__ import annotations

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")
ADAPTER_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "identity")

# The C++ kernels (cpu and cuda backends): ``enum Activation`` in csrc/common/activations.h. One table for
# both paths; "identity" is an adapter activation only, "gpt_oss" a gated one only.
CPP_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "identity": 4, "gpt_oss": 5}
# The Triton expert-MLP kernels (constexpr ACTIVATION of moe_kernels/triton/experts.py).
TRITON_GATED_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
# The Triton adapter kernels (constexpr ACTIVATION of moe_kernels/triton/adapters.py).
TRITON_ADAPTER_ACTIVATION_CODES = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}

# Routing variants (moe_kernels.route). scoring: how logits become scores; order: choose the top k among the
# scores ("softmax_then_topk", weights = the chosen scores) or among the raw logits ("topk_then_softmax",
# weights = scoring of the chosen logits). The kernels take them as two flags: sigmoid = scoring == "sigmoid",
# topk_first = order == "topk_then_softmax". "No group limit" is n_group = None at the public op; the C++ op
# takes 0 and the Triton kernel N_GROUP = 1 for it.
ROUTE_SCORINGS = ("softmax", "sigmoid")
ROUTE_ORDERS = ("softmax_then_topk", "topk_then_softmax")

GPT_OSS_ALPHA = 1.702  # GPT-OSS's clamped SwiGLU: glu = gate * sigmoid(alpha * gate)

# Added to the renormalisation denominator so an all-zero choice (sigmoid underflow) gives 0, not NaN.
# Far below fp32 resolution of any realistic sum, so it does not change normal results.
RENORM_EPS = 1e-20

MAX_ADAPTER_RANK = 1024  # adapter_moe's bottleneck width r: 1 <= r <= MAX_ADAPTER_RANK

__all__ = ["GATED_ACTIVATIONS", "ADAPTER_ACTIVATIONS", "CPP_ACTIVATION_CODES", "TRITON_GATED_ACTIVATION_CODES",
           "TRITON_ADAPTER_ACTIVATION_CODES", "ROUTE_SCORINGS", "ROUTE_ORDERS", "GPT_OSS_ALPHA", "RENORM_EPS",
           "MAX_ADAPTER_RANK"]
