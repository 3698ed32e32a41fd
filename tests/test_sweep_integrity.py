"""``sweep --resume`` must never unpickle a file that this user's sweep did not sign.

A genuinely tiny Tune experiment (Optuna under a concurrency limit, ASHA, a callback with state, one
trial that fails) runs once on a local Ray, so the Tune folder holds every kind of file Ray 2.60's
restore deserialises. ``test_planted_payloads_run_without_the_check`` shows that a payload planted in
each of them really runs when the folder is restored unchecked; the other tests plant the same
payloads and check that ``verify_sweep`` refuses, naming the file, before anything is unpickled.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

import pytest
import ray
from ray import tune

from mwt_ray.cli import run_command
from mwt_ray.cluster.sweep_integrity import (
    CONFIG_DIR_ENV,
    KEY_FILE,
    SweepIntegrityError,
    config_dir,
    manifest_path,
    secret_key,
    sign_sweep,
    verify_sweep,
)
from mwt_ray.jobs import SetupError

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

# --------------------------------------------------------------------------- the experiment


def _trial(config):
    if config["x"] == 0.9:  # only the reference point: its error.pkl is one of the files restore unpickles
        raise RuntimeError("planned failure")
    for epoch in (1, 2):
        tune.report({"score": config["x"] * epoch, "epoch": epoch})


class _Completed(tune.Callback):
    """A callback with state, so that Tune writes ``callback-states-*.pkl``."""

    def __init__(self):
        self.completed = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1

    def get_state(self):
        return {"completed": self.completed}

    def set_state(self, state):
        self.completed = state["completed"]


def _run_experiment(storage: Path) -> None:
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = ConcurrencyLimiter(OptunaSearch(metric="score", mode="max", sampler=optuna.samplers.TPESampler(seed=0),
                                             points_to_evaluate=[{"x": 0.9}]), max_concurrent=2)
    tuner = tune.Tuner(tune.with_resources(_trial, {"cpu": 1}), param_space={"x": tune.uniform(0.0, 1.0)},
                       run_config=tune.RunConfig(name="tune", storage_path=str(storage), verbose=0,
                                                 callbacks=[_Completed()]),
                       tune_config=tune.TuneConfig(search_alg=search, num_samples=3,
                                                   scheduler=ASHAScheduler(metric="score", mode="max",
                                                                           time_attr="epoch", max_t=3,
                                                                           grace_period=1)))
    tuner.fit()


def _restore(tune_folder: Path):
    """What ``sweep --resume`` does with the Tune folder (``cluster/sweep.py``)."""
    return tune.Tuner.restore(str(tune_folder), trainable=tune.with_resources(_trial, {"cpu": 1}),
                              resume_unfinished=True, resume_errored=True)


def _guarded_restore(tune_folder: Path):
    """The resume as it is to be wired: check first, then restore."""
    verify_sweep(tune_folder)
    return _restore(tune_folder)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two users' config folders: "mine" is the one in effect unless a test says otherwise."""
    root = tmp_path_factory.mktemp("config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONFIG_DIR_ENV, str(root / "mine"))
        patch.setenv("RAY_AIR_NEW_OUTPUT", "0")
        yield {"mine": root / "mine", "other": root / "other"}


@pytest.fixture(scope="module")
def local_ray(keys):
    from ray import cloudpickle

    if ray.is_initialized():
        ray.shutdown()
    # Trials run in Ray workers, which cannot import this test module: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")  # never another's cluster
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pristine(local_ray, tmp_path_factory) -> Path:
    """A sweep folder whose Tune experiment ran to the end and was signed; tests work on copies."""
    sweep = tmp_path_factory.mktemp("pristine")
    _run_experiment(sweep)
    sign_sweep(sweep / "tune")
    return sweep


@pytest.fixture
def signed(pristine, tmp_path) -> Path:
    """A copy of the signed sweep folder; returns its Tune folder."""
    shutil.copytree(pristine, tmp_path / "sweep", symlinks=True)
    return tmp_path / "sweep" / "tune"


# --------------------------------------------------------------------------- payloads

class _Payload:
    """Unpickling this runs ``code`` (it writes a marker file) and then yields ``inner`` (the original
    object, unpickled), so that a restore goes on and reaches the next planted file."""

    def __init__(self, marker: Path, inner: bytes | None = None):
        self.marker, self.inner = marker, inner

    def __reduce__(self):
        original = "None" if self.inner is None else f"__import__('pickle').loads(bytes.fromhex({self.inner.hex()!r}))"
        return eval, (f"(open({str(self.marker)!r}, 'a').write('ran'), {original})[1]",)


def _payload(marker: Path, inner: bytes | None = None) -> bytes:
    # Plain pickle: the payload refers to builtins.eval only, never to this test module.
    return pickle.dumps(_Payload(marker, inner))


def _one(tune_folder: Path, pattern: str) -> Path:
    found = sorted(tune_folder.glob(pattern))
    assert found, f"the experiment left no {pattern} in {sorted(p.name for p in tune_folder.iterdir())}"
    return found[-1]


def _replace_pickle(pattern: str):
    def plant(tune_folder: Path, markers: Path) -> Path:
        path = _one(tune_folder, pattern)
        path.write_bytes(_payload(markers / path.name, path.read_bytes()))
        return path
    return plant


def _pickle_in_json(tune_folder: Path, markers: Path) -> Path:
    """An entry Tune's JSON decoder unpickles (``CLOUDPICKLE_FALLBACK``), added to the experiment state."""
    path = _one(tune_folder, "experiment_state-*.json")
    state = json.loads(path.read_text())
    state["planted"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": _payload(markers / path.name).hex()}
    path.write_text(json.dumps(state))
    return path


def _added(name: str, json_state: bool = False):
    """A new file under a name Tune globs for, newer than any real one (Tune reads the ``max`` name)."""
    def plant(tune_folder: Path, markers: Path) -> Path:
        path = tune_folder / name
        if json_state:
            state = json.loads(_one(tune_folder, "experiment_state-*.json").read_text())
            state["planted"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": _payload(markers / name).hex()}
            path.write_text(json.dumps(state))
        else:
            path.write_bytes(_payload(markers / name))
        return path
    return plant


def _added_error_pickle(tune_folder: Path, markers: Path) -> Path:
    trial = next(p for p in sorted(tune_folder.iterdir()) if p.is_dir() and not (p / "error.pkl").exists())
    (trial / "error.pkl").write_bytes(_payload(markers / "added-error.pkl"))
    return trial / "error.pkl"


# Every file Ray 2.60's restore deserialises (see the module docstring of sweep_integrity), changed in
# place; "live" ones are shown to run in test_planted_payloads_run_without_the_check.
CHANGED = {
    "tuner.pkl": _replace_pickle("tuner.pkl"),
    "searcher-state": _replace_pickle("searcher-state-*.pkl"),
    "search_gen_state (a pickle named .json)": _replace_pickle("search_gen_state-*.json"),
    "experiment_state (pickle inside JSON)": _pickle_in_json,
    "callback-states": _replace_pickle("callback-states-*.pkl"),
    "trial error.pkl": _replace_pickle("*/error.pkl"),
    "trial params.pkl": _replace_pickle("*/params.pkl"),
}
LIVE = ["tuner.pkl", "searcher-state", "search_gen_state (a pickle named .json)",
        "experiment_state (pickle inside JSON)", "callback-states", "trial error.pkl"]
ADDED = {
    "newer experiment_state": _added("experiment_state-9999-12-31_23-59-59.json", json_state=True),
    "newer searcher-state": _added("searcher-state-9999-12-31_23-59-59.pkl"),
    "newer search_gen_state": _added("search_gen_state-9999-12-31_23-59-59.json"),
    "newer callback-states": _added("callback-states-9999-12-31_23-59-59.pkl"),
    "basic-variant-state": _added("basic-variant-state-9999-12-31_23-59-59.json"),
    "hidden file": _added(".tuner.pkl"),
    "trial error.pkl where there was none": _added_error_pickle,
}


def _assert_refused(tune_folder: Path, planted: Path, markers: Path, *words: str) -> str:
    with pytest.raises(SweepIntegrityError) as caught:
        _guarded_restore(tune_folder)
    message = str(caught.value)
    assert isinstance(caught.value, SetupError) and isinstance(caught.value, ValueError)
    assert "\n" not in message and str(planted) in message, message
    assert "start a new sweep (without --resume)" in message, message
    for word in words:
        assert word in message, message
    assert not any(markers.iterdir()), "a planted payload ran"
    return message


# --------------------------------------------------------------------------- tests

def test_planted_payloads_run_without_the_check(signed, tmp_path):
    """The control: every "live" file really is deserialised by an unchecked restore (and its fit),
    so the refusals below guard something real."""
    markers = tmp_path / "markers"
    markers.mkdir()
    planted = {kind: CHANGED[kind](signed, markers) for kind in LIVE}
    tuner = _restore(signed)
    tuner.get_results()  # what the sweep's results step reads: the errored trial's error.pkl
    tuner.fit()
    ran = {path.name for path in markers.iterdir()}
    assert {planted[kind].name for kind in LIVE} <= ran, (sorted(ran), {k: p.name for k, p in planted.items()})


@pytest.mark.parametrize("kind", sorted(CHANGED))
def test_a_changed_file_is_refused_before_it_is_unpickled(signed, tmp_path, kind):
    _assert_refused(signed, *_plant(CHANGED[kind], signed, tmp_path), "changed after the sweep signed it")


@pytest.mark.parametrize("kind", sorted(ADDED))
def test_an_added_file_is_refused(signed, tmp_path, kind):
    _assert_refused(signed, *_plant(ADDED[kind], signed, tmp_path), "not in the signed manifest")


def _plant(plant, signed, tmp_path):
    """``plant(signed, markers)``'s planted files and the folder of markers a payload would leave."""
    markers = tmp_path / "markers"
    markers.mkdir()
    return plant(signed, markers), markers


def test_a_link_is_refused(signed, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    elsewhere = tmp_path / "elsewhere.pkl"
    elsewhere.write_bytes(_payload(markers / "linked"))
    (signed / "tuner.pkl").unlink()
    (signed / "tuner.pkl").symlink_to(elsewhere)
    _assert_refused(signed, signed / "tuner.pkl", markers, "link or special file")


def test_a_planted_name_cannot_break_the_one_line(signed, tmp_path):
    (signed / "evil\nname.pkl").write_bytes(_payload(tmp_path / "marker"))
    with pytest.raises(SweepIntegrityError) as caught:
        verify_sweep(signed)
    assert "\n" not in str(caught.value) and "evil\\nname.pkl" in str(caught.value)


def test_several_problems_name_the_first_and_count_the_rest(signed, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    first = CHANGED["callback-states"](signed, markers)
    CHANGED["tuner.pkl"](signed, markers)
    _added_error_pickle(signed, markers)
    message = _assert_refused(signed, first, markers)
    assert "(and 2 more files)" in message, message


def test_an_untouched_signed_folder_verifies_restores_and_signs_again(signed):
    checked = verify_sweep(signed)
    assert checked == sum(1 for p in signed.rglob("*") if p.is_file()) and checked >= 10
    before = json.loads(manifest_path(signed).read_text())["files"]
    grid = _restore(signed).fit()  # the failed trial runs again (resume_errored) and fails again
    assert len(grid) == 3 and sum(r.error is not None for r in grid) == 1
    sign_sweep(signed)  # after the resumed run, as the sweep will
    assert verify_sweep(signed) >= checked
    after = json.loads(manifest_path(signed).read_text())["files"]
    assert after["tuner.pkl"] == before["tuner.pkl"]


def test_a_tuner_pickle_replaced_during_the_run_stays_refused_after_signing_again(signed, tmp_path):
    """sign_sweep keeps the first signature of tuner.pkl (Tune never rewrites it): a replacement
    between two signings is not blessed by the second one."""
    markers = tmp_path / "markers"
    markers.mkdir()
    planted = CHANGED["tuner.pkl"](signed, markers)
    sign_sweep(signed)
    _assert_refused(signed, planted, markers, "changed after the sweep signed it")


def test_a_sweep_that_never_signed_is_refused(signed, tmp_path):
    """A SIGKILLed sweep never signs: its --resume is refused."""
    manifest_path(signed).unlink()
    with pytest.raises(SweepIntegrityError, match="never signed") as caught:
        _guarded_restore(signed)
    assert str(signed) in str(caught.value) and "without --resume" in str(caught.value)


def test_an_altered_manifest_is_refused(signed, tmp_path):
    """Swapping in the hash of another signed file (all an attacker can copy) breaks the manifest's own MAC."""
    markers = tmp_path / "markers"
    markers.mkdir()
    planted = CHANGED["tuner.pkl"](signed, markers)
    manifest = json.loads(manifest_path(signed).read_text())
    manifest["files"]["tuner.pkl"] = manifest["files"][next(n for n in manifest["files"] if n != "tuner.pkl")]
    manifest_path(signed).write_text(json.dumps(manifest))
    with pytest.raises(SweepIntegrityError, match="altered after it was signed"):
        _guarded_restore(signed)
    assert not any(markers.iterdir()) and planted.exists()


@pytest.mark.parametrize("change", ["not json", "a list", "non-ASCII hash", "no files"])
def test_a_malformed_manifest_is_refused(signed, change):
    manifest = json.loads(manifest_path(signed).read_text())
    if change == "non-ASCII hash":
        manifest["mac"] = "\u00e9" * 64
    elif change == "no files":
        del manifest["files"]
    text = {"not json": "{not json", "a list": "[]"}.get(change, json.dumps(manifest))
    manifest_path(signed).write_text(text)
    with pytest.raises(SweepIntegrityError, match="not a valid mwt-ray integrity manifest"):
        verify_sweep(signed)


def test_a_folder_signed_with_another_users_secret_is_refused(signed, tmp_path, keys, monkeypatch):
    """Another user plants a payload and signs the folder with their own secret."""
    markers = tmp_path / "markers"
    markers.mkdir()
    planted = CHANGED["searcher-state"](signed, markers)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(keys["other"]))
    sign_sweep(signed)
    assert verify_sweep(signed) > 0  # valid for its signer
    monkeypatch.setenv(CONFIG_DIR_ENV, str(keys["mine"]))
    with pytest.raises(SweepIntegrityError, match="signed with another secret"):
        _guarded_restore(signed)
    assert not any(markers.iterdir()) and planted.exists()


def test_no_secret_on_this_machine_is_refused(signed, tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "fresh-config"))
    with pytest.raises(SweepIntegrityError, match="no signing secret"):
        verify_sweep(signed)
    assert not (tmp_path / "fresh-config").exists()  # verifying never makes a secret


def test_a_refusal_is_one_error_line_and_exit_2(signed, capsys):
    manifest_path(signed).unlink()
    assert run_command(lambda: verify_sweep(signed)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refusing to resume from "), err


def test_a_folder_that_does_not_exist_has_nothing_to_check(tmp_path):
    assert verify_sweep(tmp_path / "no-such-tune") == 0
    with pytest.raises(SweepIntegrityError, match="only a local or mounted folder"):
        verify_sweep("s3://bucket/sweep/tune")  # not "nothing there": it cannot be checked at all


# --------------------------------------------------------------------------- the secret

def test_the_secret_is_made_on_first_use_mode_0600_in_a_0700_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cfg" / "mwt-ray"
    monkeypatch.setenv(CONFIG_DIR_ENV, str(folder))
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        key = secret_key()
    finally:
        os.umask(old)
    assert len(key) == 32 and secret_key() == key
    assert stat.S_IMODE((folder / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == [KEY_FILE]  # no temporary file left behind


def test_an_existing_loose_folder_is_tightened_and_a_loose_secret_refused(tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(folder))
    secret_key()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    os.chmod(folder / KEY_FILE, 0o644)
    with pytest.raises(SweepIntegrityError, match="is not private"):
        secret_key()


def test_the_config_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "mwt-ray"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_dir() == tmp_path / "home" / ".config" / "mwt-ray"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config_dir() == tmp_path / "home" / ".config" / "mwt-ray"
