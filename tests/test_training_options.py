"""Training options beyond the paper: sparsity term, warm-up shapes, generator learning
rate, generator bias initialisation; each checked against a literal computation, and the paper's
method unchanged when they are at their defaults."""
import math

import pytest
import torch
from helpers import random_masks

from mwt_ray import create_model
from mwt_ray.config import load_config
from mwt_ray.core.graph import modular_units
from mwt_ray.core.losses import modular_objective
from mwt_ray.core.methods.mwt import init_mask_bias
from mwt_ray.core.training import loss_weight_ramp, make_optimizer, make_scheduler
from mwt_ray.jobs import train_in_process

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses


def settings(*overrides):
    return load_config(None, list(overrides)).train.optim_settings()


def test_sparsity_term_adds_the_layer_averaged_mean_mask():
    masks = random_masks(12, [5, 9, 3])
    labels = torch.randint(0, 4, (12,))
    logits = torch.randn(12, 4, dtype=torch.float64)
    plain, _ = modular_objective(logits, labels, masks, labels, 0.5, 1.5)
    sparse, _ = modular_objective(logits, labels, masks, labels, 0.5, 1.5, sparsity=0.3)
    layer_means = [sum(float(v) for v in m.flatten()) / m.numel() for m in masks]
    assert sparse.item() - plain.item() == pytest.approx(0.3 * sum(layer_means) / len(layer_means), rel=1e-9)


def test_sparsity_gradient_pushes_every_positive_mask_down():
    masks = [m.requires_grad_() for m in random_masks(6, [4, 7])]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.zeros(6, 3, dtype=torch.float64)
    plain, _ = modular_objective(logits, labels, masks, labels, 0.0, 0.0, sparsity=2.0)
    plain.backward()
    for m in masks:  # d/dm of 2 * mean over layers of mean(m): 2 / (layers * numel)
        assert torch.allclose(m.grad, torch.full_like(m, 2.0 / (2 * m.numel())))


@pytest.mark.parametrize("shape, progress, expected", [
    ("linear", 1.5, 0.5), ("linear", 3.0, 1.0), ("linear", 7.0, 1.0),
    ("cosine", 1.5, 0.5), ("cosine", 0.75, (1 - math.cos(math.pi / 4)) / 2), ("cosine", 0.0, 0.0),
    ("step", 2.99, 0.0), ("step", 3.0, 1.0), ("step", 0.0, 0.0),
])
def test_warmup_ramp_shapes(shape, progress, expected):
    s = settings("train.warmup_epochs=3", f"train.warmup_shape={shape}")
    assert loss_weight_ramp(s, progress) == pytest.approx(expected)
    assert loss_weight_ramp(settings(f"train.warmup_shape={shape}"), progress) == 1.0  # no warm-up: full weight


@pytest.mark.parametrize("name, width", [("vgg16", 0.125), ("torchvision:mobilenet_v2", 0.25)])
def test_generator_learning_rate_has_its_own_group_that_follows_the_schedule(name, width):
    model = create_model(name, width=width)
    s = settings("train.generator_lr_scale=4", "train.lr=0.05", "train.epochs=10")
    optimizer = make_optimizer(model, s)
    scheduler = make_scheduler(optimizer, s)
    network, generators = optimizer.param_groups
    # By name: a generator sits at <unit>.mask_generator or <unit>.<conv>_mask_generator, one packed tensor each.
    generator_ids = {id(p) for n, p in model.named_parameters() if n.split(".")[-2].endswith("mask_generator")}
    assert len(generator_ids) == len(modular_units(model))
    assert {id(p) for p in generators["params"]} == generator_ids
    assert {id(p) for p in network["params"]} | generator_ids == {id(p) for p in model.parameters()}
    assert len(network["params"]) + len(generators["params"]) == len(list(model.parameters()))
    for _ in range(3):
        assert generators["lr"] == pytest.approx(4 * network["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps the schedule in order
        scheduler.step()
    assert network["lr"] < 0.05


def test_default_optimizer_is_one_group_over_all_parameters_in_order():
    model = create_model("vgg16", width=0.125)
    (group,) = make_optimizer(model, settings()).param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_mask_bias_init_sets_every_generator_and_very_negative_switches_masks_off():
    model = create_model("vgg16", width=0.125)
    init_mask_bias(model, -0.5)
    assert all(torch.equal(u.state.b2, torch.full_like(u.state.b2, -0.5))
               for u in modular_units(model))
    init_mask_bias(model, -1e4)
    _, masks = model.eval()(torch.randn(4, 3, 32, 32), return_masks=True)
    assert all(m.eq(0).all() for m in masks)


def test_training_job_applies_the_options(tmp_path):
    """A job with every kernel switched off at the start and no gradient through the masks' ReLU keeps
    them off: the first epoch's kernel rate is exactly 0 (1 with the default bias)."""
    base = ["data.train_limit=200", "model.width=0.125", "train.batch_size=50", "train.epochs=1",
            "tracking.enabled=false", f"output_dir={tmp_path}", "modularize.cohesion_samples_per_class=0"]
    off = train_in_process(
        load_config(
            None,
            base
            + [
                "name=bias-off",
                "train.mask_bias_init=-1e4",
                "train.sparsity=0.5",
                "train.generator_lr_scale=2",
                "train.warmup_epochs=1",
                "train.warmup_shape=cosine",
                "train.detach_generator_input=true",
            ],
        ),
        log=None,
    )
    on = train_in_process(load_config(None, base + ["name=bias-on"]), log=None)
    assert off["final"]["kernel_rate"] == 0.0
    assert on["final"]["kernel_rate"] > 0.5


@pytest.mark.parametrize("detach", [False, True])
def test_detached_generator_inputs_keep_modularity_gradients_out_of_the_backbone(detach):
    from mwt_ray.core.losses import cohesion_coupling_losses
    from mwt_ray.core.methods.mwt import detach_generator_inputs

    model = create_model("vgg16", width=0.125)
    detach_generator_inputs(model, detach)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logits, masks = model(torch.randn(8, 3, 32, 32), return_masks=True)
    cohesion, coupling = cohesion_coupling_losses(masks, labels, 10)
    (cohesion + coupling).backward()
    generator_ids = {id(p) for unit in modular_units(model) for p in unit.state.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in generator_ids]
    touched = [p for p in backbone if p.grad is not None and p.grad.abs().sum() > 0]
    assert (not touched) if detach else len(touched) > len(backbone) // 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if id(p) in generator_ids)
    model.zero_grad()  # cross-entropy still reaches the backbone, through the masked activations too
    logits, masks = model(torch.randn(8, 3, 32, 32), return_masks=True)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None for p in backbone)


def test_optim_settings_take_each_field_from_the_train_key_of_its_name():
    """A train key the loop does not read needs no second mention; one it reads is read by name."""
    from dataclasses import fields

    from mwt_ray.config import TrainConfig
    from mwt_ray.core.training import OptimSettings

    train = load_config(None, ["train.lr=0.125", "train.sparsity=0.25", "train.compile_mode=max-autotune",
                               "train.mask_bias_init=3"]).train
    optim = train.optim_settings()
    assert {f.name for f in fields(OptimSettings)} <= set(TrainConfig.model_fields)
    assert all(getattr(optim, f.name) == getattr(train, f.name) for f in fields(OptimSettings))
    assert (optim.lr, optim.sparsity, optim.compile_mode) == (0.125, 0.25, "max-autotune")
