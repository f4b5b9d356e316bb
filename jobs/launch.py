"""Submit a job (or a sweep as ONE job array) to SLURM through submitit; returns at once.

    python jobs/launch.py train                                       # default partition, CPU
    python jobs/launch.py --partition gpu --gpus_per_node 1 train --optim.lr 0.01
    python jobs/launch.py --partition gpu --gpus_per_node 2 train     # DDP: one task per GPU
    python jobs/launch.py --sweep optim.lr=0.1,0.03,0.01 --sweep optim.optimizer=sgd,adamw train
    python jobs/launch.py --sweep_file sweep.yaml --sweep_dir runs/lr-sweep train
    python jobs/launch.py --sweep_dir runs/lr-sweep --resume --sweep optim.lr=0.1,0.03,0.01 train
    python jobs/launch.py --dry-run train                             # write + print submit.sh only
    python jobs/launch.py --wait evaluate --checkpoint runs/<run>
    python jobs/launch.py --cluster local train                       # no SLURM: same job, locally
    python jobs/launch.py --shards 8 extract --checkpoint runs/<run> --stimuli /data/stimuli
    python jobs/status.py runs/lr-sweep                               # table + results.csv + plot

Flags before the job name are the launcher's and SlurmConfig's (`--help` lists them; a SLURM
YAML file goes in `--config_path`); flags after it are the job's own (`train --help`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _cli import run_job

from bonnerlab.cluster import JOBS, SlurmConfig, submit
from bonnerlab.config import parse_config
from bonnerlab.errors import ConfigError

LAUNCHER_FLAGS_WITHOUT_VALUE = {"--wait", "--dry-run", "--dry_run", "--resume", "-h", "--help"}


def launcher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/launch.py [launcher and SlurmConfig flags] JOB [job flags]",
                                add_help=False)
    p.add_argument("--wait", action="store_true", help="block until the job (or every sweep task) ends; print results")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="write and print the sbatch script; submit nothing")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a job config key; several --sweep flags form a grid")
    p.add_argument("--sweep_file", default="", help="YAML mapping of keys to value lists (a grid)")
    p.add_argument("--sweep_dir", default="", help="sweep folder (default runs/sweep-<date>-<time>-<job>)")
    p.add_argument("--resume", action="store_true", help="resubmit only the unfinished tasks of --sweep_dir")
    p.add_argument("--shards", type=int, default=0, metavar="N",
                   help="extract: split the stimuli over N array tasks that write one store")
    p.add_argument("--additional_parameters", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. exclusive=true or reservation=lab (repeatable)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """[top-level flags], job name, [job flags]: the job is the first job name not used as a value."""
    for i, token in enumerate(argv):
        if token in JOBS:
            prev = argv[i - 1] if i else ""
            if not prev.startswith("-") or prev in LAUNCHER_FLAGS_WITHOUT_VALUE:
                return argv[:i], token, argv[i + 1:]
    raise ConfigError(f"no job given: jobs/launch.py [flags] {{{','.join(JOBS)}}} [job flags] (--help)")


def _key_values(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--additional_parameters {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value) if value else True
    return out


def _without_submitted(argv: list[str]) -> list[str]:
    """A run folder's slurm.yaml as --config_path: drop its `submitted` record (not a field)."""
    import tempfile

    import yaml

    if "--config_path" not in argv[:-1]:
        return argv
    i = argv.index("--config_path") + 1
    path = Path(argv[i])
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(data, dict) or "submitted" not in data:
        return argv
    data.pop("submitted")
    tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with tmp:
        yaml.safe_dump(data, tmp)
    return [*argv[:i], tmp.name, *argv[i + 1:]]


def main(argv: list[str]) -> Any:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        launcher_parser().print_help()
        print()
        parse_config(SlurmConfig, ["--help"], prog="jobs/launch.py")
    top, kind, job_argv = split_argv(argv)
    opts, rest = launcher_parser().parse_known_args(top)
    slurm = parse_config(SlurmConfig, _without_submitted(rest), prog="jobs/launch.py")
    if opts.additional_parameters:
        slurm = SlurmConfig(**{**vars(slurm), "additional_parameters": {
            **slurm.additional_parameters, **_key_values(opts.additional_parameters)}})
    cfg = parse_config(JOBS[kind].load_config_class(), job_argv, prog=f"jobs/launch.py {kind}")
    if opts.shards:
        return launch_shards(kind, cfg, slurm, opts)
    if opts.sweep or opts.sweep_file:
        return launch_sweep(kind, cfg, slurm, opts)
    if opts.resume:
        raise ConfigError("--resume is for sweep folders (with --sweep_dir); a train run resumes with train --resume")
    return launch_one(kind, cfg, slurm, opts)


def launch_one(kind: str, cfg: Any, slurm: SlurmConfig, opts: argparse.Namespace) -> Any:
    t0 = time.perf_counter()
    sub = submit(kind, cfg, slurm, dry_run=opts.dry_run)
    if opts.dry_run:
        print(sub.script.read_text())
        print(f"dry run: wrote {sub.script}; nothing submitted")
        return None
    print(f"submitted {kind} job {sub.job_id} ({slurm.cluster}) in {time.perf_counter() - t0:.2f}s")
    print(f"  run folder: {sub.run_dir}")
    if sub.log_hint():
        print(f"  follow:     {sub.log_hint()}")
    print(f"  status:     python jobs/status.py {sub.run_dir}")
    if not opts.wait:
        return sub
    result = sub.job.results()[0]  # rank 0's; raises with the job's traceback when it failed
    print(json.dumps(result, default=str, indent=2))
    return result


def launch_sweep(kind: str, cfg: Any, slurm: SlurmConfig, opts: argparse.Namespace) -> Any:
    from bonnerlab.sweeps import (
        format_table,
        grid,
        load_sweep_file,
        parse_sweep_args,
        submit_sweep,
        sweep_status,
    )

    spec = parse_sweep_args(opts.sweep)
    if opts.sweep_file:
        for key, values in load_sweep_file(opts.sweep_file).items():
            if key in spec:
                raise ConfigError(f"{key} is swept both in --sweep and in {opts.sweep_file}")
            spec[key] = values
    points = grid(spec)
    sweep_dir = Path(opts.sweep_dir or Path(getattr(cfg, "runs_root", "runs")) /
                     f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{kind}")
    t0 = time.perf_counter()
    tasks = submit_sweep(kind, cfg, points, slurm, sweep_dir, resume=opts.resume, dry_run=opts.dry_run)
    if opts.dry_run:
        script = sweep_dir.resolve() / "submit.sh"
        print(script.read_text())
        print(f"dry run: {len(tasks)} tasks in {sweep_dir}; wrote {script}; nothing submitted")
        return tasks
    if not tasks:
        print(f"nothing to resubmit: every task of {sweep_dir} is done or still queued")
        return tasks
    arrays = sorted({t.job_id.split("_")[0] for t in tasks})
    print(f"submitted {len(tasks)} tasks as {len(arrays)} job array(s) {', '.join(arrays)} "
          f"in {time.perf_counter() - t0:.2f}s")
    print(f"  sweep folder: {sweep_dir.resolve()}")
    print(f"  status:       python jobs/status.py {sweep_dir}")
    if opts.wait:
        wait_for_tasks(tasks)
        print(format_table(sweep_status(sweep_dir)))
    return tasks


def launch_shards(kind: str, cfg: Any, slurm: SlurmConfig, opts: argparse.Namespace) -> Any:
    """`extract --shards N`: one job array whose tasks write disjoint chunk ranges of ONE store."""
    if kind != "extract":
        raise ConfigError(f"--shards is for extract jobs, not {kind}")
    if opts.shards < 1:
        raise ConfigError(f"--shards must be >= 1; got {opts.shards}")
    if opts.sweep or opts.sweep_file:
        raise ConfigError("--shards cannot be combined with --sweep")
    from bonnerlab.config import default_store_name

    # every task must agree on the store before any of them starts: the name a plain extract uses
    output = cfg.output or default_store_name(cfg)
    output = str(Path(output).resolve())
    points = [{"shard_index": i, "num_shards": opts.shards, "output": output} for i in range(opts.shards)]
    sweep_dir = Path(opts.sweep_dir or Path("runs") / f"extract-{time.strftime('%Y%m%d-%H%M%S')}")
    opts.sweep, opts.sweep_file, opts.sweep_dir = [], "", str(sweep_dir)
    from bonnerlab.sweeps import submit_sweep

    t0 = time.perf_counter()
    tasks = submit_sweep(kind, cfg, points, slurm, sweep_dir, resume=opts.resume, dry_run=opts.dry_run)
    if opts.dry_run:
        print((sweep_dir.resolve() / "submit.sh").read_text())
        print(f"dry run: {opts.shards} shards of {output}; nothing submitted")
        return tasks
    print(f"submitted {len(tasks)} extraction shard(s) in {time.perf_counter() - t0:.2f}s, writing {output}")
    print(f"  folder: {sweep_dir.resolve()}  (the last shard to finish finalizes the store)")
    print(f"  status: python jobs/status.py {sweep_dir}")
    if opts.wait:
        wait_for_tasks(tasks)
        for task in tasks:
            if task.job is not None:
                task.job.result()  # raises with the task's traceback when it failed
    return tasks


def wait_for_tasks(tasks: list[Any], poll_s: float = 2.0) -> None:
    """Block until every task has a final result (requeued tasks are waited for again)."""
    import subprocess

    pending = [t for t in tasks if t.job is not None]
    while pending:
        pending = [t for t in pending if not t.job.done()]
        if pending:
            time.sleep(poll_s)
    # a task's result lands a moment before SLURM marks it finished: let squeue catch up
    arrays = sorted({t.job_id.split("_")[0] for t in tasks if t.job_id and "_" in t.job_id})
    for _ in range(30):
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(arrays)],
                             capture_output=True, text=True) if arrays else None
        if out is None or out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(1)


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
