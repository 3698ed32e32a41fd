"""What the tests share beyond fixtures: random masks, small configs, MLflow stores and clients,
local ports. Fixtures stay in ``conftest.py``; test modules import these by name (``from helpers import
tiny_config``), since ``tests/`` is on the path pytest gives them."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mwt_ray.config import load_config


def random_masks(batch, layer_sizes, zero_fraction=0.3, generator=None):
    """Masks in [0, 1) with exact zeros, like relu(tanh(.)) produces."""
    masks = []
    for k in layer_sizes:
        m = torch.rand(batch, k, dtype=torch.float64, generator=generator)
        m[torch.rand(batch, k, generator=generator) < zero_fraction] = 0
        masks.append(m)
    return masks


STORE_TEMPLATE_DIR: list[Path] = []  # one folder per test session, set by conftest's fixture


def empty_store(path: Path) -> str:
    """The ``sqlite:///`` URI of a new, empty MLflow store at ``path``, copied from one made once per
    test session: MLflow makes a new sqlite store by running its schema migrations (about 4 s here,
    in every process and test that starts one), and opens a copy in about 1 s. Tests of store
    creation itself (concurrent first use, a bad path) make their own."""
    import shutil
    import subprocess
    import sys

    template = STORE_TEMPLATE_DIR[0] / "mlflow.db"
    if not template.exists():  # made in a subprocess: this one keeps no MLflow state from it
        code = (
            "import sys\nfrom mlflow import MlflowClient\n"
            "MlflowClient(tracking_uri='sqlite:///' + sys.argv[1]).search_experiments()\n"
        )
        subprocess.run([sys.executable, "-c", code, str(template)], check=True, capture_output=True, timeout=300)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def tiny_config(tmp_path: Path, name: str, *overrides: str, workers: int = 2, epochs: int = 2):
    """A two-epoch VGG16/8 on 160 digits, tracked in an (empty) MLflow store in ``tmp_path`` unless
    the overrides say otherwise about tracking."""
    if not any(o.startswith("tracking.") for o in overrides):
        empty_store(tmp_path / "mlflow.db")
    return load_config(None, [
        f"name={name}", f"output_dir={tmp_path / 'runs'}", "model.name=vgg16", "model.width=0.125",
        "data.name=digits", "data.train_limit=160", "train.batch_size=32", f"train.epochs={epochs}",
        "train.lr=0.02", "modularize.cohesion_samples_per_class=20", f"scaling.num_workers={workers}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def mlflow_client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def only_run(client, experiment: str = "mwt-ray"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected exactly one MLflow run, found {len(runs)}"
    return runs[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_local(url, timeout: float):
    """urlopen for a server these tests started on 127.0.0.1, never through a proxy. The bad-input
    tests point the proxy variables at a dead port, and urlopen's global opener keeps the proxy
    settings of its first use for the rest of the session."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout)


REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args`` in a new process in ``cwd`` (one torch thread, its own dataset cache), which
    must succeed. The repository on PYTHONPATH is how a researcher's package is found (the working
    directory, where the command runs, also is: in these tests a fresh folder)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MWT_RAY_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
