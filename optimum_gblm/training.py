"""Sparse fine-tuning with transformers' `Trainer`: the masks stay exact whatever the optimizer does.

Masked gradients are already zeroed as they are produced (see `sparse_state.install_gradient_masking`), but weight
decay and momentum can still move a pruned weight; the callback re-applies the masks after every optimizer step.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .sparse_state import GBLMHfQuantizer, apply_masks


class SparsityCallback(TrainerCallback):
    """Re-applies the pruning masks after every optimizer step, whatever the optimizer does with zero gradients."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
            apply_masks(model)
