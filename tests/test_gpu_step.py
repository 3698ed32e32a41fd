"""The GPU-shaped step: exact against the literal equations, free of host syncs, traceable
without graph breaks, and its options (compile, precision, channels_last, device-resident data)
changing speed, not results beyond their documented tolerance.

CI compiles slowly on 2 cores: one real inductor compile here (forward + objective at the smallest
width, no backward); the other compile checks use ``torch._dynamo.explain`` or dynamo's ``eager``
backend (the same capture, no code generation).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import random_masks, tiny_config
from torch.profiler import ProfilerActivity, profile

from mwt_ray.config import TrainConfig
from mwt_ray.core.data import iterate_batches, load_dataset, place_data
from mwt_ray.core.losses import modular_objective
from mwt_ray.core.metrics import batch_modularity
from mwt_ray.core.models import create_model, list_models
from mwt_ray.core.training import TrainingStep, make_optimizer, step_value_names

CPU = torch.device("cpu")


# ----------------------------------------------------------------- exactness against the equations

def literal_objective(logits, labels, masks, alpha, beta, sparsity):
    """Eq. 4-6 (and the sparsity option) as loops over samples, pairs and layers, in autograd ops."""
    def similarity(j, k):
        return sum(F.cosine_similarity(m[j], m[k], dim=0, eps=1e-12) if m[j].any() and m[k].any()
                   else m.new_zeros(()) for m in masks) / len(masks)

    members = {c: [i for i, y in enumerate(labels.tolist()) if y == c] for c in range(logits.shape[1])}
    cohesion_terms = [sum(similarity(j, k) for j, k in itertools.combinations(idx, 2)) / (len(idx) * (len(idx) - 1) / 2)
                      for idx in members.values() if len(idx) >= 2]
    coupling_terms = [
        sum(similarity(j, k) for j in members[h] for k in members[i]) / (len(members[h]) * len(members[i]))
        for h, i in itertools.combinations(members, 2)
        if members[h] and members[i]
    ]
    cohesion = 1 - sum(cohesion_terms) / len(cohesion_terms) if cohesion_terms else logits.new_zeros(())
    coupling = sum(coupling_terms) / len(coupling_terms) if coupling_terms else logits.new_zeros(())
    mean_mask = sum(m.mean() for m in masks) / len(masks)
    return F.cross_entropy(logits, labels) + alpha * cohesion + beta * coupling + sparsity * mean_mask


BATCHES = {
    "mixed, with a class of one sample": [0, 0, 1, 1, 1, 2, 3, 3, 0, 1],
    "one class only": [2] * 7,
    "every class once": [0, 1, 2, 3],
    "one sample": [1],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_objective_and_gradients_match_the_literal_equations(batch, dtype):
    """Loss and gradients (masks and logits) equal the literal loops: exactly in float64, within
    rtol 1e-5 in float32 (the weighted sums add in another order than the loops). A mask value of 0
    comes from the generator's relu(tanh(.)), whose slope there is 0: its gradient is never used
    (and in an all-zero layer it is that of ``x / eps``, as with ``F.normalize``), so it is not compared."""
    g = torch.Generator().manual_seed(len(batch))
    labels = torch.tensor(BATCHES[batch])
    masks = [m.to(dtype).requires_grad_() for m in random_masks(len(labels), [3, 6, 4], generator=g)]
    with torch.no_grad():
        masks[0][0] = 0  # an all-zero layer for one sample
    logits = torch.randn(len(labels), 4, generator=g, dtype=dtype, requires_grad=True)
    inputs = [logits, *masks]

    total, _ = modular_objective(logits, labels, masks, labels, alpha=0.5, beta=1.5, sparsity=0.3)
    grads = torch.autograd.grad(total, inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    reference = literal_objective(ref_inputs[0], labels, ref_inputs[1:], 0.5, 1.5, 0.3)
    ref_grads = torch.autograd.grad(reference, ref_inputs)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), reference, **tolerance)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], **tolerance)
    for got, expected, mask in zip(grads[1:], ref_grads[1:], masks):
        used = mask.detach() > 0
        torch.testing.assert_close(got.double()[used], expected[used], **tolerance)


def test_batch_metrics_are_nan_where_a_batch_defines_nothing():
    """One class: no coupling (NaN); no class with two samples: no cohesion (NaN); the epoch means
    skip such steps (train_epoch counts the defined ones)."""
    one_class = batch_modularity(random_masks(5, [4, 3]), torch.full((5,), 2), 4)
    assert torch.isnan(one_class["batch_coupling"]) and torch.isfinite(one_class["batch_cohesion"])
    singletons = batch_modularity(random_masks(3, [4, 3]), torch.tensor([0, 1, 3]), 4)
    assert torch.isnan(singletons["batch_cohesion"]) and torch.isfinite(singletons["batch_coupling"])


# ----------------------------------------------------------------------- no host sync, no breaks

def tiny_step(name="vgg16", method="mwt", batch=16, **options):
    torch.manual_seed(0)
    settings = TrainConfig(method=method, **options).optim_settings()
    model = create_model(name, 10, 0.125, method=method).train()
    step = TrainingStep(model, make_optimizer(model, settings), settings, 10, CPU)
    images, labels = torch.randn(batch, 3, 32, 32), torch.arange(batch) % 10
    return model, step, images, labels


@pytest.mark.parametrize("name, method", [("vgg16", "mwt"), ("resnet18", "mwt"), ("vgg16", "moda"),
                                          ("resnet18", "moda")])
def test_a_modular_step_never_reads_a_tensor_on_the_host(name, method):
    """On a GPU, ``.item()``, ``nonzero`` and boolean-mask indexing wait for the device; their CPU
    ops are what the profiler records in their place. A step (forward, objective, backward, SGD,
    the per-step metrics) calls none of them."""
    _, step, images, labels = tiny_step(name, method)
    step(images, labels, 0.5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        values = step(images, labels, 0.5)
    names = {event.name for event in prof.events()}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                        "aten::is_nonzero"}
    assert set(values.names) == set(step_value_names(method)) and values.table.shape == (len(values.names),)


# torchvision's CNNs come through the same traced graph: a residual one, an inverted-residual one
# with a width multiplier, and one with squeeze-excitation and stochastic depth.
TRACED = ["torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:efficientnet_b0"]


@pytest.mark.parametrize("name", list_models() + [pytest.param(name, marks=pytest.mark.slow) for name in TRACED])
def test_forward_objective_and_metrics_trace_in_one_graph(name):
    width = 0.125 if name in list_models() else (0.25 if "mobilenet" in name else None)
    model = create_model(name, 10, width).train()
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10

    def forward_and_objective(x, y, ramp):
        logits, masks = model(x, return_masks=True)
        loss, parts = modular_objective(logits, y, masks, y, 0.5 * ramp, 1.5 * ramp, sparsity=0.1 * ramp)
        return loss, parts, batch_modularity(masks, y, 10)

    explained = torch._dynamo.explain(forward_and_objective)(images, labels, 0.3)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow  # inductor compiles C++ kernels: a minute here
def test_inductor_compiled_forward_and_objective_equal_eager():
    """The one real inductor compile of the suite: the generators' plain-op path (what the
    compiler sees) gives the eager single-node path's logits, masks and loss."""
    model = create_model("vgg16", 10, 0.125).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 2])

    def forward_and_objective(x, y):
        logits, masks = model(x, return_masks=True)
        return logits, torch.cat(masks, 1), modular_objective(logits, y, masks, y, 0.5, 1.5)[0]

    with torch.no_grad():
        eager = forward_and_objective(images, labels)
        compiled = torch.compile(forward_and_objective, fullgraph=True)(images, labels)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ the step's options

def test_bf16_step_stays_within_tolerance_of_fp32():
    """bf16 autocast rounds activations to 8 mantissa bits; the masks and the pair losses stay fp32.
    Documented tolerance on a first step: cross-entropy within 2%, cohesion and coupling within 0.01."""
    rows = {}
    for precision in ("fp32", "bf16"):
        _, step, images, labels = tiny_step(precision=precision)
        rows[precision] = step(images, labels, 1.0).to_dict()
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert bf16["ce_loss"] == pytest.approx(fp32["ce_loss"], rel=0.02)
    for name in ("cohesion_loss", "coupling_loss"):
        assert bf16[name] == pytest.approx(fp32[name], abs=0.01)


def test_fp16_step_with_a_grad_scaler_updates_the_model():
    model, step, images, labels = tiny_step(precision="fp16")
    before = [p.detach().clone() for p in model.parameters()]
    values = step(images, labels, 1.0)
    assert torch.isfinite(values["loss"]) and torch.isfinite(values["ce_loss"])
    assert step.scaler is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_channels_last_changes_memory_layout_not_results():
    """VGG16: the same step values and gradients in NHWC. (ResNet18's gradients differ by ~2% of
    their largest value between layouts on this CPU, for the standard model as much as for the
    modular one: oneDNN's channels-last kernels for its strided 1x1 convs, not the mask op.)"""
    from mwt_ray.core.training import prepare_model

    rows, grads = {}, {}
    for channels_last in (False, True):
        model, step, images, labels = tiny_step("vgg16", channels_last=channels_last)
        prepare_model(model, step.s)
        rows[channels_last] = step(images, labels, 1.0)
        grads[channels_last] = [p.grad.clone() for p in model.parameters()]
    assert model.get_submodule("units.1.conv").weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rows[True].to_dict(), rows[False].to_dict(), rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[True], grads[False]):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max()


def test_batches_are_the_same_draws_wherever_the_data_lives():
    """The epoch's order and augmentation come from the CPU generator, drawn as a literal loop over
    batches draws them (a permutation, then per batch crop offsets and flips), whatever device the
    images are on; here the literal draw is replayed by hand and compared."""
    data = load_dataset("digits", train_limit=100)
    batches = list(iterate_batches(data.train_images, data.train_labels, 32, mean=data.mean, std=data.std,
                                   shuffle=True, augment=True, seed=7, drop_last=True))
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(len(data.train_labels), generator=generator)
    for number, (x, y) in enumerate(batches):
        index = order[number * 32:(number + 1) * 32]
        offsets = torch.randint(0, 9, (32, 2), generator=generator)
        flips = torch.rand(32, generator=generator) < 0.5
        assert torch.equal(y, data.train_labels[index])
        raw = data.train_images[index].float() / 255
        padded = F.pad(raw, (4, 4, 4, 4))
        for i in (0, 31):  # two samples of every batch, cropped and flipped literally
            r, c = offsets[i].tolist()
            crop = padded[i, :, r:r + 32, c:c + 32]
            crop = crop.flip(-1) if flips[i] else crop
            torch.testing.assert_close(x[i], (crop - data.mean[:, None, None]) / data.std[:, None, None])
    assert place_data(data, CPU, "auto").train_images.device.type == "cpu"
    with pytest.raises(ValueError, match="device_resident must be true, false or auto"):
        place_data(data, CPU, "sometimes")


@pytest.mark.slow  # compiles with inductor
def test_a_compiled_run_checkpoint_loads_uncompiled_and_resumes(tmp_path, monkeypatch):
    """``train.compile`` compiles in place: the checkpoint's names are the plain model's, so the
    run resumes without compiling. (Dynamo's "eager" backend: the same in-place capture and guards,
    without inductor's minutes of code generation on 2 cores.)"""
    from mwt_ray.core.checkpoint import load_checkpoint
    from mwt_ray.jobs import train_in_process

    real_compile = torch.compile

    compiled = []

    def dynamo_only(model=None, **kwargs):
        compiled.append(kwargs.pop("mode", None))
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", dynamo_only)
    cfg = tiny_config(tmp_path, "compiled", "train.compile=true", "tracking.enabled=false", workers=0, epochs=1)
    first = train_in_process(cfg, log=None)
    assert compiled == ["default"] * 3  # the model, the objective and the step's metrics
    checkpoint = next((tmp_path / "runs").rglob("checkpoint.pt"))
    state = load_checkpoint(checkpoint, map_location="cpu")
    assert not [k for k in state["model_state"] if "_orig_mod" in k]
    resumed_cfg = tiny_config(tmp_path, "compiled", "tracking.enabled=false", workers=0, epochs=2)
    second = train_in_process(resumed_cfg, resume=True, log=None)
    assert first is not None and second is not None
    assert len(load_checkpoint(next((tmp_path / "runs").rglob("checkpoint.pt")), map_location="cpu")["history"]) == 2
