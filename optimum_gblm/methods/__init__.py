"""Pruning methods and sparsity profiles: one module each, registered on import (see `base.PruningMethod`).

Every module in this package is imported here, so a new method is one file with its `@register_method` line and
nothing else to edit.
"""

import importlib
import pkgutil

from .base import PruningMethod, SparsityProfile

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PruningMethod", "SparsityProfile"]
