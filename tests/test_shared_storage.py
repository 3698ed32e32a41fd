"""Shared storage on a multi-node Ray cluster, looked at from every node (cluster.shared_storage).

The cluster of these tests has three nodes on this machine: a head with 0 CPUs, one ordinary node,
and one started in a mount namespace of its own with a tmpfs over a folder, so that this node
genuinely does not see what the others see there (an unshared disk at the same path, as on a
real cluster). The cluster starts once for the class; the one-node and package tests need none.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from mwt_ray.cluster.shared_storage import (
    CHECK_FILE_PREFIX,
    _node_probe,
    check_not_in_ray_package,
    check_shared_places,
    ray_package_folder,
)
from mwt_ray.jobs import SetupError

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

RAY_CLI = str(Path(sys.executable).parent / "ray")


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _node_processes(namespace: str | None, root: int | None = None) -> list[int]:
    """The hidden node's processes: those of its private mount namespace (and below ``root`` when
    given). Never one of this namespace: an empty list for it, or for a namespace not known yet."""
    if namespace is None or namespace == _mount_namespace(os.getpid()):
        return []
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass

    def below_root(pid: int) -> bool:
        seen = set()
        while pid and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    return [pid for pid in parents if pid != os.getpid() and _mount_namespace(pid) == namespace
            and (root is None or below_root(pid))]


def _stop_hidden_node(process: subprocess.Popen, namespace: str | None) -> None:
    """SIGTERM to `ray start --block` (it stops its children), then SIGKILL whatever of the node's
    namespace is left; `ray stop` would stop every Ray on the machine."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    for pid in _node_processes(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if process.poll() is None:
        process.kill()
        process.wait(timeout=15)


@pytest.fixture(scope="class")
def cluster(tmp_path_factory):
    """(hidden folder, shared folder, the hidden node's id, its `ray start` process, its mount
    namespace) on a 3-node cluster this process is connected to."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a node with a folder of its own needs root and unshare (unshare -m, mount -t tmpfs)")
    hidden = tmp_path_factory.mktemp("hidden-from-one-node")
    shared = tmp_path_factory.mktemp("seen-by-every-node")
    tried = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs '{hidden}'"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if tried.returncode != 0:
        pytest.skip(f"unshare -m with mount -t tmpfs is not permitted here: {tried.stderr.strip()}")
    (hidden / "data").mkdir()
    (hidden / "data" / "a.png").write_bytes(b"png")
    (hidden / "data.tar.gz").write_bytes(b"archive" * 100)
    (shared / "data").mkdir()
    (shared / "data" / "a.png").write_bytes(b"png")
    (shared / "data.tar.gz").write_bytes(b"archive" * 100)

    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    # The cluster keeps to itself: its own temp dir (Ray's socket paths live under it, hence short), no
    # fixed port, and the machine's "current cluster" file (/tmp/ray/ray_current_cluster, which
    # ray.init() without an address follows) neither written nor deleted for another Ray's users.
    temp_dir = tempfile.mkdtemp(prefix="mwt-ray-", dir="/tmp")
    patches = pytest.MonkeyPatch()
    patches.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    patches.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
    patches.setenv("RAY_ADDRESS", "local")
    ray_cluster, process, namespace = None, None, None
    log = Path(temp_dir) / "hidden-node.log"
    try:
        ray_cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "dashboard_port": free_port(), "temp_dir": temp_dir})
        ray_cluster.add_node(num_cpus=1)
        patches.setenv("RAY_ADDRESS", ray_cluster.address)
        ray.init(address=ray_cluster.address, logging_level="ERROR")
        visible = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        ports = " ".join(
            f"--{name}={free_port()}"
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
        )
        start = (f"mount -t tmpfs tmpfs '{hidden}' && exec '{RAY_CLI}' start --address={ray_cluster.address} "
                 f"--node-ip-address={ray.util.get_node_ip_address()} --num-cpus=1 {ports} --block")
        with open(log, "w") as output:
            process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", start],
                                       stdout=output, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 120
        while True:
            alive = [node for node in ray.nodes() if node["Alive"]]
            if len(alive) >= 3:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the third node did not join (exit status {process.poll()}): {log.read_text()[-3000:]}")
            time.sleep(0.5)
        (hidden_node,) = [node["NodeID"] for node in alive if node["NodeID"] not in visible]
        # Read only now: right after Popen the child may not have left this namespace yet.
        namespace = _mount_namespace(process.pid)
        if namespace is None or namespace == _mount_namespace(os.getpid()):
            pytest.fail(f"the third node runs in this process's mount namespace ({namespace})")
        yield hidden, shared, hidden_node, process, namespace
    finally:
        ray.shutdown()
        if process is not None:
            _stop_hidden_node(process, namespace or _mount_namespace(process.pid))
        if ray_cluster is not None:
            ray_cluster.shutdown()
        patches.undo()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _refusal(places: dict, **options) -> str:
    with pytest.raises(SetupError) as caught:
        check_shared_places(places, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


class TestThreeNodes:

    def test_the_cluster_really_hides_the_folder_from_one_node(self, cluster):
        """The premise of every test below, seen from each node itself."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        hidden, _, hidden_node, _, _ = cluster

        def names(folder):
            import os
            return sorted(os.listdir(folder))

        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        seen = ray.get([ray.remote(names).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(str(hidden)) for node in nodes])
        assert {node: tuple(s) for node, s in zip(nodes, seen)} == {
            node: (() if node == hidden_node else ("data", "data.tar.gz")) for node in nodes}

    def test_an_output_folder_one_node_cannot_see_is_refused_leaving_nothing_behind(self, cluster):
        hidden, _, hidden_node, _, _ = cluster
        before = sorted(os.listdir(hidden))
        value = str(hidden / "runs")
        message = _refusal({"output_dir": value})
        assert message.startswith(
            f"output_dir {value} is not reachable from 1 of 3 Ray nodes (node {hidden_node[:8]} at "
        )
        assert f"sees {hidden}, but not the check file the driver wrote there" in message
        assert message.endswith("use a shared mount (e.g. /mnt/shared/...)")  # output_dir is no object store URI
        assert sorted(os.listdir(hidden)) == before

    def test_places_every_node_sees_pass_and_leave_nothing_behind(self, cluster):
        _, shared, _, _, _ = cluster
        before = sorted(os.listdir(shared))
        check_shared_places(
            {
                "output_dir": str(shared / "runs"),
                "scaling.storage_path": str(shared / "runs" / "n" / "jobs"),
                "data.root": str(shared / "data"),
                "tracking.tracking_uri": f"sqlite:///{shared / 'mlflow.db'}",
                "reuse.output_dir": None,
            }
        )
        assert sorted(os.listdir(shared)) == before
        assert not [name for name in os.listdir(shared) if name.startswith(CHECK_FILE_PREFIX)]

    @pytest.mark.parametrize("name", ["data", "data.tar.gz"])
    def test_a_dataset_every_node_sees_passes(self, cluster, name):
        _, shared, _, _, _ = cluster
        check_shared_places({"data.root": str(shared / name)})

    @pytest.mark.parametrize("name", ["data", "data.tar.gz"])
    def test_a_dataset_one_node_cannot_see_is_refused(self, cluster, name):
        hidden, _, hidden_node, _, _ = cluster
        value = str(hidden / name)
        message = _refusal({"output_dir": None, "data.root": value})
        assert message.startswith(f"data.root {value} is not reachable from 1 of 3 Ray nodes (node {hidden_node[:8]} ")
        assert f"cannot see {value}" in message and "same copy at this path on every node" in message

    def test_a_dataset_that_differs_on_one_node_is_refused(self, cluster):
        """The hidden node sees a folder of the same name with other contents: a stale copy."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        hidden, _, hidden_node, _, _ = cluster

        def make(folder):
            import os
            os.makedirs(folder, exist_ok=True)

        stale = hidden / "stale"
        stale.mkdir(exist_ok=True)
        (stale / "b.png").write_bytes(b"png")
        ray.get(ray.remote(make).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            hidden_node, soft=False)).remote(str(stale)))  # on the hidden node's tmpfs: empty
        message = _refusal({"data.root": str(stale)})
        assert (
            f"node {hidden_node[:8]} " in message
            and "sees another folder" in message
            and "(0 entries, 1 here)" in message
        )

    def test_an_sqlite_store_one_node_cannot_see_is_refused(self, cluster):
        hidden, shared, hidden_node, _, _ = cluster
        value = f"sqlite:///{hidden / 'mlflow.db'}"
        message = _refusal({"output_dir": str(shared / "runs"), "tracking.tracking_uri": value})
        assert message.startswith(f"tracking.tracking_uri {value} is not reachable from 1 of 3 Ray nodes "
                                  f"(node {hidden_node[:8]} ")
        assert "MLflow server (http://" in message and ":5000" in message

    def test_the_first_refusal_names_the_others(self, cluster):
        hidden, _, _, _, _ = cluster
        message = _refusal({"output_dir": str(hidden / "runs"), "data.root": str(hidden / "data"),
                            "tracking.tracking_uri": f"sqlite:///{hidden / 'mlflow.db'}"})
        assert message.startswith("output_dir ")
        assert message.endswith("; data.root and tracking.tracking_uri not reachable either")

    @pytest.mark.parametrize("uri", ["s3://bucket/x", "gs://bucket/x"])
    def test_an_object_store_uri_is_skipped(self, cluster, monkeypatch, uri):
        """Taken for a relative path, the URI would resolve in the hidden folder (this cwd) and be refused."""
        hidden, _, _, _, _ = cluster
        monkeypatch.chdir(hidden)
        check_shared_places({"scaling.storage_path": uri})
        with pytest.raises(SetupError, match="1 of 3"):
            check_shared_places({"scaling.storage_path": "relative/storage"})

    def test_an_mlflow_server_nobody_listens_on_is_refused_by_every_node_in_time(self, cluster):
        uri = f"http://127.0.0.1:{free_port()}"
        started = time.monotonic()
        message = _refusal({"tracking.tracking_uri": uri}, timeout_s=20)
        assert time.monotonic() - started < 20
        assert message.startswith(f"tracking.tracking_uri {uri} is not reachable from 3 of 3 Ray nodes (node ")
        assert "cannot connect to 127.0.0.1:" in message and "MLflow server" in message

    def test_an_mlflow_server_every_node_reaches_passes(self, cluster):
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(8)
            check_shared_places({"tracking.tracking_uri": f"http://127.0.0.1:{server.getsockname()[1]}"})


    @pytest.mark.parametrize("command", [["mwt_ray.sweep", "--set", "sweep.trials=1"],
                                         ["mwt_ray.train", "--num-workers", "2"]])
    def test_a_command_on_the_cluster_refuses_an_unshared_output_folder_before_any_work(self, cluster, tmp_path,
                                                                                       command):
        """The sweep and data-parallel training, joined to the cluster as a user's command is: one
        error line naming the key, exit 2, and nothing written (no run folder, no MLflow run)."""
        from helpers import empty_store

        hidden, shared, hidden_node, _, _ = cluster
        store = empty_store(shared / f"{command[0]}.db")
        before = sorted(os.listdir(hidden))
        result = subprocess.run(
            [sys.executable, "-m", *command, "--set", f"output_dir={hidden / 'runs'}", "--set", "name=unshared",
             "--set", "model.width=0.125", "--set", "data.train_limit=100", "--set", "train.epochs=1",
             "--set", "train.batch_size=32", "--set", f"tracking.tracking_uri={store}"],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stdout[-2000:] + result.stderr[-3000:]
        assert errors[0].startswith(f"error: output_dir {hidden / 'runs'} is not reachable from 1 of 3 Ray nodes "
                                    f"(node {hidden_node[:8]} ")
        assert sorted(os.listdir(hidden)) == before
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=store)
        assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())

    def test_a_node_that_does_not_answer_is_named_in_time(self, cluster):
        """The hidden node's processes stopped (SIGSTOP) for a moment, as a node stuck in a hung mount:
        the check ends at its timeout and names the node. Last in the class: it disturbs that node."""
        _, shared, hidden_node, process, namespace = cluster
        stopped = _node_processes(namespace, root=process.pid)  # its raylet and workers, nothing else
        assert process.pid in stopped and os.getpid() not in stopped and len(stopped) < 40, stopped
        started = time.monotonic()
        try:
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            message = _refusal({"output_dir": str(shared / "runs")}, timeout_s=3)
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        assert time.monotonic() - started < 10
        assert message.startswith(
            f"the shared-storage check of output_dir {shared / 'runs'} got no answer from 1 of 3 Ray nodes "
            f"(node {hidden_node[:8]} at "
        )
        assert "did not answer within 3 s" in message
        assert not [name for name in os.listdir(shared) if name.startswith(CHECK_FILE_PREFIX)]


def test_one_node_or_no_ray_checks_nothing(tmp_path):
    """The places the cluster refuses pass on one node: nothing is looked at."""
    import ray

    places = {"output_dir": str(tmp_path / "runs"), "data.root": str(tmp_path / "missing"),
              "tracking.tracking_uri": f"http://127.0.0.1:{free_port()}"}
    assert not ray.is_initialized()
    check_shared_places(places)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        started = time.monotonic()
        check_shared_places(places)
        assert time.monotonic() - started < 1
    finally:
        ray.shutdown()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.5", "[::1]"])
def test_a_loopback_server_on_several_machines_is_refused_without_looking(monkeypatch, host):
    import ray

    nodes = [{"NodeID": f"{i}" * 56, "Alive": True, "NodeManagerAddress": f"10.0.0.{i}",
              "Resources": {"node:__internal_head__": 1.0} if i == 1 else {}} for i in (1, 2)]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "remote", lambda *a, **k: pytest.fail("no node is asked"))
    message = _refusal({"tracking.tracking_uri": f"http://{host}:5000"})
    assert message.startswith(f"tracking.tracking_uri http://{host}:5000 names the loopback address ")
    assert "2 Ray nodes (on 2 machines)" in message and "http://10.0.0.1:5000" in message


def test_a_hung_place_is_named_in_time(tmp_path):
    """A node's look at a place that blocks (here a FIFO nobody writes, as a hung mount) ends with
    the budget and says so; the other places still answer."""
    probe, _ = _node_probe()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    try:
        answers = probe({"0": {"kind": "read", "path": str(fifo), "fingerprint": ["file", 0, ""]},
                         "1": {"kind": "read", "path": str(tmp_path / "gone"), "fingerprint": ["folder", 0, ""]}}, 1.0)
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the blocked thread go
    assert time.monotonic() - started < 5
    assert answers == {"0": (False, "gave no answer within 1 s (a hung mount?)"),
                       "1": (False, f"cannot see {tmp_path / 'gone'}")}


# ----------------------------------------------------------------------------- Ray's package cache

def ray_package(tmp_path: Path, name: str = "_ray_pkg_5f0c3e2a9b7d41c6") -> Path:
    """A folder laid out like the one Ray 2.60 unpacks a submitted job's working_dir into."""
    package = (
        tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1" / "runtime_resources" / "working_dir_files" / name
    )
    package.mkdir(parents=True)
    return package


def written_places(relative_output: str = "runs") -> dict[str, str]:
    """The places as the command makes them absolute, against this cwd."""
    return {"output_dir": os.path.abspath(relative_output),
            "tracking.tracking_uri": f"sqlite:///{os.path.abspath('mlflow.db')}",
            "data.root": os.path.abspath("data"), "scaling.storage_path": "s3://bucket/ray"}


@pytest.mark.parametrize("name", ["_ray_pkg_5f0c3e2a9b7d41c6", "s3_bucket_code"])
def test_a_relative_output_folder_in_rays_package_is_refused(tmp_path, monkeypatch, name):
    package = ray_package(tmp_path, name)
    monkeypatch.chdir(package)
    assert ray_package_folder() == package
    places = written_places()
    with pytest.raises(SetupError) as caught:
        check_not_in_ray_package(places, {"output_dir": "runs", "tracking.tracking_uri": "/mnt/shared/mlflow.db"})
    message = str(caught.value)
    assert message.startswith(f"output_dir runs resolves to {package / 'runs'}, which lies inside the job's "
                              f"working_dir package {package}, which Ray deletes")
    assert "--set output_dir=/mnt/shared/runs" in message and "without --working-dir" in message


def test_the_default_store_in_rays_package_is_refused(tmp_path, monkeypatch):
    package = ray_package(tmp_path)
    monkeypatch.chdir(package)
    places = {**written_places(), "output_dir": "/mnt/shared/runs"}  # the store: the default, ./mlflow.db
    with pytest.raises(SetupError) as caught:
        check_not_in_ray_package(places, {"output_dir": "/mnt/shared/runs"})
    assert str(caught.value).startswith(f"tracking.tracking_uri (not set, so sqlite:///{package / 'mlflow.db'}) lies "
                                        f"inside the job's working_dir package {package}, which Ray deletes")


def test_absolute_places_outside_rays_package_pass(tmp_path, monkeypatch):
    package = ray_package(tmp_path)
    monkeypatch.chdir(package)
    places = {"output_dir": str(tmp_path / "runs"), "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
              "scaling.storage_path": "s3://bucket/ray", "data.root": os.path.abspath("data")}  # read: fine
    check_not_in_ray_package(places, dict(places))
    with pytest.raises(SetupError, match="^scaling.storage_path"):  # the same places, one written inside
        check_not_in_ray_package({**places, "scaling.storage_path": str(package / "jobs")},
                                 {**places, "scaling.storage_path": "jobs"})


def test_an_ordinary_cwd_passes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_package_folder() is None
    check_not_in_ray_package(written_places(), {"output_dir": "runs"})
    assert ray_package_folder(str(ray_package(tmp_path))) is not None  # the same check does see a package
