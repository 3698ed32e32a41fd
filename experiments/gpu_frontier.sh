#!/usr/bin/env bash
# The frontier's confirmation runs on one lent GPU, where PyTorch is installed but Ray and MLflow are not:
# the jobs of PLAN through experiments/parallel_runs.py, PARALLEL at a time, stopped BUDGET seconds
# after this script starts (less the time to pack); then the summaries, and the checkpoints a reuse
# check may need, packed into OUT. RESUME=1 continues the jobs an earlier call stopped (same WORK).
#   OUT=gpu_out DATA=../shared/datasets/cifar10-jpeg.tar.gz bash experiments/gpu_frontier.sh
# Measured on an H200: modular VGG16/4 jobs on all of CIFAR-10 shared the GPU at about
# 3.3 s per epoch in total, whether 6 or 12 ran at once (40 s per epoch each at 12, 20 s at 6); a
# standard job needs about a quarter of that. So one 15-epoch modular job costs about 50 s of GPU:
# size PLAN and BUDGET with that.
set -uo pipefail
START=$SECONDS
OUT=${OUT:-gpu_out}; DATA=${DATA:-../shared/datasets/cifar10-jpeg.tar.gz}; WORK=${WORK:-/tmp/gpu_frontier}
PARALLEL=${PARALLEL:-6}; BUDGET=${BUDGET:-540}; PLAN=${PLAN:-experiments/gpu_plan.txt}; PACK_S=30
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/driver.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# One short job first: a plan that cannot run fails here in seconds, not after the deadline.
[ "${RESUME:-0}" = 1 ] || python3 experiments/parallel_runs.py \
  <(echo "smoke tune_configs/cifar10_vgg16.yaml train.epochs=1 data.train_limit=2000") \
  --out "$WORK/smoke" --set data.root="$DATA" || { cat "$WORK/smoke/smoke.log"; exit 1; }
# The driver's deadline counts from its own start, after every job's config and data are checked.
timeout $((BUDGET - (SECONDS - START) - PACK_S)) python3 experiments/parallel_runs.py "$PLAN" \
  --parallel "$PARALLEL" --deadline $((BUDGET - (SECONDS - START) - PACK_S - 60)) --out "$WORK" \
  --set data.root="$DATA" --set 'modularize.report_taus=[0.5,0.7,0.8,0.9,0.95]' $([ "${RESUME:-0}" = 1 ] && echo --resume)
(cd "$WORK" && tar czf "$OUT/results.tgz" *.log runs/*/metrics.json runs/*/history.csv)
# Checkpoints for reuse: the seed-0 standard models and paper settings, then the most accurate
# seed-0 modular models at KRR <= 0.34 and <= 0.25; tar files of at most 15 MB each, 5 at most.
python3 - "$WORK/runs" "$OUT" <<'PY'
import json, sys, tarfile
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
done = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/metrics.json")}
krr = lambda n: done[n].get("modules", {}).get("krr", 1.0)
acc = lambda n: done[n]["final"]["test_accuracy"]
pick = [n for n in ("vgg-standard-s0", "vgg-paper-s0", "rn-standard-s0", "rn-paper-s0") if n in done]
modular = sorted((n for n in done if n.endswith("-s0") and "modules" in done[n]), key=acc, reverse=True)
pick += [n for n in modular if krr(n) <= 0.34][:4] + [n for n in modular if krr(n) <= 0.25][:2]
pick = list(dict.fromkeys(pick))
bundles, size = [[]], 0
for n in pick:
    s = (runs / n / "checkpoint.pt").stat().st_size
    if bundles[-1] and size + s > 15e6:
        bundles.append([]); size = 0
    bundles[-1].append(n); size += s
for i, names in enumerate(bundles[:5]):
    with tarfile.open(out / f"checkpoints_{i}.tar", "w") as tar:
        for n in names:
            tar.add(runs / n / "checkpoint.pt", arcname=f"{n}/checkpoint.pt")
    print("packed", i, names)
PY
