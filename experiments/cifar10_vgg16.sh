#!/usr/bin/env bash
# The CIFAR-10 experiment of the README: standard vs modular VGG16 at width 1/4, modules at
# tau = 0.9, and reuse of a 2-class and a 5-class sub-task. EPOCHS=15 by default (about 25 min
# of training per run on a 2-core CPU). Needs the shared CIFAR-10 JPEG copy (data.root).
set -euo pipefail
EPOCHS=${EPOCHS:-15}
CONFIG=tune_configs/cifar10_vgg16.yaml
python -m mwt_ray.train --config $CONFIG --standard --set name=cifar10-vgg16-standard --set train.epochs=$EPOCHS "$@"
python -m mwt_ray.train --config $CONFIG --set name=cifar10-vgg16-modular --set train.epochs=$EPOCHS "$@"
python -m mwt_ray.train --config $CONFIG --set name=cifar10-vgg16-modular-warmup3 --set train.epochs=$EPOCHS --set train.warmup_epochs=3 "$@"
for run in cifar10-vgg16-modular cifar10-vgg16-modular-warmup3; do
  python -m mwt_ray.reuse --modular runs/$run/checkpoint.pt --standard runs/cifar10-vgg16-standard/checkpoint.pt
done
