"""MLflow tracking (one run per job, exactly-once epochs, artifacts) and the plots it uploads."""
from .runs import ARTIFACTS, MlflowRun, flatten_params, open_run
from .store import TrackingError, check_server, check_store, default_tracking_uri, resolve_tracking_uri

__all__ = ["ARTIFACTS", "MlflowRun", "TrackingError", "check_server", "check_store", "default_tracking_uri",
           "flatten_params", "open_run", "resolve_tracking_uri"]
