"""The default sparsity profile: every layer at `GBLMConfig.sparsity`."""

from __future__ import annotations

from ..registry import register_profile
from .base import SparsityProfile


@register_profile("uniform")
class UniformProfile(SparsityProfile):
    help = "every layer at the same sparsity"

    def layer_sparsities(self, model, input_ids, method, modules, show_progress=True) -> dict[str, float]:
        return dict.fromkeys(modules, self.config.sparsity)
