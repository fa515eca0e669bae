"""Calibration and evaluation text.

Sources: a tensor of token ids, a list of strings, a `datasets.Dataset` with a text column, a local text file or a
folder of them, or the names "c4" and "wikitext2" (loaded with `datasets.load_dataset`, windows drawn as the
reference loaders draw them). The same seed always gives the same windows.
"""

from __future__ import annotations

import logging
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
NAMED_SOURCES = ("c4", "wikitext2")
# Offline default: a public-domain novel (Pride and Prejudice, from Debian's r-cran-janeaustenr) in the package.
DEFAULT_CALIBRATION_FILE = "austen_prideprejudice.txt"

CalibrationSource = Union[torch.Tensor, str, os.PathLike, Sequence[str], Any]


def default_calibration_path() -> Path:
    """Path of the public-domain calibration text shipped inside the package."""
    return Path(str(resources.files("optimum_gblm") / "data" / DEFAULT_CALIBRATION_FILE))


def _is_dataset(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(source, datasets.Dataset)


def read_text(source: str | os.PathLike) -> str:
    """Read a text file, or every text file under a folder (sorted, joined by blank lines)."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no text files ({', '.join(TEXT_SUFFIXES)}); add some or pass a file.")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    raise ValueError(
        f"calibration/evaluation source {str(source)!r} is neither a file, a folder, nor one of the names "
        f"{NAMED_SOURCES}: check the path."
    )


def dataset_text(dataset: Any, text_column: str = "text") -> str:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"the dataset has no column {text_column!r} (columns: {dataset.column_names}); pass text_column=..."
        )
    return "\n\n".join(t for t in dataset[text_column] if t)


def _require_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise ValueError(
            f"{what} is text and needs a tokenizer: pass tokenizer=... to prune() or set GBLMConfig(tokenizer=...)."
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of a long text as a 1-D LongTensor (the tokenizer's own special tokens, as the references do)."""
    # A long text exceeds model_max_length by design: we cut windows ourselves, so silence that warning.
    verbose = getattr(tokenizer, "verbose", None)
    if verbose is not None:
        tokenizer.verbose = False
    try:
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    finally:
        if verbose is not None:
            tokenizer.verbose = verbose
    return torch.tensor(ids, dtype=torch.long)


def random_windows(token_ids: torch.Tensor, num_samples: int, seqlen: int, seed: int, what: str = "calibration data") -> torch.Tensor:
    """Draw `num_samples` windows of `seqlen` tokens at seeded random offsets (the reference's wikitext2 loader)."""
    total = int(token_ids.numel())
    if total < seqlen + 1:
        raise ValueError(
            f"{what} is too short: found {total} tokens, need at least {seqlen + 1} for one window of {seqlen} "
            f"tokens. Add text or lower seqlen."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(num_samples)]
    return torch.stack([token_ids[s : s + seqlen] for s in starts])


def _c4_windows(tokenizer: Any, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The reference C4 loader: first training shard, a random document long enough, a random window in it."""
    from datasets import load_dataset

    documents = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    rng = random.Random(seed)
    windows = []
    for _ in range(num_samples):
        while True:
            document = documents[rng.randint(0, len(documents) - 1)]["text"]
            ids = tokenize(document, tokenizer)
            if ids.numel() > seqlen:
                break
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def _wikitext2_text(split: str) -> str:
    from datasets import load_dataset

    return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def source_description(source: CalibrationSource) -> str:
    """A short, JSON-friendly description of a data source for recipes and logs."""
    if isinstance(source, torch.Tensor):
        return f"token ids {tuple(source.shape)}"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if _is_dataset(source):
        return f"datasets.Dataset ({len(source)} rows)"
    return f"{len(source)} texts"


def load_text(source: CalibrationSource, text_column: str = "text", split: str = "train") -> str:
    """The raw text of any non-tensor source."""
    if isinstance(source, (str, os.PathLike)):
        if source == "wikitext2":
            return _wikitext2_text(split)
        return read_text(source)
    if _is_dataset(source):
        return dataset_text(source, text_column)
    if isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        if not source:
            raise ValueError("the list of calibration texts is empty: pass at least one string.")
        return "\n\n".join(source)
    raise ValueError(
        f"cannot use a {type(source).__name__} as text: pass token ids (a LongTensor), a list of strings, a "
        f"datasets.Dataset, a file or folder path, or one of {NAMED_SOURCES}."
    )


def get_calibration_data(
    source: CalibrationSource,
    tokenizer: Any = None,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_column: str = "text",
) -> torch.Tensor:
    """Calibration token ids of shape (N, T).

    A tensor is used as given (it must be 2-D integer token ids); text sources are tokenized once and cut into
    `num_samples` windows of `seqlen` tokens at seeded random offsets.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype not in (torch.int64, torch.int32) or source.numel() == 0:
            raise ValueError(
                f"calibration token ids must be a non-empty 2-D integer tensor (num_samples, seqlen), got "
                f"shape {tuple(source.shape)} and dtype {source.dtype}."
            )
        if source.shape[1] < 2:
            raise ValueError(f"calibration sequences need at least 2 tokens each, got {source.shape[1]}.")
        return source.long()
    if source == "c4":
        return _c4_windows(_require_tokenizer(tokenizer, "c4"), num_samples, seqlen, seed)
    text = load_text(source, text_column=text_column, split="train")
    token_ids = tokenize(text, _require_tokenizer(tokenizer, "the calibration data"))
    windows = random_windows(token_ids, num_samples, seqlen, seed)
    logger.info("calibration: %d windows x %d tokens from %s (%d tokens)", num_samples, seqlen, source_description(source), token_ids.numel())
    return windows


def get_evaluation_tokens(source: CalibrationSource, tokenizer: Any = None, text_column: str = "text") -> torch.Tensor:
    """Evaluation token ids as one 1-D tensor (WikiText-2: the test split joined with blank lines)."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    if source == "c4":
        from datasets import load_dataset

        documents = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        text = " ".join(documents[:1100]["text"])
    else:
        text = load_text(source, text_column=text_column, split="test")
    return tokenize(text, _require_tokenizer(tokenizer, "the evaluation data"))
