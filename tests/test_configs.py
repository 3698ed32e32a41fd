"""Every shipped config loads and validates."""
import re
from pathlib import Path

import pytest

from mwt_ray.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.model.name in ("vgg16", "resnet18")


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["reuse.subtasks=[[0, 1], [2, 3, 4]]", "train.warmup_epochs=2.5", "data.root=null"])
    assert cfg.reuse.subtasks == [[0, 1], [2, 3, 4]] and cfg.train.warmup_epochs == 2.5 and cfg.data.root is None


@pytest.mark.parametrize("override,message", [
    ("train.alpha=.inf", "train.alpha"), ("train.lr=.nan", "train.lr"), ("train.device=tpu", "unknown device"),
    ("model.width=-1", "model.width"), ("reuse.val_fraction=1", "reuse.val_fraction"),
])
def test_bad_values_name_the_key(override, message):
    from mwt_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _numeric_fields(model, prefix=""):
    """Dotted keys of every int / float field (also optional ones) of every section, found by walking
    the config's types: a field added later is covered without changing this test."""
    import types
    import typing

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        annotation = info.annotation
        args = (
            typing.get_args(annotation)
            if typing.get_origin(annotation) in (typing.Union, types.UnionType)
            else (annotation,)
        )
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _numeric_fields(annotation, f"{prefix}{name}.")
        elif bool not in args and any(a in (int, float) for a in args):
            yield f"{prefix}{name}"


NUMERIC = sorted(_numeric_fields(__import__("mwt_ray.config", fromlist=["Config"]).Config))


def test_every_section_has_numeric_fields_to_check():
    assert len(NUMERIC) > 40 and {
        "train.epochs",
        "train.lr",
        "reuse.per_size",
        "sweep.trials",
        "sweep.krr_weight",
    } <= set(NUMERIC)


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("word", ["true", "false"])
def test_no_numeric_field_takes_a_boolean(key, word):
    from mwt_ray.config import ConfigError

    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: true/false is not a number"):
        load_config(None, [f"{key}={word}"])


def test_booleans_stay_booleans_and_numbers_numbers():
    cfg = load_config(None, ["train.augment=false", "train.epochs=2", "train.lr=1", "model.width=1e-1",
                             "sweep.space={train.augment: {choices: [true, false]}}"])
    assert cfg.train.augment is False and cfg.train.epochs == 2 and cfg.train.lr == 1.0 and cfg.model.width == 0.1
    assert cfg.sweep.space["train.augment"].choices == [True, False]


def test_alias_bomb_is_refused_in_little_time_and_memory(tmp_path):
    import time
    import tracemalloc

    from mwt_ray.config import ConfigError

    text = "l0: &l0 [" + ", ".join(["lol"] * 10) + "]\n"
    for level in range(1, 10):
        text += f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]\n"
    (tmp_path / "bomb.yaml").write_text(text + "sweep:\n  space:\n    train.alpha:\n      choices: *l9\n")
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expand to more than 100000 values") as caught:
        load_config(tmp_path / "bomb.yaml")
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 5 and peak < 20e6 and len(str(caught.value)) < 400, (seconds, peak)


def test_the_method_key_and_its_old_spelling(tmp_path):
    """``train.modular`` (configs and checkpoints from before ``train.method``) reads as mwt / standard, and
    ``--standard`` (both spellings, as train.py appends them) wins over an old file's ``modular: true``."""
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  modular: true\n")
    assert load_config(old).train.method == "mwt"
    assert load_config(None, ["train.modular=false"]).train.method == "standard"
    assert load_config(old, ["train.method=standard", "train.modular=false"]).train.method == "standard"
    assert load_config(None, ["train.method=moda", "train.modular=true"]).train.method == "moda"
    assert not load_config(None, ["train.method=standard"]).train.modular
