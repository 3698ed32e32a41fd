"""Run storage: the file-system I/O of a job's folder, a local folder or an object-store URI (s3://, gs://).

The layout of the folders (one per job, their checkpoints) and the choice of a job are
``jobs.job_plan``'s; this module reads, writes, lists and probes them. One layout for every job,
in one process or on Ray Train workers (Ray Train writes the same folders through
``RunConfig(storage_path=storage_root(cfg), name=<job id>)``)::

    <storage root>                                   scaling.storage_path/<name>, default <output_dir>/<name>/jobs
      job-20261125-193501-123456/                    one job (its id sorts by start time)
        job.json                                     who ran it: host, pid, start time, workers
        mlflow_run.json                              the MLflow run of this job
        checkpoint_epoch_0003/training_state.pt      the newest KEEP_CHECKPOINTS epochs
        final_<time>_<epochs>/                       training_state.pt, checkpoint.pt, metrics.json, history.csv

A job whose folder holds a ``final_*`` checkpoint has finished.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.files import DiskFull, full_disk_message, is_disk_full, writable_folder_error
from ..core.messages import first_line, last_line
from .setup import SetupError

__all__ = ["RunStorage", "REMOTE_PROBE_TIMEOUT_S", "TRAINING_STATE", "RUN_FILE", "JOB_FILE", "KEEP_CHECKPOINTS"]

TRAINING_STATE = "training_state.pt"
RUN_FILE = "mlflow_run.json"
JOB_FILE = "job.json"
KEEP_CHECKPOINTS = 2
_PARTIAL = ".partial-"


# How long the write probe of an object-store URI may take. Without a network (or with a bucket name
# that does not resolve) pyarrow's clients retry for a long time: S3 gave up after 6 s here, GCS
# after 16 minutes. A 2-byte write to a reachable bucket takes well under a second.
REMOTE_PROBE_TIMEOUT_S = 15.0

# The probe runs in a child process: one stuck in pyarrow's retries is killed when the time is up
# (a thread could only be abandoned, and pyarrow's S3 finalisation at exit would wait for it).
_REMOTE_PROBE = """
import os, sys, time
import pyarrow.fs as pafs
fs, path = pafs.FileSystem.from_uri(sys.argv[1])
probe = f"{path.rstrip('/')}/.write_probe_{os.getpid()}_{time.time_ns()}"
with fs.open_output_stream(probe) as stream:
    stream.write(b"ok")
fs.delete_file(probe)
"""


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or first_line(error)


class RunStorage:
    """The job's folder in the run storage: a local path or a pyarrow URI (s3://, gs://, ...).

    An object store is opened on first use (``fs``, ``path``), not when the object is made: opening an
    S3 URI already asks the network for the bucket's region, and ``check_writable`` must be the first
    to reach out, with a bound on the time it takes."""

    _probed: set[str] = set()  # remote URIs this process found writable (the checks run more than once)

    def __init__(self, path_or_uri: str):
        import pyarrow.fs as pafs

        self._pafs = pafs
        self.uri = path_or_uri
        self.remote = "://" in path_or_uri
        self._fs, self._path = (None, None) if self.remote else (
            pafs.LocalFileSystem(), str(Path(path_or_uri).expanduser().resolve()))

    def _open(self) -> None:
        if self._fs is None:
            try:
                self._fs, self._path = self._pafs.FileSystem.from_uri(self.uri)
            except Exception as error:  # an unknown scheme, a bucket that does not resolve, no credentials
                raise SetupError(f"run storage {self.uri} cannot be opened ({_reason(error)}); set "
                                 "scaling.storage_path to a writable folder or URI") from None

    @property
    def fs(self):
        self._open()
        return self._fs

    @property
    def path(self) -> str:
        self._open()
        return self._path

    @property
    def is_local(self) -> bool:
        """Whether the folder is on this machine's file system (a path, or a file:// URI)."""
        return isinstance(self.fs, self._pafs.LocalFileSystem)

    def _join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def check_writable(self) -> None:
        """Raise SetupError unless checkpoints can be written here; creates no folder on local disk,
        and gives an object store ``REMOTE_PROBE_TIMEOUT_S`` to answer."""
        if not self.remote:
            reason = writable_folder_error(self.path)
        elif self.uri in self._probed:
            reason = None
        else:
            reason = self._probe_remote()
        if reason:
            raise SetupError(f"run storage {self.uri} is not writable ({reason}); set scaling.storage_path "
                             "to a writable folder or URI")

    def _probe_remote(self) -> str | None:
        """None when a file can be written and deleted at the URI, else why not (within the bound)."""
        import subprocess
        import sys

        try:
            result = subprocess.run([sys.executable, "-c", _REMOTE_PROBE, self.uri], capture_output=True, text=True,
                                    timeout=REMOTE_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return (f"no answer within {REMOTE_PROBE_TIMEOUT_S:g} s: check the bucket name, the network and the "
                    "credentials")
        if result.returncode == 0:
            self._probed.add(self.uri)
            return None
        last = last_line(result.stderr) or f"the probe exited with status {result.returncode}"
        # "OSError: When resolving region for bucket ...": the exception's message, not its class
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._join(name)).type != self._pafs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self._join(name)) as stream:
            return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.path, recursive=True)
        try:
            with self.fs.open_output_stream(self._join(name)) as stream:
                stream.write(data)
        except Exception as error:
            if not is_disk_full(error):
                raise
            try:  # a half-written record is worse than none
                self.fs.delete_file(self._join(name))
            except Exception:
                pass
            raise DiskFull(full_disk_message(name, self.uri)) from None

    def subfolders(self, prefix: str) -> list[str]:
        """The names of the folders in this one whose names start with ``prefix``, sorted."""
        selector = self._pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector)
                      if info.type == self._pafs.FileType.Directory and info.base_name.startswith(prefix))

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
        """Store a checkpoint folder so that a kill at any moment leaves either all of it or none of it
        (a folder without ``training_state.pt`` is not a checkpoint): on local disk a copy under a
        temporary name, then a rename; on an object store every file, then ``training_state.pt``."""
        local_dir = Path(local_dir)
        if self.is_local:
            import shutil

            Path(self.path).mkdir(parents=True, exist_ok=True)
            for leftover in Path(self.path).glob(f"{_PARTIAL}*"):  # from a process killed while copying
                shutil.rmtree(leftover, ignore_errors=True)
            partial = Path(self.path) / f"{_PARTIAL}{name}"
            try:
                shutil.copytree(local_dir, partial)
            except BaseException as error:  # a full disk, Ctrl-C: no half copy stays (a SIGKILL's is removed next time)
                shutil.rmtree(partial, ignore_errors=True)
                if isinstance(error, Exception) and is_disk_full(error):
                    raise DiskFull(full_disk_message(f"checkpoint {name}", self.path)) from None
                raise
            target = Path(self.path) / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
            return
        target = self._join(name)
        self.fs.create_dir(target, recursive=True)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == TRAINING_STATE):
            with (
                open(path, "rb") as source,
                self.fs.open_output_stream(f"{target}/{path.relative_to(local_dir).as_posix()}") as out,
            ):
                out.write(source.read())

    def delete_dir(self, name: str) -> None:
        self.fs.delete_dir(self._join(name))
