"""Ray's own lines go to a log file; the terminal keeps the command's progress lines.

    with ray_output_to(folder / "ray_output.log"):
        ...  # train, sweep, evaluate on Ray

Ray prints what its processes say on the driver's stdout and stderr, each line behind a prefix
naming where it came from: ``(RayTrainWorker pid=123) ...``, ``(raylet) ...``. Worker tracebacks
(their stderr) and Ray's own messages belong in a file a user opens when something failed; what
the workers print on stdout (rank 0's epoch lines) stays on the terminal. A node that dies makes
the driver print its raylet's last log lines, hundreds of ``[state-dump]`` lines in one message,
which buried the progress lines: such a message goes to the file whole (it arrives in one write,
with its continuation lines indented), and the terminal gets one line saying what happened and
where the details are. The commands themselves say what they retry (a trial, a sub-task, a worker
group), each in one line.

``MWT_RAY_WORKER_STDERR=1`` leaves both streams alone (Ray's lines live on the terminal).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ray_output_to", "RAY_PREFIX"]

# A line Ray forwards from a worker, actor or raylet: "(RayTrainWorker pid=123) ...", "(raylet) ...".
RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\((raylet|autoscaler|[\w.]+ pid=\d+)[^)]*\)")
# Ray's own messages (not a worker's printed output, such as rank 0's epoch lines on stdout).
_RAYLET_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\((raylet|autoscaler)[^)]*\)")
_RAYLET_DIED = re.compile(r"Raylet is terminated")
_NODE_DEAD = re.compile(r"node id: ([0-9a-f]+) and address: (\S+) .*marked dead")
_TASK_RETRIED = re.compile(r"Task (\S+) failed\. There are (\d+) retries remaining")


class _RayLines:
    """Stands in for ``sys.stdout`` or ``sys.stderr``: the lines ``prefix`` matches to ``path``, the
    rest through."""

    def __init__(self, stream, path: Path, lock: threading.Lock, files: dict, prefix: re.Pattern):
        self.stream, self.path, self.lock, self.files, self.prefix = stream, path, lock, files, prefix
        self.pending, self.print_end = "", False
        self.said: dict[str, float] = {}  # summary line -> when it was last printed

    def _to_log(self, text: str) -> None:
        if "file" not in self.files:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.files["file"] = open(self.path, "a")
        self.files["file"].write(text)
        self.files["file"].flush()

    def _summary(self, message: str) -> str | None:
        dead = _NODE_DEAD.search(message)
        if dead:
            return f"Ray: node {dead[1][:8]} ({dead[2]}) is lost (it missed its heartbeats); Ray's log in {self.path}"
        if _RAYLET_DIED.search(message):
            return f"Ray: a node stopped (its raylet terminated: a lost node); Ray's log in {self.path}"
        retried = _TASK_RETRIED.search(message)
        if retried:
            return f"Ray: task {retried[1]} lost its process or node; Ray runs it again ({retried[2]} retries left)"
        return None

    def _say_once(self, message: str) -> None:
        """A summary line, at most once a minute: one lost node makes Ray report it several times."""
        summary = self._summary(message)
        now = time.monotonic()
        if summary and now - self.said.get(summary, -math.inf) > 60:
            self.said[summary] = now
            self.stream.write(summary + "\n")
            self.stream.flush()

    def write(self, text: str) -> int:
        with self.lock:
            if self.print_end and text == "\n":  # the end print() adds to one of Ray's messages
                self.print_end = False
                return len(text)
            self.print_end = False
            if not self.pending and self.prefix.match(text):
                # One print() of Ray's, continuation lines and all.
                self._to_log(text if text.endswith("\n") else text + "\n")
                self.print_end = True
                self._say_once(text)
                return len(text)
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                if self.prefix.match(line):
                    self._to_log(line + "\n")
                    self._say_once(line)
                else:
                    self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending and not self.prefix.match(self.pending):
                self.stream.write(self.pending)
                self.pending = ""
            self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def ray_output_to(path: Path) -> Iterator[None]:
    """Route Ray's lines to ``path`` until the block ends: its own messages on either stream, and
    everything its processes write to stderr (what they print to stdout, such as rank 0's epoch
    lines, stays on the terminal); the file is
    made only when Ray says something. Keep the block open until Ray is shut down: Ray forwards
    its processes' lines asynchronously, and the last ones arrive after the work failed."""
    if os.environ.get("MWT_RAY_WORKER_STDERR"):
        yield
        return
    lock, files = threading.Lock(), {}
    previous = sys.stdout, sys.stderr
    sys.stdout = _RayLines(previous[0], path, lock, files, _RAYLET_PREFIX)  # workers' printed lines stay
    sys.stderr = _RayLines(previous[1], path, lock, files, RAY_PREFIX)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = previous
        if "file" in files:
            files["file"].close()
