"""Files on disk: writing one so that readers see the old file or the new one, never half of it; owner locks that
say whether a leftover's writer is still alive, and the folders they guard; disk errors reported as `OSError`s with
their errno."""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no owner locks (see OwnerLock)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Rust's std::io::Error (safetensors, tokenizers) ends its message with "(os error N)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(error: BaseException) -> OSError | None:
    """`error` as an `OSError` when it is one underneath: safetensors raises `SafetensorError("... I/O error: No
    space left on device (os error 28)")`, which is no OSError, for a full disk. None when it is not an OS error."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    match = _OS_ERROR.search(text)
    if match is not None:
        code = int(match.group(1))
    elif "No space left on device" in text:
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, f"{os.strerror(code)} ({type(error).__name__}: {text})")


def _create_new_file(folder: Path, prefix: str, suffix: str) -> str:
    """A new empty file with a unique name in `folder`, with the permissions `open(path, "w")` gives (0666 less
    the process umask; `tempfile.mkstemp` would give 0600)."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(path)
    raise FileExistsError(errno.EEXIST, f"no unused temporary file name in {str(folder)!r}")


def write_atomically(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The temporary file is unique (two writers never share one) and is removed if `write` fails; `suffix` lets
    writers that infer the format from the name (matplotlib) see the right one. The file gets the permissions a
    plain `open(path, "w")` would give it: those of the file it replaces, else 0666 less the process umask. An OS error that `write`
    reports as another exception (safetensors' `SafetensorError` for a full disk) is raised as an `OSError` with
    its errno, so that callers can tell a full disk from a bug.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_new_file(path.parent, f".{path.name}.", suffix)
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)  # created with 0666: what the umask leaves of it
        try:
            write(tmp)
        except Exception as error:
            translated = as_os_error(error)
            if translated is None or translated is error:
                raise
            raise translated from error
        # Set after writing: a writer may replace the file with its own (safetensors >= 0.8 writes a 0600 temporary
        # file and renames it).
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class OwnerLock:
    """An exclusive `flock` on the file `path`, held while its owner works on something (a staging folder, a cache
    key). The kernel releases it when the owner's process dies, however it dies: a lock that another process can
    take has no living owner, and what it guarded is a leftover. The file names the owner (pid and host) for people
    who look, and is removed on release.

    Removing the file is safe because every acquirer checks, once it holds the lock, that `path` still is the file
    it locked, and starts over otherwise. Where `flock` is missing (not POSIX) or refused (some network
    filesystems), `acquire` succeeds without locking and `take_over` never does: nothing is then removed as a
    leftover.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self.locked = False  # False while held without a real lock (flock unavailable)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, creating its file; False when another process holds it and `blocking` is False."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            outcome = self._lock(fd, blocking)
            if outcome is None:  # flock unavailable here
                self._fd, self.locked = fd, False
                return True
            if not outcome:
                os.close(fd)
                return False
            if self._still_ours(fd):
                self._own(fd)
                return True
            os.close(fd)  # its previous owner removed the file after we opened it: lock the new one

    @classmethod
    def take_over(cls, path: str | os.PathLike) -> OwnerLock | None:
        """The lock of `path` when the file exists and no living process holds it (its owner died or is done),
        else None. The caller then owns what it guarded, and releases the lock when it has cleaned up."""
        lock = cls(path)
        try:
            fd = os.open(lock.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        outcome = lock._lock(fd, blocking=False)
        if not outcome or not lock._still_ours(fd):
            os.close(fd)
            return None
        lock._own(fd)
        return lock

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd, self.locked = None, False

    def __enter__(self) -> OwnerLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock(self, fd: int, blocking: bool) -> bool | None:
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            logger.warning("cannot lock %s (%s): going on without a lock", self.path, error)
            return None
        return True

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _own(self, fd: int) -> None:
        self._fd, self.locked = fd, True
        with contextlib.suppress(OSError):  # the owner's name is for people; a full disk must not stop the work
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())


class OwnedFolder:
    """A new folder `<parent>/<prefix><random>` that one process works in (a save's staging folder, a prune's scratch
    norms), owned by that process for as long as it exists: the lock file `<folder>.lock` beside it is flock'ed
    (`OwnerLock`) before the folder is made and released after it is removed. A folder whose lock can be taken is a
    leftover of a dead process (`remove_dead_folders`); one whose lock is held belongs to a process at work, this one
    or another."""

    def __init__(self, parent: str | os.PathLike, prefix: str):
        parent = Path(parent)
        for _ in range(100):
            self.path = parent / f"{prefix}{secrets.token_hex(6)}"
            self.lock = OwnerLock(f"{self.path}.lock")
            if os.path.lexists(self.lock.path) or os.path.lexists(self.path):
                continue
            self.lock.acquire()
            try:
                os.mkdir(self.path)  # 0777 less the umask, like a folder transformers creates (mkdtemp: 0700)
            except FileExistsError:
                self.lock.release()
                continue
            except BaseException:
                self.lock.release()
                raise
            return
        raise FileExistsError(errno.EEXIST, f"no unused folder name {prefix}* in {str(parent)!r}")

    def close(self) -> None:
        """Remove the folder (if it is still there), then give up ownership."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.lock.release()

    def __enter__(self) -> OwnedFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_dead_folders(parent: str | os.PathLike, prefix: str, owner: str) -> None:
    """Remove the `OwnedFolder`s `<parent>/<prefix>*` whose process died (`owner` names it in the log: "a save");
    never one whose owner is alive."""
    pattern = glob.escape(str(Path(parent) / prefix)) + "*"
    for lock_path in glob.glob(pattern + ".lock"):
        lock = OwnerLock.take_over(lock_path)
        if lock is not None:
            with lock:
                shutil.rmtree(lock_path[: -len(".lock")], ignore_errors=True)
                logger.info("removed %s, left by %s that did not finish", lock_path[: -len(".lock")], owner)
    for folder in glob.glob(pattern):
        # A folder without its lock file: its owner removed the lock after the folder, or never made one (a killed
        # process of an earlier version). Either way no living process owns it.
        if not folder.endswith(".lock") and os.path.isdir(folder) and not os.path.lexists(f"{folder}.lock"):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def kill_unwinds() -> Iterator[None]:
    """Inside, `kill` (SIGTERM) raises SystemExit(143) in the main thread instead of ending the process on the spot,
    so that context managers and `finally` blocks run and remove what the process owns (as Ctrl-C does). A SIGTERM
    handler the program set itself is left alone, and so is a call off the main thread (signals go to the main one)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def exit_on_kill(number: int, frame: object) -> None:
        raise SystemExit(128 + number)

    signal.signal(signal.SIGTERM, exit_on_kill)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
