"""Short real training runs, checkpoints, and the command line's handling of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mwt_ray.config import load_config
from mwt_ray.core.checkpoint import build_model, check_architecture, load_checkpoint
from mwt_ray.jobs import reuse_from_checkpoints, train_in_process

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_limit=300", "model.width=0.125", "train.batch_size=32", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def modular_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, TINY + ["train.epochs=4", f"output_dir={out}", "name=mod"])
    summary = train_in_process(cfg, log=None)
    return cfg, summary


def test_modular_training_lowers_the_loss_and_modularizes(modular_run):
    cfg, summary = modular_run
    history = [json.loads(json.dumps(h)) for h in load_checkpoint(cfg.run_dir / "checkpoint.pt")["history"]]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["ce_loss"] < history[0]["ce_loss"]
    modules = summary["modules"]
    assert 0 < modules["krr"] <= 1 and 0 <= modules["coupling"] <= 1 and 0 <= modules["cohesion"] <= 1
    assert (cfg.run_dir / "history.csv").read_text().count("\n") == 5


def test_checkpoint_round_trip_with_weights_only(modular_run):
    cfg, _ = modular_run
    state = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=True)
    model = build_model(state).eval()
    assert state["module_masks"].dtype == torch.bool and state["module_masks"].shape[0] == 10
    assert state["kernel_usage"]["counts"].shape == state["module_masks"].shape
    assert state["config"]["train"]["epochs"] == 4
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    check_architecture(state, "vgg16", 0.125, 10)
    with pytest.raises(ValueError, match="holds vgg16 width 0.125"):
        check_architecture(state, "resnet18", 0.125, 10)


def test_standard_training_has_no_modules(tmp_path):
    cfg = load_config(None, TINY + ["train.epochs=1", "train.modular=false", f"output_dir={tmp_path}"])
    summary = train_in_process(cfg, log=None)
    assert "modules" not in summary
    assert "module_masks" not in load_checkpoint(cfg.run_dir / "checkpoint.pt")


def test_single_process_command_runs_without_ray(tmp_path):
    """The machine that trains on one GPU may have no Ray: the command's single-process path never
    imports it (here it cannot: ``sys.modules["ray"] = None`` makes ``import ray`` fail), nor does
    importing the reuse command."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import mwt_ray.reuse  # its in-process path (reuse.num_actors=0) needs no Ray either\n"
            "from mwt_ray.train import main\n"
            f"code = main({[f'--set={o}' for o in TINY + ['train.epochs=1', f'output_dir={tmp_path}']]!r})\n"
            "assert not any(name == 'ray' or name.startswith('ray.') for name in sys.modules if sys.modules[name])\n"
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "mwt" / "checkpoint.pt").is_file()


def run_cli(module, args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=300)


# The command's bad-input cases (one line, exit 2, nothing written) are in test_bad_input.py.


def test_reuse_cli_rejects_bad_classes_and_wrong_checkpoint(modular_run, tmp_path):
    cfg, _ = modular_run
    ckpt = str(cfg.run_dir / "checkpoint.pt")
    for sub, message in [("[[0, 12]]", "out of range"), ("[[3, 3]]", "repeat")]:
        result = run_cli("mwt_ray.reuse", ["--modular", ckpt, "--set", f"reuse.subtasks={sub}"], tmp_path)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for override, message in [("reuse.epochs=-1", "reuse.epochs"), ("model.width=0.5", "cannot be overridden")]:
        result = run_cli("mwt_ray.reuse", ["--modular", ckpt, "--set", override], tmp_path)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = run_cli("mwt_ray.reuse", ["--modular", str(garbage)], tmp_path)
    assert result.returncode == 2 and "is not a PyTorch checkpoint file" in result.stderr


def test_reuse_rebuilds_module_masks_for_another_tau(modular_run):
    cfg, _ = modular_run
    ckpt = str(cfg.run_dir / "checkpoint.pt")
    krr = {}
    for tau in (0.3, 1.0):
        rows = reuse_from_checkpoints(ckpt, None, [f"modularize.tau={tau}", "reuse.epochs=0",
                                                   "reuse.subtasks=[[0, 1]]"], log=None)
        krr[tau] = rows[0]["krr"]
    state = load_checkpoint(ckpt)
    stored = state["module_masks"][[0, 1]].any(0).float().mean().item()
    assert krr[0.3] >= stored >= krr[1.0] and krr[0.3] > krr[1.0]


def test_modularizing_pass_shows_progress(monkeypatch, capsys):
    from mwt_ray.core.data import load_dataset
    from mwt_ray.core.models import create_model
    from mwt_ray.jobs import derive_modules

    monkeypatch.setenv("MWT_RAY_PROGRESS_EVERY_S", "0")
    data = load_dataset("digits")  # 1437 training images: batches of 512
    cfg = load_config(None, ["modularize.cohesion_samples_per_class=5"])
    derive_modules(create_model("vgg16", 10, 0.125), data, cfg, torch.device("cpu"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("modularizing")]
    assert [line.split(": ")[2].split()[0] for line in lines] == ["512/1437", "1024/1437"]


def test_every_run_is_a_new_job_and_resume_continues_the_latest(tmp_path, monkeypatch):
    """What a sweep trial relies on: resume=True with no earlier job starts one; without resume a
    name used before gets a fresh job; with it, the latest job continues (here: already finished),
    its checkpoint read once (the preflight's read is the one the job resumes from: on an object
    store a second read would be a second download)."""
    from mwt_ray.jobs import job_plan, list_jobs

    cfg = load_config(None, TINY + ["train.epochs=1", f"output_dir={tmp_path}", "name=again"])
    lines = []
    first = train_in_process(cfg, resume=True, log=lines.append)
    assert any("no earlier job named 'again'" in line for line in lines) and len(list_jobs(cfg)) == 1
    train_in_process(cfg, log=None)
    assert len(list_jobs(cfg)) == 2
    lines.clear()
    reads = []
    read_state = job_plan._read_state
    monkeypatch.setattr(job_plan, "_read_state", lambda *args: reads.append(args[1]) or read_state(*args))
    again = train_in_process(cfg, resume=True, log=lines.append)
    assert len(reads) == 1, reads
    assert len(list_jobs(cfg)) == 2 and any(f"resuming job {list_jobs(cfg)[-1]}" in line for line in lines)
    assert again["final"]["test_accuracy"] == pytest.approx(first["final"]["test_accuracy"])  # same seed, same data


def test_fault_drill_kills_once_half_way_through_its_epoch(tmp_path, monkeypatch):
    """``scaling.fail_at_epoch``'s job hook, without the kill: it counts optimizer steps from the
    job's start epoch, waits for the previous epoch's checkpoint, leaves its marker, and fires once."""
    import signal
    from types import SimpleNamespace

    from mwt_ray.jobs import FaultDrill, RunStorage
    from mwt_ray.jobs import fault_drill as drill_module

    kills, waited, lines = [], [], []
    monkeypatch.setattr(drill_module.os, "kill", lambda pid, sig: kills.append(sig))
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    storage = RunStorage(str(tmp_path))
    job = SimpleNamespace(session=SimpleNamespace(rank=0, storage=storage), start_epoch=1, optimizer=optimizer,
                          data=SimpleNamespace(train_labels=range(40)), log=lines.append,
                          cfg=SimpleNamespace(train=SimpleNamespace(batch_size=10)))  # 4 steps an epoch
    FaultDrill(3, wait_for_checkpoint=lambda store, name: waited.append(name))(job)
    for step in range(1, 4 * 2 + 1):  # epochs 2 and 3 (resumed from epoch 1)
        parameter.grad = torch.ones(1)
        optimizer.step()
        assert kills == ([signal.SIGKILL] if step >= 4 + 2 else []), step
    assert waited == ["checkpoint_epoch_0002"] and "at epoch 3 step 2" in storage.read_bytes(
        ".fault_injected_epoch_3").decode()
    assert len(lines) == 1 and "step 2/4" in lines[0]
