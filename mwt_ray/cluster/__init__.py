"""Everything that needs Ray: data-parallel training on Ray Train (``trainer``, ``worker``) and
reuse evaluation on a pool of actors (``reuse_pool``).

Ray itself is imported inside the functions that use it, so importing this package is cheap.
"""
from .reuse_pool import evaluate_reuse
from .trainer import DistributedTrainingError, check_cluster_resources, run_distributed, run_training
from .worker import loop_config, train_loop_per_worker

__all__ = ["DistributedTrainingError", "check_cluster_resources", "run_distributed", "run_training", "loop_config",
           "train_loop_per_worker", "evaluate_reuse"]
