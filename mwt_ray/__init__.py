"""mwt_ray: Modularizing while Training (MwT) for CNNs, at cluster scale on Ray.

Layers, each importing only those below it:

- ``mwt_ray.train`` / ``reuse`` / ``sweep``: command-line entry points (parse, run, exit status);
- ``mwt_ray.cluster``: everything that needs Ray (Train workers, Tune sweep, actor pools);
- ``mwt_ray.jobs``: what one process does with a config (data, device, a training job, reuse);
- ``mwt_ray.tracking``: MLflow runs and plots, used by jobs and cluster;
- ``mwt_ray.config``: the typed config;
- ``mwt_ray.core``: the method in pure PyTorch (no Ray, MLflow or pydantic).
"""
from .core.models import create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "register_model", "__version__"]
