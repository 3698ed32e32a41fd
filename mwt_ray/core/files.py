"""Files written so that a crash never leaves half of one behind, and one probe for "can I write here".

Atomic writes go to a temporary file in the same folder, then a rename: a crash, or two processes
writing the same path, never leave a half-written file. ``writable_folder_error`` tries to create
and delete a file, because ``os.access`` answers yes for root even on read-only file systems.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

__all__ = ["atomic_write_text", "atomic_torch_save", "writable_folder_error"]


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    temporary = _temporary(path)
    try:
        temporary.write_text(text)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    temporary = _temporary(path)
    try:
        torch.save(obj, temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


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
