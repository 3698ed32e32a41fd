"""Run storage: where a job's checkpoints live, a local folder or an object-store URI (s3://, gs://).

One layout for every job, in one process or on Ray Train workers (Ray Train writes the same
folders through ``RunConfig(storage_path=storage_root(cfg), name=cfg.name)``)::

    <storage root>/<name>/checkpoint_epoch_0003/training_state.pt
    <storage root>/<name>/final_<time>_<epochs>/  training_state.pt, checkpoint.pt, metrics.json, history.csv
    <storage root>/<name>/mlflow_run.json          the MLflow run of this job
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import torch

from ..config import Config
from ..core.checkpoint import check_architecture
from ..core.files import writable_folder_error
from .setup import SetupError

__all__ = ["RunStorage", "storage_root", "job_storage", "latest_training_state", "check_resume",
           "TRAINING_STATE", "RUN_FILE", "KEEP_CHECKPOINTS"]

TRAINING_STATE = "training_state.pt"
RUN_FILE = "mlflow_run.json"
KEEP_CHECKPOINTS = 2


class RunStorage:
    """The job's folder in the run storage: a local path or a pyarrow URI (s3://, gs://, ...)."""

    def __init__(self, path_or_uri: str):
        import pyarrow.fs as pafs

        self._pafs = pafs
        if "://" in path_or_uri:
            self.fs, self.path = pafs.FileSystem.from_uri(path_or_uri)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(path_or_uri).expanduser().resolve())
        self.uri = path_or_uri

    def _join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def check_writable(self) -> None:
        """Raise SetupError unless checkpoints can be written here; creates no folder on local disk."""
        if isinstance(self.fs, self._pafs.LocalFileSystem):
            reason = writable_folder_error(self.path)
        else:
            probe = self._join(f".write_probe_{os.getpid()}_{time.time_ns()}")
            try:
                with self.fs.open_output_stream(probe) as stream:
                    stream.write(b"ok")
                self.fs.delete_file(probe)
                reason = None
            except Exception as error:  # cloud auth errors, missing buckets, ...
                reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
        if reason:
            raise SetupError(f"run storage {self.uri} is not writable ({reason}); set scaling.storage_path "
                             "to a writable folder or URI")

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._join(name)).type != self._pafs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self._join(name)) as stream:
            return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(self._join(name)) as stream:
            stream.write(data)

    def checkpoint_dirs(self) -> list[tuple[float, str]]:
        """(mtime of training_state.pt, folder name) of every checkpoint folder, oldest first."""
        selector = self._pafs.FileSelector(self.path, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            if info.type == self._pafs.FileType.Directory and info.base_name.startswith(("checkpoint_", "final_")):
                state = self.fs.get_file_info(f"{info.path}/{TRAINING_STATE}")
                if state.type == self._pafs.FileType.File:
                    found.append((state.mtime.timestamp() if state.mtime else 0.0, info.base_name))
        return sorted(found)

    def upload_dir(self, local_dir: str | Path, name: str) -> None:
        target = self._join(name)
        self.fs.create_dir(target, recursive=True)
        self._pafs.copy_files(str(local_dir), target, source_filesystem=self._pafs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def delete_dir(self, name: str) -> None:
        self.fs.delete_dir(self._join(name))


def storage_root(cfg: Config) -> str:
    """``scaling.storage_path``, or ``<output_dir>/<name>/checkpoints`` as an absolute path."""
    if cfg.scaling.storage_path:
        root = cfg.scaling.storage_path
        return root if "://" in root else str(Path(root).expanduser().resolve())
    return str((cfg.run_dir / "checkpoints").resolve())


def job_storage(cfg: Config) -> RunStorage:
    """The folder of this job's checkpoints: ``<storage root>/<name>``."""
    root = storage_root(cfg)
    return RunStorage(f"{root.rstrip('/')}/{cfg.name}")


def latest_training_state(storage: RunStorage | str) -> dict | None:
    """The newest ``training_state.pt`` in a job's storage folder, or None."""
    storage = RunStorage(storage) if isinstance(storage, str) else storage
    folders = storage.checkpoint_dirs()
    if not folders:
        return None
    name = folders[-1][1]
    data = storage.read_bytes(f"{name}/{TRAINING_STATE}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise SetupError(f"checkpoint {storage.uri}/{name}/{TRAINING_STATE} cannot be read ({error}); "
                         "delete it or use a new name") from None
    state["source"] = f"{storage.uri}/{name}"
    return state


def check_resume(state: dict, cfg: Config, num_classes: int | None = None) -> None:
    source = f"checkpoint to resume ({state.get('source', 'run storage')})"
    try:
        check_architecture(state, cfg.model.name, cfg.model.width, num_classes, source=source)
    except ValueError as error:
        raise SetupError(f"{error}; use a new name or delete the run storage") from None
    if bool(state["architecture"].get("modular")) != cfg.train.modular:
        kind = "modular" if state["architecture"].get("modular") else "standard"
        raise SetupError(f"{source} is from {kind} training, but train.modular={cfg.train.modular}; "
                         "use a new name or delete the run storage")
