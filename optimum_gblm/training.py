"""Sparse fine-tuning with transformers' `Trainer`: the masks stay exact whatever the optimizer does, and what the
Trainer pushes to the Hub carries them.

Masked gradients are already zeroed as they are produced (see `sparse_state.install_gradient_masking`), but weight
decay and momentum can still move a pruned weight; the callback re-applies the masks after every optimizer step.
Before each Trainer push (`on_push_begin`, transformers' extension point for it) it writes the masks and this
package's model card into the folder the Trainer uploads, as a pruned model's own save does
(`GBLMHfQuantizer.write_masks_and_card`).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .quantizer import GBLMHfQuantizer
from .sparse_state import apply_masks


def _pruned(model: Any) -> nn.Module | None:
    """`model`, or the model a wrapper (DDP, DataParallel) holds as `.module`, when it carries GBLM masks."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
            return model
        model = getattr(model, "module", None)
    return None


class SparsityCallback(TrainerCallback):
    """Keeps a pruned model sparse under `Trainer`, and makes the Trainer's Hub pushes carry its masks.

    - After every optimizer step the masks are re-applied, whatever the optimizer does with zero gradients.
    - Before every Trainer push (`on_push_begin`) the masks and this package's model card are written into
      `args.output_dir`, the folder the Trainer uploads. The checkpoint pushes of `push_to_hub=True` training
      (`hub_strategy` "every_save", "checkpoint", "all_checkpoints") copy only weights and config there, so they
      then upload the masks and our card too (the card's "How to load" shows a placeholder repo id).
    - `Trainer.push_to_hub()` uploads the masks as well, but it then runs `Trainer.create_model_card`, which
      overwrites `README.md` with the Trainer's training card: that push carries the Trainer's card, not ours. For
      this package's card push with `model.push_to_hub(repo_id)` (or save with `trainer.save_model(folder)` and run
      `optimum-gblm push FOLDER REPO_ID`), which uploads weights, config, masks and our card in one commit.

    Models without GBLM masks are left alone.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = _pruned(model)
        if model is not None:
            apply_masks(model)

    def on_push_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = _pruned(model)
        if model is None or not getattr(state, "is_world_process_zero", True):
            return  # only the main process uploads (Trainer.push_to_hub calls this on every process)
        os.makedirs(args.output_dir, exist_ok=True)
        model.hf_quantizer.write_masks_and_card(model, args.output_dir)
