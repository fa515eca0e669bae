"""Calibration and evaluation data.

Sources: a 2-D tensor of token ids (used as given); token ids as tokenizers and quantization tools produce them (a
`datasets.Dataset` with an `input_ids` column, a transformers `BatchEncoding` or a dict with `input_ids`, a list of
id lists, a list of `{"input_ids": ...}` examples as optimum's GPTQ takes them); texts (a list of strings, a
`datasets.Dataset` with a text column, a local text file or a folder of them); or the names "c4" and "wikitext2"
(loaded with `datasets.load_dataset`, windows drawn as the reference loaders draw them). The same seed always gives
the same windows.

optimum's own helpers (`optimum.gptq.data.get_dataset`, `prepare_dataset`) are deliberately not used:
`get_dataset` reseeds the global `random`, numpy and torch generators (a side effect on the caller) and its
WikiText-2 loader keeps only the first 1000 rows, while GBLM's reference draws from the whole split; and
`prepare_dataset` pads variable-length examples with an attention mask for batch-1 loops, whereas pruning here feeds
one rectangular (num_samples, seqlen) tensor without a mask, so padding would put pad tokens into the activation
and gradient statistics. Their tokenized form (a list of `{"input_ids", "attention_mask"}` dicts) is accepted.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
NAMED_SOURCES = ("c4", "wikitext2")
# Offline default: a public-domain novel (Pride and Prejudice, from Debian's r-cran-janeaustenr) in the package.
DEFAULT_CALIBRATION_FILE = "austen_prideprejudice.txt"

CalibrationSource = Union[torch.Tensor, str, os.PathLike, Sequence[str], Sequence[Sequence[int]], Mapping, Any]  # noqa: UP007 (a runtime alias)

ACCEPTED_FORMS = (
    "token ids (a 2-D LongTensor, a datasets.Dataset with an 'input_ids' column, a BatchEncoding or dict with "
    "'input_ids', a list of id lists), texts (a list of strings, a datasets.Dataset with a text column), a file or "
    f"folder path, or one of {NAMED_SOURCES}"
)


def default_calibration_path() -> Path:
    """Path of the public-domain calibration text shipped inside the package."""
    return Path(str(resources.files("optimum_gblm") / "data" / DEFAULT_CALIBRATION_FILE))


def _is_dataset(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(source, datasets.Dataset)


def _check_not_dataset_dict(source: Any) -> None:
    """A DatasetDict is a dict of splits: say which split to pass rather than looking for `input_ids` in it."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(
            f"got a DatasetDict with splits {list(source)}: pass one split, e.g. dataset[{next(iter(source), 'train')!r}]."
        )


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
    """The rows of a dataset's text column, joined by blank lines (empty rows skipped)."""
    if text_column not in dataset.column_names:
        raise ValueError(
            f"the dataset has no column {text_column!r} (columns: {dataset.column_names}); pass "
            f"text_column=... (to prune() or get_calibration_data()) naming the text column, or add an 'input_ids' "
            f"column of token ids."
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


def window_start_token(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer starts every encoded text with it (Gemma, Llama 2/3), else None (GPT-2 style
    tokenizers such as SmolLM2's add none).

    Windows cut from one long tokenization lack that token, and some models depend on it (Gemma 3 270M: ppl about
    104 on Austen without it, about 30 with it), so calibration and evaluation windows start the way the tokenizer
    starts a text: one rule for every model, which leaves models without a BOS convention untouched.
    """
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def strip_start_token(token_ids: torch.Tensor, start_token: int | None) -> torch.Tensor:
    """`token_ids` without a leading `start_token` (the one the tokenizer put before the whole text)."""
    if start_token is not None and token_ids.numel() and int(token_ids[0]) == start_token:
        return token_ids[1:]
    return token_ids


def window_at(token_ids: torch.Tensor, start: int, seqlen: int, start_token: int | None = None) -> torch.Tensor:
    """The window of `seqlen` tokens at `start`; with `start_token`, that token and then `seqlen - 1` text tokens."""
    if start_token is None:
        return token_ids[start : start + seqlen]
    return torch.cat([token_ids.new_tensor([start_token]), token_ids[start : start + seqlen - 1]])


def random_windows(
    token_ids: torch.Tensor,
    num_samples: int,
    seqlen: int,
    seed: int,
    what: str = "calibration data",
    start_token: int | None = None,
) -> torch.Tensor:
    """Draw `num_samples` windows of `seqlen` tokens at seeded random offsets (the reference's wikitext2 loader).
    With `start_token` (see `window_start_token`) each window is that token and then `seqlen - 1` text tokens."""
    token_ids = strip_start_token(token_ids, start_token)
    width = seqlen - (start_token is not None)
    total = int(token_ids.numel())
    if total < width + 1:
        raise ValueError(
            f"{what} is too short: found {total} tokens, need at least {width + 1} for one window of {seqlen} "
            f"tokens. Add text or lower seqlen."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - width - 1) for _ in range(num_samples)]
    return torch.stack([window_at(token_ids, s, seqlen, start_token) for s in starts])


# -- token ids as users have them -------------------------------------------------------------------------------
def _row_tensor(row: Any, what: str, mask: bool = False) -> torch.Tensor:
    """One sequence of token ids as a 1-D LongTensor (an attention mask row as a bool tensor: any number or bool
    works there); a (1, T) row (tokenized with return_tensors) is flattened."""
    values = row.tolist() if hasattr(row, "tolist") else row
    if isinstance(values, (list, tuple)) and len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{what}: each row must be a sequence of token ids, got a {type(row).__name__}.")
    if not values:
        return torch.zeros(0, dtype=torch.bool if mask else torch.long)
    try:
        tensor = torch.tensor(values)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: each row must be a flat sequence of integer token ids.") from None
    if mask and tensor.dim() == 1:
        return tensor != 0
    if tensor.dim() != 1 or tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(
            f"{what}: token ids must be integers in flat rows, got a row of dtype {tensor.dtype} and shape "
            f"{tuple(tensor.shape)}."
        )
    return tensor.long()


def _rows_of(ids: Any, what: str, mask: bool = False) -> list[torch.Tensor]:
    """Rows of a column/array of token ids (or of attention masks): a 2-D tensor, a 1-D tensor or flat list (one
    row), a list of rows."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            return [_row_tensor(ids, what, mask)]
        if ids.dim() == 2:
            return [_row_tensor(row, what, mask) for row in ids]
        raise ValueError(f"{what}: token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}.")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, datasets columns
    if ids and all(isinstance(i, (int, float)) for i in ids):
        return [_row_tensor(ids, what, mask)]
    return [_row_tensor(row, what, mask) for row in ids]


def _apply_attention_mask(rows: list[torch.Tensor], masks: Any, what: str) -> list[torch.Tensor]:
    """Drop padded positions (attention_mask 0): padding tokens are not text and must not reach the statistics."""
    mask_rows = _rows_of(masks, what + " attention_mask", mask=True)
    if len(mask_rows) != len(rows) or any(m.numel() != r.numel() for m, r in zip(mask_rows, rows)):
        raise ValueError(f"{what}: attention_mask does not match input_ids row for row.")
    return [r[m] for r, m in zip(rows, mask_rows)]


def token_rows(source: Any) -> tuple[list[torch.Tensor], str] | None:
    """(rows of token ids, description) when `source` holds token ids other than a bare tensor; None for text.

    Padded positions (attention_mask 0) are removed, so a padded BatchEncoding gives its real tokens only.
    """
    _check_not_dataset_dict(source)
    if _is_dataset(source):
        if "input_ids" not in source.column_names:
            return None
        plain = source.with_format(None)
        what = f"datasets.Dataset ({len(source)} rows)"
        rows = _rows_of(list(plain["input_ids"]), what)
        if "attention_mask" in source.column_names:
            rows = _apply_attention_mask(rows, list(plain["attention_mask"]), what)
        return rows, f"token ids from a datasets.Dataset ({len(source)} rows)"
    if isinstance(source, Mapping):
        kind = type(source).__name__ if type(source).__name__ == "BatchEncoding" else "dict"
        if "input_ids" not in source:
            raise ValueError(f"a {kind} of calibration data needs an 'input_ids' entry (keys: {list(source)}).")
        rows = _rows_of(source["input_ids"], kind)
        if source.get("attention_mask") is not None:
            rows = _apply_attention_mask(rows, source["attention_mask"], kind)
        return rows, f"token ids from a {kind} ({len(rows)} rows)"
    if isinstance(source, (list, tuple)) and source and not any(isinstance(item, str) for item in source):
        if all(isinstance(item, Mapping) for item in source):
            rows = []
            for example in source:
                if "input_ids" not in example:
                    raise ValueError(f"each tokenized example needs 'input_ids' (keys: {list(example)}).")
                example_rows = _rows_of(example["input_ids"], "tokenized examples")
                if example.get("attention_mask") is not None:
                    example_rows = _apply_attention_mask(example_rows, example["attention_mask"], "tokenized examples")
                rows.extend(example_rows)
            return rows, f"token ids from {len(source)} tokenized examples"
        rows = _rows_of(source, "the list of token ids")
        return rows, f"token ids ({len(rows)} sequences)"
    return None


def _separators(tokenizer: Any) -> tuple[int | None, int | None]:
    """(separator, bos) ids for joining rows: the tokenizer's EOS (else BOS), as between documents in pre-training."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _require_tokenizer(tokenizer, "token ids")
    eos, bos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)
    return (eos if eos is not None else bos), bos


def join_rows(rows: list[torch.Tensor], tokenizer: Any = None) -> torch.Tensor:
    """One stream of the non-empty rows, the separator between two rows unless one already marks the boundary."""
    separator, bos = _separators(tokenizer)
    pieces: list[torch.Tensor] = []
    previous: torch.Tensor | None = None
    for row in rows:
        if row.numel() == 0:
            continue
        boundary_marked = previous is None or int(previous[-1]) == separator or (bos is not None and int(row[0]) == bos)
        if separator is not None and not boundary_marked:
            pieces.append(torch.tensor([separator], dtype=torch.long))
        pieces.append(row)
        previous = row
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def row_windows(rows: list[torch.Tensor], num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """One window of `seqlen` tokens per sample, each inside one row (every row must hold >= seqlen tokens).

    Distinct rows are drawn (seeded, kept in dataset order), so N rows for N samples use every row once; when there
    are fewer rows than samples, rows are reused at other random offsets.
    """
    rng = random.Random(seed)
    picks: list[int] = []
    while len(picks) < num_samples:
        take = min(num_samples - len(picks), len(rows))
        picks += sorted(rng.sample(range(len(rows)), take))
    if num_samples > len(rows):
        logger.warning("calibration: %d rows for %d samples; rows are reused at other offsets", len(rows), num_samples)
    windows = []
    for index in picks:
        row = rows[index]
        start = rng.randint(0, row.numel() - seqlen)
        windows.append(row[start : start + seqlen])
    return torch.stack(windows)


def token_windows(
    rows: list[torch.Tensor], num_samples: int, seqlen: int, seed: int, tokenizer: Any = None, what: str = "calibration data"
) -> torch.Tensor:
    """(num_samples, seqlen) windows from rows of token ids of any lengths.

    When every row holds at least `seqlen` tokens, each sample is a window inside one row: GPTQ and llm-compressor
    users hand over one example per row and expect samples not to run across them. Rows shorter than `seqlen` cannot
    fill a rectangular window without padding (pad tokens would enter the statistics), so then all rows are joined
    into one stream, the tokenizer's EOS between them when a tokenizer is given, and windows are drawn at random
    offsets as the reference draws WikiText-2 windows.
    """
    rows = [row for row in rows if row.numel()]
    if not rows:
        raise ValueError(f"{what} is empty: it holds no token ids.")
    if all(row.numel() >= seqlen for row in rows):
        return row_windows(rows, num_samples, seqlen, seed)
    logger.info("calibration: rows shorter than seqlen %d; joining %d rows into one token stream", seqlen, len(rows))
    return random_windows(join_rows(rows, tokenizer), num_samples, seqlen, seed, what)


def _c4_windows(tokenizer: Any, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The reference C4 loader: first training shard, a random document long enough, a random window in it."""
    from datasets import load_dataset

    documents = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    rng = random.Random(seed)
    start_token = window_start_token(tokenizer)
    width = seqlen - (start_token is not None)
    windows = []
    for _ in range(num_samples):
        while True:
            document = documents[rng.randint(0, len(documents) - 1)]["text"]
            ids = strip_start_token(tokenize(document, tokenizer), start_token)
            if ids.numel() > width:
                break
        start = rng.randint(0, ids.numel() - width - 1)
        windows.append(window_at(ids, start, seqlen, start_token))
    return torch.stack(windows)


def _wikitext2_text(split: str) -> str:
    from datasets import load_dataset

    return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def source_description(source: CalibrationSource, text_column: str = "text") -> str:
    """A short, JSON-friendly description of a data source for recipes and logs."""
    if isinstance(source, torch.Tensor):
        return f"token ids {tuple(source.shape)}"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if _is_dataset(source):
        if "input_ids" in source.column_names:
            return f"token ids from a datasets.Dataset ({len(source)} rows)"
        column = "" if text_column == "text" else f", column {text_column!r}"
        return f"datasets.Dataset ({len(source)} rows{column})"
    if isinstance(source, Mapping) or (isinstance(source, (list, tuple)) and source and not isinstance(source[0], str)):
        try:
            found = token_rows(source)
        except ValueError:
            found = None
        if found is not None:
            return found[1]
    try:
        return f"{len(source)} texts"
    except TypeError:
        return type(source).__name__


def load_text(source: CalibrationSource, text_column: str = "text", split: str = "train") -> str:
    """The raw text of any text source."""
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
    raise ValueError(f"cannot use a {type(source).__name__} as calibration/evaluation data: pass {ACCEPTED_FORMS}.")


def get_calibration_data(
    source: CalibrationSource,
    tokenizer: Any = None,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_column: str = "text",
) -> torch.Tensor:
    """Calibration token ids of shape (N, T).

    A 2-D tensor is used as given (it must be integer token ids): it is the explicit way to choose every sample.
    Other token ids (a Dataset with `input_ids`, which wins over its text column; a BatchEncoding or dict; a list of
    id lists) give `num_samples` windows of `seqlen` tokens as `token_windows` explains; the tokenizer is optional
    there and only supplies the EOS placed between joined rows. Text sources (`text_column` names a Dataset's text
    column) are tokenized once and cut into `num_samples` windows of `seqlen` tokens at seeded random offsets, each
    starting with BOS when the tokenizer starts texts with one (`window_start_token`).
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
    if isinstance(source, str) and source == "c4":
        return _c4_windows(_require_tokenizer(tokenizer, "c4"), num_samples, seqlen, seed)
    found = token_rows(source)
    if found is not None:
        rows, description = found
        windows = token_windows(rows, num_samples, seqlen, seed, tokenizer, what=f"calibration data ({description})")
        logger.info("calibration: %d windows x %d tokens from %s", num_samples, seqlen, description)
        return windows
    text = load_text(source, text_column=text_column, split="train")
    tokenizer = _require_tokenizer(tokenizer, "the calibration data")
    token_ids = tokenize(text, tokenizer)
    windows = random_windows(token_ids, num_samples, seqlen, seed, start_token=window_start_token(tokenizer))
    logger.info(
        "calibration: %d windows x %d tokens from %s (%d tokens)",
        num_samples, seqlen, source_description(source, text_column), token_ids.numel(),
    )
    return windows


def get_evaluation_tokens(source: CalibrationSource, tokenizer: Any = None, text_column: str = "text") -> torch.Tensor:
    """Evaluation token ids as one 1-D tensor (WikiText-2: the test split joined with blank lines; rows of token
    ids: joined with the tokenizer's EOS between them, as for calibration)."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    if isinstance(source, str) and source == "c4":
        from datasets import load_dataset

        documents = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        text = " ".join(documents[:1100]["text"])
    else:
        found = token_rows(source)
        if found is not None:
            stream = join_rows(found[0], tokenizer)
            if stream.numel() == 0:
                raise ValueError(f"evaluation data ({found[1]}) is empty: it holds no token ids.")
            return stream
        text = load_text(source, text_column=text_column, split="test")
    return tokenize(text, _require_tokenizer(tokenizer, "the evaluation data"))
