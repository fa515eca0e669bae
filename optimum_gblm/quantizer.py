"""The quantizer transformers instantiates for quant_method "gblm" (registered when this module is imported).

With a pruned checkpoint (`pre_quantized`) it reads the masks back and verifies them against the recorded checksum,
the weights and the recorded sparsity; given `quantization_config=GBLMConfig(dataset=...)` on a dense checkpoint it
prunes the model while loading. It sits above the pruner and the checkpoint format so that the masks holder
(`sparse_state.GBLMHfQuantizer`) needs neither.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer

from .checkpoint import load_masks
from .config import GBLMConfig
from .pruner import GBLMPruner
from .sparse_state import GBLMHfQuantizer

logger = logging.getLogger(__name__)


class GBLMLoadingQuantizer(GBLMHfQuantizer):
    """`GBLMHfQuantizer` plus what `from_pretrained` calls: environment check and the after-loading step."""

    def __init__(self, quantization_config: GBLMConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_dir: str | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError(
                "pruning while loading needs calibration data: GBLMConfig(dataset='c4' | 'wikitext2' | a local path, "
                "tokenizer=...)."
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # The only place the weights' folder is known (a Hub checkpoint is in the cache, not at name_or_path).
        files = kwargs.get("checkpoint_files") or []
        if files:
            self.checkpoint_dir = os.path.dirname(files[0])
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            load_masks(model, self, self.checkpoint_dir)
        else:
            config = self.quantization_config
            tokenizer = config.tokenizer if config.tokenizer is not None else model.name_or_path
            GBLMPruner(config).prune(model, config.dataset, tokenizer=tokenizer)
        return model


if AUTO_QUANTIZER_MAPPING.get("gblm") is not GBLMLoadingQuantizer:
    AUTO_QUANTIZER_MAPPING.pop("gblm", None)
    register_quantizer("gblm")(GBLMLoadingQuantizer)
