"""Model cards and `push_to_hub` for pruned checkpoints.

Every checkpoint this package writes explains itself: `save_pretrained` puts a `README.md` built with
huggingface_hub's `ModelCard` / `ModelCardData` beside the weights (metadata, the recipe, the calibration data,
measured sparsity, perplexity before/after with its protocol, how to load, the command that reproduces it), and
`push_to_hub` uploads weights, config, masks and that card in one commit. Endpoint and token come from
huggingface_hub's own settings (`HF_ENDPOINT`, `HF_TOKEN`, the login cache).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from . import checkpoint  # noqa: F401  (registers write_masks first: a save writes the masks, then the card)
from .config import GBLMConfig
from .record import PruningRecord
from .sparse_state import register_save_hook, set_push_handler

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"


# -- the card ---------------------------------------------------------------------------------------------------
def reproduce_command(config: GBLMConfig) -> str:
    """The `optimum-gblm prune` command that redoes this pruning (output folder left to fill in).

    The recipe flags come from `options.command_line_arguments` (generated from the recipe's fields, so every method
    and profile option is covered); the calibration source is the one the run actually used, when it can be named
    on a command line (a path or 'c4' / 'wikitext2', not in-memory token ids or texts, not the shipped default).
    """
    from .data import default_calibration_path
    from .options import command_line_arguments

    record = config.record if config.record is not None else PruningRecord()
    base = record.base_model or {}
    parts = ["optimum-gblm", "prune"]
    if not base.get("default"):
        if base.get("name"):
            parts += ["--model", base["name"]]
        if base.get("gguf_file"):
            parts += ["--gguf-file", base["gguf_file"]]
    source = (record.calibration or {}).get("source") or config.dataset
    if not isinstance(source, str) or source.startswith(("token ids", "datasets.Dataset")) or source.endswith(" texts"):
        source = config.dataset
    if source == str(default_calibration_path()):
        source = None
    parts += command_line_arguments(config, always=("method", "sparsity", "pattern"), dataset=source)
    parts += ["--output", "OUTPUT_DIR"]
    return shlex.join(parts)


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


def build_model_card(config: GBLMConfig, model_config: dict[str, Any] | None = None, model_name: str | None = None) -> ModelCard:
    """The card of a pruned checkpoint, from its `GBLMConfig` (recipe + measured results)."""
    model_config = model_config or {}
    record = config.record if config.record is not None else PruningRecord()
    base = record.base_model or {}
    base_name = base.get("name")
    model_name = model_name or (f"{base_name.split('/')[-1]}-{config.method}-{config.pattern.replace(':', 'of')}" if base_name else "pruned-model")
    tags = ["pruned", "sparse", "gblm", "optimum-gblm", config.method]
    tags.append("unstructured-sparsity" if config.nm is None else f"{config.pattern.replace(':', 'of')}-sparsity")
    evaluations = record.evaluation or []
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=e["data"],
            dataset_name=e["data"],
            metric_type="perplexity",
            metric_value=round(e["perplexity"], 4),
            metric_name=f"perplexity (seqlen {e['seqlen']}, {e['num_tokens']} tokens)",
        )
        for e in evaluations
    ]
    data = ModelCardData(
        base_model=base_name if base_name and not os.path.isabs(base_name) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=base.get("license"),
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    architecture = (model_config.get("architectures") or ["a causal LM"])[0]
    calibration = record.calibration or {}
    lines = [
        f"# {model_name}",
        "",
        f"{base_name or 'A causal language model'} ({architecture}) pruned to "
        f"**{record.global_sparsity if record.global_sparsity is not None else config.sparsity:.2%} sparsity** "
        f"({config.pattern}) with **{config.method}** by [optimum-gblm](https://pypi.org/project/optimum-gblm/).",
    ]
    if base.get("gguf_file"):
        lines += ["", f"Base weights: `{base['gguf_file']}`, dequantized to dense floating point before pruning."]
    lines += [
        "",
        "The pruned weights are stored as exact zeros in the dense weight tensors (any transformers stack loads a "
        "correct model); the masks, 1 bit per prunable weight, are in `" + config.masks_file + "`.",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in config.recipe().items() if k not in ("quant_method", "base_model", "evaluation")]
    lines += ["", "## Calibration data", ""]
    if calibration:
        lines.append(
            f"{calibration.get('num_samples')} sequences x {calibration.get('seqlen')} tokens from "
            f"`{calibration.get('source')}`, seed {calibration.get('seed')}."
        )
    else:
        lines.append("None: magnitude pruning uses the weights alone.")
    lines += ["", "## Measured sparsity", ""]
    if record.global_sparsity is not None:
        lines.append(f"Global (all pruned layers): **{record.global_sparsity:.4f}**. Per layer:")
        lines += ["", _layer_table(record.layer_sparsity or {})]
    lines += ["", "## Evaluation", ""]
    if evaluations:
        lines += ["| text | seqlen | tokens | dense ppl | pruned ppl |", "|---|---|---|---|---|"]
        for e in evaluations:
            dense = f"{e['dense_perplexity']:.3f}" if e.get("dense_perplexity") is not None else "-"
            lines.append(f"| {e['data']} | {e['seqlen']} | {e['num_tokens']} | {dense} | {e['perplexity']:.3f} |")
        lines += ["", "Perplexity: non-overlapping windows of `seqlen` tokens, remainder dropped, exp(mean token NLL)."]
    else:
        lines.append("Not evaluated when saved (run `optimum-gblm eval --model THIS_FOLDER --data TEXT --seqlen 2048`).")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import optimum_gblm  # registers quant_method 'gblm': masks are read back and verified",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_name}")',
        "```",
        "",
        "Without `import optimum_gblm`, transformers warns about the unknown quantization type and loads the same "
        "zero-filled weights without the masks. For sparse fine-tuning keep the masks: pass "
        "`callbacks=[optimum_gblm.SparsityCallback()]` to `Trainer`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"pip install optimum-gblm && {reproduce_command(config)}",
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(model: Any, save_directory: str | os.PathLike) -> Path:
    config = model.config.quantization_config
    card = build_model_card(config, model.config.to_dict())
    path = Path(save_directory) / CARD_FILE
    card.save(str(path))
    return path


register_save_hook(write_model_card)  # after checkpoint.write_masks (imported above)


# -- pushing ----------------------------------------------------------------------------------------------------
def _checked_checkpoint(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(folder)!r} is not a checkpoint folder (no config.json); pass the folder save_pretrained wrote.")
    model_config = json.loads(config_path.read_text(encoding="utf-8"))
    entry = model_config.get("quantization_config") or {}
    if entry.get("quant_method") != "gblm":
        raise ValueError(f"{str(folder)!r} was not pruned by optimum-gblm (no quant_method 'gblm' in config.json).")
    masks = folder / entry.get("masks_file", "gblm_masks.safetensors")
    if not masks.is_file():
        raise ValueError(f"{str(folder)!r} lacks its mask file {masks.name!r}; re-save the pruned model before pushing.")
    return model_config


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    replace_model_card: bool = True,
    endpoint: str | None = None,
):
    """Upload a saved pruned checkpoint (weights, config, masks, card) in one commit; the folder is only read.

    A missing README.md is generated from config.json for the upload (nothing is written into `folder`). With
    `replace_model_card=False` the README is not uploaded, leaving the Hub's card as it is.
    """
    folder = Path(folder)
    model_config = _checked_checkpoint(folder)
    api = HfApi(endpoint=endpoint, token=token)
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    card_bytes = None
    if not replace_model_card:
        files.pop(CARD_FILE, None)
    elif CARD_FILE not in files:
        # Never write into the user's folder: the card is generated for the upload only.
        config = GBLMConfig.from_dict(model_config["quantization_config"])
        card_bytes = str(build_model_card(config, model_config, model_name=repo_id)).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    if card_bytes is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_bytes))
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        # One commit with every file: weights, config, masks and card land together or not at all.
        return api.create_commit(
            repo_id=repo.repo_id,
            operations=operations,
            commit_message=commit_message or "Upload pruned model (optimum-gblm)",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as error:  # network, auth, server: one clear message, the local folder untouched
        raise ConnectionError(
            f"could not push {str(folder)!r} to {api.endpoint} as {repo_id!r}: {type(error).__name__}: {error}. "
            f"Check the endpoint (HF_ENDPOINT) and your token (HF_TOKEN or `hf auth login`). "
            f"The local checkpoint is unchanged."
        ) from error


def push_to_hub(model: Any, repo_id: str, tokenizer: Any = None, **kwargs: Any):
    """Save a pruned model (weights, config, masks, card) to a temporary folder and upload it in one commit."""
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card = build_model_card(model.config.quantization_config, model.config.to_dict(), model_name=repo_id)
        card.save(os.path.join(staging, CARD_FILE))
        return push_folder_to_hub(staging, repo_id, **kwargs)


set_push_handler(push_to_hub)  # a pruned model's push_to_hub uploads through push_to_hub above
