"""Export one reused module as files that run without mwt_ray (``python -m mwt_ray.export``).

    plan = plan_export("runs/q/checkpoint.pt", "cat,dog", "modules/cat-dog", standard_ref="runs/std")
    summary = export_module(plan)      # module.pt2, module.onnx, module.json in modules/cat-dog

``plan_export`` makes every check on the input and writes nothing (the references are those of
``reuse``: an MLflow run id, a checkpoint or a run folder). ``export_module`` builds the module of
the classes at tau (``reuse_module``: with ``reuse.epochs`` 0 the union of their modules with the
original classifier's logits restricted to them, else the better of that and the paper's
fine-tuned head on held-out training samples), writes the ``torch.export`` program and the ONNX
file, checks ONNX Runtime against PyTorch on the sub-task's test images, measures FLOPs, latency
and accuracy and writes ``module.json``, all in a hidden folder inside the output folder; then it
renames the three files into place and only then logs the module in MLflow and registers it when
asked (``tracking.modules``), so a failure before that leaves none of them behind and no MLflow
trace. ``plan_export`` refuses an output folder the files cannot be renamed into (a folder of one
of their names, names too long) and a checkpoint with non-finite weights.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..core.checkpoint import build_model
from ..core.data import validate_classes
from ..core.export import (
    ImagesToScores,
    check_scores,
    export_program,
    fastest_calls,
    load_program,
    onnx_scores,
    onnx_session,
    save_program,
    write_onnx,
)
from ..core.files import (
    DiskFull,
    atomic_write_text,
    full_disk_message,
    is_disk_full,
    owner_alive,
    writable_folder_error,
)
from ..core.flops import count_flops
from ..core.graph import conv_columns
from ..core.kernel_usage import KernelUsage, module_masks
from ..core.models import create_model
from ..core.reuse import mixed_module_mask, reuse_module
from ..core.training import evaluate
from .reuse_job import ReuseSources, load_sources
from .setup import JobFailed, SetupError

__all__ = ["ExportPlan", "plan_export", "export_module", "parse_classes", "EXPORT_FILES", "check_registry_name"]

EXPORT_FILES = ("module.pt2", "module.onnx", "module.json")
_TRIAL_RESULT = "trial_result.json"  # a sweep trial's scan beside its checkpoint (cluster.sweep writes it)


@dataclass
class ExportPlan:
    sources: ReuseSources
    classes: list[int]
    tau: float
    tau_from: str  # where tau came from, in words
    out_dir: Path
    register: str | None = None

    @property
    def cfg(self) -> Config:
        return self.sources.cfg

    @property
    def class_names(self) -> list[str]:
        return [self.sources.data.classes[c] for c in self.classes]


def parse_classes(text: str, names: list[str], what: str = "--classes") -> list[int]:
    """``"3,5"`` or ``"cat,dog"`` -> class indices, in the given order. A class's name wins over
    reading it as an index (digits' classes are named "0".."9", the same indices). ``what`` names
    the setting in the error line."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise SetupError(f"{what} is empty: give class indices or names, e.g. 3,5 or cat,dog")
    indices = []
    for item in items:
        if item in names:
            indices.append(names.index(item))
        elif re.fullmatch(r"-?\d+", item):
            indices.append(int(item))
        else:
            known = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise SetupError(f"{what}: {item!r} is neither a class name ({known}) nor an index 0..{len(names) - 1}")
    try:
        validate_classes(indices, len(names))
    except ValueError as error:
        raise SetupError(f"{what} {text}: {error}") from None
    return indices


def _chosen_tau(sources: ReuseSources) -> tuple[float, str]:
    """The tau the run chose: a sweep trial's (``sweep.tau``: its trial_result.json beside the
    checkpoint, or the metric on its MLflow run), else the run's own ``modularize.tau``."""
    if "path" in sources.modular:
        scan = Path(sources.modular["path"]).parent / _TRIAL_RESULT
        if scan.is_file():
            try:
                return float(json.loads(scan.read_text())["result"]["tau"]), f"the sweep trial's choice ({scan.name})"
            except (ValueError, KeyError, TypeError):
                raise SetupError(f"{scan} cannot be read as a sweep trial's result; pass --tau") from None
    else:
        from mlflow import MlflowClient

        run = sources.modular["mlflow"]
        metrics = MlflowClient(tracking_uri=run["tracking_uri"]).get_run(run["run_id"]).data.metrics
        if "sweep.tau" in metrics:
            return float(metrics["sweep.tau"]), "the sweep trial's choice (metric sweep.tau)"
    return float(sources.cfg.modularize.tau), "the run's modularize.tau"


def check_registry_name(name: str) -> None:
    """The name MLflow's registry would refuse, refused here before anything is written (MLflow's own
    check: the registry raises the same error only after the model is logged)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as error:
        raise SetupError(f"--register {name!r}: MLflow refuses this registered model name ({error.message})") from None


def plan_export(run_ref: str, classes: str, out_dir: str | Path, *, standard_ref: str | None = None,
                tau: float | None = None, register: str | None = None, overrides: list[str] | None = None,
                cfg: Config | None = None) -> ExportPlan:
    """Check every input; nothing is written. Raises SetupError / ConfigError (exit 2)."""
    overrides = list(overrides or [])
    if tau is not None and not 0 < tau <= 1:
        raise SetupError(f"--tau {tau:g} is outside (0, 1]")
    # load_sources checks both checkpoints whole (core.checkpoint.check_checkpoint) before anything else.
    sources = load_sources(run_ref, standard_ref, cfg, overrides, tau=tau)
    state = sources.state
    indices = parse_classes(classes, list(sources.data.classes))
    if tau is not None:
        chosen, tau_from = float(tau), "--tau"
    else:
        chosen, tau_from = _chosen_tau(sources)
    if "kernel_usage" not in state and abs(float(state.get("tau") or sources.cfg.modularize.tau) - chosen) > 1e-9:
        raise SetupError(f"{sources.where} holds module masks for tau {state.get('tau')} only (no kernel counts): "
                         f"it cannot make modules at tau {chosen:g}")
    out = Path(out_dir).expanduser().resolve()
    reason = _name_length_error(out) or writable_folder_error(out) or _target_error(out)
    if reason:
        shown = str(out) if len(str(out)) <= 200 else f"{str(out)[:120]}...{str(out)[-60:]}"  # a path too long, cut
        raise SetupError(f"--out {shown!r} cannot be written ({reason})")
    if register is not None:
        if not sources.cfg.tracking.enabled:
            raise SetupError(f"--register {register!r} needs MLflow: tracking.enabled is false")
        check_registry_name(register)
    if sources.cfg.tracking.enabled:
        from ..tracking import check_store, resolve_tracking_uri

        check_store(resolve_tracking_uri(sources.cfg.tracking.tracking_uri))
    return ExportPlan(sources, indices, chosen, tau_from, out, register)


# The longest name the export writes inside --out: its staging folder (".export-<pid>-<8 random>")
# holding a file's temporary copy (".module.<pid>.tmp.json"); pids have at most 7 digits on Linux.
_LONGEST_INSIDE = len(".export-9999999-xxxxxxxx/.module.9999999.tmp.json")


def _name_length_error(out: Path) -> str | None:
    """Why the file system would refuse ``out`` or the paths written in it for their length (the
    limits of the nearest folder that exists: PC_NAME_MAX per name, PC_PATH_MAX in all), else None."""
    def exists(path: Path) -> bool:  # Path.exists raises on a name too long (ENAMETOOLONG)
        try:
            path.stat()
        except OSError:
            return False
        return True

    existing = next((p for p in [out, *out.parents] if exists(p)), Path("/"))
    if not existing.is_dir():
        return None  # said by writable_folder_error
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return None
    for part in out.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            return (
                f"the name {part[:40]}... is {len(os.fsencode(part))} bytes, "
                f"longer than the {name_max} its file system allows"
            )
    longest = len(os.fsencode(str(out))) + 1 + _LONGEST_INSIDE
    if longest >= path_max:  # PC_PATH_MAX counts the terminating NUL
        return (f"the paths written in it would be {longest} bytes, longer than the {path_max - 1} its file system "
                f"allows; choose a shorter --out")
    return None


def _target_error(out: Path) -> str | None:
    """A name the export would rename a file onto that holds something else (a folder, a FIFO): the
    rename would fail after all the work, with some files already in place."""
    for name in EXPORT_FILES:
        try:
            mode = (out / name).lstat().st_mode
        except FileNotFoundError:
            continue
        except OSError as error:
            return f"{out / name}: {error.strerror or error}"
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            return f"{out / name} is {kind}; the export writes a file of that name there"
    return None


def _masks(plan: ExportPlan) -> torch.Tensor:
    state = plan.sources.state
    if "kernel_usage" in state:
        return module_masks(KernelUsage.from_state_dict(state["kernel_usage"]), plan.tau)
    return state["module_masks"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class _Module:
    """What ``export_module`` builds before it writes anything: the module and what it is measured against."""
    module: torch.nn.Module  # the reused module, on class indices' logits
    portable: torch.nn.Module  # the module taking 0-1 images (normalisation inside): what the files hold
    chosen: dict  # reuse_module's choice: fine-tuned or not, its validation accuracy
    standard: torch.nn.Module | None  # the standard model, when one was given
    whole: torch.nn.Module  # the full model the module's costs are compared with
    masks: torch.Tensor
    conv: torch.Tensor  # which columns of the masks are conv kernels (graph.conv_columns): what KRR counts
    settings: object  # the fine-tuning settings (core.reuse.FineTuneSettings)
    sub: object  # the sub-task's data (ImageData of the classes)
    test_images: torch.Tensor  # the sub-task's test images, 0-1 floats


def export_module(plan: ExportPlan, log=print) -> dict:
    """Build, write, check and publish the module, then (with tracking on) log it; returns what
    module.json holds.

    The three files are made and checked in a staging folder inside ``--out`` (same file system:
    the renames that publish them cannot fail for space) and only then renamed into place, so a
    failure before that leaves nothing; MLflow hears of the module only once its files are
    published. The staging folder stays until MLflow is done and records this process and its
    MLflow run: an export killed part-way leaves it, and the next export into the folder removes
    it and marks that run FAILED (``_clean_abandoned``)."""
    settings = plan.cfg.reuse.fine_tune_settings(plan.cfg.train.seed)
    log(
        f"module of classes {_classes_text(plan.classes, plan.class_names)} at tau {plan.tau:g} ({plan.tau_from}); "
        + ("no fine-tuning (reuse.epochs=0)" if settings.epochs == 0 else f"fine-tuning up to {settings.epochs} epochs")
    )
    _clean_abandoned(plan.out_dir, log)
    built = _build(plan, settings)
    with _Staging(plan.out_dir) as staging:
        summary = _write_staged(plan, built, staging)
        _publish(staging.folder, plan.out_dir)
        staging.published = True
        if plan.cfg.tracking.enabled:
            summary["mlflow"] = _log_in_mlflow(plan, summary, built.test_images, staging, log)
            atomic_write_text(plan.out_dir / "module.json", json.dumps(summary, indent=2))
    log(_summary_line(summary, plan.out_dir))
    return summary


def _build(plan: ExportPlan, settings) -> _Module:
    """The module of the plan's classes at its tau (fine-tuned or not: ``reuse_module`` picks), on the CPU."""
    sources, data = plan.sources, plan.sources.data
    device = torch.device("cpu")  # the files are CPU programs; fine-tuning a small sub-task fits a CPU
    arch = sources.state["architecture"]
    modular = build_model(sources.state).eval()
    masks = _masks(plan)
    module, chosen = reuse_module(modular, masks, data, plan.classes, settings, device)
    standard = build_model(sources.standard_state).eval() if sources.standard_state is not None else None
    whole = standard if standard is not None else create_model(arch["name"], arch["num_classes"], arch["width"],
                                                               method="standard").eval()
    sub = data.subset(plan.classes)
    return _Module(module=module, portable=ImagesToScores(module, data.mean, data.std).eval(), chosen=chosen,
                   standard=standard, whole=whole, masks=masks, conv=conv_columns(modular), settings=settings, sub=sub,
                   test_images=sub.test_images.to(torch.float32) / 255)


class _Staging:
    """A new hidden folder in ``out`` for this export's files and its owner record (host, pid; later
    its MLflow run), removed as the block ends; unless ``published`` was set by then, the folders
    made for ``out`` are removed too."""

    def __init__(self, out: Path):
        self.out = out
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.published = False

    def __enter__(self) -> _Staging:
        self.made = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=self.out))
        return self

    def record(self, **more: str) -> None:
        atomic_write_text(self.folder / _OWNER_FILE, json.dumps({**self.owner, **more}))

    def __exit__(self, *error) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if not self.published:
            for folder in self.made:  # innermost first; a folder something else wrote into stays
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _write_staged(plan: ExportPlan, built: _Module, staging: _Staging) -> dict:
    """The owner record, then ``_write_and_check``, in the staging folder; a full disk is said of
    ``--out``, with nothing written."""
    try:
        staging.record()
        return _write_and_check(plan, built, staging.folder)
    except Exception as error:
        if not is_disk_full(error):
            raise
        # Said of --out, not of the staging folder that is removed; the file it failed on kept.
        what = str(error).replace(str(staging.folder), str(plan.out_dir)) if isinstance(error, DiskFull) else \
            full_disk_message("the module's files", plan.out_dir)
        raise DiskFull(f"{what}; nothing was written") from error


def _publish(staging: Path, out: Path) -> None:
    """Rename the files from ``staging`` into ``out``, module.json last: its presence says the other
    two are complete."""
    reason = _target_error(out)  # something put in the way while the module was made
    if reason:
        raise JobFailed(f"{reason}; nothing was written")
    for name in EXPORT_FILES:
        (staging / name).replace(out / name)


def _log_in_mlflow(plan: ExportPlan, summary: dict, test_images: torch.Tensor, staging: _Staging, log) -> dict:
    """The published module logged (and registered when asked) in MLflow; its run is recorded in the
    staging folder's owner file first, so that an export killed meanwhile has its run marked FAILED."""
    from ..tracking.modules import log_module

    try:
        return log_module(plan.cfg, plan.out_dir, summary, test_images[:2], register=plan.register, log=log,
                          on_run=lambda uri, run_id: staging.record(tracking_uri=uri, run_id=run_id))
    except Exception as error:
        error.add_note(f"{', '.join(EXPORT_FILES)} were written to {plan.out_dir}, but not logged in MLflow")
        raise


def _classes_text(classes: list[int], names: list[str]) -> str:
    """``3, 5`` where the names are the indices (digits), else ``cat (3), dog (5)``."""
    if all(name == str(index) for index, name in zip(classes, names)):
        return ", ".join(names)
    return ", ".join(f"{name} ({index})" for index, name in zip(classes, names))


_OWNER_FILE = "owner.json"  # in a staging folder: the export's host and pid, then its MLflow run


def _clean_abandoned(out: Path, log) -> None:
    """Remove the staging folders that exports killed in ``out`` left (their process on this host is
    gone; another host's are left alone), and mark FAILED the MLflow runs they left RUNNING."""
    for folder in sorted(out.glob(".export-*")) if out.is_dir() else []:
        try:
            record = json.loads((folder / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            # Killed before its record was written (just after the folder was made): the pid is in the name.
            found = re.fullmatch(r"\.export-(\d+)-.*", folder.name)
            record = {"host": socket.gethostname(), "pid": int(found.group(1)) if found else 0}
        if not folder.is_dir() or owner_alive(record):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        line = f"removed {folder.name}, left by an export that was killed (pid {record.get('pid')})"
        if record.get("run_id") and record.get("tracking_uri"):
            from ..tracking.store import fail_if_running

            if fail_if_running(record["tracking_uri"], record["run_id"]):
                line += f"; its MLflow run {record['run_id']} was left RUNNING, marked FAILED"
        log(line)


def _write_and_check(plan: ExportPlan, built: _Module, staging: Path) -> dict:
    """module.pt2, module.onnx and module.json in ``staging``, each read back and checked."""
    data = plan.sources.data
    program = export_program(built.portable, data.train_images.shape[-1], data.train_images.shape[1])
    save_program(program, staging / "module.pt2")
    write_onnx(program, staging / "module.onnx")
    session, saved, onnx_check = _check_files(staging, built.portable, built.test_images)
    summary = _summary(plan, built, onnx_check, _latency(saved, session, built.module, built.whole,
                                                         built.test_images.shape[1:], plan.cfg))
    summary["files"] = {name: (staging / name).stat().st_size for name in ("module.pt2", "module.onnx")}
    atomic_write_text(staging / "module.json", json.dumps(summary, indent=2))
    if json.loads((staging / "module.json").read_text()) != json.loads(json.dumps(summary)):
        raise JobFailed("module.json does not read back as written; nothing was kept")
    return summary


def _check_files(staging: Path, portable: torch.nn.Module, test_images: torch.Tensor):
    """module.onnx (in ONNX Runtime) and module.pt2 (loaded back) give the module's scores on the test
    images; returns the ONNX session, the loaded program and the ONNX check."""
    session = onnx_session(staging / "module.onnx")
    onnx_check = check_scores(lambda x: onnx_scores(session, x), portable, test_images)
    if not onnx_check.agrees:
        raise JobFailed(f"module.onnx gives scores up to {onnx_check.difference:.3g} away from the module's exact "
                        f"(float64) scores on the {len(test_images)} test images, where PyTorch's float32 scores "
                        f"are {onnx_check.pytorch_difference:.3g} away (allowed {onnx_check.allowed:.3g}: "
                        f"{onnx_check.as_dict()['rule']}); nothing was kept")
    saved = load_program(staging / "module.pt2")
    program_check = check_scores(saved, portable, test_images)
    if not program_check.agrees:
        raise JobFailed(f"module.pt2 gives scores up to {program_check.difference:.3g} away from the module's exact "
                        f"(float64) scores (allowed {program_check.allowed:.3g}); nothing was kept")
    return session, saved, onnx_check


def _summary(plan: ExportPlan, built: _Module, onnx_check, latency: dict) -> dict:
    """What module.json says of the module: where it came from, what it keeps, costs and scores."""
    sources, data, sub, device = plan.sources, plan.sources.data, built.sub, torch.device("cpu")
    arch, classes, size = sources.state["architecture"], plan.classes, data.train_images.shape[-1]
    keep, conv = mixed_module_mask(built.masks, classes), built.conv
    summary = {
        "source": {"reference": sources.where, "checkpoint": sources.modular.get("path") or
                   f"artifact checkpoint.pt of MLflow run {sources.modular['mlflow']['run_id']}",
                   "mlflow_run": sources.source_run()},
        "architecture": {k: arch[k] for k in ("name", "width", "num_classes") if k in arch},
        "classes": [{"index": c, "name": n} for c, n in zip(classes, plan.class_names)],
        "tau": plan.tau, "tau_from": plan.tau_from,
        "krr": keep[conv].float().mean().item(), "kernels_kept": int(keep[conv].sum()),
        "kernels_total": int(conv.sum()),
        "flops": {"module": count_flops(built.module, size), "full_model": count_flops(built.whole, size)},
        "parameters": {"module": _parameters(built.module), "full_model": _parameters(built.whole)},
        "fine_tuning": {"epochs": built.settings.epochs, **{k: v for k, v in built.chosen.items() if k != "history"}},
        "accuracy": {"test_images": len(built.test_images),
                     "module": evaluate(built.module, sub.test_images, sub.test_labels, sub, device)},
        "input": {"name": "images", "shape": ["batch", data.train_images.shape[1], size, size], "dtype": "float32",
                  "colour": "RGB", "range": [0.0, 1.0],
                  "values": "finite, in [0, 1] (0-255 pixels: divide by 255 first); the MLflow model refuses "
                            "others with HTTP 400, module.pt2 and module.onnx do not check and score them wrongly",
                  "normalisation": {"mean": data.mean.tolist(), "std": data.std.tolist(), "applied": "inside"}},
        "output": {"name": "scores", "shape": ["batch", len(classes)], "meaning": "logits, in the order of classes"},
        "onnx_check": {"test_images": len(built.test_images), **onnx_check.as_dict()},
        "latency_ms": latency,
        "files": {},
        "versions": {p: _version(p) for p in ("torch", "mwt-ray", "onnx", "onnxruntime", "mlflow")},
    }
    if built.standard is not None:
        summary["accuracy"]["standard"] = evaluate(built.standard, sub.test_images, sub.test_labels, sub, device,
                                                   classes=list(classes))
    return summary


def _latency(program, session, module, whole, image_shape: torch.Size, cfg: Config) -> dict:
    """Milliseconds of one forward pass at each ``reuse.latency_batch_sizes``: the .pt2 program, ONNX
    Runtime and the module in PyTorch, against the full model in PyTorch (timed in turn)."""
    result = {}
    for batch in cfg.reuse.latency_batch_sizes:
        images = torch.rand(batch, *image_shape)
        with torch.no_grad():
            times = fastest_calls([program, lambda x: onnx_scores(session, x), module, whole], images,
                                  cfg.reuse.latency_repeats)
        result[f"batch_{batch}"] = {
            name: seconds * 1e3
            for name, seconds in zip(
                ("module_pt2", "module_onnxruntime", "module_pytorch", "full_model_pytorch"), times
            )
        }
    return result


def _summary_line(summary: dict, out: Path) -> str:
    flops, acc = summary["flops"], summary["accuracy"]
    line = (f"wrote {', '.join(EXPORT_FILES)} to {out}: KRR {summary['krr']:.3f}, FLOPs {flops['module'] / 1e6:.2f}M "
            f"of {flops['full_model'] / 1e6:.2f}M, accuracy {acc['module']:.2%}")
    if "standard" in acc:
        line += f" (standard model {acc['standard']:.2%})"
    line += f", {summary['fine_tuning']['chosen']}"
    registered = (summary.get("mlflow") or {}).get("registered")
    if registered:
        line += f"; registered as models:/{registered['name']}/{registered['version']}"
    return line
