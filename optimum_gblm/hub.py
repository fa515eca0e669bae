"""`push_to_hub` for pruned checkpoints: weights, config, masks and card uploaded in one commit.

`model.push_to_hub`, `model.save_pretrained(..., push_to_hub=True)` (both through `GBLMHfQuantizer`) and
`push_folder_to_hub` (the CLI's `push`) upload through here. transformers' `Trainer` pushes through its own upload;
`training.SparsityCallback` puts the masks (and, for checkpoint pushes, the card) in what it uploads. Endpoint and
token come from huggingface_hub's own settings (`HF_ENDPOINT`, `HF_TOKEN`, the login cache).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled

from .card import CARD_FILE, build_model_card, model_card, save_card
from .config import GBLMConfig

logger = logging.getLogger(__name__)

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
            save_card(model_card(model, repo_id=name, tags=tags), folder)
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

