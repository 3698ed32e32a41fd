"""Run a plan of training jobs side by side on one machine, in plain processes: no Ray, no MLflow.

    python experiments/parallel_runs.py experiments/gpu_plan.txt --parallel 10 --deadline 500 --out results/

Made for a lent GPU machine that has PyTorch but where Ray cannot be installed: each job is
``mwt_ray.jobs.train_in_process``, the very job ``python -m mwt_ray.train --num-workers 0`` runs, with
tracking off. Many small CIFAR jobs share one GPU well because each one is bound by kernel launches,
not by the GPU's arithmetic. Where Ray is installed, ``python -m mwt_ray.sweep`` with fractional
``gpus_per_trial`` is the way to do the same.

Each plan line is ``<name> <config.yaml> [key=value ...]`` (``#`` starts a comment). Jobs start in
the plan's order, ``--parallel`` at a time; a job still running at ``--deadline`` seconds is stopped
and reported as unfinished, and ``--resume`` continues it later from its last finished epoch. Writes
``<out>/runs/<name>/`` (the job's usual results) and ``<out>/<name>.log``, then prints one line per
job: its accuracy, KRR and time.

Bad input (a plan, config or argument that cannot work, an ``--out`` that cannot be written) stops
with one ``error:`` line on stderr and exit status 2 before anything is written; exit 1 means a job
was stopped or failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an argument error is one ``error:`` line and exit 2 like every other bad input,
    not the usage block argparse prints (``--help`` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())}\n")


def read_plan(path: Path) -> list[tuple[str, str, list[str]]]:
    try:  # os.stat first: opening a FIFO for reading waits for a writer forever, /dev/zero never ends
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = True  # the read below says why it cannot be read
    if not regular:
        raise ValueError(f"plan {str(path)!r} is not a regular file (a FIFO, a device or a folder)")
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"plan {str(path)!r} cannot be read ({error.strerror or error})") from None
    jobs, names = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) < 2 or any("=" not in w for w in words[2:]):
            raise ValueError(f"{path}:{number}: expected '<name> <config.yaml> [key=value ...]', got {line.strip()!r}")
        if words[0] in names:
            raise ValueError(f"{path}:{number}: job name {words[0]!r} is used twice")
        names.add(words[0])
        jobs.append((words[0], words[1], words[2:]))
    if not jobs:
        raise ValueError(f"plan {str(path)!r} holds no job")
    return jobs


def job_config(name: str, config: str, overrides: list[str], out: Path, extra: list[str]):
    from mwt_ray.config import load_config

    return load_config(
        config, overrides + extra + [f"name={name}", f"output_dir={out / 'runs'}", "tracking.enabled=false"]
    )


def run_one(name: str, config: str, overrides: list[str], out: Path, extra: list[str], resume: bool) -> None:
    from mwt_ray.jobs import train_in_process

    train_in_process(job_config(name, config, overrides, out, extra), resume=resume)


def run_plan(args) -> bool:
    """Every job of the plan; True when all of them finished."""
    from mwt_ray.core.files import writable_folder_error
    from mwt_ray.jobs.setup import load_data

    if args.parallel < 1:
        raise ValueError(f"--parallel is {args.parallel}; it must be at least 1")
    if not args.deadline > 0:  # also NaN: a deadline that has passed at the start would run no job at all
        raise ValueError(f"--deadline is {args.deadline:g}; it must be a positive number of seconds")
    # Checked here, before any job is planned: mkdir below would otherwise fail with an OSError, which
    # reads as a failed run (exit 1), not as the bad input it is. The probe leaves nothing behind.
    reason = writable_folder_error(args.out)
    if reason:
        raise ValueError(f"--out {str(args.out)!r} cannot be written ({reason})")
    jobs = read_plan(args.plan)
    loaded = set()  # every config is checked up front; each distinct data section is loaded (and cached) once
    for number, (name, config, overrides) in enumerate(jobs, 1):
        try:
            cfg = job_config(name, config, overrides, args.out, args.extra)
            data_key = cfg.data.model_dump_json()
            if data_key not in loaded:
                load_data(cfg)
                loaded.add(data_key)
        except ValueError as error:
            raise ValueError(f"plan job {number} ({name}): {error}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    start, waiting, running, done = time.monotonic(), list(jobs), {}, {}
    while waiting or running:
        while waiting and len(running) < args.parallel and time.monotonic() - start < args.deadline:
            name, config, overrides = waiting.pop(0)
            log = open(args.out / f"{name}.log", "w")
            command = [sys.executable, __file__, "--out", str(args.out), *sum((["--set", e] for e in args.extra), []),
                       *(["--resume"] if args.resume else []), "--job", name, config, *overrides]
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.monotonic(), log)
            print(f"[{time.monotonic() - start:6.0f}s] started {name}", flush=True)
        for name, (process, began, log) in list(running.items()):
            over = time.monotonic() - start >= args.deadline
            if process.poll() is None and not over:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
            del running[name]
            done[name] = (process.returncode, time.monotonic() - began)
            print(
                f"[{time.monotonic() - start:6.0f}s] {name}: exit {process.returncode} after {done[name][1]:.0f}s",
                flush=True,
            )
        if waiting and time.monotonic() - start >= args.deadline:
            for name, _, _ in waiting:
                done[name] = (None, 0.0)
            waiting = []
        time.sleep(1)
    print(f"\n{'job':<28} {'exit':>11} {'time':>6} {'test acc':>9} {'KRR':>6} {'cohesion':>9}")
    for name, _, _ in jobs:
        code, seconds = done[name]
        metrics = args.out / "runs" / name / "metrics.json"
        cells = ["-", "-", "-"]
        if code == 0 and metrics.exists():
            summary = json.loads(metrics.read_text())
            modules = summary.get("modules", {})
            cells = [f"{summary['final']['test_accuracy']:.2%}", f"{modules['krr']:.3f}" if modules else "-",
                     f"{modules['cohesion']:.3f}" if "cohesion" in modules else "-"]
        status = "not started" if code is None else str(code)
        print(f"{name:<28} {status:>11} {seconds:>5.0f}s {cells[0]:>9} {cells[1]:>6} {cells[2]:>9}")
    return all(code == 0 for code, _ in done.values())


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path, nargs="?")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (default 2)")
    parser.add_argument(
        "--deadline", type=float, default=float("inf"), help="stop unfinished jobs after this many seconds"
    )
    parser.add_argument("--out", type=Path, default=Path("parallel_runs"))
    parser.add_argument("--resume", action="store_true",
                        help="continue each job from its latest checkpoint under --out (one a deadline stopped, say)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="key=value added to every job")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)  # a child process: name config [key=value ...]
    args = parser.parse_args(argv)
    from mwt_ray.cli import run_command

    if args.job:
        return run_command(lambda: run_one(args.job[0], args.job[1], args.job[2:], args.out, args.extra, args.resume))
    if args.plan is None:
        parser.error("the plan file is required")
    finished = []
    code = run_command(lambda: finished.append(run_plan(args)))
    return code or (0 if finished[0] else 1)


if __name__ == "__main__":
    sys.exit(main())
