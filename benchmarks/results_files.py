"""Writing benchmark results safely: each file is replaced whole (a run stopped mid-write never leaves half a table
or a truncated JSON), and a resumed run refuses a results file that was measured under other settings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _replace_through(tmp, path, lambda: tmp.write_text(text))


def atomic_savefig(figure: Any, path: str | Path, **savefig_kwargs: Any) -> None:
    """`figure.savefig` through a temporary file; the temporary name keeps the suffix matplotlib reads the format from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    _replace_through(tmp, path, lambda: figure.savefig(tmp, **savefig_kwargs))


def _replace_through(tmp: Path, path: Path, write: Callable[[], Any]) -> None:
    try:
        write()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a half file nor a stray temporary one


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
