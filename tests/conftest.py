import pytest
import torch
from helpers import STORE_TEMPLATE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_config_dir(tmp_path_factory):
    """The sweep's signing key goes to a folder of the test session (also for the commands the tests
    start as subprocesses), never to the user's own ~/.config/mwt-ray."""
    import os

    os.environ["MWT_RAY_CONFIG_DIR"] = str(tmp_path_factory.mktemp("mwt-ray-config"))


@pytest.fixture(autouse=True, scope="session")
def _own_local_ray():
    """Every Ray these tests start is their own: ``ray.init()`` without an address would otherwise join
    the newest ``ray start`` cluster on this machine (a user's, or the job-submission test's while
    the suite runs in parallel, ``pytest -n 2``), and a test's ``ray.shutdown()`` or kill would reach
    it. ``local`` makes Ray start a new local instance; tests of RAY_ADDRESS set their own.

    Ray runs its workers at nice 15: with other work on the machine (CI's, or the two ``yes`` loops of
    the loaded run) a trial then gets a few percent of a core, and a 2-minute sweep took 15. The
    tests' workers run at the priority of everything else."""
    import os

    os.environ["RAY_ADDRESS"] = "local"
    os.environ["RAY_worker_niceness"] = "0"


@pytest.fixture(autouse=True, scope="session")
def _store_template_dir(tmp_path_factory):
    """The folder ``helpers.empty_store`` copies new MLflow stores from, one per test session."""
    STORE_TEMPLATE_DIR.append(tmp_path_factory.mktemp("mlflow-store-template"))
