"""Mixed modules, fine-tuning, and the standard model scored on a sub-task."""
import pytest
import torch

from mwt_ray.core.data import ImageData
from mwt_ray.core.extract import extract_module
from mwt_ray.core.graph import modular_units
from mwt_ray.core.models import create_model
from mwt_ray.core.reuse import (
    FineTuneSettings,
    build_reused_model,
    evaluate_subtask,
    mixed_module_mask,
    sample_subtasks,
)
from mwt_ray.core.training import evaluate

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses


def separable_data(n=120, classes=4):
    """Class c is a bright square in quadrant c: learnable in a couple of epochs."""
    images = torch.randint(0, 40, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(n) % classes
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, :, r * 16:(r + 1) * 16, q * 16:(q + 1) * 16] += 200
    return ImageData(images, labels, images[:40].clone(), labels[:40].clone(), [str(c) for c in range(classes)])


def test_mixed_module_is_the_union():
    masks = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert mixed_module_mask(masks, [0, 2]).tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="out of range"):
        mixed_module_mask(masks, [0, 3])


def test_reused_model_wraps_the_extracted_mixed_module():
    model = create_model("vgg16", num_classes=4, width=0.125).eval()
    sizes = [u.num_kernels for u in modular_units(model)]
    masks = torch.rand(4, sum(sizes)) < 0.5
    masks[:, :] |= torch.cat([torch.nn.functional.one_hot(torch.tensor(0), s).bool() for s in sizes])
    reused = build_reused_model(model, masks, [1, 3]).eval()
    x = torch.randn(3, 3, 32, 32)
    module = extract_module(model, masks[[1, 3]].any(0)).eval()
    torch.testing.assert_close(reused(x), reused.head(torch.relu(module(x))))
    assert reused(x).shape == (3, 2)


def test_fine_tuning_learns_the_subtask_and_standard_is_scored_on_restricted_logits():
    torch.manual_seed(0)
    data = separable_data(n=200)
    model = create_model("vgg16", num_classes=4, width=0.125)
    sizes = [u.num_kernels for u in modular_units(model)]
    masks = torch.ones(4, sum(sizes), dtype=torch.bool)
    settings = FineTuneSettings(
        epochs=4, lr=0.05, batch_size=16, momentum=0.9, weight_decay=5e-4, val_fraction=0.2, seed=0
    )
    result = evaluate_subtask(model, masks, data, [2, 0], settings, torch.device("cpu"), standard_model=model,
                              arch={"name": "vgg16", "num_classes": 4, "width": 0.125})
    assert result["module_accuracy"] >= 0.9
    assert result["krr"] == 1.0 and 1 <= result["best_epoch"] <= 4
    assert result["module_flops"] < result["model_flops"] * 1.01
    # The untrained standard model, restricted to classes [2, 0]: check against a manual count.
    sub = data.subset([2, 0])
    model.eval()
    with torch.no_grad():
        x = (sub.test_images.float() / 255 - data.mean[:, None, None]) / data.std[:, None, None]
        manual = (model(x)[:, [2, 0]].argmax(1) == sub.test_labels).float().mean().item()
    assert result["standard_accuracy"] == pytest.approx(manual)
    assert evaluate(model, sub.test_images, sub.test_labels, sub, torch.device("cpu"), classes=[2, 0]) == pytest.approx(
        manual
    )


def test_sampled_subtasks_are_distinct_and_valid():
    tasks = sample_subtasks(10, [2, 5, 10], per_size=3, seed=0)
    assert [len(t) for t in tasks] == [2, 2, 2, 5, 5, 5, 10]
    assert len({tuple(t) for t in tasks}) == len(tasks)
    assert sample_subtasks(10, [2], 3, seed=0) == sample_subtasks(10, [2], 3, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        sample_subtasks(10, [11], 1, 0)


def test_accuracy_without_fine_tuning_is_the_hard_masked_model_on_restricted_logits():
    """Brute force: per held-out sample, the hard-masked full network's logits at the sub-task's
    classes, argmax, compared with the label."""
    from hard_masks import fixed_masks

    from mwt_ray.core.reuse import accuracy_without_fine_tuning

    torch.manual_seed(1)
    data = separable_data(n=200).with_validation(0.25, seed=0)
    assert len(data.val_labels) == 48 and len(data.train_labels) == 152
    model = create_model("vgg16", num_classes=4, width=0.125).eval()
    sizes = [u.num_kernels for u in modular_units(model)]
    masks = torch.rand(4, sum(sizes)) < 0.4
    masks |= torch.cat([torch.nn.functional.one_hot(torch.tensor(0), s).bool() for s in sizes])
    classes = [3, 1]
    got = accuracy_without_fine_tuning(model, masks, data, classes, torch.device("cpu"), split="val")
    correct = total = 0
    with torch.no_grad(), fixed_masks(model, masks[classes].any(0)):
        for image, label in zip(data.val_images, data.val_labels.tolist()):
            if label not in classes:
                continue
            x = (image.float()[None] / 255 - data.mean[:, None, None]) / data.std[:, None, None]
            logits = model(x)[0]
            correct += int(classes[int(logits[classes].argmax())] == label)
            total += 1
    assert total == 24 and got == pytest.approx(correct / total)


def test_sampling_takes_all_sets_when_fewer_exist_and_each_m_is_seeded_on_its_own():
    from itertools import combinations

    tasks = sample_subtasks(5, [2, 4, 5], per_size=6, seed=3)
    # C(5,2) = 10 > 6: six distinct pairs; C(5,4) = 5 and C(5,5) = 1 <= 6: every set there is.
    pairs = [t for t in tasks if len(t) == 2]
    assert len(pairs) == 6 and len({tuple(p) for p in pairs}) == 6 and all(p == sorted(p) for p in pairs)
    assert [tuple(t) for t in tasks if len(t) == 4] == list(combinations(range(5), 4))
    assert [t for t in tasks if len(t) == 5] == [[0, 1, 2, 3, 4]]
    # Adding an M leaves the sets of the others unchanged; another seed draws other sets.
    assert sample_subtasks(10, [3], 4, seed=1) == [t for t in sample_subtasks(10, [2, 3, 7], 4, seed=1) if len(t) == 3]
    assert sample_subtasks(10, [3], 4, seed=1) != sample_subtasks(10, [3], 4, seed=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        sample_subtasks(10, [2], 0, seed=0)


class _Sleeper(torch.nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return x


def test_latency_is_measured_on_the_clock():
    from mwt_ray.core.reuse import compare_latency, inference_latency

    fast, slow = compare_latency([_Sleeper(0.01), _Sleeper(0.03)], 2, 8, torch.device("cpu"), repeats=5)
    # The fastest pass: a sleep never ends early, and the best of 5 is barely lengthened by load.
    assert 0.01 <= fast < 0.02 and 0.03 <= slow < 0.045 and 0.2 < fast / slow < 0.55
    assert inference_latency(_Sleeper(0.002), 1, 8, torch.device("cpu"), repeats=3) >= 0.002


def test_evaluate_subtask_reports_zero_fine_tune_loss_and_latency():
    from mwt_ray.core.reuse import accuracy_without_fine_tuning

    torch.manual_seed(0)
    data = separable_data(n=120)
    model = create_model("vgg16", num_classes=4, width=0.125)
    sizes = [u.num_kernels for u in modular_units(model)]
    masks = torch.rand(4, sum(sizes)) < 0.5
    masks |= torch.cat([torch.nn.functional.one_hot(torch.tensor(0), s).bool() for s in sizes])
    settings = FineTuneSettings(
        epochs=1, lr=0.05, batch_size=16, momentum=0.9, weight_decay=5e-4, val_fraction=0.2, seed=0
    )
    standard = create_model("vgg16", num_classes=4, width=0.125, method="standard")
    row = evaluate_subtask(model, masks, data, [1, 3], settings, torch.device("cpu"), standard,
                           {"name": "vgg16", "num_classes": 4, "width": 0.125}, zero_fine_tune=True,
                           latency_batch_sizes=(1, 8), latency_repeats=2)
    assert row["zero_ft_accuracy"] == pytest.approx(
        accuracy_without_fine_tuning(model, masks, data, [1, 3], torch.device("cpu")))
    assert row["accuracy_loss"] == pytest.approx(row["standard_accuracy"] - row["module_accuracy"])
    assert row["module_flops"] < row["model_flops"]  # about half the kernels are gone
    for b in (1, 8):
        assert row[f"latency_ratio_b{b}"] == pytest.approx(row[f"module_ms_b{b}"] / row[f"model_ms_b{b}"])
    assert row["fine_tune_s"] > 0 and row["latency_s"] > 0


def _trained_plain(data, epochs=3):
    """A modular VGG16/8 trained as a plain network (hard masks of ones: generators off), so that
    its extracted module with every kernel computes what was trained."""
    from hard_masks import fixed_masks

    from mwt_ray.core.data import iterate_batches

    model = create_model("vgg16", num_classes=data.num_classes, width=0.125)
    sizes = [u.num_kernels for u in modular_units(model)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    with fixed_masks(model, [torch.ones(k) for k in sizes]):
        for epoch in range(epochs):
            for x, y in iterate_batches(data.train_images, data.train_labels, 32, mean=data.mean, std=data.std,
                                        shuffle=True, seed=epoch):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval(), torch.ones(data.num_classes, sum(sizes), dtype=torch.bool)


def test_a_collapsing_fine_tune_hands_back_the_module_without_fine_tuning():
    """Fine-tuning that makes the module worse (here a learning rate that blows the
    weights up) loses the held-out choice to the module without fine-tuning, which is returned."""
    from mwt_ray.core.reuse import RestrictedLogits, accuracy_without_fine_tuning, reuse_module

    data = separable_data(n=240)
    model, masks = _trained_plain(data)
    classes = [3, 1]
    assert accuracy_without_fine_tuning(model, masks, data, classes, torch.device("cpu")) >= 0.9
    collapsing = FineTuneSettings(
        epochs=2, lr=50.0, batch_size=16, momentum=0.9, weight_decay=0, val_fraction=0.25, seed=0
    )
    module, info = reuse_module(model, masks, data, classes, collapsing, torch.device("cpu"))
    assert max(h["val_accuracy"] for h in info["history"]) < info["baseline_val_accuracy"]  # it did collapse
    assert isinstance(module, RestrictedLogits) and info["best_epoch"] == 0 and info["chosen"] == "no fine-tuning"
    sub = data.subset(classes)
    assert evaluate(module, sub.test_images, sub.test_labels, sub, torch.device("cpu")) == pytest.approx(
        accuracy_without_fine_tuning(model, masks, data, classes, torch.device("cpu")))
    row = evaluate_subtask(model, masks, data, classes, collapsing, torch.device("cpu"))
    assert row["chosen"] == "no fine-tuning" and row["fine_tune_won"] is False and row["best_epoch"] == 0
    # A fine-tune that helps wins: an untrained model's restricted logits are near chance.
    helpful = FineTuneSettings(
        epochs=2, lr=0.05, batch_size=16, momentum=0.9, weight_decay=5e-4, val_fraction=0.25, seed=0
    )
    untrained = create_model("vgg16", num_classes=4, width=0.125)
    module, info = reuse_module(untrained, masks, data, classes, helpful, torch.device("cpu"))
    assert info["best_epoch"] >= 1 and info["val_accuracy"] > info["baseline_val_accuracy"]
    assert not isinstance(module, RestrictedLogits) and info["chosen"] == f"fine-tuned epoch {info['best_epoch']}"


def test_batchnorm_statistics_are_recomputed_on_the_given_images():
    """The running mean and variance of the first BN equal the statistics of its input, the first
    conv's output, computed directly over every image (what fine-tuning sets after each epoch):
    exactly with one batch, as the mean of the batches' statistics with several."""
    from mwt_ray.core.reuse import recompute_batchnorm_statistics

    data = separable_data(n=90)
    model = create_model("vgg16", num_classes=4, width=0.125, method="standard").eval()
    first = model.units[0]
    with torch.no_grad():
        x = (data.train_images.float() / 255 - data.mean[:, None, None]) / data.std[:, None, None]
        y = first.conv(x)
    recompute_batchnorm_statistics(model, data.train_images, data, torch.device("cpu"), batch_size=90)
    torch.testing.assert_close(first.bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first.bn.running_var, y.var(dim=(0, 2, 3), unbiased=True), atol=1e-6, rtol=1e-5)
    recompute_batchnorm_statistics(model, data.train_images, data, torch.device("cpu"), batch_size=32)
    batches = torch.split(y, 32)
    torch.testing.assert_close(first.bn.running_mean, torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first.bn.running_var, torch.stack([b.var(dim=(0, 2, 3)) for b in batches]).mean(0),
                               atol=1e-6, rtol=1e-5)
    assert not model.training and first.bn.momentum == 0.1


def test_the_new_head_starts_as_the_restricted_logits():
    from mwt_ray.core.reuse import RestrictedLogits, ReusedModel

    module = create_model("vgg16", num_classes=4, width=0.125, method="standard").eval()
    x = torch.randn(5, 3, 32, 32)
    reused = ReusedModel(module, 4, 2, [3, 0]).eval()
    restricted = RestrictedLogits(module, [3, 0])
    torch.testing.assert_close(restricted(x), module(x)[:, [3, 0]])
    torch.testing.assert_close(reused(x), torch.relu(restricted(x)))
