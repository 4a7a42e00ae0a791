"""The transformers details moe_kernels depends on that changed, or may change, between 5.x releases.

Code elsewhere in the package asks this module instead of guessing a name or reaching into a private
module itself, so that a transformers release that moves something breaks one place, and
``tests/test_hf_compat.py`` names what moved. CI runs that test with the oldest transformers the package
declares and with the newest release (see ``.ci/run``).

Supported: transformers >= :data:`MIN_TRANSFORMERS` (the oldest version CI runs; older 5.x releases lack
router classes and the ``router_logits`` recording the HF integration is written against).
"""

from __future__ import annotations

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = "5.21.0"
"""The oldest transformers CI runs the suite with; keep in step with pyproject.toml and constraints-oldest.txt."""

TRANSFORMERS_VERSION = Version(transformers.__version__)

# The KV-cache keyword: transformers 5.24 renamed ``past_key_values`` to ``cache`` in models, decoder layers
# and the mask functions of ``transformers.masking_utils`` (the old name still works there, deprecated, with
# removal announced for 5.40). Up to 5.23 the decoder layers take ``**kwargs``, so a ``cache=`` passed to
# them would be swallowed without an error and the layer would run without its cache: the name has to match
# the installed version, it cannot simply be the new one.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION.release >= (5, 24) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{CACHE_KWARG: cache}``: the KV cache as a keyword argument for a transformers model, decoder layer
    or mask function (``create_causal_mask``, ``create_sliding_window_causal_mask``) of this version."""
    return {CACHE_KWARG: cache}


def default_apply_gate():
    """transformers' default ``_apply_gate`` of experts modules (``act(gate) * up`` on concatenated halves),
    a private function of ``transformers.integrations.moe``; None if a release drops it."""
    from transformers.integrations import moe

    return getattr(moe, "_default_apply_gate", None)


__all__ = ["CACHE_KWARG", "MIN_TRANSFORMERS", "TRANSFORMERS_VERSION", "cache_kwargs", "default_apply_gate"]
