"""Files written so that a crash never leaves half of one behind, one probe for "can I write here",
and one way to say that the disk is full (``DiskFull``, ``is_disk_full``).

Atomic writes (``atomic_write``, and its text and torch forms) go to a temporary file in the same
folder, then a rename: a crash, or two processes writing the same path, never leave a half-written
file. ``writable_folder_error`` tries to create
and delete a file, because ``os.access`` answers yes for root even on read-only file systems.
``input_file_error`` says why a path given as an input file is not one, from ``os.stat`` alone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "writable_folder_error", "DiskFull",
           "is_disk_full", "full_disk_message", "input_file_error", "scratch_folder", "remove_stale_scratch",
           "process_alive", "owner_alive"]

# A scratch folder in the temporary folder is named after the process that made it, so that one a
# killed process left behind (a SIGTERM'd or lost Ray worker never runs its clean-up) can be told
# from one in use, and removed by the next process that looks.
SCRATCH_PREFIX = "mwt_ckpt_"

# What a full disk says when the error is not an OSError with its errno: shutil.copytree's list of
# failures, SQLite's error through MLflow, pyarrow's messages.
_FULL_DISK_TEXT = ("No space left on device", "database or disk is full", "Disk quota exceeded")
# torch.save says only "unexpected pos ..." when its write fails; below this much free space after
# such a failure, the disk was full.
_NEARLY_FULL_BYTES = 1 << 20


class DiskFull(OSError):
    """No space left on the device (ENOSPC) where a file was written; ``str()`` is one line saying so."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from or during, is a full disk (or quota)."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)[:20000]
        if any(phrase in text for phrase in _FULL_DISK_TEXT):
            return True
        stack += [current.__cause__, current.__context__]
    return False


def _nearly_full(folder: Path) -> bool:
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < _NEARLY_FULL_BYTES


def full_disk_message(what: str | Path, folder: str | Path) -> str:
    return f"disk full (ENOSPC): no space left on the device of {folder} to write {what}"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary)``, then a rename of the temporary file onto ``path``; returns ``path``.

    The temporary file is named after this process and keeps ``path``'s suffix (matplotlib and
    torch.export pick the format by it). A full disk, however the writer says so, raises ``DiskFull``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        temporary.replace(path)
    except (OSError, RuntimeError) as error:
        # Checked before the half-written temporary file is removed (that frees the space again);
        # torch.save's RuntimeError on a full disk says only "unexpected pos ...".
        if is_disk_full(error) or _nearly_full(temporary.parent):
            raise DiskFull(full_disk_message(path.name, path.parent)) from error
        raise
    finally:
        temporary.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text))


def atomic_torch_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def writable_folder_error(folder: str | Path) -> str | None:
    """None if files can be created in ``folder`` (or in the folder it would be made in), else why not.

    Creates nothing that stays: the probe goes into the nearest folder that exists already, so a
    folder that a later error would leave empty is never made here."""
    folder = Path(folder).expanduser().absolute()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing or folder} is not a folder"
    probe = existing / f".mwt_write_probe_{os.getpid()}_{time.time_ns()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return f"{existing}: {error.strerror or error}"
    return None


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new folder ``mwt_ckpt_<pid>_*`` in the temporary folder, removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_scratch(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders of processes that are gone (in ``root``, by default the temporary
    folder of this process); returns what was removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*_*"):
        owner = folder.name[len(SCRATCH_PREFIX):].split("_", 1)[0]
        if not owner.isdigit() or process_alive(int(owner)) or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie does not; another user's does)."""
    if pid <= 0:  # 0 and -1 would ask about this process group or every process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone for this purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_alive(record: dict) -> bool:
    """Whether the process a record of its ``host`` and ``pid`` names still runs: a job's ``job.json``,
    an export's owner file. On another host it cannot be asked, so it is taken to run."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        return process_alive(int(record.get("pid", 0)))
    except (ValueError, TypeError):
        return False


def input_file_error(path: str | Path) -> str | None:
    """None when ``path`` is a regular file (or a link to one), else why it cannot be read as one, in
    a few words: missing, a folder, a named pipe, a device. Decided by ``os.stat`` before any open: opening
    a FIFO for reading waits for a writer forever, and /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:  # a dangling link's loop, a component that is a file, no permission
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device file"
    return "is a socket" if stat.S_ISSOCK(mode) else "is not a regular file"
