"""Bad input, as a hostile but fair user gives it: every case ends with exactly one stderr line that
starts with ``error:``, the promised exit status, and no file created anywhere the job writes: the
output folder, the MLflow store, the dataset cache ($MWT_RAY_CACHE) or the Ray run storage (Ray's
own temporary folders, under /tmp/ray, are exempt).

Each case runs in a fresh folder that is also the working directory (where the default MLflow store
``mlflow.db`` would go) and the dataset cache; the whole folder is compared before and after. The
cache holds the embedded digits beforehand: any job that reads them keeps that decoded copy (written
whole or not at all), so only what a case's job itself would write is looked for.
Cases whose behaviour does not depend on the process boundary call the command's ``main(argv)`` in
this process; the few that do (Ray's log lines on the driver's terminal, a worker killed after
training started) run ``python -m mwt_ray.train``. Later features add their cases to ``CASES``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port
from PIL import Image

from mwt_ray.core.messages import MAX_ERROR_CHARS

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses

REPO = Path(__file__).resolve().parents[1]
# Small and quick, so that a case that wrongly trains still ends soon (and then fails its checks).
COMMON = ["--set", "output_dir={tmp}/runs", "--set", "train.epochs=1", "--set", "data.train_limit=100",
          "--set", "model.width=0.125", "--set", "train.batch_size=32"]
NO_GPU = not torch.cuda.is_available()


@dataclasses.dataclass
class Case:
    id: str
    args: list[str]
    expected: str  # a part of the error line
    status: int = 2
    setup: Callable[[Path], None] | None = None
    command: str = "train"
    common: bool = True  # add COMMON to a train command
    needs: str = ""  # "ray": a running Ray cluster; "job": a finished job of name 'base' in {tmp}/runs
    skip: str = ""  # a real reason this case cannot run here


# ----------------------------------------------------------------------------- inputs the cases need

def image_folder(root: Path, train: list[str], test: list[str], per_class: int = 2, empty: tuple = ()) -> None:
    rng = np.random.default_rng(0)
    for split, classes in (("train", train), ("test", test)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(0 if (split, name) in empty else per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def folder(relative: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / relative).mkdir(parents=True, exist_ok=True)


def images(train: list[str], test: list[str], **kwargs) -> Callable[[Path], None]:
    return lambda tmp: image_folder(tmp / "in" / "ds", train, test, **kwargs)


def tar_of_images(truncate: bool) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        image_folder(tmp / "src", ["a", "b"], ["a", "b"], per_class=20)
        archive = tmp / "in" / "ds.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tmp / "src", arcname="ds")
        shutil.rmtree(tmp / "src")
        if truncate:
            data = archive.read_bytes()
            archive.write_bytes(data[: len(data) // 2])
    return setup


def alias_bomb(at: str, levels: int = 9) -> str:
    """'Billion laughs' as the value of ``at`` (a dotted key): a list whose items are anchors, each of
    ten aliases of the one before, the last standing for 10**levels values; a few hundred bytes."""
    items = ["&l0 [" + ", ".join(["lol"] * 10) + "]"]
    items += [f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]" for level in range(1, levels + 1)]
    section, key = at.split(".")
    return f"{section}:\n  {key}: [{', '.join(items)}]\n"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels (PIL checks the size when it opens the file:
    nothing near that large is ever allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def with_image(relative: str, content: bytes) -> Callable[[Path], None]:
    """A good 2-class image folder in in/ds plus one more file."""
    return lambda tmp: [images(["a", "b"], ["a", "b"])(tmp), write(relative, content)(tmp)]


def fifo(relative: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        images(["a", "b"], ["a", "b"])(tmp)
        os.mkfifo(tmp / relative)
    return setup


def deleted_experiment(tmp: Path) -> None:
    """An sqlite store in in/m.db whose experiment 'mwt-ray' is deleted (not purged)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'in' / 'm.db'}")
    client.delete_experiment(client.create_experiment("mwt-ray"))


def mlflow_store(tmp: Path) -> None:
    """An MLflow sqlite store in in/m.db (no runs)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp / 'in' / 'm.db'}").search_experiments()


def other_program_db(tmp: Path) -> None:
    """An sqlite database another program keeps (a table of notes), not an MLflow store."""
    import sqlite3

    with sqlite3.connect(tmp / "in" / "other.db") as db:
        db.execute("create table notes (body text)")


def three_class_folder_cached(tmp: Path) -> None:
    """A 3-class image folder, decoded (and so cached) before the case runs."""
    from mwt_ray.core.data import load_dataset

    image_folder(tmp / "in" / "ds", ["a", "b", "c"], ["a", "b", "c"], per_class=12)
    load_dataset("folder", str(tmp / "in" / "ds"))


def forge_training_states(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for path in (tmp / "runs" / "base" / "jobs").rglob("training_state.pt"):
            state = torch.load(path, weights_only=True)
            change(state)
            torch.save(state, path)
    return setup


def rename_first_weight(state: dict) -> None:
    key = next(iter(state["model_state"]))
    state["model_state"]["forged." + key] = state["model_state"].pop(key)


def text_training_states(tmp: Path) -> None:
    for path in (tmp / "runs" / "base" / "jobs").rglob("training_state.pt"):
        path.write_text("hello, I am not a checkpoint\n")


# ----------------------------------------------------------------------------- the cases

def config_cases() -> list[Case]:
    values = [  # (override, part of the message)
        ("model.name=alexnet", "unknown model 'alexnet'"),
        ("model.width=0", "model.width"),
        ("model.width=-1", "model.width"),
        ("model.width=1e9", "more than the 2e+09 allowed"),
        ("model.width=nan", "model.width"),
        ("model.width=abc", "model.width"),
        ("model.width=40", "use a width up to"),
        ("data.name=imagenet", "unknown dataset 'imagenet'"),
        ("data.train_limit=1", "data.train_limit"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("data.val_fraction=-0.1", "data.val_fraction"),
        ("data.download=maybe", "data.download"),
        ("train.epochs=0", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=[1]", "train.epochs"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.momentum=1", "train.momentum"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.alpha=-0.5", "train.alpha"),
        ("train.beta=-1", "train.beta"),
        ("train.warmup_epochs=-1", "train.warmup_epochs"),
        ("train.warmup_shape=exponential", "train.warmup_shape"),
        ("train.sparsity=-0.1", "train.sparsity"),
        ("train.generator_lr_scale=0", "train.generator_lr_scale"),
        ("train.mask_bias_init=nan", "train.mask_bias_init"),
        ("train.detach_generator_input=sometimes", "train.detach_generator_input"),
        ("train.device=tpu", "unknown device 'tpu'"),
        ("train.device=cuda:x", "unknown device"),
        ("train.modular=perhaps", "train.modular 'perhaps' is not true or false (train.method is the key now"),
        # The method and each method's own settings.
        ("train.method=lasso", "train.method: unknown method 'lasso'; choose one of standard, mwt, moda"),
        ("train.method=[moda]", "train.method"),
        ("train.affinity=2", "train.affinity=2 is a setting of method moda, but train.method is mwt"),
        ("train.compactness=-1", "train.compactness"),
        ("train.dispersion=true", "train.dispersion: true/false is not a number"),
        ("train={method: moda, alpha: 2}", "train.alpha=2 is a setting of method mwt, but train.method is moda "
                                           "(its weights: affinity, dispersion, compactness)"),
        ("train={method: moda, mask_bias_init: 3}", "train.mask_bias_init=3 is a setting of method mwt"),
        ("train={modular: true, method: standard}", "train.modular=true contradicts train.method=standard"),
        ("modularize.tau=0", "modularize.tau"),
        # The GPU step's options.
        ("train.precision=fp8", "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ("train.precision=true", "train.precision"),
        ("train.compile=sometimes", "train.compile"),
        (
            "train.compile_mode=fast",
            "train.compile_mode: Input should be 'default', 'reduce-overhead' or 'max-autotune'",
        ),
        ("train.channels_last=2", "train.channels_last"),
        ("data.device_resident=sometimes", "data.device_resident: use true, false or auto"),
        ("data.device_resident=1", "data.device_resident: use true, false or auto"),
        ("modularize.tau=1.5", "modularize.tau"),
        ("modularize.cohesion_samples_per_class=-1", "cohesion_samples_per_class"),
        ("scaling.num_workers=-1", "scaling.num_workers"),
        ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker"),
        ("scaling.max_failures=-2", "scaling.max_failures"),
        ("scaling.fail_at_epoch=0", "scaling.fail_at_epoch"),
        ("tracking.enabled=perhaps", "tracking.enabled"),
        ("name=../../../x", "plain folder name"),
        ("name=a/b", "plain folder name"),
        ("name=..", "plain folder name"),
        ("name=.hidden", "plain folder name"),
        ("name=", "name"),
        ("name=a\\b", "plain folder name"),
        ("unknown.key=1", "unknown key"),
        ("train.unknown=1", "train.unknown: unknown key"),
        ("train=5", "train"),
        ("train.epochs.x=1", "not a section"),
        ("output_dir=[1, 2]", "output_dir"),
        # YAML that does not parse is bad input (exit 2), like a config file's.
        ("train.epochs=[1", "override 'train.epochs=[1' is not valid YAML"),
        ("train.lr={0.1", "is not valid YAML"),
        ("data.root='x", "is not valid YAML"),
        ("train.epochs=&a [1, *a]", "a structure that holds itself"),
        ("reuse.subtasks=" + "[" * 3000 + "]" * 3000, "nests lists or mappings too deeply"),
        # Booleans are not numbers (pydantic would take true as 1): int, float, optional, list and sweep fields.
        ("train.epochs=true", "train.epochs: true/false is not a number: give a whole number"),
        ("train.epochs=yes", "train.epochs: true/false is not a number"),
        ("train.batch_size=true", "train.batch_size"),
        ("train.lr=true", "train.lr: true/false is not a number: give a number"),
        ("train.alpha=false", "train.alpha"),
        ("train.seed=false", "train.seed: true/false"),
        ("model.width=true", "model.width: true/false is not a number"),
        ("data.train_limit=true", "data.train_limit: true/false"),
        ("data.val_fraction=false", "data.val_fraction: true/false"),
        ("modularize.tau=true", "modularize.tau: true/false"),
        ("modularize.report_taus=[0.5, true]", "report_taus: true/false"),
        ("modularize.cohesion_samples_per_class=true", "cohesion_samples_per_class: true/false"),
        ("reuse.sizes=[2, true]", "reuse.sizes: true/false"),
        ("reuse.subtasks=[[0, true]]", "reuse.subtasks: true/false"),
        ("reuse.cpus_per_actor=true", "reuse.cpus_per_actor: true/false"),
        ("scaling.num_workers=true", "scaling.num_workers: true/false"),
        ("scaling.fail_at_epoch=on", "scaling.fail_at_epoch: true/false"),
        ("sweep.trials=true", "sweep.trials: true/false"),
        ("sweep.tau_grid=[0.5, true]", "sweep.tau_grid: true/false"),
        ("sweep.krr_weight=true", "sweep.krr_weight: true/false"),
        ("sweep.space={train.alpha: {low: true, high: 2}}", "sweep.space.train.alpha.low: true/false"),
        (
            "sweep.points=[{train.alpha: true, train.beta: 1}]",
            "train.alpha=true: true/false is not a number; give a number",
        ),
    ]
    cases = [Case(f"set {o}", ["--set", o], m) for o, m in values]
    cases.append(Case("override without =", ["--set", "train.epochs"], "must look like section.key=value"))
    return cases


def config_file(label: str, content: str | bytes, expected: str) -> Case:
    """A case whose --config file holds ``content``."""
    return Case(label, ["--config", "{tmp}/in/c.yaml"], expected, setup=write("in/c.yaml", content))


def cli_cases() -> list[Case]:
    return [
        Case("config file missing", ["--config", "{tmp}/in/none.yaml"], "does not exist"),
        Case(
            "config file is a folder",
            ["--config", "{tmp}/in/conf"],
            "is a folder, not a YAML file",
            setup=folder("in/conf"),
        ),
        config_file("config YAML malformed", "train:\n  epochs: 3\n   lr: [0.1\n", "is not valid YAML"),
        config_file("config YAML tab", "train:\n\tepochs: 3\n", "is not valid YAML"),
        config_file("config YAML is a list", "- 1\n- 2\n", "must hold a mapping"),
        config_file("config unknown section", "trian:\n  epochs: 3\n", "unknown key"),
        config_file("config bad value", "train:\n  lr: -3\n", "train.lr"),
        config_file("config binary file", b"\xff\xfe\x00\x81", "cannot be read"),
        Case("--num-workers not a number", ["--num-workers", "two"], "invalid int value"),
        Case("unknown flag", ["--epochs", "3"], "unrecognized arguments"),
        Case("--set without a value", ["--set"], "expected one argument", common=False),
        Case("--num-workers negative", ["--num-workers", "-1"], "scaling.num_workers"),
        # Alias bombs: refused while loading, before validation expands them (the line is short too).
        *[
            Case(
                f"config alias bomb in {at}",
                ["--config", "{tmp}/in/bomb.yaml"],
                "expand to more than 100000 values",
                setup=write("in/bomb.yaml", alias_bomb(at)),
            )
            for at in ("train.lr", "reuse.subtasks", "data.root")
        ],
        Case(
            "config alias bomb of 10**5 values",
            ["--config", "{tmp}/in/bomb.yaml"],
            "expand to more than 100000 values",
            setup=write("in/bomb.yaml", alias_bomb("train.lr", levels=5)),
        ),
        config_file("config recursive alias", "reuse:\n  subtasks: &a [[0, 1], *a]\n", "a structure that holds itself"),
        # An error line quotes what it was given; a long path is cut at the one cap (core.messages.MAX_ERROR_CHARS).
        Case(
            "config file missing, very long path",
            ["--config", "{tmp}/in/" + "/".join(["d" * 200] * 15) + "/c.yaml"],
            "cut short: the message has",
        ),
    ]


def data_cases() -> list[Case]:
    ds = ["--set", "data.name=folder", "--set", "data.root={tmp}/in/ds"]
    tv = lambda name, *more: ["--set", f"data.name={name}", *more]  # noqa: E731
    return [
        Case("folder without root", ["--set", "data.name=folder"], "needs data.root"),
        Case("folder root missing", ["--set", "data.name=folder", "--set", "data.root=/no/such/dir"], "does not exist"),
        Case("folder root empty", ds, "no train/ and test/", setup=folder("in/ds")),
        Case(
            "folder without test split",
            ds,
            "no train/ and test/",
            setup=lambda t: (
                image_folder(t / "in" / "ds", ["a", "b"], [])
                or shutil.rmtree(t / "in" / "ds" / "test", ignore_errors=True)
            ),
        ),
        Case(
            "folder train without classes",
            ds,
            "holds no class folders",
            setup=lambda t: [folder("in/ds/train")(t), folder("in/ds/test/a")(t)],
        ),
        Case("test split has an extra class", ds, "only in test/: ['c']", setup=images(["a", "b"], ["a", "b", "c"])),
        Case("test split misses a class", ds, "missing from test/: ['b']", setup=images(["a", "b", "c"], ["a", "c"])),
        Case(
            "class without training images",
            ds,
            "have no training samples",
            setup=images(["a", "b", "c"], ["a", "b", "c"], empty=(("train", "b"),)),
        ),
        Case(
            "test split without images",
            ds,
            "holds no images",
            setup=images(["a", "b"], ["a", "b"], empty=(("test", "a"), ("test", "b"))),
        ),
        Case(
            "corrupt image",
            ds,
            "cannot decode image",
            setup=lambda t: [images(["a", "b"], ["a", "b"])(t), write("in/ds/train/a/bad.png", b"\x89PNG garbage")(t)],
        ),
        # Images beyond PIL's decompression-bomb limit: above twice the limit PIL refuses, above it warns.
        Case(
            "image above twice the bomb limit",
            ds,
            "in/ds/train/a/huge.png' is too large to decode",
            setup=with_image("in/ds/train/a/huge.png", png_header(20000, 20000)),
        ),
        Case(
            "image above the bomb limit",
            ds,
            "in/ds/test/b/huge.png' is too large to decode",
            setup=with_image("in/ds/test/b/huge.png", png_header(10000, 10000)),
        ),
        # A data root (or an image) that is a device or a pipe: refused without reading it (no hang).
        *[
            Case(
                f"{name} root {dev}",
                ["--set", f"data.name={name}", "--set", f"data.root={dev}"],
                f"data path '{dev}' is a device file",
            )
            for name in ("folder", "cifar10", "svhn")
            for dev in ("/dev/null", "/dev/zero")
        ],
        Case(
            "folder root is a pipe",
            ["--set", "data.name=folder", "--set", "data.root={tmp}/in/pipe"],
            "is a named pipe (FIFO)",
            setup=lambda t: os.mkfifo(t / "in" / "pipe"),
        ),
        Case(
            "image that is a pipe",
            ds,
            "in/ds/train/a/p.png' is a named pipe (FIFO), not an image file",
            setup=fifo("in/ds/train/a/p.png"),
        ),
        Case(
            "image that is /dev/zero",
            ds,
            "is a device file, not an image file",
            setup=lambda t: [
                images(["a", "b"], ["a", "b"])(t),
                os.symlink("/dev/zero", t / "in" / "ds" / "test" / "a" / "z.png"),
            ],
        ),
        Case(
            "cifar10 root is a file",
            ["--set", "data.name=cifar10", "--set", "data.root={tmp}/in/c10"],
            "is a file, not the folder",
            setup=write("in/c10", "x"),
        ),
        Case(
            "truncated tar.gz",
            ["--set", "data.name=folder", "--set", "data.root={tmp}/in/ds.tar.gz"],
            "damaged or truncated tar archive",
            setup=tar_of_images(truncate=True),
        ),
        Case(
            "file that is not a tar",
            ["--set", "data.name=folder", "--set", "data.root={tmp}/in/ds.tar.gz"],
            "not a readable tar archive (not a .tar",
            setup=write("in/ds.tar.gz", "just some text\n" * 100),
        ),
        Case(
            "tar without train/test",
            ["--set", "data.name=folder", "--set", "data.root={tmp}/in/x.tar"],
            "no train/ and test/",
            setup=lambda t: tarfile.open(write("in/x.txt", "x")(t) or t / "in" / "x.tar", "w").close(),
        ),
        Case("cifar10 without root", tv("cifar10"), "needs data.root"),
        Case("svhn without root", tv("svhn"), "needs data.root"),
        Case(
            "cifar10 not there",
            tv("cifar10", "--set", "data.root={tmp}/in/c10"),
            "set data.download=true",
            setup=folder("in/c10"),
        ),
        Case(
            "cifar10 offline download",
            tv("cifar10", "--set", "data.root={tmp}/dl", "--set", "data.download=true"),
            "could not be downloaded",
        ),
        Case(
            "svhn offline download",
            tv("svhn", "--set", "data.root={tmp}/dl", "--set", "data.download=true"),
            "could not be downloaded",
        ),
        Case("batch larger than the data", ["--set", "train.batch_size=5000"], "larger than the training set"),
        Case(
            "good folder, bad tracking store",
            ds + ["--set", "tracking.tracking_uri=foo://bar"],
            "does not know",
            setup=images(["a", "b"], ["a", "b"], per_class=20),
        ),
        # Object stores whose bucket does not resolve (no network here): refused within the probe's bound.
        *[
            Case(
                f"storage bucket {uri}",
                ["--set", f"scaling.storage_path={uri}"],
                f"run storage {uri}/mwt is not writable",
            )
            for uri in ("s3://no-such-bucket-xyz/x", "gs://no-such-bucket-xyz/x")
        ],
        Case(
            "storage URI of an unknown scheme",
            ["--set", "scaling.storage_path=nosuch://bucket/x"],
            "run storage nosuch://bucket/x/mwt is not writable",
        ),
        Case(
            "good folder, storage under a file",
            ds + ["--set", "scaling.storage_path={tmp}/in/blocker/s"],
            "run storage",
            setup=lambda t: [images(["a", "b"], ["a", "b"], per_class=20)(t), write("in/blocker", "x")(t)],
        ),
        Case(
            "good folder, 2 workers, server down",
            ds + ["--num-workers", "2", "--set", "tracking.tracking_uri=http://127.0.0.1:{port}"],
            "does not answer",
            setup=images(["a", "b"], ["a", "b"], per_class=20),
        ),
    ]


def place_cases() -> list[Case]:
    block = write("in/blocker", "a file where a folder should be\n")
    return [
        Case("output_dir in /proc", ["--set", "output_dir=/proc/x"], "output_dir '/proc/x' cannot be written"),
        Case("output_dir in /sys", ["--set", "output_dir=/sys/x"], "output_dir '/sys/x' cannot be written"),
        Case("output_dir under a file", ["--set", "output_dir={tmp}/in/blocker/runs"], "is not a folder", setup=block),
        Case("output_dir is a file", ["--set", "output_dir={tmp}/in/blocker"], "is not a folder", setup=block),
        Case("storage under a file", ["--set", "scaling.storage_path={tmp}/in/blocker/s"], "run storage", setup=block),
        Case("storage in /proc", ["--set", "scaling.storage_path=/proc/x"], "is not writable"),
        Case(
            "tracking scheme unknown",
            ["--set", "tracking.tracking_uri=foo://bar"],
            "scheme MLflow does not know ('foo')",
        ),
        Case(
            "tracking sqlite not a db",
            ["--set", "tracking.tracking_uri=sqlite:///{tmp}/in/m.db"],
            "is not an sqlite database",
            setup=write("in/m.db", "name,value\n1,2\n"),
        ),
        Case(
            "tracking sqlite is a folder",
            ["--set", "tracking.tracking_uri=sqlite:///{tmp}/in/m.db"],
            "is a folder, not an sqlite database file",
            setup=folder("in/m.db"),
        ),
        Case(
            "tracking sqlite under a file",
            ["--set", "tracking.tracking_uri=sqlite:///{tmp}/in/blocker/m.db"],
            "not writable",
            setup=block,
        ),
        Case(
            "tracking file store is a file",
            ["--set", "tracking.tracking_uri={tmp}/in/blocker"],
            "is a file, not a folder",
            setup=block,
        ),
        Case(
            "tracking experiment deleted",
            ["--set", "tracking.tracking_uri=sqlite:///{tmp}/in/m.db"],
            "MLflow experiment 'mwt-ray' is deleted",
            setup=deleted_experiment,
        ),
        Case(
            "tracking experiment deleted, 2 workers",
            ["--num-workers", "2", "--set", "tracking.tracking_uri=sqlite:///{tmp}/in/m.db"],
            "MLflow experiment 'mwt-ray' is deleted",
            setup=deleted_experiment,
        ),
        Case("tracking server down", ["--set", "tracking.tracking_uri=http://127.0.0.1:{port}"], "does not answer"),
        Case(
            "tracking sqlite of another program",
            ["--set", "tracking.tracking_uri=sqlite:///{tmp}/in/other.db"],
            "is an sqlite database of something else (tables notes), not an MLflow store",
            setup=other_program_db,
        ),
        Case(
            "tracking parent run made up",
            [
                "--set",
                "tracking.tracking_uri=sqlite:///{tmp}/in/m.db",
                "--set",
                "tracking.parent_run_id=0123456789abcdef0123456789abcdef",
            ],
            "tracking.parent_run_id '0123456789abcdef0123456789abcdef' is not a run of",
            setup=mlflow_store,
        ),
        Case(
            "tracking parent run not an id",
            ["--set", "tracking.parent_run_id=parent"],
            "tracking.parent_run_id 'parent' is not a run of",
        ),
        Case(
            "tracking databricks without credentials",
            ["--set", "tracking.tracking_uri=databricks"],
            "MLflow store databricks cannot be used",
        ),
        Case(
            "device cuda without GPU",
            ["--set", "train.device=cuda"],
            "no CUDA GPU",
            skip="" if NO_GPU else "a GPU is here",
        ),
        Case("device cuda:7", ["--set", "train.device=cuda:7"], "cuda:7", skip="" if NO_GPU else "a GPU is here"),
    ]


def distributed_cases() -> list[Case]:
    two = ["--num-workers", "2"]
    return [
        Case("batch not divisible by workers", ["--num-workers", "3"], "not divisible by scaling.num_workers 3"),
        Case("workers but cuda device", two + ["--set", "train.device=cuda"], "scaling.use_gpu=false"),
        Case(
            "use_gpu with cpu device",
            two + ["--set", "scaling.use_gpu=true", "--set", "train.device=cpu"],
            "train.device=cpu",
        ),
        Case(
            "workers, storage under a file",
            two + ["--set", "scaling.storage_path={tmp}/in/blocker/s"],
            "run storage",
            setup=write("in/blocker", "x"),
        ),
        Case(
            "workers, storage bucket",
            two + ["--set", "scaling.storage_path=s3://no-such-bucket-xyz/x"],
            "run storage s3://no-such-bucket-xyz/x/mwt is not writable",
        ),
        Case("workers, tracking scheme", two + ["--set", "tracking.tracking_uri=foo://bar"], "does not know"),
        Case(
            "workers, tracking folder",
            two + ["--set", "tracking.tracking_uri=sqlite:///{tmp}/in/m.db"],
            "is a folder",
            setup=folder("in/m.db"),
        ),
        Case(
            "workers, server down", two + ["--set", "tracking.tracking_uri=http://127.0.0.1:{port}"], "does not answer"
        ),
        Case(
            "64 workers",
            ["--num-workers", "64", "--set", "train.batch_size=64"],
            "64 workers with 1 CPU each",
            needs="ray",
        ),
        Case(
            "100 CPUs per worker",
            ["--num-workers", "1", "--set", "scaling.cpus_per_worker=100"],
            "1 worker with 100 CPU each",
            needs="ray",
        ),
        Case(
            "a GPU on a CPU machine",
            ["--num-workers", "1", "--set", "scaling.use_gpu=true"],
            "0 GPUs",
            needs="ray",
            skip="" if NO_GPU else "a GPU is here",
        ),
        Case("3 workers on 2 CPUs", ["--num-workers", "3", "--set", "train.batch_size=48"], "room for 2", needs="ray"),
    ]


def resume_cases() -> list[Case]:
    base = ["--set", "name=base", "--resume"]
    return [
        Case("resume another width", base + ["--set", "model.width=0.25"], "width 0.125", needs="job"),
        Case("resume another model", base + ["--set", "model.name=resnet18"], "holds vgg16", needs="job"),
        Case("resume standard over modular", base + ["--standard"], "is from mwt training, but train.method=standard",
             needs="job"),
        Case(
            "resume another class count",
            base + ["--set", "data.name=folder", "--set", "data.root={tmp}/in/ds"],
            "with 10 classes, but the config asks for vgg16 width 0.125 with 3 classes",
            needs="job",
            setup=three_class_folder_cached,
        ),
        Case(
            "resume another class count, 2 workers",
            base + ["--num-workers", "2", "--set", "data.name=folder", "--set", "data.root={tmp}/in/ds"],
            "with 3 classes",
            needs="job",
            setup=three_class_folder_cached,
        ),
        Case(
            "resume another width, 2 workers",
            base + ["--num-workers", "2", "--set", "model.width=0.25"],
            "width 0.125",
            needs="job",
        ),
        Case(
            "resume forged weights",
            base,
            "weights do not fit the model it describes: 1 missing",
            needs="job",
            setup=forge_training_states(rename_first_weight),
        ),
        Case("resume text checkpoint", base, "cannot be read", needs="job", setup=text_training_states),
        Case(
            "resume forged architecture",
            base,
            "classes, but the config asks",
            needs="job",
            setup=forge_training_states(lambda s: s["architecture"].update(num_classes=7)),
        ),
    ]


def model_cases() -> list[Case]:
    """Models that cannot be built, made modular or cut into modules: refused before training."""
    # model.width=null: the cases' base arguments set 0.125, which only the built-ins take.
    tv = lambda name, *more: ["--set", f"model.name=torchvision:{name}", "--set", "model.width=null", *more]  # noqa: E731
    own = lambda name, width="null": ["--set", f"model.name={name}", "--set", f"model.width={width}"]  # noqa: E731
    return [
        Case("unknown torchvision model", tv("resnet19"), "unknown torchvision model 'torchvision:resnet19'"),
        Case("width on a model without one", tv("resnet18", "--set", "model.width=0.5"),
             "torchvision:resnet18 has no width multiplier"),
        Case("no BatchNorm", tv("squeezenet1_1"), "no conv -> BatchNorm unit after its first conv"),
        Case("channel shuffle", tv("shufflenet_v2_x0_5"), "a reshape that moves channels (as a channel shuffle does)"),
        Case("auxiliary outputs", tv("googlenet"), "returns GoogLeNetOutputs in training mode"),
        Case("standard, auxiliary outputs", tv("googlenet", "--standard"), "returns GoogLeNetOutputs in training mode"),
        # A function of the user's own (tests/own_cnn.py), named package.module:function.
        Case("own model, no such module", own("nosuchpkg.mod:f"), "module nosuchpkg.mod cannot be imported"),
        Case("own model, no such function", own("tests.own_cnn:missing"),
             "module tests.own_cnn has no attribute 'missing'"),
        Case("own model, not callable", own("tests.own_cnn:not_callable"),
             "is a int, not a Python function of num_classes"),
        Case("own model, a builtin", own("os:getcwd"), "is a builtin_function_or_method, not a Python function"),
        Case("own model, a class that is no module", own("subprocess:Popen"), "is a type, not a Python function"),
        Case("own model, returns no module", own("tests.own_cnn:not_a_module"),
             "not_a_module(num_classes=10) returned a list, not a torch.nn.Module"),
        Case("own model, raises", own("tests.own_cnn:raises"), "raised RuntimeError: no network for 10 classes"),
        Case("own model, two colons", own("a:b:c"), "model 'a:b:c' is not package.module:function"),
        Case("own model, no module path", own(":tiny_cnn"), "model ':tiny_cnn' is not package.module:function"),
        Case("own model, no function name", own("'tests.own_cnn:'"), "is not package.module:function"),
        Case("own model, no function name, unquoted", own("tests.own_cnn:"),
             "{'tests.own_cnn': None} is not a model name"),
        Case("own model, empty package part", own("tests..own_cnn:tiny_cnn"), "is not package.module:function"),
        Case("own model, a width", own("tests.own_cnn:tiny_cnn", "0.5"), "takes num_classes and no width"),
        Case("own model, logits of another shape", own("tests.own_cnn:wrong_logits"),
             "returns a tensor of shape (2, 11) in training mode"),
        Case("own model, no BatchNorm", own("tests.own_cnn:no_batchnorm"), "no conv -> BatchNorm unit"),
    ]


def reuse_cases() -> list[Case]:
    """The reuse command's checkpoint handling (its other checks belong to the reuse tests)."""
    return [
        Case(
            "reuse text file as checkpoint",
            ["--modular", "{tmp}/in/notes.pt"],
            "is not a PyTorch checkpoint file",
            command="reuse",
            setup=write("in/notes.pt", "hello\n"),
        ),
        Case(
            "reuse truncated checkpoint",
            ["--modular", "{tmp}/in/cut.pt"],
            "cannot be read",
            command="reuse",
            needs="job",
            setup=lambda t: write("in/cut.pt", (t / "runs" / "base" / "checkpoint.pt").read_bytes()[:3000])(t),
        ),
    ]


def forged_checkpoint(change: Callable[[dict], None], name: str = "forged.pt") -> Callable[[Path], None]:
    """The finished job's checkpoint, changed, as in/<name>."""
    def setup(tmp: Path) -> None:
        state = torch.load(tmp / "runs" / "base" / "checkpoint.pt", weights_only=True)
        change(state)
        torch.save(state, tmp / "in" / name)
    return setup


def as_standard(state: dict) -> None:
    """What a standard run of the same settings saves: a plain network's weights, no module masks."""
    from mwt_ray.core.models import create_model

    arch = state["architecture"]
    for key in ("kernel_usage", "module_masks", "tau"):
        state.pop(key, None)
    arch["method"] = state["config"]["train"]["method"] = "standard"
    state["model_state"] = create_model(arch["name"], arch["num_classes"], arch["width"], "standard").state_dict()


def export_cases() -> list[Case]:
    """``python -m mwt_ray.export``: classes, references, the output folder, the registry."""
    base = ["--run", "{tmp}/runs/base/checkpoint.pt", "--out", "{tmp}/out"]
    store = ["--set", "tracking.enabled=true", "--set", "tracking.tracking_uri=sqlite:///{tmp}/in/m.db"]

    def case(name: str, args: list[str], expected: str, **more) -> Case:
        return Case(f"export {name}", args, expected, command="export", needs="job", **more)
    return [
        case(
            "classes out of range",
            base + ["--classes", "3,12"],
            "target classes [12] are out of range: classes are 0..9",
        ),
        case("negative class", base + ["--classes=-1,2"], "target classes [-1] are out of range"),
        case("unknown class names", base + ["--classes", "cat,dog"], "'cat' is neither a class name (0, 1, 2"),
        case("a repeated class", base + ["--classes", "3,3"], "repeat a class"),
        case("a single class", base + ["--classes", "3"], "a sub-task needs at least 2 classes"),
        case("empty classes", base + ["--classes", ","], "--classes is empty"),
        case("no --classes", base, "the following arguments are required: --classes"),
        case(
            "standard checkpoint as the run",
            ["--run", "{tmp}/in/std.pt", "--out", "{tmp}/out", "--classes", "3,5"],
            "has no module masks",
            setup=forged_checkpoint(as_standard, "std.pt"),
        ),
        case(
            "modular checkpoint as the standard",
            base + ["--classes", "3,5", "--standard", "{tmp}/runs/base"],
            "was trained with method mwt; pass a standard",
        ),
        case(
            "checkpoint of another architecture than its run",
            ["--run", "{tmp}/in/forged.pt", "--out", "{tmp}/out", "--classes", "3,5"],
            "records architecture resnet18 but was trained as vgg16",
            setup=forged_checkpoint(lambda s: s["architecture"].update(name="resnet18")),
        ),
        case(
            "checkpoint whose weights are of another width",
            ["--run", "{tmp}/in/forged.pt", "--out", "{tmp}/out", "--classes", "3,5"],
            "weights do not fit the model it describes",
            setup=forged_checkpoint(lambda s: s["architecture"].update(width=0.25)),
        ),
        case(
            "--out in /proc",
            ["--run", "{tmp}/runs/base", "--out", "/proc/x", "--classes", "3,5"],
            "--out '/proc/x' cannot be written",
        ),
        case(
            "--out under a file",
            ["--run", "{tmp}/runs/base", "--out", "{tmp}/in/blocker/out", "--classes", "3,5"],
            "is not a folder",
            setup=write("in/blocker", "x"),
        ),
        case(
            "registry name with a slash",
            base + ["--classes", "3,5", "--register", "digits/3-5"] + store,
            "MLflow refuses this registered model name (Invalid model name 'digits/3-5'",
        ),
        case("registry name with a colon", base + ["--classes", "3,5", "--register", "a:b"] + store, "MLflow refuses"),
        case("blank registry name", base + ["--classes", "3,5", "--register", " "] + store, "MLflow refuses"),
        case(
            "--register with tracking off",
            base + ["--classes", "3,5", "--register", "m"],
            "needs MLflow: tracking.enabled is false",
        ),
        case("--tau out of range", base + ["--classes", "3,5", "--tau", "1.5"], "--tau 1.5 is outside (0, 1]"),
        case(
            "run id not in the store",
            ["--run", "0" * 32, "--out", "{tmp}/out", "--classes", "3,5"] + store,
            "does not exist in sqlite:///",
        ),
        case(
            "tracking store is not a database",
            base
            + [
                "--classes",
                "3,5",
                "--set",
                "tracking.enabled=true",
                "--set",
                "tracking.tracking_uri=sqlite:///{tmp}/in/notes.db",
            ],
            "is not an sqlite database",
            setup=write("in/notes.db", "hello\n"),
        ),
        case(
            "--out holding a folder named module.onnx",
            base + ["--classes", "3,5"] + store,
            "out/module.onnx is a folder; the export writes a file of that name there",
            setup=folder("out/module.onnx"),
        ),
        case(
            "--out holding a folder named module.json",
            base + ["--classes", "3,5"],
            "out/module.json is a folder",
            setup=folder("out/module.json"),
        ),
        case(
            "--out holding a FIFO named module.pt2",
            base + ["--classes", "3,5"],
            "out/module.pt2 is not a regular file",
            setup=lambda tmp: [folder("out")(tmp), os.mkfifo(tmp / "out" / "module.pt2")],
        ),
        case(
            "--out that is a file",
            ["--run", "{tmp}/runs/base", "--out", "{tmp}/in/notes", "--classes", "3,5"],
            "is not a folder",
            setup=write("in/notes", "x"),
        ),
        case(
            "--out name longer than the file system allows",
            ["--run", "{tmp}/runs/base", "--out", "{tmp}/" + "n" * 300, "--classes", "3,5"],
            "is 300 bytes, longer than the 255 its file system allows",
        ),
        case(
            "--out path longer than the file system allows",
            ["--run", "{tmp}/runs/base", "--out", "{tmp}/" + "/".join(["p" * 200] * 21), "--classes", "3,5"],
            "longer than the 4095 its file system allows",
        ),
        case(
            "checkpoint with NaN weights",
            ["--run", "{tmp}/in/forged.pt", "--out", "{tmp}/out", "--classes", "3,5"],
            "holds NaN or infinite values",
            setup=forged_checkpoint(poison_weights),
        ),
        case(
            "standard model with infinite weights",
            base + ["--classes", "3,5", "--standard", "{tmp}/in/std.pt"],
            "holds NaN or infinite values",
            setup=forged_checkpoint(lambda s: [as_standard(s), poison_weights(s, float("inf"))], "std.pt"),
        ),
    ]


def first_float_weight(state: dict) -> str:
    return next(k for k, v in state["model_state"].items() if v.is_floating_point())


def nan_weight(state: dict) -> None:
    state["model_state"][first_float_weight(state)][0] = float("nan")


def usage(change: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda state: change(state["kernel_usage"])


# What a hostile user forges from a real checkpoint: each is refused whole, before any data, model or
# Ray actor, by the one check every reader makes (core.checkpoint.check_checkpoint).
FORGERIES = [  # (name, change, part of the message)
    (
        "width that does not fit its weights",
        lambda s: s["architecture"].update(width=0.25),
        "weights do not fit the model it describes",
    ),
    ("huge width", lambda s: s["architecture"].update(width=1e6), "would give vgg16 about 1.5e+19 parameters"),
    (
        "width that is not a number",
        lambda s: s["architecture"].update(width="wide"),
        "architecture width 'wide' is not a positive number",
    ),
    ("NaN width", lambda s: s["architecture"].update(width=float("nan")), "architecture width nan is not a positive"),
    (
        "a billion classes",
        lambda s: s["architecture"].update(num_classes=10**9),
        "classes: a model has 2..100000 classes",
    ),
    ("unknown model", lambda s: s["architecture"].update(name="alexnet"), "unknown model 'alexnet'"),
    ("NaN weight", nan_weight, "holds NaN or infinite values"),
    (
        "a weight that is a list",
        lambda s: s["model_state"].update({first_float_weight(s): s["model_state"][first_float_weight(s)].tolist()}),
        "is a list, not a tensor",
    ),
    (
        "kernel counts of the wrong type",
        usage(lambda u: u.update(counts=u["counts"].tolist())),
        "kernel_usage.counts is a list, not a tensor",
    ),
    (
        "kernel counts of the wrong shape",
        usage(lambda u: u.update(counts=u["counts"][:, :-1])),
        "kernel_usage.counts has shape [10, ",
    ),
    (
        "kernel counts as floats",
        usage(lambda u: u.update(counts=u["counts"].double())),
        "kernel_usage.counts has dtype float64",
    ),
    (
        "kernel counts above the class sizes",
        usage(lambda u: u.update(counts=u["counts"] + 10**6)),
        "exceed their class's sample count",
    ),
    (
        "class sizes of the wrong shape",
        usage(lambda u: u.update(class_sizes=u["class_sizes"][:3])),
        "kernel_usage.class_sizes has shape [3]",
    ),
    (
        "layer sizes that differ from the model",
        usage(lambda u: u.update(layer_sizes=u["layer_sizes"].flip(0) + 1)),
        "kernel_usage.layer_sizes",
    ),
    (
        "kernel_usage that is a string",
        lambda s: s.update(kernel_usage="many"),
        "kernel_usage is a str, not a dictionary",
    ),
    (
        "module masks of the wrong shape",
        lambda s: s.update(module_masks=s["module_masks"][:, :5]),
        "module_masks has shape",
    ),
    (
        "module masks of the wrong dtype",
        lambda s: s.update(module_masks=s["module_masks"].float()),
        "module_masks has dtype float32, not bool",
    ),
    ("tau outside (0, 1]", lambda s: s.update(tau=7.0), "tau 7.0 is not a number in (0, 1]"),
]


def checkpoint_cases() -> list[Case]:
    """Forged or damaged checkpoints given to reuse and export, and training states to --resume."""
    reuse = [Case(f"reuse checkpoint with {name}", ["--modular", "{tmp}/in/forged.pt"], expected, command="reuse",
                  needs="job", setup=forged_checkpoint(change)) for name, change, expected in FORGERIES]
    export = [
        Case(
            f"export checkpoint with {name}",
            ["--run", "{tmp}/in/forged.pt", "--out", "{tmp}/out", "--classes", "3,5"],
            expected,
            command="export",
            needs="job",
            setup=forged_checkpoint(change),
        )
        for name, change, expected in FORGERIES
        if name
        in (
            "huge width",
            "NaN weight",
            "kernel counts of the wrong type",
            "module masks of the wrong shape",
            "a billion classes",
        )
    ]
    standard = [Case("reuse standard checkpoint with NaN weights", ["--modular", "{tmp}/runs/base/checkpoint.pt",
                     "--standard", "{tmp}/in/std.pt"], "standard model", command="reuse", needs="job",
                     setup=forged_checkpoint(lambda s: [as_standard(s), nan_weight(s)], "std.pt"))]
    pipes = [
        Case(
            "reuse checkpoint that is a pipe",
            ["--modular", "{tmp}/in/pipe.pt"],
            "is a named pipe (FIFO), not a checkpoint file",
            command="reuse",
            setup=lambda t: os.mkfifo(t / "in" / "pipe.pt"),
        ),
        Case(
            "export checkpoint that is a pipe",
            ["--run", "{tmp}/in/pipe.pt", "--out", "{tmp}/out", "--classes", "3,5"],
            "is a named pipe (FIFO), not a checkpoint file",
            command="export",
            setup=lambda t: os.mkfifo(t / "in" / "pipe.pt"),
        ),
        Case("reuse checkpoint that is /dev/zero", ["--modular", "/dev/zero"], "is a device file", command="reuse"),
    ]
    base = ["--set", "name=base", "--resume"]
    resume = [
        Case("resume NaN width", base, "architecture width nan is not a positive number", needs="job",
             setup=forge_training_states(lambda s: s["architecture"].update(width=float("nan")))),
        Case("resume NaN weight", base, "holds NaN or infinite values; run without --resume", needs="job",
             setup=forge_training_states(nan_weight)),
        Case("resume weight that is a list", base, "is a list, not a tensor", needs="job",
             setup=forge_training_states(lambda s: s["model_state"].update(
                 {first_float_weight(s): s["model_state"][first_float_weight(s)].tolist()}))),
        Case("resume infinite optimizer state", base, "holds NaN or infinite values", needs="job",
             setup=forge_training_states(lambda s: next(
                 v for v in s["optimizer_state"]["state"].values())["momentum_buffer"].fill_(float("inf")))),
        Case("resume unknown model", base, "holds alexnet", needs="job",
             setup=forge_training_states(lambda s: s["architecture"].update(name="alexnet"))),
    ]
    return reuse + export + standard + pipes + resume


SWEEP = ["--set", "output_dir={tmp}/runs", "--set", "tracking.enabled=false", "--set", "model.width=0.125", "--set",
         "data.train_limit=100", "--set", "train.epochs=1", "--set", "sweep.trials=1", "--set", "sweep.reuse=false",
         "--set", "sweep.standard_baseline=false", "--set", "train.batch_size=32"]
KEY = "0123456789abcdef" * 4 + "\n"


def signing_key(mode: int) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "keys").mkdir(mode=0o700)
        write("keys/sweep-signing.key", KEY)(tmp)
        os.chmod(tmp / "keys" / "sweep-signing.key", mode)
    return setup


def linked_key(tmp: Path) -> None:
    (tmp / "keys").mkdir(mode=0o700)
    write("in/real.key", KEY)(tmp)
    os.chmod(tmp / "in" / "real.key", 0o600)
    os.symlink(tmp / "in" / "real.key", tmp / "keys" / "sweep-signing.key")


def limit_cases() -> list[Case]:
    """Values the config takes only within their real range, and input files that are not regular files."""
    values = [
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
        (
            "train.seed=4294967296",
            "train.seed: Input should be less than or equal to 4294967295 (got 4294967296): seeds are 32-bit",
        ),
        ("reuse.sampling_seed=-5", "reuse.sampling_seed: Input should be greater than or equal to 0"),
        ("sweep.seed=99999999999", "sweep.seed: Input should be less than or equal to 4294967295"),
        (
            "train.epochs=100000000000000000000000",
            "train.epochs: Input should be less than or equal to 100000 "
            "(got 100000000000000000000000): more epochs than any run can finish",
        ),
        ("train.epochs=100001", "train.epochs: Input should be less than or equal to 100000"),
        ("train.warmup_epochs=1e12", "train.warmup_epochs"),
        (
            "train.batch_size=2097152",
            "train.batch_size: Input should be less than or equal to 1048576 (got 2097152): a batch",
        ),
        ("reuse.batch_size=10000000", "reuse.batch_size"),
        ("reuse.epochs=1000000000", "reuse.epochs"),
        ("reuse.per_size=1000000", "reuse.per_size: Input should be less than or equal to 5000"),
        (
            "reuse.subtasks=[" + ", ".join(["[0, 1]"] * 5001) + "]",
            "reuse.subtasks: List should have at most 5000 items",
        ),
        ("reuse.latency_batch_sizes=[1, 99999999]", "latency batch sizes must lie in 1..1048576"),
        ("reuse.latency_repeats=1e100", "reuse.latency_repeats"),
        ("reuse.max_restarts=99999999", "reuse.max_restarts"),
        ("reuse.num_actors=1000000", "reuse.num_actors"),
        ("reuse.cpus_per_actor=1e9", "reuse.cpus_per_actor"),
        ("data.train_limit=10000000000000", "data.train_limit"),
        ("scaling.num_workers=1000000", "scaling.num_workers"),
        ("scaling.max_failures=10000000", "scaling.max_failures"),
        ("scaling.fail_at_epoch=10000000", "scaling.fail_at_epoch"),
        ("modularize.cohesion_samples_per_class=1e40", "cohesion_samples_per_class"),
        ("sweep.trials=1000000000", "sweep.trials: Input should be less than or equal to 10000"),
        ("sweep.grace_period=1000000", "sweep.grace_period"),
        ("sweep.cpus_per_trial=1e12", "sweep.cpus_per_trial"),
        ("sweep.gpus_per_trial=1000", "sweep.gpus_per_trial"),
        ("sweep.subtasks_per_size=100000", "sweep.subtasks_per_size"),
    ]
    cases = [Case(f"set {o[:60]}", ["--set", o], m) for o, m in values]
    width = lambda name, w: ["--set", f"model.name=torchvision:{name}", "--set", f"model.width={w}"]  # noqa: E731
    cases += [
        Case(
            "MobileNet of width 1e300",
            width("mobilenet_v2", "1e300"),
            "would give torchvision:mobilenet_v2 about inf parameters",
        ),
        Case("MobileNet v3 of width 1e20", width("mobilenet_v3_small", "1e20"), "more than the 2e+09 allowed"),
        Case(
            "RegNet with a width", width("regnet_x_400mf", "0.5"), "torchvision:regnet_x_400mf has no width multiplier"
        ),
        Case(
            "config file that is a pipe",
            ["--config", "{tmp}/in/c.yaml"],
            "is a named pipe (FIFO), not a YAML file",
            setup=lambda t: os.mkfifo(t / "in" / "c.yaml"),
        ),
        Case(
            "config file that is /dev/zero", ["--config", "/dev/zero"], "'/dev/zero' is a device file, not a YAML file"
        ),
    ]
    sweep = lambda name, args, expected, **more: Case(f"sweep {name}", SWEEP + args, expected, command="sweep",  # noqa: E731
                                                     common=False, **more)
    cases += [
        sweep("negative seed", ["--set", "sweep.seed=-1"], "sweep.seed: Input should be greater than or equal to 0"),
        sweep("seed of 2^32", ["--set", "sweep.seed=4294967296"], "sweep.seed: Input should be less than or equal to"),
        sweep("config file that is a pipe", ["--config", "{tmp}/in/c.yaml"], "is a named pipe (FIFO)",
              setup=lambda t: os.mkfifo(t / "in" / "c.yaml")),
        sweep("signing key of mode 0644", [], "(mwt-ray's signing secret) is not private (mode 0644",
              setup=signing_key(0o644)),
        sweep("symlinked signing key", [], "signing secret", setup=linked_key),
        sweep("signing key that is a pipe", [], "signing secret) is not private",
              setup=lambda t: [(t / "keys").mkdir(mode=0o700), os.mkfifo(t / "keys" / "sweep-signing.key", 0o600)]),
        sweep("config folder that is a file", [], "(where mwt-ray keeps its signing secret) is not a folder",
              setup=write("keys", "a file\n")),
    ]
    return cases


def poison_weights(state: dict, value: float = float("nan")) -> None:
    """A few weights of the first convolution set to ``value``, as a diverged training run leaves them."""
    name = next(k for k, v in state["model_state"].items() if v.is_floating_point() and v.dim() == 4)
    state["model_state"][name].view(-1)[:3] = value


CASES = (config_cases() + cli_cases() + data_cases() + place_cases() + distributed_cases() + resume_cases()
         + model_cases() + reuse_cases() + export_cases() + checkpoint_cases() + limit_cases())


# ----------------------------------------------------------------------------- running a case

def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``; a file with its size and mtime (a folder's mtime changes when the
    write probe creates and deletes its file: what matters is that nothing stays)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """The output folder of one finished tiny job named 'base' (digits, modular VGG16 at 1/8 width)."""
    from mwt_ray.config import load_config
    from mwt_ray.jobs import train_in_process

    out = tmp_path_factory.mktemp("finished") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_process(load_config(None, ["name=base", f"output_dir={out}", "train.epochs=1", "data.train_limit=100",
                                            "model.width=0.125", "train.batch_size=32", "tracking.enabled=false",
                                            "modularize.cohesion_samples_per_class=10"]), log=None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A dataset cache that holds the embedded digits (what any job that reads them leaves there)."""
    from mwt_ray.core.data import load_dataset

    folder = tmp_path_factory.mktemp("digits-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MWT_RAY_CACHE", str(folder))
        load_dataset("digits")
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def expand(args: list[str], tmp: Path, port: int) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{port}", str(port)) for a in args]


def one_error_line(stderr: str, expected: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n" + "\n".join(lines[-30:])
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], f"{expected!r} not in {lines[0][:3000]!r}"
    assert len(lines[0]) <= len("error: ") + MAX_ERROR_CHARS + 80, f"a line of {len(lines[0])} characters"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys, request, digits_cache):
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits_cache, tmp_path / "cache")
    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):  # downloads fail at once, network or not
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # The sweep's signing secret: inside the compared folder, so a case that makes one is caught.
    monkeypatch.setenv("MWT_RAY_CONFIG_DIR", str(tmp_path / "keys"))
    from mwt_ray.jobs import storage

    # An object store without a network answers nothing: give up after 3 s, not the default 15 s
    # (test_storage_probe_is_bounded_in_time checks the bound itself).
    monkeypatch.setattr(storage, "REMOTE_PROBE_TIMEOUT_S", 3.0)
    if case.needs == "ray":
        request.getfixturevalue("ray_cluster")
    if case.needs == "job":
        shutil.copytree(request.getfixturevalue("finished_job"), tmp_path / "runs")
    (tmp_path / "in").mkdir(exist_ok=True)
    if case.setup:
        case.setup(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    args = expand((COMMON if case.command == "train" and case.common else []) + case.args, tmp_path, free_port())
    if case.command == "train":
        from mwt_ray.train import main
    elif case.command == "export":
        from mwt_ray.export import main
    elif case.command == "sweep":
        from mwt_ray.sweep import main
    else:
        from mwt_ray.reuse import main
    try:
        status = main(args)
    except SystemExit as stop:  # argparse
        status = stop.code
    assert status == case.status, capsys.readouterr().err
    one_error_line(capsys.readouterr().err, case.expected)
    after = snapshot(tmp_path)
    assert after == before, f"created or changed: {sorted(set(after.items()) ^ set(before.items()))[:10]}"


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- across the process boundary

# Only a hang guard: each case's outcome is its exit status and its lines. A data-parallel job's worker
# group alone took 4 minutes to start on this 2-core machine with both cores busy (240 s cut it off).
HANG_GUARD_S = 1200


def run_cli(args: list[str], cwd: Path, timeout: int = HANG_GUARD_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MWT_RAY_CACHE": str(cwd / "cache"), "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", "mwt_ray.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_impossible_resources_one_line_despite_ray_logging(tmp_path):
    """Ray starts in the command's process and logs on its stderr; the error is still the only line."""
    result = run_cli(expand(COMMON + ["--num-workers", "64", "--set", "train.batch_size=64"], tmp_path, 0), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    one_error_line(result.stderr, "64 workers with 1 CPU each")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] or not (tmp_path / "runs").exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_worker_killed_after_start_names_the_dead_worker(tmp_path):
    """Issue item 1: a worker SIGKILLed with no failure budget: exit 1, one line that names the
    killed worker (rank 0 and its pid), not the surviving worker's lost connection; its MLflow run FAILED."""
    from helpers import mlflow_client, only_run

    result = run_cli(
        expand(
            COMMON
            + [
                "--num-workers",
                "2",
                "--set",
                "scaling.fail_at_epoch=1",
                "--set",
                "data.train_limit=200",
                "--set",
                "tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            ],
            tmp_path,
            0,
        ),
        tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result.stderr, "worker rank 0 (pid ")
    killed = next(out for out in result.stdout.splitlines() if "fault injection: killing worker pid" in out)
    pid = killed.split("killing worker pid ")[1].split()[0]
    assert f"(pid {pid}) died" in line and "scaling.max_failures=0" in line
    log = next((tmp_path / "runs" / "mwt" / "jobs").glob("job-*/worker_stderr.log"))
    assert "Traceback" in log.read_text() and str(log) in line  # the tracebacks went to the log, not the terminal
    assert only_run(mlflow_client(tmp_path)).info.status == "FAILED"


def test_storage_probe_is_bounded_in_time(tmp_path, monkeypatch):
    """GCS's client retries for 16 minutes without a network; the write probe gives up at its bound
    (lowered here), in one line, and runs in a child process that is gone afterwards."""
    from mwt_ray.config import load_config
    from mwt_ray.jobs import SetupError, check_destinations, storage

    monkeypatch.setattr(storage, "REMOTE_PROBE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(storage.RunStorage, "_probed", set())
    cfg = load_config(None, [f"output_dir={tmp_path}/runs", "scaling.storage_path=gs://no-such-bucket-xyz/y"])
    started = time.monotonic()
    with pytest.raises(SetupError, match="gs://no-such-bucket-xyz/y/mwt is not writable .no answer within 2 s"):
        check_destinations(cfg)
    assert time.monotonic() - started < 10
    children = subprocess.run(
        ["pgrep", "-f", "no-such-bucket-xyz/y/mwt"], capture_output=True, text=True
    ).stdout.split()
    assert not children, children
