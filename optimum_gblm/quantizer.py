"""The quantizer transformers instantiates for quant_method "gblm" (registered when this module is imported).

With a pruned checkpoint (`pre_quantized`) it reads the masks back and verifies them against the recorded checksum,
the weights and the recorded sparsity; a checkpoint in compressed storage (`GBLMConfig.storage`, see
`optimum_gblm.compressed`) has its masks read before the weights, checked against the stored values' shapes, and
each pruned weight rebuilt from its kept values as it loads. Given `quantization_config=GBLMConfig(dataset=...)` on a
dense checkpoint it prunes the model while loading. It sits above the pruner and the checkpoint format so that the
masks holder (`sparse_state.GBLMHfQuantizer`) needs neither.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer

from .checkpoint import find_masks_file, load_masks, read_masks
from .compressed import check_compressed_checkpoint, decompression_conversions, is_decompression_conversion
from .config import GBLMConfig
from .pruner import GBLMPruner, needs_calibration
from .sparse_state import GBLMHfQuantizer, attach_masks

logger = logging.getLogger(__name__)


class GBLMLoadingQuantizer(GBLMHfQuantizer):
    """`GBLMHfQuantizer` plus what `from_pretrained` calls: environment check and the after-loading step."""

    def __init__(self, quantization_config: GBLMConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_dir: str | None = None
        # Masks read before the weights (compressed storage): what the decompression needs, attached after loading.
        self.checkpoint_masks: tuple[dict[str, Any], dict[str, tuple[int, ...]]] | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if not self.pre_quantized and config.dataset is None and needs_calibration(config):
            raise ValueError(
                "pruning while loading needs calibration data: GBLMConfig(dataset='c4' | 'wikitext2' | a local path, "
                "tokenizer=...)."
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # The only place the weights' folder is known (a Hub checkpoint is in the cache, not at name_or_path).
        files = kwargs.get("checkpoint_files") or []
        if files:
            self.checkpoint_dir = os.path.dirname(files[0])
        if self.pre_quantized and self.quantization_config.storage == "compressed":
            path = find_masks_file(model, self.quantization_config.masks_file, self.checkpoint_dir)
            packed, shapes = read_masks(path)
            compressed = check_compressed_checkpoint(files, packed, shapes)
            self.checkpoint_masks = (packed, shapes)
            logger.info("compressed checkpoint: %d of %d pruned weights are stored as kept values", compressed, len(packed))
        return model

    def get_weight_conversions(self) -> list[Any]:
        if self.checkpoint_masks is None:
            return []
        return decompression_conversions(*self.checkpoint_masks)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized and self.checkpoint_masks is not None:
            # Saving reverses the conversions kept here; ours must not be: the stored form is written by
            # get_state_dict_and_metadata (see optimum_gblm.compressed).
            conversions = getattr(model, "_weight_conversions", None)
            if conversions:
                model._weight_conversions = [c for c in conversions if not is_decompression_conversion(c)]
            packed, shapes = self.checkpoint_masks
            self.checkpoint_masks = None
            attach_masks(model, self.quantization_config, packed, shapes, verify=True, quantizer=self)
            logger.info("loaded %d GBLM masks and verified them against the decompressed weights", len(packed))
        elif self.pre_quantized:
            load_masks(model, self, self.checkpoint_dir)
        else:
            config = self.quantization_config
            tokenizer = config.tokenizer if config.tokenizer is not None else model.name_or_path
            GBLMPruner(config).prune(model, config.dataset, tokenizer=tokenizer)
        return model


if AUTO_QUANTIZER_MAPPING.get("gblm") is not GBLMLoadingQuantizer:
    AUTO_QUANTIZER_MAPPING.pop("gblm", None)
    register_quantizer("gblm")(GBLMLoadingQuantizer)
