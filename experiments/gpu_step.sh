#!/usr/bin/env bash
# The GPU step's checks on one lent GPU (PyTorch there; Ray, MLflow, pydantic and fvcore not):
#  (a) benchmarks/step_time.py --grid cuda: vgg16, resnet18, simcnn at width 1, batch 128, fp32 eager
#      and bf16+compile, standard vs modular (step time, aten events, GPU busy share, samples/s);
#  (b) end to end: 2 epochs of modular VGG16/4 (tune_configs/cifar10_vgg16.yaml) on all of CIFAR-10
#      with train.precision=bf16 train.compile=true, then the modularization the job runs at its end,
#      through mwt_ray.jobs.train_in_process (the path of `python -m mwt_ray.train --num-workers 0`),
#      tracking off, with ray, mlflow and fvcore blocked so a hidden import of them fails here too.
# Writes into OUT: driver.log, step_time_cuda.json, e2e_summary.json, e2e.log.
#
# Once, on the machine that calls the tool (the wheels: pydantic and what it needs, for Python 3.12;
# the data: a shared/ folder inside the checkout travels, the ../shared beside it does not):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
#   mkdir -p shared/datasets && cp ../shared/datasets/cifar10-jpeg.tar.gz shared/datasets/
# (/.whl/ is in .gitignore; add /shared/ to .git/info/exclude or .gitignore so it is not committed.)
# Then, with the tool `run`:
#   run(command="bash experiments/gpu_step.sh", carry=[".whl"], timeout_s=540)
# and copy OUT's step_time_cuda.json to benchmarks/results/ to commit it.
#
# Time: BENCH_S and E2E_S bound the two parts (defaults 210 s and 180 s, about 6.5 minutes with the
# wheels' install), so a rerun still fits in a 15-minute lease. Compilation dominates both: the
# benchmark compiles 6 model steps (3 models, standard and modular); a row is written as soon as it
# is measured, so a part cut by its bound keeps what it finished.
# A CPU rehearsal of the same commands at tiny sizes (a few minutes on 2 cores, compile included):
#   DRY=1 OUT=/tmp/gpu_step_dry bash experiments/gpu_step.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; DATA=${DATA:-shared/datasets/cifar10-jpeg.tar.gz}; WORK=${WORK:-/tmp/gpu_step}
SITE=${SITE:-/tmp/site}; DRY=${DRY:-0}; BENCH_S=${BENCH_S:-210}; E2E_S=${E2E_S:-180}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/driver.log") 2>&1
START=$SECONDS
# The wheels are built for Python 3.12 (the GPU machine's). Under another Python, pip installs them as
# for 3.12 (which checks they are complete and consistent) and they stay off the path: their binary
# part would not load there.
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then AS_312=(); else
  AS_312=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64); fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${AS_312[@]}" \
  .whl/*.whl || { echo "error: the wheels in .whl/ did not install"; exit 1; }
if [ ${#AS_312[@]} = 0 ]; then
  export PYTHONPATH=$SITE:$PWD
else
  echo "python $(python3 -c 'import platform; print(platform.python_version())') is not 3.12: wheels installed in $SITE, not used"
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then  # the same code paths at sizes a 2-core CPU runs in minutes
  BENCH_ARGS=(--device cpu --models vgg16 --widths 0.0625 --batch 16 --steps 1 --warmup 1 --precision bf16 --compile)
  E2E_SETS=(model.width=0.0625 data.train_limit=1000 train.epochs=1 train.device=cpu)
else
  BENCH_ARGS=(--grid cuda --steps 20 --warmup 3)
  E2E_SETS=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || exit 1
[ -f "$DATA" ] || { echo "error: no data at $DATA (see the header: copy it into shared/datasets/)"; exit 1; }

echo "== (a) step-time benchmark, at most ${BENCH_S}s"
timeout "$BENCH_S" python3 benchmarks/step_time.py "${BENCH_ARGS[@]}" --out "$OUT/step_time_cuda.json"
BENCH_EXIT=$?
echo "benchmark exit $BENCH_EXIT after $((SECONDS - START))s (124: stopped at the bound; finished rows are kept)"

echo "== (b) 2 epochs of modular VGG16/4, bf16 + compile, then modularization, at most ${E2E_S}s"
E2E_START=$SECONDS
timeout "$E2E_S" python3 - "$OUT/e2e_summary.json" "$WORK" "$DATA" "${E2E_SETS[@]}" <<'PY' 2>&1 | tee "$OUT/e2e.log"
import csv, json, sys, time
for blocked in ("ray", "mlflow", "fvcore"):  # not on the GPU machine: the in-process job must not need them
    sys.modules[blocked] = None
summary_path, work, data, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
start = time.perf_counter()
from mwt_ray.config import load_config
from mwt_ray.jobs import train_in_process

cfg = load_config("tune_configs/cifar10_vgg16.yaml", [
    f"data.root={data}", "train.epochs=2", "train.precision=bf16", "train.compile=true", "tracking.enabled=false",
    "name=gpu-step-vgg16", f"output_dir={work}/runs", *extra])
result = train_in_process(cfg)
third_party = sorted({name.split(".")[0] for name, module in sys.modules.items() if module is not None}
                     - set(sys.stdlib_module_names) - {"mwt_ray", "__main__"})
summary = {"wall_s": time.perf_counter() - start, "overrides": extra, "final": result["final"],
           "modules": {k: v for k, v in result.get("modules", {}).items() if not isinstance(v, (list, dict))},
           "history": list(csv.DictReader((cfg.run_dir / "history.csv").open())),
           "third_party_modules": [n for n in third_party if not n.startswith("_")]}
with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2, default=str)
print("e2e wall", round(summary["wall_s"], 1), "s; epoch times",
      [round(float(h["epoch_time_s"]), 1) for h in summary["history"]], "; KRR", summary["modules"].get("krr"))
print("third-party modules imported:", " ".join(summary["third_party_modules"]))
PY
E2E_EXIT=${PIPESTATUS[0]}
echo "end-to-end exit $E2E_EXIT after $((SECONDS - E2E_START))s; total $((SECONDS - START))s"
[ "$BENCH_EXIT" = 0 ] && [ "$E2E_EXIT" = 0 ]
