"""What a lost node or a killed process looks like to the driver, told apart from a job's own errors.

On a cluster of spot or preemptible nodes a node can go at any time. What it ran is then worth
running again elsewhere (a trial resumes from its last finished epoch, a reuse sub-task runs on a
new actor), while an error of the work itself (bad numerics, a config the model cannot train, a
bug) would only fail again: it is reported at once and never retried.

Lost: the process Ray ran the work in died or became unreachable (``RayActorError`` and its
``ActorDiedError`` / ``ActorUnavailableError``, ``WorkerCrashedError``, ``NodeDiedError``,
``ObjectLostError``, ``OwnerDiedError``; also when a task re-raises one of them), or Ray Train's
worker group lost a worker more often than ``scaling.max_failures`` allows. Ray's messages name
the node (an id, an address) in varying forms: ``lost_where`` makes one short phrase of them.
"""
from __future__ import annotations

import re

__all__ = ["is_lost_process_or_node", "lost_where"]

_NODE_ID = re.compile(r"[Nn]ode(?:[ _][Ii][Dd])?[:=]?\s*([0-9a-f]{16,})")
_ADDRESS = re.compile(r"(?:ip|IP|ipv4|address)[:=]?\s*(\d{1,3}(?:\.\d{1,3}){3})")
_PID = re.compile(r"pid[:=]?\s*(\d+)")


def _system_errors() -> tuple[type, ...]:
    from ray import exceptions

    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
             "LocalRayletDiedError")
    return tuple(getattr(exceptions, name) for name in names if hasattr(exceptions, name))


def is_lost_process_or_node(error: BaseException) -> bool:
    """Whether ``error`` says the work lost its process or node (worth running again elsewhere)."""
    from ray.exceptions import RayTaskError

    from .trainer import DistributedTrainingError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _system_errors()):
            return True
        if isinstance(error, DistributedTrainingError):
            return error.lost_worker
        if isinstance(error, RayTaskError):
            cause = error.as_instanceof_cause()
            if cause is not error and isinstance(cause, _system_errors()):
                return True
        error = error.__cause__ or error.__context__
    return False


def lost_where(error: BaseException | str) -> str:
    """A short phrase for where the work was lost, from Ray's error (or its text): 'node 3f2a9c1d
    (10.0.0.5) lost', 'its process (pid 123) died: ...', 'unreachable at 10.0.0.5: ...'."""
    text = str(error)
    node, address, pid = _NODE_ID.search(text), _ADDRESS.search(text), _PID.search(text)
    if node or "node" in text.lower() and ("died" in text.lower() or "dead" in text.lower()):
        named = f"node {node[1][:8]}" if node else "its node"
        return f"{named}{f' ({address[1]})' if address else ''} lost"
    if type(error).__name__ == "ActorUnavailableError" or "unavailable" in text:
        return f"unreachable{f' at {address[1]}' if address else ''}: its node lost or its process killed"
    return f"its process{f' (pid {pid[1]})' if pid else ''} died: killed, out of memory, or its node lost"
