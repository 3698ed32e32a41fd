"""What a sweep's driver prints while Tune runs, and how often each trial ran again.

A line per trial epoch and per finished, stopped, failed or retried trial, each naming its trial.
Tune calls ``Progress`` (a ``ray.tune.Callback``, built lazily to keep Ray imports out of the
module's import); the driver prints the lines itself, so no worker's lines are folded together.
A trial Tune runs again after it lost its process or node is counted in ``retries.json`` of the
sweep's folder, which a resumed sweep adds to and the results table reads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import Config
from ..core.files import atomic_write_text
from ..core.messages import last_line
from .failures import lost_where

__all__ = ["progress_callback", "read_retries", "RETRIES_FILE"]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


RETRIES_FILE = "retries.json"  # trial id -> times it lost its process or node and ran again


def read_retries(folder: Path) -> dict[str, int]:
    """The retries of each trial of the sweep in ``folder`` (none recorded: empty)."""
    path = folder / RETRIES_FILE
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def progress_callback(cfg: Config, folder: Path):
    """The sweep's ``ray.tune.Callback``: progress lines, and the retries counted in ``folder``.
    Tune pickles its callbacks, so this one writes to stdout itself."""
    from ray.tune import Callback

    log = _say

    class Progress(Callback):
        def __init__(self):
            self.done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "tau" not in result and "epoch" in result and "trial_error" not in result:
                log(f"  trial {trial.trial_id} epoch {result['epoch']}/{cfg.train.epochs}: val "
                    f"{result.get('val_accuracy', float('nan')):.2%}  kernel rate "
                    f"{result.get('kernel_rate', float('nan')):.3f}  score {result['epoch_score']:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            m, params = trial.last_result or {}, trial.config
            values = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                              for k, v in params.items())
            if "trial_error" in m:
                log(f"[{self.done}/{cfg.sweep.trials}] trial {trial.trial_id} ({values}): failed ({m['trial_error']}; "
                    "an error of its own: not retried)")
            elif "tau" in m and "krr" in m:
                log(f"[{self.done}/{cfg.sweep.trials}] trial {trial.trial_id} ({values}): objective "
                    f"{m['objective']:.4f}  tau {m['tau']:.2f}  KRR {m['krr']:.3f}  module acc "
                    f"{m['module_accuracy']:.2%}  test {m['test_accuracy']:.2%}")
            else:
                log(f"[{self.done}/{cfg.sweep.trials}] trial {trial.trial_id} ({values}): stopped early at epoch "
                    f"{m.get('epoch', 0)}, val {m.get('val_accuracy', float('nan')):.2%}")

        def on_trial_recover(self, iteration, trials, trial, **info):
            retries = read_retries(folder)
            retries[trial.trial_id] = retries.get(trial.trial_id, 0) + 1
            atomic_write_text(folder / RETRIES_FILE, json.dumps(retries, indent=1))
            epoch = (trial.last_result or {}).get("epoch")
            log(f"  trial {trial.trial_id}: {_last_failure(trial)}; retry {retries[trial.trial_id]} of "
                f"{cfg.sweep.max_failures}: it resumes from its last finished epoch"
                + (f" ({epoch})" if epoch else ""))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            written = Path(trial.error_file) if trial.error_file else None  # local: not yet synced to storage
            reason = last_line(written.read_text()) if written and written.exists() else "no error file"
            log(f"[{self.done}/{cfg.sweep.trials}] trial {trial.trial_id}: failed ({reason})")

    return Progress()


def _last_failure(trial) -> str:
    """Where a trial Tune is about to retry was lost: its node, when the node it reported from is
    gone, else what the last failure in its error file says."""
    import ray

    node = (trial.last_result or {}).get("node_id")
    known = {n["NodeID"]: n for n in ray.nodes()}
    if node in known and not known[node].get("Alive"):
        return f"node {node[:8]} ({known[node].get('NodeManagerAddress', '?')}) lost"
    written = Path(trial.error_file) if trial.error_file else None
    if not written or not written.exists():
        return "its process or node lost"
    return lost_where(written.read_text().split("Failure # ")[-1])
