"""A test hook file (``MWT_RAY_HOOKS``): the reuse actor evaluating sub-task ``MWT_RAY_HOOK_KILL_SUBTASK``
kills its own process (SIGKILL) after its first fine-tuning step, once: the marker file
``MWT_RAY_HOOK_KILL_MARKER`` it writes first, with its pid, keeps the retry alive."""
import os
import signal
from pathlib import Path


def install_hooks(install):
    target = int(os.environ["MWT_RAY_HOOK_KILL_SUBTASK"])
    marker = Path(os.environ["MWT_RAY_HOOK_KILL_MARKER"])

    def kill(index: int, step: int) -> None:
        if index != target or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed pid {os.getpid()} at fine-tuning step {step} of sub-task {index}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    install("reuse.fine_tune_step", kill)
