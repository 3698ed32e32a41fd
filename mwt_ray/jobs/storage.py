"""Run storage: where a job's checkpoints live, a local folder or an object-store URI (s3://, gs://).

Every run of ``python -m mwt_ray.train`` is a *job* with its own folder, so running a name again
trains again, and ``--resume`` continues the latest job of that name. One layout for every job, in
one process or on Ray Train workers (Ray Train writes the same folders through
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

import io
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..core.checkpoint import check_architecture, check_checkpoint
from ..core.files import DiskFull, full_disk_message, is_disk_full, writable_folder_error
from .setup import SetupError

__all__ = [
    "RunStorage",
    "REMOTE_PROBE_TIMEOUT_S",
    "storage_root",
    "job_storage",
    "latest_training_state",
    "check_resume",
    "check_destinations",
    "JobPlan",
    "plan_job",
    "start_job",
    "list_jobs",
    "new_job_id",
    "TRAINING_STATE",
    "RUN_FILE",
    "JOB_FILE",
    "KEEP_CHECKPOINTS",
]

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
    return getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]


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
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"the probe exited with status {result.returncode}"
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
        if isinstance(self.fs, self._pafs.LocalFileSystem):
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


def storage_root(cfg: Config) -> str:
    """The folder of every job of ``cfg.name``: ``scaling.storage_path/<name>``, or
    ``<output_dir>/<name>/jobs`` as an absolute path."""
    if cfg.scaling.storage_path:
        root = cfg.scaling.storage_path
        root = root if "://" in root else str(Path(root).expanduser().resolve())
        return f"{root.rstrip('/')}/{cfg.name}"
    return str((cfg.run_dir / "jobs").resolve())


def new_job_id() -> str:
    """``job-<date>-<time>-<microseconds>``: job ids sort by start time."""
    now = time.time()
    return f"job-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now % 1 * 1e6):06d}"


def job_storage(cfg: Config, job_id: str) -> RunStorage:
    """The folder of one job: ``<storage root>/<job id>``."""
    return RunStorage(f"{storage_root(cfg).rstrip('/')}/{job_id}")


def list_jobs(cfg: Config) -> list[str]:
    """The ids of every job of ``cfg.name`` in the run storage, oldest first."""
    root = RunStorage(storage_root(cfg))
    selector = root._pafs.FileSelector(root.path, allow_not_found=True)
    return sorted(info.base_name for info in root.fs.get_file_info(selector)
                  if info.type == root._pafs.FileType.Directory and info.base_name.startswith("job-"))


def _read_state(storage: RunStorage, name: str) -> dict:
    data = storage.read_bytes(f"{name}/{TRAINING_STATE}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latest_training_state(storage: RunStorage | str) -> dict | None:
    """The newest readable ``training_state.pt`` in a job's folder, or None when it has none."""
    storage = RunStorage(storage) if isinstance(storage, str) else storage
    folders = storage.checkpoint_dirs()
    failure = None
    for _, name in reversed(folders):
        try:
            state = _read_state(storage, name)
        except Exception as error:  # damaged by hand or by the file system: try the one before
            failure = failure or (name, error)
            continue
        if not isinstance(state, dict) or not {"architecture", "model_state", "epoch"} <= set(state):
            failure = failure or (name, ValueError("not a training state"))
            continue
        state["source"] = f"{storage.uri}/{name}"
        return state
    if failure:
        name, error = failure
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise SetupError(f"checkpoint {storage.uri}/{name}/{TRAINING_STATE} cannot be read ({reason}); "
                         "start a new job (without --resume) or delete it")
    return None


def check_resume(state: dict, cfg: Config, num_classes: int | None = None) -> None:
    source = f"checkpoint to resume ({state.get('source', 'run storage')})"
    try:
        check_architecture(state, cfg.model.name, cfg.model.width, num_classes, source=source)
    except (ValueError, KeyError, TypeError) as error:
        raise SetupError(f"{error}; run without --resume to start a new job") from None
    if bool(state["architecture"].get("modular")) != cfg.train.modular:
        kind = "modular" if state["architecture"].get("modular") else "standard"
        raise SetupError(f"{source} is from {kind} training, but train.modular={cfg.train.modular}; "
                         "run without --resume to start a new job")
    try:  # the whole checkpoint: weights against the architecture (on the meta device), finite values
        check_checkpoint(state, source)
    except ValueError as error:
        raise SetupError(f"{error}; run without --resume to start a new job") from None


def check_destinations(cfg: Config) -> None:
    """Where the job will write, checked before any data is decoded (so that a failing check leaves no
    dataset cache behind either): the output folder, the run storage and the MLflow store."""
    reason = writable_folder_error(cfg.run_dir)
    if reason:
        raise SetupError(
            f"output_dir {cfg.output_dir!r} cannot be written ({reason}); set output_dir to a writable folder"
        )
    RunStorage(storage_root(cfg)).check_writable()
    if cfg.tracking.enabled:
        from ..tracking import check_store, resolve_tracking_uri

        check_store(resolve_tracking_uri(cfg.tracking.tracking_uri))


@dataclass
class JobPlan:
    """What a job will be, decided before anything is written (``plan_job``)."""
    job_id: str
    storage: RunStorage
    resumed: bool
    state: dict | None = None  # the training state it resumes from
    run_info: dict = field(default_factory=dict)  # its MLflow run so far (tracking_uri, run_id)
    finished: bool = False


def plan_job(cfg: Config, resume: bool, num_classes: int | None = None, log=print) -> JobPlan:
    """Decide the job, reading only: a new one, or with ``resume`` the latest job of ``cfg.name``
    (a new one when there is none). Raises SetupError when the checkpoint to resume does not fit
    the config (another model, width or class count); that the storage can be written is
    ``check_destinations``' part of the preflight (``jobs.preflight``)."""
    jobs = list_jobs(cfg) if resume else []
    if resume and not jobs and log:
        log(f"--resume: no earlier job named {cfg.name!r} in {storage_root(cfg)}; starting a new job")
    plan = JobPlan(jobs[-1], job_storage(cfg, jobs[-1]), True) if jobs else JobPlan(new_job_id(), None, False)
    if plan.storage is None:
        plan.storage = job_storage(cfg, plan.job_id)
        return plan
    plan.state = latest_training_state(plan.storage)
    if plan.state is not None:
        check_resume(plan.state, cfg, num_classes)
    plan.finished = any(name.startswith("final_") for _, name in plan.storage.checkpoint_dirs())
    raw = plan.storage.read_bytes(RUN_FILE)
    try:
        plan.run_info = json.loads(raw) if raw else {}
    except ValueError:
        plan.run_info = {}
    return plan


def _alive(record: dict) -> bool:
    """Whether the process a ``job.json`` names still runs (on this host; other hosts: assume yes)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record.get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (OSError, ValueError, TypeError):
        return False
    return True


def start_job(cfg: Config, plan: JobPlan, tracking_uri: str | None = None, log=print) -> None:
    """Write the job's record; a new job also marks FAILED the MLflow runs that earlier jobs of the
    same name left RUNNING (their process was killed without a chance to end them)."""
    record = {"job_id": plan.job_id, "name": cfg.name, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "num_workers": cfg.scaling.num_workers,
              "resumed": plan.resumed}
    plan.storage.write_bytes(JOB_FILE, json.dumps(record, indent=1).encode())
    if plan.resumed or tracking_uri is None:
        return
    for job_id in list_jobs(cfg):
        if job_id == plan.job_id:
            continue
        storage = job_storage(cfg, job_id)
        try:
            run = json.loads(storage.read_bytes(RUN_FILE) or b"{}")
            earlier = json.loads(storage.read_bytes(JOB_FILE) or b"{}")
        except ValueError:
            continue
        if run.get("tracking_uri") != tracking_uri or not run.get("run_id") or _alive(earlier):
            continue
        from ..tracking.runs import fail_if_running

        if fail_if_running(tracking_uri, run["run_id"]) and log:
            log(f"MLflow: run {run['run_id']} of the earlier job {job_id} was left RUNNING (killed?); marked FAILED")
