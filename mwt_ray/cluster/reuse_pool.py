"""Reuse evaluation at cluster scale: every sampled M-class sub-task on a pool of Ray actors.

    tables = evaluate_reuse("runs/mwt/checkpoint.pt", "runs/std/checkpoint.pt", cfg)   # -> ReuseTables
    python -m mwt_ray.reuse --run <MLflow run id | checkpoint> --standard <run id | checkpoint>

``evaluate_reuse`` plans the evaluation (``jobs.plan_reuse``: every check on the input, the
sub-tasks sampled per M), sizes a pool of ``ReuseActor``s (``reuse.num_actors``, or as many as the
cluster can place with ``reuse.cpus_per_actor`` / ``reuse.gpus_per_actor`` each), and hands out
one sub-task per call with ``ray.util.ActorPool``. Each actor loads the data and the models once,
from storage (a checkpoint path or the MLflow run's artifact), sets torch's thread count to its
CPUs (a reused worker process keeps the count of its first import) and evaluates many sub-tasks.

Failures: a sub-task whose actor dies (its process killed, its node lost) runs again on a new
actor, placed by Ray on any node with room (its ``__init__`` loads everything again, from storage),
so the table holds every sub-task exactly once (checked: the evaluation fails with ``JobFailed``
otherwise); a sub-task may lose its actor ``reuse.max_restarts`` times, and the next loss fails the
evaluation naming it. Each fine-tuning step reaches the hook point ``reuse.fine_tune_step``
(``core.hooks``, with the sub-task's ``index`` and the ``step``), where a test kills an actor.

Results: a progress line per finished sub-task; ``ReuseTables`` (tracking.reuse_report) written
as CSV, Markdown and a PNG into the output folder and logged to the MLflow run evaluated (the
given run, the run of ``--run``, or a new ``<name>-reuse`` run when the checkpoint names none).
``reuse.num_actors=0`` runs the same evaluation in this process without Ray.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..config import Config
from ..core.hooks import hook_at
from ..core.messages import last_line
from ..jobs import JobFailed, SetupError
from ..jobs.reuse_job import ReusePlan, SubtaskEvaluator, format_row, plan_reuse, resolve_reference
from ..tracking.reuse_report import ReuseTables, build_tables, log_report, write_report
from .capacity import cluster_room
from .failures import lost_where
from .ray_output import ray_output_to
from .ray_session import ray_session
from .runtime_env import worker_runtime_env
from .shared_storage import check_job_places, check_shared_places, job_places

__all__ = ["evaluate_reuse", "run_plan", "ReuseActor", "pool_size"]


class ReuseActor:
    """One pool member (wrapped with ``ray.remote`` at run time): loads once, evaluates many."""

    def __init__(self, spec: dict, threads: int, device: str):
        import torch

        torch.set_num_threads(max(1, threads))
        self.evaluator = SubtaskEvaluator(spec, device)

    def evaluate(self, index: int, classes: list[int]) -> dict:
        hook = hook_at("reuse.fine_tune_step", index=index)
        row = self.evaluator.evaluate(index, classes, on_step=(lambda step: hook(step=step)) if hook else None)
        import ray
        import torch

        return {**row, "threads": torch.get_num_threads(), "node": ray.get_runtime_context().get_node_id()}

    def pid(self) -> int:
        return os.getpid()


def pool_size(cfg: Config, num_tasks: int) -> int:
    """``reuse.num_actors`` (checked against the cluster: Ray would wait forever for an actor it
    cannot place), or as many as fit, never more than there are sub-tasks."""
    r = cfg.reuse
    room = cluster_room(r.cpus_per_actor, r.gpus_per_actor)
    if r.num_actors is not None and r.num_actors > room.count:
        raise SetupError(f"reuse.num_actors {r.num_actors} with {room.asked} each, but the Ray cluster has "
                         f"{room.have}: room for {room.count}; lower reuse.num_actors or reuse.cpus_per_actor, "
                         "or add nodes")
    if room.count < 1:
        raise SetupError(f"the Ray cluster has {room.have}: no room for one reuse actor with {room.asked}; "
                         "lower reuse.cpus_per_actor / reuse.gpus_per_actor")
    return min(r.num_actors or room.count, num_tasks)


def run_plan(plan: ReusePlan, num_actors: int, log: Callable[[str], None]) -> list[dict]:
    """Evaluate every sub-task of ``plan`` on ``num_actors`` actors (Ray must be initialised);
    returns one row per sub-task, in plan order.

    The driver hands out the sub-tasks itself (not Ray's task retries: an actor on a lost node
    answers ``ActorUnavailableError`` at once, and Ray spends every retry in milliseconds, before
    a restart could place the actor elsewhere). A sub-task whose actor died (its process killed,
    its node lost) goes back to the front of the queue and its actor is replaced by a new one,
    which Ray places on any node with room; a sub-task may lose its actor ``reuse.max_restarts``
    times, and the next loss fails the evaluation naming it. An error of the sub-task itself
    (a bug, bad numerics) is not retried."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pool = _Pool(plan, num_actors)
    queue = list(range(len(plan.tasks)))
    losses: dict[int, int] = {}
    rows: dict[int, dict] = {}
    try:
        while queue or pool.running:
            pool.hand_out(queue)
            actor, index, done = pool.next_done()
            try:
                row = ray.get(done)
            except RayActorError as error:
                losses[index] = losses.get(index, 0) + 1
                _lost_actor(plan, index, losses[index], len(rows), lost_where(error), log)
                pool.replace(actor)
                queue.insert(0, index)
                continue
            except RayTaskError as error:
                raise JobFailed(f"reuse evaluation failed after {len(rows)}/{len(plan.tasks)} sub-tasks: sub-task "
                                f"{index} (classes {plan.tasks[index]}): {last_line(error)}") from error
            if index in rows:
                raise JobFailed(f"sub-task {index} was evaluated twice")
            rows[index] = row
            pool.idle.append(actor)
            log(format_row(row, len(rows), len(plan.tasks)))
    finally:
        pool.close()
    missing = sorted(set(range(len(plan.tasks))) - set(rows))
    if missing:
        raise JobFailed(f"sub-tasks {missing} have no result")
    return [rows[i] for i in range(len(plan.tasks))]


class _Pool:
    """The actors of ``run_plan``: idle ones, and the calls running on the others."""

    def __init__(self, plan: ReusePlan, size: int):
        import ray

        r = plan.cfg.reuse
        self.plan = plan
        self.device = "cuda" if r.gpus_per_actor > 0 else "cpu"
        self.remote = ray.remote(ReuseActor).options(num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor,
                                                     runtime_env=worker_runtime_env())
        self.actors = [self._new_actor() for _ in range(size)]
        self.idle = list(self.actors)
        self.running: dict = {}  # object ref -> (actor, sub-task index)

    def _new_actor(self):
        return self.remote.remote(self.plan.spec, int(self.plan.cfg.reuse.cpus_per_actor), self.device)

    def hand_out(self, queue: list[int]) -> None:
        """One sub-task from the front of ``queue`` to each idle actor."""
        while self.idle and queue:
            actor, index = self.idle.pop(), queue.pop(0)
            self.running[actor.evaluate.remote(index, self.plan.tasks[index])] = (actor, index)

    def next_done(self):
        """(actor, sub-task index, object ref) of the next call to finish, however it finished."""
        import ray

        (done,), _ = ray.wait(list(self.running), num_returns=1)
        actor, index = self.running.pop(done)
        return actor, index, done

    def replace(self, actor) -> None:
        """A new idle actor instead of ``actor``, which lost its process (Ray places the new one on
        any node with room)."""
        import ray

        ray.kill(actor, no_restart=True)
        self.actors[self.actors.index(actor)] = replacement = self._new_actor()
        self.idle.append(replacement)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _lost_actor(plan: ReusePlan, index: int, losses: int, finished: int, where: str, log) -> None:
    """Say that sub-task ``index`` lost its actor (``losses`` times now), or fail the evaluation
    when that is more than ``reuse.max_restarts``."""
    r = plan.cfg.reuse
    if losses > r.max_restarts:
        raise JobFailed(f"reuse evaluation failed after {finished}/{len(plan.tasks)} sub-tasks: sub-task "
                        f"{index} (classes {plan.tasks[index]}) lost its actor {losses} time(s), "
                        f"the last time {where} (reuse.max_restarts={r.max_restarts})") from None
    log(f"reuse: sub-task {index} (classes {plan.tasks[index]}) lost its actor ({where}); it runs again "
        f"on a new actor (restart {losses} of {r.max_restarts})")


def _run_in_process(plan: ReusePlan, log) -> list[dict]:
    import torch

    evaluator = SubtaskEvaluator(plan.spec)
    rows = []
    for index, task in enumerate(plan.tasks):
        rows.append({**evaluator.evaluate(index, task), "threads": torch.get_num_threads()})
        log(format_row(rows[-1], index + 1, len(plan.tasks)))
    return rows


def _target_run(plan: ReusePlan, mlflow_run, log: Callable[[str], None] = lambda line: None):
    """The MLflow run the results go to: ``mlflow_run`` (an MlflowRun, its info dict, or a run id in
    the config's store), else the run evaluated, else None (a new run is opened later).

    Checked here, before anything is evaluated, that the run is in its store: a checkpoint copied
    away from its MLflow store names a run the store does not hold, and that failed only after the
    whole evaluation. Such a run (the checkpoint's, found by default) means a new run, said in one
    line; a run given explicitly that is not there is bad input (SetupError)."""
    from ..tracking import MlflowRun, check_store
    from ..tracking.store import run_exists

    explicit = mlflow_run is not None
    if mlflow_run is None:
        if plan.mlflow_run is None or not plan.cfg.tracking.enabled:
            return None
        target = MlflowRun.from_info(plan.mlflow_run)
    elif isinstance(mlflow_run, MlflowRun):
        target = mlflow_run
    elif isinstance(mlflow_run, dict):
        target = MlflowRun.from_info(mlflow_run)
    else:
        spec = resolve_reference(str(mlflow_run), plan.cfg.tracking.tracking_uri, "MLflow run to log to")
        if "mlflow" not in spec:
            raise SetupError(f"MLflow run to log to {mlflow_run!r} is not a run id")
        target = MlflowRun.from_info(spec["mlflow"])
    check_store(target.tracking_uri)
    if run_exists(target.tracking_uri, target.run_id):
        return target
    if explicit:
        raise SetupError(f"MLflow run to log to {target.run_id} is not in {target.tracking_uri} (or it is deleted); "
                         "pass a run of that store or set tracking.tracking_uri")
    log(f"MLflow: run {target.run_id} of the checkpoint is not in {target.tracking_uri} (a checkpoint copied from "
        "another store?); the results will go to a new run")
    return None


def evaluate_reuse(modular_checkpoint: str, standard_checkpoint: str | None = None, cfg: Config | None = None,
                   mlflow_run=None, *, tau: float | None = None, overrides: list[str] | None = None,
                   log: Callable[[str], None] | None = print) -> ReuseTables:
    """Evaluate the modules of ``modular_checkpoint`` on every sampled sub-task; return the tables.

    ``modular_checkpoint`` / ``standard_checkpoint``: a checkpoint file, a run folder, or an MLflow
    run id (``standard_checkpoint=None``: no M-ACC columns). ``cfg``: its ``reuse.*`` settings (and
    data / tracking / output_dir) apply; model and training settings always come from the
    checkpoint (``None``: the checkpoint's own config). ``mlflow_run``: where the tables and plots
    are logged (an ``MlflowRun``, its ``info()`` dict or a run id); by default the run evaluated,
    or a new ``<name>-reuse`` run when tracking is on and the checkpoint names none. ``tau``: module
    masks rebuilt at this tau from the stored kernel counts (default: the checkpoint's tau).
    ``overrides``: ``--set`` items on top. Bad input raises ``SetupError`` / ``ConfigError``
    (``ValueError``) before anything is written; a failure while evaluating raises ``JobFailed``.
    """
    log = log or (lambda line: None)
    plan = plan_reuse(modular_checkpoint, standard_checkpoint, cfg, overrides, tau=tau)
    places = {"reuse.output_dir": str(plan.out_dir)}
    check_job_places(plan.cfg, **places)
    target = _target_run(plan, mlflow_run, log)
    if target is None and plan.cfg.tracking.enabled:
        from ..tracking import check_store, resolve_tracking_uri

        check_store(resolve_tracking_uri(plan.cfg.tracking.tracking_uri))
    started = time.perf_counter()
    if plan.cfg.reuse.num_actors == 0:
        log(f"reuse: {len(plan.tasks)} sub-tasks in this process")
        rows = _run_in_process(plan, log)
    else:
        with ray_output_to(plan.out_dir / "ray_output.log"), ray_session(dashboard=False, worker_output=False):
            n = pool_size(plan.cfg, len(plan.tasks))
            check_shared_places(job_places(plan.cfg, **places))  # the actors load and write from any node
            log(f"reuse: {len(plan.tasks)} sub-tasks on {n} actor(s) with {plan.cfg.reuse.cpus_per_actor:g} CPU"
                + (f" and {plan.cfg.reuse.gpus_per_actor:g} GPU" if plan.cfg.reuse.gpus_per_actor else "") + " each")
            rows = run_plan(plan, n, log)
    tables = build_tables(rows)
    title = (f"{plan.spec['architecture']['name']} width {plan.spec['architecture']['width']:g} on "
             f"{plan.cfg.data.name}, tau {plan.cfg.modularize.tau:g}")
    files = write_report(tables, plan.out_dir, title)
    log(f"{len(rows)} sub-tasks in {time.perf_counter() - started:.1f} s; wrote {', '.join(p.name for p in files)} "
        f"to {plan.out_dir}")
    log(tables.summary.to_string(float_format=lambda v: f"{v:.4g}"))
    if target is not None or plan.cfg.tracking.enabled:  # a run given explicitly is logged to in any case
        _log_to_mlflow(plan, target, files, tables, log)
    return tables


def _log_to_mlflow(plan: ReusePlan, target, files, tables: ReuseTables, log) -> None:
    settings = {"modular": plan.spec["modular"], "standard": plan.spec["standard"], "tau": plan.cfg.modularize.tau,
                "reuse": plan.cfg.reuse.model_dump(mode="json"), "subtasks": plan.tasks}
    if target is not None:
        log_report(target, files, tables, settings)
        log(f"MLflow: logged the reuse tables to run {target.run_id}")
        return
    from ..tracking import open_run

    cfg = plan.cfg.model_copy(deep=True)
    cfg.name = f"{cfg.name}-reuse"
    with open_run(cfg, tags={"mwt.reuse_of": str(plan.spec["modular"])}, log=log) as tracked:
        log_report(tracked, files, tables, settings)
