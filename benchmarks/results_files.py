"""Writing benchmark results safely: each file is replaced whole (a run stopped mid-write never leaves half a table
or a truncated JSON), and a resumed run refuses a results file that was measured under other settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optimum_gblm.files import write_atomically


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and one rename."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


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
