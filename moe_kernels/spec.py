"""The op contracts' shared definitions: the activations and their codes, the routing variants, and the
constants every backend must agree on. Pure Python, imports nothing of the package, so every layer may import it.

Activations
  ``GATED_ACTIVATIONS``   the expert MLP's (``moe_mlp``) gated forms: act(gate) * up, or GPT-OSS's SwiGLU
                          ``(up + 1) * gate * sigmoid(GPT_OSS_ALPHA * gate)``; each optionally clamped first
                          (``swiglu_limit``: gate <= limit, up in [-limit, limit]); or Inkling2's soft-capped
                          SwiGLU ``softcap_swiglu``: cg tanh(gate / cg) * sigmoid(gate) * cu tanh(up / cu) with
                          ``softcaps = (cg, cu)`` (the sigmoid sees the raw gate).
  ``ELEMENTWISE_ACTIVATIONS`` the plain activations act(z): the adapter experts' (``adapter_moe``) bottleneck
                          and the ungated expert MLP's (``moe_mlp(..., gated=False)``, Nemotron-H's ReLU^2
                          experts). ``ADAPTER_ACTIVATIONS`` is the same tuple under its older name.
  The tuples' order is the order error messages list them in.

Codes
  The kernels branch on integer codes, one table for every backend: :data:`ACTIVATION_CODES` is
  ``enum Activation`` of ``csrc/common/activations.h`` (``tests/test_spec.py`` checks the two are equal) and
  the constexpr ``ACTIVATION`` of the Triton kernels (``moe_kernels/triton/common.py`` names its branches
  from this table).

Adding an activation: add it here (its name to the tuple(s) and a code to :data:`ACTIVATION_CODES`), its
math to :mod:`moe_kernels.reference`, and a branch to each backend's kernels (``activation`` /
``activation_grad`` in ``moe_kernels/triton/common.py``, ``csrc/common/activations.h`` and the C++ name
parser). ``tests/test_spec.py`` fails while a backend lacks it.
"""

from __future__ import annotations

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss", "softcap_swiglu")
SOFTCAP_ACTIVATIONS = ("softcap_swiglu",)  # the gated activations that take softcaps (and only they do)
# relu2 = relu(z)^2 (transformers' ReLUSquaredActivation, Nemotron-H's "relu2")
ELEMENTWISE_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "relu2", "identity")
ADAPTER_ACTIVATIONS = ELEMENTWISE_ACTIVATIONS

# The integer code of each activation, in the C++ kernels (``enum Activation`` in csrc/common/activations.h)
# and the Triton kernels alike. "identity" and "relu2" are elementwise only, "gpt_oss" and "softcap_swiglu" gated only.
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "identity": 4, "gpt_oss": 5, "relu2": 6,
                    "softcap_swiglu": 7}

# Routing variants (moe_kernels.route). scoring: how logits become scores; order: choose the top k among the
# scores ("softmax_then_topk", weights = the chosen scores) or among the raw logits ("topk_then_softmax",
# weights = scoring of the chosen logits). The kernels take them as two flags: sigmoid = scoring == "sigmoid",
# topk_first = order == "topk_then_softmax". "No group limit" is n_group = topk_group = None at the public op and
# the Backend interface; the kernels' ops (C++ schema, Triton op) take NO_GROUP for it.
ROUTE_SCORINGS = ("softmax", "sigmoid")
ROUTE_ORDERS = ("softmax_then_topk", "topk_then_softmax")
NO_GROUP = 0

GPT_OSS_ALPHA = 1.702  # GPT-OSS's clamped SwiGLU: glu = gate * sigmoid(alpha * gate)

# Added to the renormalisation denominator so an all-zero choice (sigmoid underflow) gives 0, not NaN.
# Far below fp32 resolution of any realistic sum, so it does not change normal results.
RENORM_EPS = 1e-20

MAX_ADAPTER_RANK = 1024  # adapter_moe's bottleneck width r: 1 <= r <= MAX_ADAPTER_RANK

__all__ = ["GATED_ACTIVATIONS", "SOFTCAP_ACTIVATIONS", "ELEMENTWISE_ACTIVATIONS", "ADAPTER_ACTIVATIONS", "ACTIVATION_CODES", "ROUTE_SCORINGS", "ROUTE_ORDERS", "NO_GROUP",
           "GPT_OSS_ALPHA", "RENORM_EPS", "MAX_ADAPTER_RANK"]
