"""Exported modules at run time: the exported modules against the full model in the
same runtimes, on this CPU. The export's module.json times the .pt2 program and ONNX Runtime of
the module against the full model in PyTorch; this adds the full (standard) model as a .pt2
program and in ONNX Runtime, so each runtime's module / model ratio compares like with like.

    python experiments/export_latency.py RUNS_DIR     # RUNS_DIR of experiments/export_modules.sh

Prints one JSON object: per module and batch size (1, 128), milliseconds of the fastest of 10
calls of module and full model in each runtime, timed in turn.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from mwt_ray.core.checkpoint import build_model, load_checkpoint
from mwt_ray.core.export import (
    ImagesToScores,
    export_program,
    fastest_calls,
    load_program,
    onnx_scores,
    onnx_session,
    write_onnx,
)


def main(runs: Path) -> dict:
    standard = build_model(load_checkpoint(runs / "standard" / "checkpoint.pt")).eval()
    first = json.loads(next((runs / "modules").glob("*/module.json")).read_text())
    norm = first["input"]["normalisation"]
    full = ImagesToScores(standard, torch.tensor(norm["mean"]), torch.tensor(norm["std"])).eval()
    with tempfile.TemporaryDirectory() as scratch:
        program = export_program(full, first["input"]["shape"][2])
        write_onnx(program, Path(scratch) / "full.onnx")
        full_session = onnx_session(Path(scratch) / "full.onnx")
        full_program = program.module()
        result = {}
        for folder in sorted((runs / "modules").iterdir()):
            module_program = load_program(folder / "module.pt2")
            module_session = onnx_session(folder / "module.onnx")
            for batch in (1, 128):
                images = torch.rand(batch, 3, 32, 32)
                with torch.no_grad():
                    times = fastest_calls([module_program, full_program, lambda x, s=module_session: onnx_scores(s, x),
                                           lambda x: onnx_scores(full_session, x)], images, repeats=10)
                result[f"{folder.name} batch {batch}"] = dict(zip(
                    ("module_pt2_ms", "full_pt2_ms", "module_onnxruntime_ms", "full_onnxruntime_ms"),
                    (round(t * 1e3, 3) for t in times)))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
