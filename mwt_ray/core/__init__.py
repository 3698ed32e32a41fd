"""The method itself, in pure PyTorch: no Ray, no MLflow, no pydantic.

models (VGG16 / ResNet18 / SimCNN / ResCNN, torchvision's CNNs, ``create_model``), masking (the mask
generator and its op), graph (any CNN made modular from its traced graph), losses (Eq. 4-6),
metrics (Eq. 1-3), kernel_usage (kernel usage counts, module masks), extract (physically pruned
modules, from the graph), reuse (mixed modules, fine-tuning), flops (fvcore), data (in-memory datasets), training
(one process or one rank), checkpoint (weights-only files), files (atomic writes).
"""
