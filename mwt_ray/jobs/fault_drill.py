"""The fault drill of ``scaling.fail_at_epoch=N``: SIGKILL rank 0's process once, half-way through
epoch N, to see a job recover from a lost worker the way a real loss would make it (with
``scaling.max_failures`` > 0 on Ray Train: the worker group restarts from the latest checkpoint; in
one process: the command dies, and ``--resume`` continues). A marker file in the job's storage keeps
the restarted attempt from failing again.

It is a *job hook* (``TrainingJob(..., hooks=[FaultDrill(...)])``): a function called with the job
once its model, optimizer and start epoch are set, before the first epoch; it registers a PyTorch
optimizer step hook, so the training loop itself knows nothing of it.
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from .storage import RunStorage

__all__ = ["FaultDrill"]


class FaultDrill:
    """``wait_for_checkpoint(storage, folder_name)``: called before the kill with the previous epoch's
    checkpoint; where a checkpoint is stored in two stages (Ray Train registers an uploaded one a
    moment later) it waits for the second, so that the drill always resumes from that epoch."""

    def __init__(self, fail_at_epoch: int,
                 wait_for_checkpoint: Callable[[RunStorage, str], None] | None = None):
        self.fail_at_epoch, self.wait_for_checkpoint = fail_at_epoch, wait_for_checkpoint

    def marker(self) -> str:
        return f".fault_injected_epoch_{self.fail_at_epoch}"

    def __call__(self, job) -> None:  # a jobs.training_job.TrainingJob, which imports this module
        if job.session.rank == 0:
            steps_per_epoch = len(job.data.train_labels) // job.cfg.train.batch_size
            job.optimizer.register_step_post_hook(self._step_hook(job, steps_per_epoch))

    def _step_hook(self, job, steps_per_epoch: int):
        storage, marker = job.session.storage, self.marker()
        kill_step = max(1, steps_per_epoch // 2)
        done = 0

        def hook(optimizer, args, kwargs):
            nonlocal done
            done += 1
            epoch = job.start_epoch + (done - 1) // steps_per_epoch + 1
            step = (done - 1) % steps_per_epoch + 1
            if epoch != self.fail_at_epoch or step != kill_step or storage.exists(marker):
                return
            if epoch > 1 and self.wait_for_checkpoint is not None:
                self.wait_for_checkpoint(storage, f"checkpoint_epoch_{epoch - 1:04d}")
            storage.write_bytes(marker, f"killed pid {os.getpid()} at epoch {epoch} step {step}\n".encode())
            job.log(f"fault injection: killing worker pid {os.getpid()} at epoch {epoch}, "
                    f"step {step}/{steps_per_epoch}")
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return hook
