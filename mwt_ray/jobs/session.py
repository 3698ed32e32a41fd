"""What a ``TrainingJob`` needs to know about where it runs: the interface its sessions share.

Two sessions implement it: ``jobs.training_job.LocalSession`` (this process, world size 1,
checkpoints written straight to the job's storage) and ``cluster.worker.RayTrainSession`` (one rank
of a Ray Train worker group, checkpoints reported to Ray Train). The job calls nothing else of
them, so a third place to run (another launcher) is a third class with these members.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .storage import RunStorage

__all__ = ["TrainingSession"]


@runtime_checkable
class TrainingSession(Protocol):
    rank: int  # this process's rank in the job; rank 0 writes checkpoints and results, logs and tracks
    world_size: int  # processes that train the job together (each takes its slice of every batch)
    device: torch.device  # where this rank trains
    storage: RunStorage  # the job's folder in the run storage (checkpoints, job.json, run.json)
    # Called with every epoch's metrics after its checkpoint is stored and logged (a sweep trial
    # reports to Tune); None: nobody listens.
    report: Callable[[dict], None] | None

    def resume_state(self) -> dict | None:
        """The training state (``training_state.pt``'s dict) the job continues from, None for a fresh
        start; read once, by whoever planned the job, where the session can be handed it."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as this session trains it (DistributedDataParallel across a worker group)."""

    def persist(self, folder: Path, folder_name: str, metrics: dict) -> None:
        """Store checkpoint ``folder`` (filled by rank 0; empty on other ranks) as ``folder_name`` of
        the job, with the epoch's ``metrics``; called by every rank."""
