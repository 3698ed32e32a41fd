"""One typed config for every stage: YAML file + ``section.key=value`` overrides, validated at load.

    cfg = load_config("tune_configs/cifar10_vgg16.yaml", ["train.epochs=5", "model.width=0.25"])

Unknown keys and out-of-range values are rejected with one line naming the key, the bad value
and what is allowed.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..core.data import DATASETS
from ..core.files import input_file_error
from ..core.messages import one_line
from ..core.methods import get_method, keys_of_other_methods, method_names
from ..core.models import (
    DEFAULT_WIDTH,
    FACTORY_FORM,
    TORCHVISION_PREFIX,
    check_model_name,
    create_model,
    default_width,
    list_models,
    model_size_error,
)
from ..core.reuse import FineTuneSettings
from ..core.training import OptimSettings
from .base import (
    LIMIT_REASONS,
    MAX_BATCH,
    MAX_COUNT,
    MAX_CPUS,
    MAX_EPOCHS,
    MAX_GPUS,
    MAX_RESTARTS,
    MAX_SAMPLES,
    MAX_SUBTASKS,
    SEED,
    Section,
    shown,
    taus_in_range,
)
from .sweep import SEARCHABLE_SECTIONS, SearchRange, SweepConfig, flatten_space

__all__ = [
    "Config",
    "ConfigError",
    "TrainConfig",
    "ReuseConfig",
    "SweepConfig",
    "SearchRange",
    "flatten_space",
    "SEARCHABLE_SECTIONS",
    "load_config",
    "apply_overrides",
    "apply_for_method",
    "keys_unread_by",
    "validate_config",
    "build_parser",
    "parse_yaml",
    "MAX_YAML_VALUES",
]


class ConfigError(ValueError):
    pass


class ModelConfig(Section):
    name: str = Field("vgg16", description=f"a built-in ({', '.join(list_models())}), {TORCHVISION_PREFIX}<name>, "
                      f"or {FACTORY_FORM} for your own CNN (a function of num_classes that returns the network)")
    width: float | None = Field(None, gt=0, description=f"channel multiplier; unset: {DEFAULT_WIDTH:g} for the "
                                "built-ins (1.0 = the paper's models), a torchvision model's own (MobileNet's "
                                "width_mult where set); a function of your own takes none")

    @field_validator("name", mode="before")
    @classmethod
    def _known(cls, value) -> str:
        if not isinstance(value, str):  # YAML reads an unquoted "module:" as a mapping
            raise ValueError(f"{value!r} is not a model name; give a built-in ({', '.join(list_models())}), "
                             f"{TORCHVISION_PREFIX}<name> or {FACTORY_FORM} (in quotes where it ends in ':')")
        check_model_name(value)
        return value

    @model_validator(mode="after")
    def _width(self) -> ModelConfig:
        """Unset becomes the model's default; an explicit width is checked against the constructor and,
        since every channel count scales with it, against the parameter count (its square)."""
        if self.width is None:
            self.width = default_width(self.name)
            return self
        value, name = self.width, self.name
        # The size first: building MobileNet at a width near 1e300 overflows inside torch.
        reason = model_size_error(name, value)
        if reason:
            raise ValueError(reason)
        if name.startswith(TORCHVISION_PREFIX) and value != 1.0:
            with torch.device("meta"):
                create_model(name, 10, value, method="standard")  # ValueError where there is no width_mult
        return self


class DataConfig(Section):
    name: str = "digits"
    root: str | None = Field(None, description="dataset folder (cifar10/svhn root, or an image folder / .tar.gz)")
    download: bool = False
    train_limit: int | None = Field(None, ge=2, le=MAX_SAMPLES, description="class-balanced cap on training samples")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of each class's training samples held out of "
                                "training as a validation set (val_accuracy per epoch; the sweep's objective)")
    device_resident: bool | Literal["auto"] = Field(
        "auto", description="keep the uint8 images on the training device (batches, normalisation and augmentation "
        "there, no host copy per step); auto = yes on a CPU, and on a GPU whose free memory holds them twice")

    @field_validator("device_resident", mode="before")
    @classmethod
    def _resident(cls, value):
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("use true, false or auto")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; choose one of {', '.join(DATASETS)}")
        return value


class TrainConfig(Section):
    method: str = Field("mwt", description=f"the training method: {', '.join(method_names())} (core.methods); "
                        "--standard sets standard")
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=2, le=MAX_BATCH)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    alpha: float = Field(0.5, ge=0, description="weight of the cohesion loss (Eq. 6)")
    beta: float = Field(1.5, ge=0, description="weight of the coupling loss (Eq. 6)")
    # MODA's weights (method moda): its code's defaults, the same for every model and dataset.
    affinity: float = Field(1.0, ge=0, description="MODA: weight of the intra-class affinity loss")
    dispersion: float = Field(1.0, ge=0, description="MODA: weight of the inter-class dispersion loss")
    compactness: float = Field(0.3, ge=0, description="MODA: weight of the compactness loss (mean pooled activation)")
    warmup_epochs: float = Field(
        0.0, ge=0, le=MAX_EPOCHS, description="ramp alpha, beta and sparsity from 0 over this many epochs"
    )
    # Options beyond the paper (the accuracy / KRR frontier study); the defaults are the paper's method.
    warmup_shape: Literal["linear", "cosine", "step"] = Field(
        "linear", description="the warm-up ramp: linear, cosine (slow start and end) or step (off, then on)")
    sparsity: float = Field(0.0, ge=0, description="weight of the mean mask value in the objective (0 = off)")
    generator_lr_scale: float = Field(1.0, gt=0, description="mask generators' learning rate / train.lr")
    mask_bias_init: float = Field(1.0, description="initial last bias of every mask generator (1.0: all kernels on)")
    detach_generator_input: bool = Field(False, description="true: cohesion and coupling train the mask generators "
                                         "only, the backbone learns from cross-entropy alone")
    augment: bool = True
    seed: int = Field(0, **SEED)
    device: str = Field("auto", description="auto (a GPU if there is one), cpu, cuda or cuda:N")
    # GPU speed options; the defaults keep fp32 eager numerics.
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 autocast (masks and pair losses stay fp32); fp16 autocast with a grad scaler")
    channels_last: bool = Field(False, description="NHWC activations and weights (faster convs on tensor cores)")
    compile: bool = Field(False, description="torch.compile the model, the objective and the per-step metrics")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode; reduce-overhead uses CUDA graphs")

    @model_validator(mode="before")
    @classmethod
    def _modular_spelling(cls, values):
        """``modular: true / false`` (configs and checkpoints from before the method key) is
        ``method: mwt / standard``; both at once must agree."""
        if not isinstance(values, dict) or "modular" not in values:
            return values
        values = dict(values)
        modular = values.pop("modular")
        if not isinstance(modular, bool):
            raise ValueError(f"train.modular {shown(modular)} is not true or false (train.method is the key now: "
                             f"{', '.join(method_names())})")
        implied = "mwt" if modular else "standard"
        if values.setdefault("method", implied) != implied and (values["method"] == "standard") == modular:
            raise ValueError(f"train.modular={str(modular).lower()} contradicts train.method={values['method']}")
        return values

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        get_method(value)  # ValueError naming the methods there are
        return value

    @model_validator(mode="after")
    def _weights_of_this_method(self) -> TrainConfig:
        """A weight or option of another method set away from its default does nothing here: refused. A
        standard run ignores them all (the reference for a config of any method: the same file, --standard)."""
        if self.method == "standard":
            return self
        for key, owner in keys_of_other_methods(self.method).items():
            value = getattr(self, key)
            if value != type(self).model_fields[key].default:
                own = get_method(self.method)
                value = f"{value:g}" if isinstance(value, float) else shown(value)
                raise ValueError(f"train.{key}={value} is a setting of method {owner}, but "
                                 f"train.method is {self.method}"
                                 + (f" (its weights: {', '.join(own.weight_keys)})" if own.weight_keys else ""))
        return self

    @property
    def modular(self) -> bool:
        """Whether the method trains a modular graph (every method but standard)."""
        return get_method(self.method).modular

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
        return value

    def optim_settings(self) -> OptimSettings:
        """The settings the training loop reads, each taken from the key of its name: a key the loop does
        not read (the device, the generators' initialisation) needs no mention here."""
        return OptimSettings(**{field.name: getattr(self, field.name) for field in fields(OptimSettings)})


class ModularizeConfig(Section):
    tau: float = Field(0.9, gt=0, le=1, description="keep a kernel used by >= tau of a class's samples")
    cohesion_samples_per_class: int | None = Field(
        None,
        ge=0,
        le=MAX_SAMPLES,
        description="samples per class for the Jaccard cohesion: null = all (exact Eq. 2), 0 = skip",
    )
    report_taus: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], description="taus whose "
                                     "module cohesion, KRR and coupling metrics.json lists (by_tau), besides tau")

    _taus = field_validator("report_taus")(lambda cls, value: taus_in_range(value) if value else value)


class ReuseConfig(Section):
    subtasks: list[list[int]] = Field(
        default_factory=list, max_length=MAX_SUBTASKS, description="explicit class lists, e.g. [[0, 1], [2, 3, 4]]"
    )
    sizes: list[int] = Field(
        default_factory=list,
        max_length=MAX_SUBTASKS,
        description="M values to sample sub-tasks for, e.g. [2, 5] or '2..9'; empty = 2..N-1 unless subtasks are given",
    )
    per_size: int = Field(
        10, ge=1, le=MAX_SUBTASKS, description="K: sampled sub-tasks per M (all of them when C(N, M) <= K)"
    )
    sampling_seed: int | None = Field(None, **SEED, description="seed of the sub-task sampling; null = train.seed")
    epochs: int = Field(5, ge=0, le=MAX_EPOCHS, description="fine-tuning epochs of a reused module")
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(64, ge=2, le=MAX_BATCH)
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="held-out share of the sub-task's training data that picks the best epoch"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    zero_fine_tune: bool = Field(True, description="also score the mixed module with no training (restricted logits)")
    latency_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 128],
        max_length=16,
        description="batch sizes of the measured inference latency of module vs model; [] = none",
    )
    latency_repeats: int = Field(
        10, ge=1, le=MAX_COUNT, description="timed forward passes per model and batch size (the fastest counts)"
    )
    num_actors: int | None = Field(
        None,
        ge=0,
        le=MAX_COUNT,
        description="Ray actors evaluating sub-tasks; null = as many as the "
        "cluster can place; 0 = in this process without Ray",
    )
    cpus_per_actor: float = Field(1.0, gt=0, le=MAX_CPUS, description="CPUs per actor (also its torch thread count)")
    gpus_per_actor: float = Field(0.0, ge=0, le=MAX_GPUS, description="GPUs per actor (> 0: sub-tasks run on the GPU)")
    max_restarts: int = Field(
        3,
        ge=0,
        le=MAX_RESTARTS,
        description="times a sub-task may lose its actor (a lost node, a killed process) and run again on a new one",
    )
    output_dir: str | None = Field(None, description="where the tables and plots go; null = a reuse/ folder "
                                   "beside the modular checkpoint (<output_dir>/reuse-<run id> for an MLflow run)")

    @field_validator("sizes", mode="before")
    @classmethod
    def _range(cls, value):
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
            if not match or int(match[1]) > int(match[2]):
                raise ValueError("sizes must be a list of M values or a range 'a..b' with a <= b")
            return list(range(int(match[1]), int(match[2]) + 1))
        return value

    @field_validator("sizes")
    @classmethod
    def _at_least_two(cls, value: list[int]) -> list[int]:
        small = [m for m in value if m < 2]
        if small:
            raise ValueError(f"sub-task size M={small[0]} is below 2: an M-class sub-task needs M >= 2")
        return value

    @field_validator("latency_batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 or b > MAX_BATCH for b in value):
            raise ValueError(f"latency batch sizes must lie in 1..{MAX_BATCH} ({LIMIT_REASONS[MAX_BATCH]}), "
                             f"got {shown(value)}")
        return value

    def fine_tune_settings(self, seed: int) -> FineTuneSettings:
        return FineTuneSettings(**self.model_dump(include=set(FineTuneSettings.__dataclass_fields__)), seed=seed)


class ScalingConfig(Section):
    num_workers: int = Field(0, ge=0, le=MAX_COUNT, description="Ray Train workers; 0 runs in this process without Ray")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_CPUS)
    max_failures: int = Field(0, ge=-1, le=MAX_RESTARTS, description="worker-group restarts allowed (-1: unlimited)")
    fail_at_epoch: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="fault injection: kill a worker once at this epoch"
    )
    storage_path: str | None = Field(None, description="Ray Train storage (shared path or URI on a cluster)")


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<cwd>/mlflow.db")
    experiment: str = "mwt-ray"
    parent_run_id: str | None = Field(None, description="nest this job's MLflow run under that run (a sweep sets it)")


class Config(Section):
    name: str = "mwt"
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    modularize: ModularizeConfig = Field(default_factory=ModularizeConfig)
    reuse: ReuseConfig = Field(default_factory=ReuseConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    # Where this config came from; not a setting.
    source: str | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value: str) -> str:  # the job's folder under output_dir and in the run storage
        if (value in ("", ".", "..") or value != value.strip() or value.startswith(".")
                or any(c in value for c in "/\\:*?\"<>|") or any(ord(c) < 32 for c in value) or len(value) > 100):
            raise ValueError("name must be a plain folder name such as 'mwt' or 'vgg16-run2': no path separators "
                             "or any of :*?\"<>|, not starting with '.', no surrounding spaces, at most 100 characters")
        return value

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Config:
        for key in self.sweep.space:
            section, field = key.split(".")
            known = type(getattr(self, section)).model_fields
            if field not in known:
                raise ValueError(f"sweep.space: {key!r} is not a config key; {section} has {', '.join(known)}")
        return self


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (YAML's own message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


# A config holds a few hundred values; YAML aliases (``*a`` repeating what ``&a`` holds) can make a
# file of a few lines stand for billions ("billion laughs"). PyYAML builds such a file fast, as lists
# shared by reference, but everything after it (validation, MLflow params, printing) expands them.
MAX_YAML_VALUES = 100_000


def _expanded_values(tree, limit: int) -> int:
    """How many values ``tree`` holds with every shared list or mapping counted each time it occurs
    (stops counting above ``limit``). Each distinct container is visited once, iteratively, so a bomb
    costs no more than its file. Raises ValueError for a structure that contains itself."""
    totals: dict[int, int] = {}
    open_now: set[int] = set()  # containers whose children are being counted (the path from the root)
    stack = [(tree, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        key = id(node)
        children = list(node.values()) if isinstance(node, dict) else node
        if children_done:
            open_now.discard(key)
            totals[key] = min(limit + 1, 1 + sum(totals.get(id(c), 1) for c in children))
            continue
        if key in totals:
            continue
        if key in open_now:
            raise ValueError("an alias refers to a list or mapping that contains it (a structure that holds itself)")
        open_now.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, (list, dict)) and id(c) not in totals)
    return totals.get(id(tree), 1)


def parse_yaml(text: str, what: str):
    """``yaml.safe_load(text)``, or ConfigError naming ``what`` (a config file, an override): YAML that
    does not parse, that nests too deeply for the parser, or that aliases expand beyond ``MAX_YAML_VALUES``."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise ConfigError(f"{what} is not a usable config: its YAML nests lists or mappings too deeply") from None
    try:
        count = _expanded_values(tree, MAX_YAML_VALUES)
    except ValueError as error:
        raise ConfigError(f"{what} is not a usable config: {error}") from None
    if count > MAX_YAML_VALUES:
        raise ConfigError(f"{what} is not a usable config: its YAML aliases (*name repeating &name) expand to more "
                          f"than {MAX_YAML_VALUES} values; a config holds a few hundred")
    return tree


def _first_error(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(p) for p in item["loc"]) or "config"
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    got = item.get("input")
    quoted = "" if isinstance(got, dict) or got is None else f" (got {shown(got)})"
    limit = (item.get("ctx") or {}).get("le" if item["type"] == "less_than_equal" else "max_length")
    reason = LIMIT_REASONS.get(limit) if item["type"] in ("less_than_equal", "too_long") else None
    return f"{where}: {message}{quoted}" + (f": {reason}" if reason else "")


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), parse_yaml(raw, f"override {shown(item)}") if raw.strip() else None)
    return tree


def keys_unread_by(method: str) -> set[str]:
    """The dotted keys of every method's settings that ``method`` does not read (empty for an unknown method,
    which validation refuses by name)."""
    return {f"train.{key}" for key in keys_of_other_methods(method)} if method in method_names() else set()


def apply_for_method(tree: dict, values: dict) -> dict:
    """``tree`` (a config as a dict) with ``values`` ({dotted key: value}) applied for the method they select
    (``train.method`` among them, or the tree's): settings only other methods read are left out, and the
    tree's own values of them go back to their defaults. A sweep samples every key for every trial; each
    trial takes those of its method. Returns ``tree``, changed in place."""
    method = values.get("train.method", tree.get("train", {}).get("method", TrainConfig.model_fields["method"].default))
    unread = keys_unread_by(method) if method != "standard" else set()
    for key in unread:
        tree.setdefault("train", {})[key.split(".")[1]] = TrainConfig.model_fields[key.split(".")[1]].default
    return apply_overrides(tree, [f"{key}={json.dumps(value)}" for key, value in values.items() if key not in unread])


def validate_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {_first_error(error)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        reason = input_file_error(path)
        if reason:
            raise ConfigError(f"config file {str(path)!r} {reason}" + ("" if reason.startswith(("does not", "cannot"))
                                                                     else ", not a YAML file"))
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"config file {str(path)!r} cannot be read ({getattr(error, 'strerror', None) or error})"
            ) from None
        tree = parse_yaml(text, f"config file {str(path)!r}") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    apply_overrides(tree, overrides or [])
    config = validate_config(tree)
    config.source = str(path) if path else None
    return config


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end like every other bad input: one ``error:`` line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser(description: str, *, with_config: bool = True) -> argparse.ArgumentParser:
    """The arguments every command shares: ``--config FILE`` and repeatable ``--set key=value``."""
    parser = _OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if with_config:
        parser.add_argument("--config", help="YAML config (see tune_configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    return parser
