"""Every shipped config loads and validates."""
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
