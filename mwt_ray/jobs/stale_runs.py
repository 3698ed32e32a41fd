"""MLflow runs left RUNNING by jobs whose process was killed (SIGKILL, a lost node): nothing ended
them, so the next new job of the same name marks them FAILED."""
from __future__ import annotations

import json
from collections.abc import Callable

from ..core.files import owner_alive
from .storage import JOB_FILE, RUN_FILE, RunStorage

__all__ = ["fail_stale_runs"]


def fail_stale_runs(jobs: dict[str, RunStorage], tracking_uri: str, log: Callable[[str], None] | None = print) -> None:
    """Mark FAILED each RUNNING MLflow run in ``tracking_uri`` of the ``jobs`` (job id -> its folder)
    whose process is gone; a job on another host, or one whose records cannot be read, is left alone."""
    from ..tracking.store import fail_if_running

    for job_id, storage in jobs.items():
        try:
            run = json.loads(storage.read_bytes(RUN_FILE) or b"{}")
            record = json.loads(storage.read_bytes(JOB_FILE) or b"{}")
        except ValueError:
            continue
        if run.get("tracking_uri") != tracking_uri or not run.get("run_id") or owner_alive(record):
            continue
        if fail_if_running(tracking_uri, run["run_id"]) and log:
            log(f"MLflow: run {run['run_id']} of the earlier job {job_id} was left RUNNING (killed?); marked FAILED")
