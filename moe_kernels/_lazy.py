"""Attributes of a package that are imported on first use (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` (pass ``__name__``): attribute ``name`` in ``table`` is
    ``getattr(import_module(table[name], package), name)``. A module name that starts with a dot is
    relative to ``package``; any other name is absolute. Other names raise AttributeError."""

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
