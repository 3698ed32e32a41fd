"""mwt_ray: Modularizing while Training (MwT) for CNNs, at cluster scale on Ray.

Core (pure PyTorch): models, losses, metrics, modularize, extract, reuse, flops, data, training.
Orchestration (Ray) and tracking (MLflow) live in their own modules and import the core.
"""
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
