"""Every built-in architecture's module as a torch.export program and an ONNX file (core.export),
equal to the module in PyTorch: ResNet18's identity shortcuts add into every channel of the residual
sum, which onnxscript 0.7.2's optimizer rewrote into a copy (4% off) before it was switched off."""
import pytest
import torch

from mwt_ray.core.export import (ImagesToScores, export_program, load_program, onnx_max_difference, onnx_session,
                                 save_program, scores_agree, write_onnx)
from mwt_ray.core.extract import extract_module
from mwt_ray.core.graph import mask_units
from mwt_ray.core.models import create_model
from mwt_ray.core.reuse import RestrictedLogits


@pytest.mark.parametrize("name", ["resnet18", "rescnn", "simcnn", "vgg16"])
def test_module_programs_compute_the_module(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, width=0.125).eval()
    sizes = [u.num_kernels for u in mask_units(model)]
    keep = torch.rand(sum(sizes)) < 0.5
    keep[torch.cumsum(torch.tensor([0] + sizes[:-1]), 0)] = True  # every layer keeps its first kernel
    module = ImagesToScores(RestrictedLogits(extract_module(model, keep), [7, 2, 4]),
                            torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])).eval()
    program = export_program(module, image_size=32)
    save_program(program, tmp_path / "module.pt2")
    write_onnx(program, tmp_path / "module.onnx")
    images = torch.rand(5, 3, 32, 32)
    difference, largest = onnx_max_difference(onnx_session(tmp_path / "module.onnx"), module, images)
    assert scores_agree(difference, largest, 1e-4), (difference, largest)
    loaded = load_program(tmp_path / "module.pt2")
    with torch.no_grad():
        for batch in (images[:1], images):
            torch.testing.assert_close(loaded(batch), module(batch), atol=1e-5, rtol=1e-5)
