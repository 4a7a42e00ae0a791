"""The user's cache folder of moe_kernels, where the tuners write the tables of the local GPU: the auto backend table
(``moe-kernels tune``) and the Triton tile tables (``moe-kernels tune --triton``)."""

from __future__ import annotations

import functools
import os


def cache_dir() -> str:
    """``$MOE_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_kernels``, else ``~/.cache/moe_kernels``."""
    env = os.environ
    return _cache_dir(env.get("MOE_KERNELS_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@functools.lru_cache(maxsize=16)
def _cache_dir(cache_dir_variable: str | None, xdg_cache_home: str | None, home: str | None) -> str:
    # Joined once per value of the three variables it depends on (``~`` is $HOME, else the user's password entry,
    # fixed per process): auto on CUDA asks for it on every call.
    return cache_dir_variable or os.path.join(
        xdg_cache_home or os.path.join(os.path.expanduser("~"), ".cache"), "moe_kernels")
