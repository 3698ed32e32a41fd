"""Atomic file writes: a temporary file in the same folder, then a rename. A crash, or two
processes writing the same path, never leave a half-written file behind."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["atomic_write_text", "atomic_torch_save"]


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
