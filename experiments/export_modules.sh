#!/usr/bin/env bash
# Exported modules of a CIFAR-10 VGG16-BN/4 at the recommended setting (warm-up 9 + sparsity 2,
# 15 epochs) on the class-balanced 10k-image subset and its standard model, then a 2-class and a
# 5-class module exported (python -m mwt_ray.export), measured on this CPU.
#   bash experiments/export_modules.sh            # OUT=runs/export_modules by default
# Each module's module.json (sizes, FLOPs, KRR, latency of the .pt2 program, ONNX Runtime and the
# full model at batch 1 and 128, accuracy vs the standard model) lands in $OUT/modules/<classes>/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/export_modules}
DATA=${DATA:-../shared/datasets/cifar10-jpeg.tar.gz}
mkdir -p "$OUT"
COMMON=(--config tune_configs/cifar10_vgg16.yaml --set "data.root=$DATA" --set data.train_limit=10000
        --set "output_dir=$OUT" --set tracking.enabled=false)
# The two trainings side by side, one thread each (the 2 cores).
OMP_NUM_THREADS=1 python -m mwt_ray.train "${COMMON[@]}" --set name=modular --set train.warmup_epochs=9 \
    --set train.sparsity=2 > "$OUT/modular.log" 2>&1 &
OMP_NUM_THREADS=1 python -m mwt_ray.train "${COMMON[@]}" --standard --set name=standard > "$OUT/standard.log" 2>&1 &
wait
for classes in airplane,automobile airplane,automobile,bird,cat,deer; do
    python -m mwt_ray.export --run "$OUT/modular" --standard "$OUT/standard" --classes "$classes" \
        --out "$OUT/modules/$classes" --set tracking.enabled=false --set 'reuse.latency_batch_sizes=[1,128]' \
        --set reuse.latency_repeats=10
done
