"""Storage every Ray node must share, checked before a multi-node job starts.

    check_shared_places({"output_dir": "/mnt/shared/runs", "scaling.storage_path": "s3://bucket/ray",
                         "data.root": "/data/cifar10", "tracking.tracking_uri": "sqlite:////mnt/shared/mlflow.db"})
    check_not_in_ray_package(places, given)   # given: the same keys as the user wrote them

Why: on a cluster of several nodes, Ray Train writes checkpoints from every node into
``scaling.storage_path``, the workers read ``data.root`` and log to the MLflow store, and the
tables go to ``output_dir``. A folder that exists on the head only works on one node and fails on
more, and Ray says so only at the first checkpoint, after the first epoch. ``check_shared_places``
looks from every alive node, with one tiny task pinned to it (0 CPUs, so a head started with
``--num-cpus=0`` is looked at too), and stops the command with one ``SetupError`` line: the key,
the value, how many nodes cannot reach it, one of them by short node id and IP, what it saw, and
the fix. On one node (or without Ray) it does nothing.

What "reachable" means, by kind of place (the kind follows from the key):

- a folder the job writes (``output_dir``, a local ``scaling.storage_path``, the folder of an
  ``sqlite:///`` or ``file:`` MLflow store): this process writes a check file of random content
  into the deepest folder of the path that exists already (the rest is created later), and every
  node must read that content back and create and delete a file of its own there. A node that
  reads nothing has another disk at that path. The check file is removed in every case.
- a place the job only reads (``data.root``, ``READ_ONLY_KEYS``; a folder or an archive, possibly
  on a read-only mount): its fingerprint here and on every node must agree (a file: its size and
  the hash of its first 64 KiB; a folder: its sorted top-level names). A copy of the dataset at
  the same path on every node passes.
- an ``http(s)://`` MLflow server: every node must open a TCP connection to its host and port
  within a few seconds; a loopback host (localhost, 127.x, ::1) on nodes of more than one machine
  is refused without looking, since each node would reach its own loopback.
- other URIs (``s3://``, ``gs://``, ``postgresql://``, ...): skipped, no cheap check exists.

Places this process cannot use itself (a folder it cannot write, a dataset it cannot see) are
skipped: the command's own checks on this machine report them in their own words, so those run
first. Each node's task answers within ``timeout_s`` or is reported as not answering; a hung mount
is named by its key (each place is looked at in a thread of its own on the node, for at most half
of ``timeout_s``). The tasks run in the job's runtime env (Ray merges a task's into the job's): a
pip or conda env still being built on a node counts against ``timeout_s``.

``check_not_in_ray_package``: a job submitted with ``ray job submit --working-dir .`` runs with
its working dir unpacked by Ray into ``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``
(``WorkingDirPlugin``, ``packaging.get_local_dir_from_uri`` of Ray 2.60), and Ray deletes that
folder when it garbage-collects the package. Relative paths and the default
``sqlite:///mlflow.db`` resolve against that folder, so the runs and the store would silently go
with it; the check refuses a place the job writes when it resolves inside the package. A
``local://`` working dir is used in place by Ray and never deleted, so it is not refused.
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..core.messages import first_line
from ..jobs import SetupError

__all__ = ["check_shared_places", "check_not_in_ray_package", "ray_package_folder", "job_places", "check_job_places",
           "READ_ONLY_KEYS", "CHECK_FILE_PREFIX"]

READ_ONLY_KEYS = frozenset({"data.root"})
CHECK_FILE_PREFIX = ".mwt-shared-check-"
FINGERPRINT_BYTES = 64 * 1024
TCP_TIMEOUT_S = 5.0

# Where Ray 2.60 unpacks a job's working_dir: <session dir>/<runtime_env_dir_name, default
# "runtime_resources">/working_dir_files/<package>; an uploaded package is named _ray_pkg_<hash>,
# one downloaded from a URI (s3://.../code.zip) after the URI.
_RUNTIME_RESOURCES = "runtime_resources"
_WORKING_DIR_FILES = "working_dir_files"
_RAY_PKG_PREFIX = "_ray_pkg_"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _node_probe() -> tuple[Callable, Callable]:
    """The code a node runs, and the fingerprint it computes (also used here, so that both sides
    compute it alike). Built in a function on purpose: cloudpickle ships a nested function by value,
    so a node needs only the standard library, not this package on its path."""

    def fingerprint(path: str):
        """("file", size, hash of the first bytes), ("folder", entries, hash of the sorted names),
        ("missing",), or ("unreadable", reason)."""
        import hashlib
        import os

        try:
            if os.path.isdir(path):
                names = sorted(os.listdir(path))
                digest = hashlib.sha256("\n".join(names).encode(errors="surrogateescape")).hexdigest()
                return ("folder", len(names), digest)
            if os.path.exists(path):
                with open(path, "rb") as stream:
                    head = stream.read(FINGERPRINT_BYTES)
                return ("file", os.path.getsize(path), hashlib.sha256(head).hexdigest())
            return ("missing",)
        except OSError as error:
            return ("unreadable", error.strerror or str(error))

    def look_write(check: dict) -> tuple[bool, str]:
        """The driver's check file reads back the same here, and a file can be created beside it."""
        import os
        import secrets

        folder = check["folder"]
        if not os.path.isdir(folder):
            return False, f"cannot see the folder {folder}"
        try:
            with open(os.path.join(folder, check["token_name"]), encoding="ascii") as stream:
                seen = stream.read(256)
        except FileNotFoundError:
            return False, f"sees {folder}, but not the check file the driver wrote there: another disk at that path"
        except (OSError, UnicodeDecodeError) as error:
            return False, f"cannot read the check file in {folder} ({getattr(error, 'strerror', None) or error})"
        if seen != check["token"]:
            return False, f"reads other content from the check file in {folder}: another disk at that path"
        own = os.path.join(folder, f"{CHECK_FILE_PREFIX}{secrets.token_hex(8)}")
        try:
            descriptor = os.open(own, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.write(descriptor, b"ok")
            finally:
                os.close(descriptor)
                os.unlink(own)
        except OSError as error:
            return False, f"sees {folder} but cannot create a file there ({error.strerror or error})"
        return True, "ok"

    def look_read(check: dict) -> tuple[bool, str]:
        """The path has the driver's fingerprint here too."""
        here, there = tuple(check["fingerprint"]), fingerprint(check["path"])
        if there == here:
            return True, "ok"
        if there[0] == "missing":
            return False, f"cannot see {check['path']}"
        if there[0] == "unreadable":
            return False, f"cannot read {check['path']} ({there[1]})"
        if there[0] != here[0]:
            return False, f"sees a {there[0]} at {check['path']}, a {here[0]} here"
        if there[0] == "file":
            return False, f"sees another file at {check['path']} ({there[1]} bytes, {here[1]} here)"
        return False, f"sees another folder at {check['path']} ({there[1]} entries, {here[1]} here)"

    def look_tcp(check: dict) -> tuple[bool, str]:
        import socket

        try:
            socket.create_connection((check["host"], check["port"]), timeout=check["timeout_s"]).close()
        except OSError as error:
            return False, f"cannot connect to {check['host']}:{check['port']} ({error.strerror or error})"
        return True, "ok"

    def look(check: dict) -> tuple[bool, str]:
        looks = {"write": look_write, "read": look_read, "tcp": look_tcp}
        if check["kind"] not in looks:
            return False, f"got a check of unknown kind {check['kind']!r}"
        return looks[check["kind"]](check)

    def probe(checks: dict, budget_s: float) -> dict:
        """Look at every place of ``checks`` (id -> check) at once, each in a thread: a hung mount
        costs ``budget_s`` and is named, the others still answer."""
        import threading
        import time

        results: dict = {}

        def run(key, check):
            try:
                results[key] = look(check)
            except Exception as error:  # noqa: BLE001 - whatever it is, it is this node's answer
                results[key] = (False, f"failed to look ({type(error).__name__}: {error})")

        threads = [threading.Thread(target=run, args=item, daemon=True) for item in checks.items()]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + budget_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = (False, f"gave no answer within {budget_s:g} s (a hung mount?)")
        return {key: results.get(key, late) for key in checks}

    return probe, fingerprint


@dataclass
class _Place:
    key: str
    value: str
    kind: str                      # "write", "read", "tcp"
    target: str | tuple[str, int]  # folder or file path, or (host, port)
    store: bool = False            # the MLflow store (its own fix)
    check_id: str | None = None


def _scheme(value: str) -> str | None:
    match = _SCHEME.match(value)
    return match.group(1).lower() if match and len(match.group(1)) > 1 else None  # "C:" is a drive, not a scheme


def _file_uri_path(value: str) -> str:
    return unquote(urlparse(value).path) or "/"


def _local_path(value: str) -> str | None:
    """The local path of a plain path or a file: URI; None for any other URI."""
    scheme = _scheme(value)
    if scheme is None:
        return os.path.abspath(os.path.expanduser(value))
    if scheme == "file":
        return os.path.abspath(_file_uri_path(value))
    return None


def _store_folder(uri: str) -> str | None:
    """The folder an MLflow store writes into (sqlite's database folder, a file store), or None."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
            return None
        return os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
    if scheme in (None, "file"):
        return _local_path(uri)
    return None


def _is_store(key: str) -> bool:
    return key.endswith("tracking_uri")


def _written_folder(key: str, value: str, read_only: Collection[str]) -> str | None:
    """The folder ``value`` of ``key`` makes the job write into, or None (read-only, remote)."""
    if key in read_only:
        return None
    return _store_folder(value) if _is_store(key) else _local_path(value)


def _existing_folder(path: str) -> str:
    """The deepest folder of ``path`` that exists here (the path itself when it is one)."""
    path = os.path.normpath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _http_target(uri: str) -> tuple[str, int] | None:
    parsed = urlparse(uri)
    if not parsed.hostname:
        return None
    try:
        port = parsed.port
    except ValueError:
        return None  # a bad port: the command's own store check says so
    return parsed.hostname, port or (443 if parsed.scheme.lower() == "https" else 80)


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _plan(places: dict[str, str], read_only: Collection[str]) -> list[_Place]:
    plan = []
    for key, value in places.items():
        if not value:
            continue
        value = str(value)
        store = _is_store(key)
        scheme = _scheme(value)
        if store and scheme in ("http", "https"):
            target = _http_target(value)
            if target:
                plan.append(_Place(key, value, "tcp", target, store=True))
            continue
        folder = _written_folder(key, value, read_only)
        if folder is not None:
            plan.append(_Place(key, value, "write", _existing_folder(folder), store=store))
        elif key in read_only and (path := _local_path(value)) is not None:
            plan.append(_Place(key, value, "read", os.path.normpath(path), store=store))
    return plan


def _node_name(node: dict) -> str:
    return f"node {node['NodeID'][:8]} at {node.get('NodeManagerAddress', '?')}"


def _head_address(nodes: list[dict]) -> str:
    for node in nodes:
        if "node:__internal_head__" in node.get("Resources", {}):
            return node.get("NodeManagerAddress") or "<head private IP>"
    return "<head private IP>"


def _fix(place: _Place, head: str) -> str:
    if place.store:
        return (f"on a multi-node cluster every node must reach the same MLflow store; use the head's MLflow server "
                f"(http://{head}:5000, started with --host 0.0.0.0) or a store on a shared mount "
                "(e.g. sqlite:////mnt/shared/mlflow.db)")
    if place.kind == "read":
        return ("on a multi-node cluster every node must see the same data; put it on a shared mount "
                "(e.g. /mnt/shared/...) or the same copy at this path on every node")
    uri = " or an object store URI (s3://..., gs://...)" if place.key.endswith("storage_path") else ""
    return (
        f"on a multi-node cluster every node must see the same storage; use a shared mount (e.g. /mnt/shared/...){uri}"
    )


def _refuse_loopback(plan: list[_Place], nodes: list[dict]) -> None:
    machines = {node.get("NodeManagerAddress") for node in nodes}
    if len(machines) < 2:
        return  # every node on this machine: its loopback is theirs too, the TCP check decides
    for place in plan:
        if place.kind == "tcp" and _is_loopback(place.target[0]):
            raise SetupError(
                f"{place.key} {place.value} names the loopback address {place.target[0]}, which each of the "
                f"{len(nodes)} Ray nodes (on {len(machines)} machines) resolves to itself: "
                f"{_fix(place, _head_address(nodes))}")


def check_shared_places(places: dict[str, str], *, timeout_s: float = 60.0,
                        read_only: Collection[str] = READ_ONLY_KEYS) -> None:
    """Raise ``SetupError`` (one line) when a place of ``places`` (config key -> absolute path or
    URI) is not reachable from every alive Ray node; nothing without Ray or on one node.

    ``read_only``: the keys the job only reads (fingerprints instead of a written check file).
    Waits at most ``timeout_s`` for the nodes; a node that does not answer is reported."""
    import ray

    if not ray.is_initialized():
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return
    plan = _plan(places, read_only)
    _refuse_loopback(plan, nodes)
    probe, fingerprint = _node_probe()
    budget = max(1.0, timeout_s / 2)  # the rest is for starting a worker process on each node
    checks: dict[str, dict] = {}
    seen_targets: dict[tuple, str] = {}
    written: list[str] = []
    try:
        for place in plan:
            if (place.kind, place.target) in seen_targets:  # the same folder under another key: looked at once
                place.check_id = seen_targets[(place.kind, place.target)]
                continue
            check_id = f"{len(checks)}"
            if place.kind == "write":
                token_name = f"{CHECK_FILE_PREFIX}{secrets.token_hex(8)}"
                token = secrets.token_hex(16)
                token_path = os.path.join(place.target, token_name)
                try:
                    descriptor = os.open(token_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except OSError:
                    continue  # this machine cannot write there: the command's own checks report it
                written.append(token_path)
                try:
                    os.write(descriptor, token.encode("ascii"))
                finally:
                    os.close(descriptor)
                check = {"kind": "write", "folder": place.target, "token_name": token_name, "token": token}
            elif place.kind == "read":
                here = fingerprint(place.target)
                if here[0] in ("missing", "unreadable"):
                    continue  # not even here: the command's own input checks report it
                check = {"kind": "read", "path": place.target, "fingerprint": list(here)}
            else:
                host, port = place.target
                check = {"kind": "tcp", "host": host, "port": port, "timeout_s": min(TCP_TIMEOUT_S, budget)}
            checks[check_id] = check
            seen_targets[(place.kind, place.target)] = check_id
            place.check_id = check_id
        if not checks:
            return
        answers = _ask_every_node(probe, checks, nodes, budget, timeout_s)
    finally:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
    _judge(plan, nodes, answers, timeout_s)


def _ask_every_node(probe: Callable, checks: dict, nodes: list[dict], budget: float, timeout_s: float) -> list:
    """Per node (in ``nodes`` order): its answers (check id -> (ok, what it saw)), or a string that
    says why there are none."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(probe)
    refs = [remote.options(num_cpus=0, max_retries=0, name="mwt-shared-storage-check",
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                           ).remote(checks, budget)
            for node in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers: list = []
    for ref in refs:
        if ref not in ready:
            answers.append(f"did not answer within {timeout_s:g} s")
            try:
                ray.cancel(ref, force=True)  # no task left behind, waiting for a node that never answers
            except Exception:  # noqa: BLE001 - already gone
                pass
            continue
        try:
            answers.append(ray.get(ref))
        except Exception as error:  # noqa: BLE001 - a node that died, a worker that could not start
            answers.append(f"failed to run the check ({type(error).__name__}: {first_line(str(error))})")
    return answers


def _judge(plan: list[_Place], nodes: list[dict], answers: list, timeout_s: float) -> None:
    head = _head_address(nodes)
    failures: list[tuple[_Place, list[tuple[dict, str]]]] = []
    for place in plan:
        if place.check_id is None:
            continue
        bad = [(node, answer[place.check_id][1]) for node, answer in zip(nodes, answers)
               if isinstance(answer, dict) and not answer[place.check_id][0]]
        if bad:
            failures.append((place, bad))
    silent = [(node, answer) for node, answer in zip(nodes, answers) if not isinstance(answer, dict)]
    if failures:
        place, bad = failures[0]
        bad = bad + silent  # a silent node cannot reach it either, as far as this check knows
        node, seen = bad[0]
        more = f"; {len(bad) - 1} more" if len(bad) > 1 else ""
        also = list(dict.fromkeys(p.key for p, _ in failures[1:] if p.key != place.key))
        also_text = f"; {' and '.join(also)} not reachable either" if also else ""
        raise SetupError(f"{place.key} {place.value} is not reachable from {len(bad)} of {len(nodes)} Ray nodes "
                         f"({_node_name(node)} {seen}{more}): {_fix(place, head)}{also_text}")
    if silent:
        node, why = silent[0]
        more = f"; {len(silent) - 1} more" if len(silent) > 1 else ""
        keys = ", ".join(dict.fromkeys(f"{place.key} {place.value}" for place in plan if place.check_id is not None))
        raise SetupError(f"the shared-storage check of {keys} got no answer from {len(silent)} of {len(nodes)} "
                         f"Ray nodes ({_node_name(node)} {why}{more}): a hung mount, a runtime env still being "
                         "built there, or a node in trouble; look at that node (ray status, its mounts, its logs) "
                         "or take it out of the cluster")


def ray_package_folder(cwd: str | None = None) -> Path | None:
    """The folder of the working_dir package Ray unpacked and runs this job in, when ``cwd``
    (default: this process's) lies in one; else None."""
    parts = Path(os.path.realpath(cwd or os.getcwd())).parts
    for i in range(1, len(parts) - 1):
        if parts[i] != _WORKING_DIR_FILES:
            continue
        package = parts[i + 1]
        # runtime_resources is Ray's default name for the folder, _ray_pkg_ its name of an uploaded package
        if parts[i - 1] == _RUNTIME_RESOURCES or package.startswith(_RAY_PKG_PREFIX):
            return Path(*parts[: i + 2])
    return None


def check_not_in_ray_package(places: dict[str, str], given: dict[str, str],
                             read_only: Collection[str] = READ_ONLY_KEYS) -> None:
    """Raise ``SetupError`` when this process runs in a Ray working_dir package and a place the job
    writes (``places``: key -> absolute path or URI) lies inside it; ``given``: the values as the
    user gave them (a key missing or None there was not set: a default)."""
    package = ray_package_folder()
    if package is None:
        return
    for key, value in places.items():
        if not value:
            continue
        folder = _written_folder(key, str(value), read_only)
        if folder is None:
            continue
        resolved = Path(os.path.realpath(folder))
        if resolved != package and package not in resolved.parents:
            continue
        wrote = given.get(key)
        if not wrote:
            said = f"{key} (not set, so {value}) lies"
        elif str(wrote) == str(value):
            said = f"{key} {value} lies"
        else:
            said = f"{key} {wrote} resolves to {value}, which lies"
        raise SetupError(
            f"{said} inside the job's working_dir package {package}, which Ray deletes when it garbage-collects "
            "the package: give absolute paths on shared storage, e.g. --set output_dir=/mnt/shared/runs "
            "--set tracking.tracking_uri=sqlite:////mnt/shared/mlflow.db, or submit the job without --working-dir")


def job_places(cfg, **more: str | None) -> dict[str, str | None]:
    """The places a job of ``cfg`` writes or reads, by config key, as ``cfg`` gives them (``more``:
    a command's own, e.g. ``{"reuse.output_dir": ...}``)."""
    return {"output_dir": cfg.output_dir, "scaling.storage_path": cfg.scaling.storage_path, "data.root": cfg.data.root,
            "tracking.tracking_uri": cfg.tracking.tracking_uri if cfg.tracking.enabled else None, **more}


def check_job_places(cfg, **more: str | None) -> None:
    """``check_not_in_ray_package`` for the places of a job of ``cfg`` as given (relative paths and
    the default MLflow store resolved here against this process's working directory). Needs no Ray:
    every command calls it before anything is written."""
    from ..jobs import absolute_paths
    from ..tracking import resolve_tracking_uri

    given = job_places(cfg, **more)
    resolved = job_places(absolute_paths(cfg), **{key: value and str(Path(value).expanduser().resolve())
                                                  for key, value in more.items()})
    if cfg.tracking.enabled:
        resolved["tracking.tracking_uri"] = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_not_in_ray_package(resolved, given)
