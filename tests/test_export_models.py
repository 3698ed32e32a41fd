"""Every built-in architecture's module as a torch.export program and an ONNX file (core.export),
equal to the module in PyTorch: ResNet18's identity shortcuts add into every channel of the residual
sum, which onnxscript 0.7.2's optimizer rewrote into a copy (4% off) before it was switched off. The
agreement check itself (``check_scores``) against the module run in float64."""
import pytest
import torch
from torch import nn

from mwt_ray.core.export import (
    ImagesToScores,
    ScoreCheck,
    check_scores,
    export_program,
    load_program,
    onnx_scores,
    onnx_session,
    save_program,
    write_onnx,
)
from mwt_ray.core.extract import extract_module
from mwt_ray.core.graph import modular_units
from mwt_ray.core.models import create_model, list_models
from mwt_ray.core.reuse import RestrictedLogits

pytestmark = pytest.mark.slow  # Ray, MLflow or subprocesses


@pytest.mark.parametrize("name", list_models())
def test_module_programs_compute_the_module(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, width=0.125).eval()
    sizes = [u.num_kernels for u in modular_units(model)]
    keep = torch.rand(sum(sizes)) < 0.5
    keep[torch.cumsum(torch.tensor([0] + sizes[:-1]), 0)] = True  # every layer keeps its first kernel
    module = ImagesToScores(RestrictedLogits(extract_module(model, keep), [7, 2, 4]),
                            torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])).eval()
    program = export_program(module, image_size=32)
    save_program(program, tmp_path / "module.pt2")
    write_onnx(program, tmp_path / "module.onnx")
    images = torch.rand(5, 3, 32, 32)
    session = onnx_session(tmp_path / "module.onnx")
    check = check_scores(lambda x: onnx_scores(session, x), module, images)
    assert check.agrees and check.difference <= 1e-4 * max(1, check.largest_score), check
    loaded = load_program(tmp_path / "module.pt2")
    with torch.no_grad():
        for batch in (images[:1], images):
            torch.testing.assert_close(loaded(batch), module(batch), atol=1e-5, rtol=1e-5)


def test_the_allowed_difference_is_the_floor_or_a_multiple_of_pytorchs_own_error():
    assert ScoreCheck(0, 0, largest_score=0.5, floor=1e-4, factor=4).allowed == 1e-4  # scores below 1: absolute
    assert ScoreCheck(0, 0, largest_score=300, floor=1e-4, factor=4).allowed == pytest.approx(3e-2)
    assert ScoreCheck(0, 1e-3, largest_score=0.5, floor=1e-4, factor=4).allowed == pytest.approx(4e-3)
    assert ScoreCheck(4.1e-3, 1e-3, 0.5, 1e-4, 4).agrees is False and ScoreCheck(3.9e-3, 1e-3, 0.5, 1e-4, 4).agrees


def test_check_scores_measures_against_float64_and_catches_a_wrong_program():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    images = torch.rand(6, 3, 8, 8)
    module(images)  # sizes the lazy layer
    module.eval()
    exact = module.double()(images.double()).detach()
    module.float()
    same = check_scores(module, module, images)
    assert same.difference == same.pytorch_difference and same.agrees
    assert same.largest_score == pytest.approx(exact.abs().max().item())
    assert next(module.parameters()).dtype == torch.float32  # the float64 copy is a copy
    shift = 10 * same.allowed  # a program off by ten times what is allowed, e.g. a dropped channel's share
    wrong = check_scores(lambda x: module(x) + shift, module, images)
    assert not wrong.agrees and wrong.difference == pytest.approx(shift, rel=1e-3)
