#!/usr/bin/env bash
# The accuracy / KRR frontier plot and table from the committed run summaries (experiments/results/*/metrics.json).
# The runs themselves: experiments/cifar10_vgg16.sh for the references, then e.g.
#   python -m mwt_ray.train --config tune_configs/cifar10_vgg16.yaml --set name=cifar10-vgg16-warmup3-sparsity0.5 \
#       --set train.warmup_epochs=3 --set train.sparsity=0.5
#   python -m mwt_ray.train --config tune_configs/cifar10_resnet18.yaml --set name=cifar10-resnet18-10k-paper \
#       --set data.train_limit=10000
# the GPU panel: experiments/gpu_frontier.sh (experiments/results/gpu-h200/README.md); the screen panel:
#   python -m mwt_ray.sweep --config tune_configs/cifar10_vgg16_options_cpu.yaml
set -euo pipefail
R=experiments/results
G=$R/gpu-h200
S=$R/cifar10-vgg16-options
python experiments/frontier.py --out $R/frontier \
  --reference "paper, earlier run:0.336:-6.22" --reference "warm-up 3, earlier run:0.490:-1.64" \
  --panel "VGG16-BN/4, CIFAR-10 (50k), 15 epochs, CPU" $R/cifar10-vgg16-standard $R/cifar10-vgg16-modular \
    $R/cifar10-vgg16-modular-warmup3 $R/cifar10-vgg16-detach $R/cifar10-vgg16-warmup3-sparsity0.5 \
    $R/cifar10-vgg16-warmup3-sparsity2 $R/cifar10-vgg16-warmup6-sparsity0.5 $R/cifar10-vgg16-warmup9-glr5 \
    $R/cifar10-vgg16-warmup9-sparsity1-glr5 $R/cifar10-vgg16-warmup9-sparsity2 \
  --panel "VGG16-BN/4, CIFAR-10 (50k), 15 epochs, H200" $G/vgg-standard-s0 $G/vgg-paper-s0 $G/vgg-w3-sp0.5-s0 \
    $G/vgg-w6-sp0.5-s0 $G/vgg-w6-sp1-s0 $G/vgg-w9-sp1-s0 $G/vgg-w9-sp2-s0 \
  --panel "ResNet18/4, CIFAR-10 10k-image subset, 15 epochs" $R/cifar10-resnet18-10k-standard \
    $R/cifar10-resnet18-10k-paper $R/cifar10-resnet18-10k-warmup3 $R/cifar10-resnet18-10k-warmup3-sparsity0.5 \
    $R/cifar10-resnet18-10k-warmup9-sparsity2 $R/cifar10-resnet18-10k-warmup9-glr5 \
  --panel "ResNet18/4, CIFAR-10 (50k), 15 epochs" $R/cifar10-resnet18-standard $R/cifar10-resnet18-warmup9-sparsity2 \
  --panel "screen (Ray Tune sweep): VGG16-BN/4, 10k subset, 8 epochs" $S/standard $S/trials/trial-*
