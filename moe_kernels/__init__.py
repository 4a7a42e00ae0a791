"""moe_kernels: Mixture-of-Experts expert dispatch kernels (routing, dispatch plan, grouped expert and
adapter GEMMs), forward and backward, with reference, C++ CPU, Triton and CUDA backends.

Public ops: :func:`route`, :func:`plan`, :func:`moe_mlp`, :func:`adapter_moe`,
:func:`load_balancing_loss`, :func:`z_loss`, :func:`available_backends`.
"""

from .backends import BackendError, Plan, available_backends
from .ops import adapter_moe, load_balancing_loss, moe_mlp, plan, route, z_loss
from .validation import set_debug
from .backends import preload as _preload

_preload()  # reference + native (cheap); triton stays lazy (importing it is slow)

__version__ = "0.1.0"

__all__ = ["route", "plan", "moe_mlp", "adapter_moe", "load_balancing_loss", "z_loss", "available_backends",
           "BackendError", "Plan", "set_debug", "__version__"]
