"""The method itself, in pure PyTorch: no Ray, no MLflow, no pydantic.

models (masked conv units, VGG16 / ResNet18 / SimCNN / ResCNN, ``create_model``), losses (Eq. 4-6),
metrics (Eq. 1-3), modularize (kernel usage counts, module masks), extract (physically pruned
modules), reuse (mixed modules, fine-tuning), flops (fvcore), data (in-memory datasets), training
(one process or one rank), checkpoint (weights-only files), files (atomic writes).
"""
