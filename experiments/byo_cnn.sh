#!/usr/bin/env bash
# Bring-your-own-CNN experiment on the CPU: torchvision's MobileNetV2 and ResNet18 (untrained, their own width) on a
# class-balanced CIFAR-10 subset, standard and modular (the paper's alpha 0.5 / beta 1.5, 3 seeds for
# MobileNetV2, and the warm-up + sparsity setting of experiments/README.md scaled to the epochs),
# modules at tau 0.9, then 2-class reuse against the standard model. Two runs at a time, one torch
# thread each. LIMIT=5000 EPOCHS=10 by default: about an hour of training on a 2-core CPU.
set -euo pipefail
LIMIT=${LIMIT:-5000}; EPOCHS=${EPOCHS:-10}; OUT=${OUT:-runs}
WARMUP=$(( EPOCHS * 6 / 10 ))  # the README's best setting: a warm-up over 60% of the epochs, sparsity 2
DATA=(--set data.name=folder --set data.root=${DATA_ROOT:-../shared/datasets/cifar10-jpeg.tar.gz}
      --set data.train_limit=$LIMIT --set train.epochs=$EPOCHS --set output_dir=$OUT)
export OMP_NUM_THREADS=1
train() {  # name model [extra --set ...]
  local name=$1 model=$2; shift 2
  python -m mwt_ray.train --set name=$name --set model.name=torchvision:$model "${DATA[@]}" "$@" > $OUT/$name.log 2>&1
}
mkdir -p $OUT
train byo-mobilenet_v2-standard mobilenet_v2 --standard & train byo-mobilenet_v2-paper-s0 mobilenet_v2 --set train.seed=0 & wait
train byo-mobilenet_v2-paper-s1 mobilenet_v2 --set train.seed=1 & train byo-mobilenet_v2-paper-s2 mobilenet_v2 --set train.seed=2 & wait
train byo-resnet18-standard resnet18 --standard & train byo-resnet18-paper resnet18 & wait
train byo-mobilenet_v2-warmup-sparsity mobilenet_v2 --set train.warmup_epochs=$WARMUP --set train.sparsity=2 &
train byo-resnet18-warmup-sparsity resnet18 --set train.warmup_epochs=$WARMUP --set train.sparsity=2 & wait
# Why MobileNetV2 loses accuracy: the masks alone (no cohesion / coupling loss), and masks that start nearly on.
train byo-mobilenet_v2-masks-only mobilenet_v2 --set train.alpha=0 --set train.beta=0 &
train byo-mobilenet_v2-paper-bias3 mobilenet_v2 --set train.mask_bias_init=3 & wait
for model in mobilenet_v2 resnet18; do
  for run in $OUT/byo-$model-paper*/ $OUT/byo-$model-warmup-sparsity/; do
    run=${run%/}
    python -m mwt_ray.reuse --modular $run/checkpoint.pt --standard $OUT/byo-$model-standard/checkpoint.pt \
      --set 'reuse.sizes=[2]' --set reuse.per_size=2 --set reuse.num_actors=0 --set reuse.epochs=3 \
      --set 'reuse.latency_batch_sizes=[128]' --set reuse.latency_repeats=3 > $run.reuse.log 2>&1 &
  done
  wait
done
