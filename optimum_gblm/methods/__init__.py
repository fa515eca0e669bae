"""Pruning methods and sparsity profiles: one module each, registered on import (see `base.PruningMethod`)."""

from . import gblm_obs, owl, score, sparsegpt, uniform  # noqa: F401  (registration)
from .base import PruningMethod, SparsityProfile

__all__ = ["PruningMethod", "SparsityProfile"]
