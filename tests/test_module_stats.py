"""Weight share and overlap against parameter sets written out from the masks for a VGG chain, against
the extracted modules' own parameter counts, and on residual and torchvision models."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mwt_ray.core.extract import extract_module
from mwt_ray.core.graph import modular_units
from mwt_ray.core.methods.mwt import insert_mask_units
from mwt_ray.core.models import create_model
from mwt_ray.core.module_stats import parameter_shares

CLASSES = 4


def _vgg():
    return create_model("vgg16", CLASSES, 0.0625)


def _vgg_layers(gm):
    """The VGG chain as the test reads it: 13 conv units (the first not masked), then three Linears."""
    convs = [gm.get_submodule(f"units.{i}.conv") for i in range(13)]
    fc1, fc2, head = (gm.get_submodule(f"classifier.{i}") for i in (0, 2, 4))
    return convs, fc1, fc2, head


def _random_masks(sizes, classes):
    """Random (classes, kernels) masks, every unit keeping at least one kernel for every class."""
    rows = []
    for _ in range(classes):
        layers = [torch.rand(n) < 0.5 for n in sizes]
        for layer in layers:
            layer[torch.randint(len(layer), (1,))] = True
        rows.append(torch.cat(layers))
    return torch.stack(rows)


def _vgg_kept(gm, row):
    """Kept output channels of each of the 13 convs (the first keeps all) and of the input, from a mask row."""
    convs, *_ = _vgg_layers(gm)
    sizes = [c.out_channels for c in convs[1:]]  # masks run in execution order: convs 1..12
    kept = [list(range(convs[0].in_channels)), list(range(convs[0].out_channels))]
    kept += [layer.nonzero().flatten().tolist() for layer in torch.split(row, sizes)]
    return kept


def _vgg_set(gm, row, head_rows):
    """(parameter name, index) of every parameter element a VGG module keeps, written out layer by layer."""
    convs, fc1, fc2, head = _vgg_layers(gm)
    kept = _vgg_kept(gm, row)
    elements = set()
    for i in range(13):
        inputs, outputs = kept[i], kept[i + 1]
        elements |= {(f"units.{i}.conv.weight", o, j, t) for o in outputs for j in inputs for t in range(9)}
        elements |= {(f"units.{i}.bn.{p}", o) for o in outputs for p in ("weight", "bias")}
    # 32x32 after five pools is 1x1: FC1's input features are the last conv's channels.
    elements |= {("classifier.0.weight", h, f) for h in range(fc1.out_features) for f in kept[13]}
    elements |= {("classifier.0.bias", h) for h in range(fc1.out_features)}
    elements |= {("classifier.2.weight", h, f) for h in range(fc2.out_features) for f in range(fc2.in_features)}
    elements |= {("classifier.2.bias", h) for h in range(fc2.out_features)}
    elements |= {("classifier.4.weight", c, f) for c in head_rows for f in range(head.in_features)}
    elements |= {("classifier.4.bias", c) for c in head_rows}
    return elements


def _vgg_count(gm, row):
    """The same module's size by formula: conv out x in x 3 x 3, two BN entries per kept channel, FC1 on
    the kept features, FC2 whole, one head row."""
    convs, fc1, fc2, head = _vgg_layers(gm)
    kept = [len(k) for k in _vgg_kept(gm, row)]
    conv = sum(kept[i + 1] * kept[i] * 9 for i in range(13))
    rest = sum(2 * kept[i + 1] for i in range(13)) + fc1.out_features * (kept[13] + 1)
    rest += fc2.out_features * (fc2.in_features + 1) + head.in_features + 1
    return conv, conv + rest


def _is_conv(element):
    return element[0].endswith("conv.weight")


def _mask_sizes(gm):
    convs, *_ = _vgg_layers(gm)
    return [c.out_channels for c in convs[1:]]


def test_vgg_matches_parameter_sets_written_from_the_masks():
    gm = _vgg()
    masks = _random_masks(_mask_sizes(gm), CLASSES)
    result = parameter_shares(gm, masks)

    whole = _vgg_set(gm, torch.ones(masks.shape[1], dtype=torch.bool), range(CLASSES))
    whole_conv = {e for e in whole if _is_conv(e)}
    plain = create_model("vgg16", CLASSES, 0.0625, method="standard")
    assert len(whole) == sum(p.numel() for p in plain.parameters())  # the test's own sets, checked
    assert result["model_parameters"] == len(whole)
    assert result["model_conv_parameters"] == len(whole_conv)

    sets = [_vgg_set(gm, masks[c], [c]) for c in range(CLASSES)]
    for c, elements in enumerate(sets):
        conv_count, count = _vgg_count(gm, masks[c])
        assert (len(elements), sum(map(_is_conv, elements))) == (count, conv_count)
        assert result["per_class_share"][c] == pytest.approx(count / len(whole), rel=1e-12)
    assert result["weight_share"] == pytest.approx(sum(len(s) for s in sets) / CLASSES / len(whole), rel=1e-12)
    conv_share = sum(sum(map(_is_conv, s)) for s in sets) / CLASSES / len(whole_conv)
    assert result["weight_share_conv"] == pytest.approx(conv_share, rel=1e-12)

    pairs = list(itertools.combinations(sets, 2))
    overlap = sum(len(a & b) for a, b in pairs) / len(pairs) / len(whole)
    overlap_conv = sum(sum(map(_is_conv, a & b)) for a, b in pairs) / len(pairs) / len(whole_conv)
    assert result["overlap"] == pytest.approx(overlap, rel=1e-12)
    assert result["overlap_conv"] == pytest.approx(overlap_conv, rel=1e-12)
    assert 0 < result["overlap"] < result["weight_share"] < 1


def _numel(module, conv_only=False):
    return sum(p.numel() for m in module.modules() if not conv_only or isinstance(m, nn.Conv2d)
               for p in m.parameters(recurse=False))


def test_shares_equal_the_extracted_modules_sizes_less_the_other_classes_head_rows():
    # ResNet18's head reads pruned features: a module's head rows are as wide as its kept features.
    classes = 3
    gm = create_model("resnet18", classes, 0.0625)
    sizes = [u.num_kernels for u in modular_units(gm)]
    masks = _random_masks(sizes, classes)
    whole = extract_module(gm, torch.ones(masks.shape[1], dtype=torch.bool))
    shares, conv_shares = [], []
    for c in range(classes):
        module = extract_module(gm, masks[c])
        other_rows = (classes - 1) * (module.get_submodule("fc").in_features + 1)
        shares.append((_numel(module) - other_rows) / _numel(whole))
        conv_shares.append(_numel(module, conv_only=True) / _numel(whole, conv_only=True))
    result = parameter_shares(gm, masks)
    assert result["per_class_share"] == pytest.approx(shares, rel=1e-12)
    assert result["weight_share"] == pytest.approx(sum(shares) / classes, rel=1e-12)
    assert result["weight_share_conv"] == pytest.approx(sum(conv_shares) / classes, rel=1e-12)
    assert (result["model_parameters"], result["model_conv_parameters"]) == (_numel(whole), _numel(whole, True))


def test_identical_masks_overlap_in_all_but_their_head_rows():
    gm = _vgg()
    row = _random_masks(_mask_sizes(gm), 1)[0]
    result = parameter_shares(gm, row.expand(CLASSES, -1))
    head = _vgg_layers(gm)[3]
    assert len(set(result["per_class_share"])) == 1
    assert result["overlap"] == pytest.approx(result["weight_share"] - (head.in_features + 1) /
                                              result["model_parameters"], rel=1e-12)
    assert result["overlap_conv"] == pytest.approx(result["weight_share_conv"], rel=1e-12)


def test_disjoint_masks_overlap_in_the_parameters_no_unit_masks():
    gm = _vgg()
    sizes = _mask_sizes(gm)
    assert min(sizes) >= CLASSES
    # Kernel j of every unit goes to class j % CLASSES alone.
    masks = torch.cat([torch.arange(n) % CLASSES == torch.arange(CLASSES)[:, None] for n in sizes], dim=1)
    result = parameter_shares(gm, masks)
    convs, fc1, fc2, head = _vgg_layers(gm)
    first = convs[0].weight.numel()
    # Shared by every module: the first conv and its BN (no unit), FC1's bias, FC2.
    shared = first + 2 * convs[0].out_channels + fc1.out_features + fc2.weight.numel() + fc2.out_features
    assert result["overlap"] == pytest.approx(shared / result["model_parameters"], rel=1e-12)
    assert result["overlap_conv"] == pytest.approx(first / result["model_conv_parameters"], rel=1e-12)


@pytest.mark.parametrize(("name", "width"), [("resnet18", 0.0625), ("torchvision:mobilenet_v2", 0.25)])
def test_residual_and_torchvision_models(name, width):
    classes = 3
    gm = create_model(name, classes, width)
    sizes = [u.num_kernels for u in modular_units(gm)]
    result = parameter_shares(gm, _random_masks(sizes, classes), example=torch.zeros(1, 3, 32, 32))
    for share, overlap in ((result["weight_share"], result["overlap"]),
                           (result["weight_share_conv"], result["overlap_conv"])):
        assert 0 < share <= 1 and 0 <= overlap <= share
    assert all(0 < s <= 1 for s in result["per_class_share"])
    plain = sum(p.numel() for n, p in gm.named_parameters() if "mask_generator" not in n)
    assert result["model_parameters"] == plain


def test_the_model_given_is_left_as_it_was():
    gm = _vgg().train()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, masks = gm.eval()(x, return_masks=True)
    gm.train()
    parameter_shares(gm, _random_masks(_mask_sizes(gm), CLASSES))
    after = gm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in gm.parameters())
    assert gm.training
    with torch.no_grad():  # the generators still compute what they did (no stale float64 state)
        again, masks_again = gm.eval()(x, return_masks=True)
    assert torch.equal(again, logits) and all(torch.equal(a, b) for a, b in zip(masks_again, masks))


def test_a_row_without_a_kernel_in_a_unit_is_refused_naming_its_class():
    gm = _vgg()
    sizes = _mask_sizes(gm)
    masks = _random_masks(sizes, CLASSES)
    masks[2, sizes[0]:sizes[0] + sizes[1]] = False
    with pytest.raises(ValueError, match=r"class 2: .*keeps no kernel"):
        parameter_shares(gm, masks)
    with pytest.raises(ValueError, match="3 module masks for a model with 4 classes"):
        parameter_shares(gm, masks[:3])
    with pytest.raises(ValueError, match="not a plain network"):
        parameter_shares(create_model("vgg16", CLASSES, 0.0625, method="standard"), masks)


class ConvHeadNet(nn.Module):
    """Logits from a 1x1 conv and a global pool: no Linear produces the output."""

    def __init__(self, classes):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.a, self.a_bn = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        x = F.relu(self.a_bn(self.a(F.relu(self.stem_bn(self.stem(x))))))
        return torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1)


def test_a_head_that_is_no_linear_counts_whole():
    classes = 3
    gm = insert_mask_units(ConvHeadNet(classes))
    masks = _random_masks([8], classes)
    result = parameter_shares(gm, masks, example=torch.zeros(1, 3, 16, 16))
    # Kept: the stem and its BN whole, conv a's kept kernels and BN entries, the head conv on them.
    whole = 6 * 3 * 9 + 12 + 8 * 6 * 9 + 16 + classes * 8 + classes
    for c in range(classes):
        k = int(masks[c].sum())
        assert result["per_class_share"][c] == pytest.approx(
            (6 * 3 * 9 + 12 + k * 6 * 9 + 2 * k + classes * k + classes) / whole, rel=1e-12)
    assert result["model_parameters"] == whole
