"""Submit a job (or a sweep as ONE job array) to SLURM through submitit; returns at once.

    python jobs/launch.py train                                       # default partition, CPU
    python jobs/launch.py --partition gpu --gpus_per_node 1 train --optim.lr 0.01
    python jobs/launch.py --partition gpu --gpus_per_node 2 train     # DDP: one task per GPU
    python jobs/launch.py --sweep optim.lr=0.1,0.03,0.01 --sweep optim.optimizer=sgd,adamw train
    python jobs/launch.py --zip optim.lr=0.1,0.01 --zip optim.weight_decay=1e-4,1e-5 --sweep seed=0,1 train
    python jobs/launch.py --sweep_file sweep.yaml --sweep_dir runs/lr-sweep train
    python jobs/launch.py --sweep_dir runs/lr-sweep --task 0 --cluster local --sweep optim.lr=0.1,0.01 train
    python jobs/launch.py --sweep_dir runs/lr-sweep --resume          # only what failed for a retryable reason
    python jobs/launch.py --sweep_dir runs/lr-sweep --resume --retry_failed   # code errors too (after a fix)
    python jobs/launch.py --dry-run train                             # write + print submit.sh only
    python jobs/launch.py --wait evaluate --checkpoint runs/<run>
    python jobs/launch.py --cluster local train                       # no SLURM: same job, locally
    python jobs/launch.py --shards 8 extract --checkpoint runs/<run> --stimuli /data/stimuli
    python jobs/status.py runs/lr-sweep                               # table, results.csv, plot, report.html

Flags before the job name are the launcher's (LaunchConfig) and the SLURM request's (SlurmConfig);
flags after it are the job's own (`train --help`). `--config_path FILE` before the job name takes a
YAML file of both kinds of keys (`partition: gpu`, `sweep: [optim.lr=0.1,0.01]`; a run's
slurm.yaml works as is); flags win over it. `--resume` needs no job name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from _cli import run_job

from bonnerlab.cluster.registry import JOBS
from bonnerlab.config import LaunchConfig, SlurmConfig, from_dict, parse_config, to_dict
from bonnerlab.errors import ConfigError


def launcher_parser() -> argparse.ArgumentParser:
    """argparse flags generated from LaunchConfig's fields (their comments are the help)."""
    from simple_parsing.docstring import get_attribute_docstring

    p = argparse.ArgumentParser(prog="jobs/launch.py [launcher and SlurmConfig flags] JOB [job flags]",
                                add_help=False, allow_abbrev=False)
    hints = typing.get_type_hints(LaunchConfig)
    for f in dataclasses.fields(LaunchConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_text = get_attribute_docstring(LaunchConfig, f.name).comment_above
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        elif typing.get_origin(kind) is list:
            p.add_argument(*names, dest=f.name, action="append", default=[], metavar="KEY=VALUES", help=help_text)
        else:
            p.add_argument(*names, dest=f.name, type=kind, default=f.default, help=help_text)
    return p


def launcher_flags_without_value() -> set[str]:
    hints = typing.get_type_hints(LaunchConfig)
    flags = {"-h", "--help"}
    for f in dataclasses.fields(LaunchConfig):
        if hints[f.name] is bool:
            flags |= {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
    return flags


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """[top-level flags], job name, [job flags]: the job is the first job name not used as a value."""
    without_value = launcher_flags_without_value()
    for i, token in enumerate(argv):
        if token in JOBS:
            prev = argv[i - 1] if i else ""
            if not prev.startswith("-") or prev in without_value:
                return argv[:i], token, argv[i + 1:]
    if "--resume" in argv:  # a sweep's job comes from its sweep.yaml
        return argv, "", []
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


def _split_config_file(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """--config_path YAML: SlurmConfig keys stay in the file (a run's slurm.yaml works as is, its
    `submitted` record dropped); LaunchConfig keys (sweep, zip, wait, ...) come back apart."""
    import tempfile

    import yaml

    from bonnerlab.config import load_yaml

    if "--config_path" not in argv[:-1]:
        return argv, {}
    i = argv.index("--config_path") + 1
    data = load_yaml(argv[i])
    # additional_parameters is SlurmConfig's mapping in a file (KEY=VALUE strings only on the command line)
    launch_keys = {f.name for f in dataclasses.fields(LaunchConfig)} - {f.name for f in dataclasses.fields(SlurmConfig)}
    launch = {k: data.pop(k) for k in list(data) if k in launch_keys}
    if not launch and "submitted" not in data:
        return argv, {}
    data.pop("submitted", None)
    tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with tmp:
        yaml.safe_dump(data, tmp)
    return [*argv[:i], tmp.name, *argv[i + 1:]], launch


def parse_launch(top: list[str]) -> tuple[LaunchConfig, SlurmConfig, bool]:
    """(launcher options, SLURM request, whether any SLURM flag was given).

    One YAML file (--config_path) may hold both kinds of keys; flags win over it (a list flag
    given on the command line replaces the file's list).
    """
    namespace, rest = launcher_parser().parse_known_args(top)
    rest, from_file = _split_config_file(rest)
    given = {k: v for k, v in vars(namespace).items() if v != getattr(LaunchConfig(), k)}
    opts = from_dict(LaunchConfig, {**from_file, **given})
    slurm = parse_config(SlurmConfig, rest, prog="jobs/launch.py")
    if opts.additional_parameters:
        slurm = from_dict(SlurmConfig, {**to_dict(slurm), "additional_parameters": {
            **slurm.additional_parameters, **_key_values(opts.additional_parameters)}})
    return opts, slurm, bool(rest) or bool(opts.additional_parameters)


def main(argv: list[str]) -> Any:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        launcher_parser().print_help()
        print()
        parse_config(SlurmConfig, ["--help"], prog="jobs/launch.py")
    top, kind, job_argv = split_argv(argv)
    opts, slurm, slurm_given = parse_launch(top)
    if opts.resume and (opts.sweep_dir or not kind):
        return launch_retry(kind, slurm if slurm_given else None, opts)
    if opts.resume:
        raise ConfigError("--resume is for sweep folders (with --sweep_dir); a train run resumes with train --resume")
    cfg = parse_config(JOBS[kind].load_config_class(), job_argv, prog=f"jobs/launch.py {kind}")
    if opts.shards:
        return launch_shards(kind, cfg, slurm, opts)
    if opts.sweep or opts.zip or opts.sweep_file:
        return launch_sweep(kind, cfg, slurm, opts)
    if opts.task >= 0:
        raise ConfigError("--task picks a task of a sweep: give the sweep's --sweep/--zip/--sweep_file too")
    return launch_one(kind, cfg, slurm, opts)


def launch_one(kind: str, cfg: Any, slurm: SlurmConfig, opts: LaunchConfig) -> Any:
    from bonnerlab.cluster.submit import submit

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


def sweep_points(opts: LaunchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The sweep's points from --sweep, --zip and --sweep_file, and the spec they came from."""
    from bonnerlab.cluster.sweeps import combine, load_sweep_file, parse_sweep_args, parse_zip_args

    grid_spec, zip_spec = parse_sweep_args(opts.sweep), parse_zip_args(opts.zip)
    if opts.sweep_file:
        file_grid, file_zip = load_sweep_file(opts.sweep_file)
        for key in [*file_grid, *file_zip]:
            if key in grid_spec or key in zip_spec:
                raise ConfigError(f"{key} is swept both on the command line and in {opts.sweep_file}")
        grid_spec, zip_spec = {**grid_spec, **file_grid}, {**zip_spec, **file_zip}
    return combine(grid_spec, zip_spec), {"grid": grid_spec, "zip": zip_spec}


def launch_sweep(kind: str, cfg: Any, slurm: SlurmConfig, opts: LaunchConfig) -> Any:
    from bonnerlab.cluster.status import format_table, sweep_status
    from bonnerlab.cluster.sweeps import submit_sweep

    points, spec = sweep_points(opts)
    sweep_dir = Path(opts.sweep_dir or Path(getattr(cfg, "runs_root", "runs")) /
                     f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{kind}")
    t0 = time.perf_counter()
    tasks = submit_sweep(kind, cfg, points, slurm, sweep_dir, dry_run=opts.dry_run, task=opts.task, spec=spec)
    if opts.dry_run:
        script = sweep_dir.resolve() / "submit.sh"
        print(script.read_text())
        print(points_table(points, [t.index for t in tasks]))
        print(f"dry run: {len(tasks)} tasks in {sweep_dir}; wrote {script}; nothing submitted")
        return tasks
    arrays = sorted({t.job_id.split("_")[0] for t in tasks})
    what = f"task {opts.task}" if opts.task >= 0 else f"{len(tasks)} tasks"
    print(f"submitted {what} as {len(arrays)} job array(s) {', '.join(arrays)} ({slurm.cluster}) "
          f"in {time.perf_counter() - t0:.2f}s")
    print(f"  sweep folder: {sweep_dir.resolve()}")
    print(f"  status:       python jobs/status.py {sweep_dir}")
    # one task on this machine is a trial: wait for it, as `jobs/train.py` would
    if opts.wait or (opts.task >= 0 and slurm.cluster != "slurm"):
        wait_for_tasks(tasks)
        print(format_table(sweep_status(sweep_dir)))
    return tasks


def points_table(points: list[dict[str, Any]], indices: list[int]) -> str:
    import pandas as pd

    return pd.DataFrame.from_records([{"task": i, **points[i]} for i in indices]).to_string(index=False)


def launch_retry(kind: str, slurm: SlurmConfig | None, opts: LaunchConfig) -> Any:
    from bonnerlab.cluster.status import folder_kind, format_table, read_sweep_yaml, sweep_status
    from bonnerlab.cluster.sweeps import retry_sweep

    if not opts.sweep_dir:
        raise ConfigError("--resume needs --sweep_dir DIR (the sweep or run folder to resubmit)")
    sweep_dir = Path(opts.sweep_dir)
    if sweep_dir.exists() and kind and folder_kind(sweep_dir) == "sweep" and read_sweep_yaml(sweep_dir).get("job") != kind:
        raise ConfigError(f"{sweep_dir} is a {read_sweep_yaml(sweep_dir).get('job')} sweep, not {kind}")
    points = sweep_points(opts)[0] if (opts.sweep or opts.zip or opts.sweep_file) else None
    t0 = time.perf_counter()
    plan = retry_sweep(sweep_dir, slurm, opts.retry_failed, opts.max_retries, opts.retry_mem_factor, points,
                       opts.task, opts.dry_run)
    for note in plan.notes:
        print(f"  {note}")
    if not plan.tasks:
        print(f"nothing to resubmit: no task of {sweep_dir} failed for a retryable reason")
        return plan.tasks
    if opts.dry_run:
        print((sweep_dir.resolve() / "submit.sh").read_text())
        print(f"dry run: would resubmit tasks {[t.index for t in plan.tasks]}; nothing submitted")
        return plan.tasks
    arrays = sorted({t.job_id.split("_")[0] for t in plan.tasks})
    print(f"submitted {len(plan.tasks)} tasks as {len(arrays)} job array(s) {', '.join(arrays)} "
          f"in {time.perf_counter() - t0:.2f}s: tasks {', '.join(str(t.index) for t in plan.tasks)}")
    for change in plan.changes:
        print(f"  {change}")
    if opts.wait:
        wait_for_tasks(plan.tasks)
        print(format_table(sweep_status(sweep_dir)))
    return plan.tasks


def launch_shards(kind: str, cfg: Any, slurm: SlurmConfig, opts: LaunchConfig) -> Any:
    """`extract --shards N`: one job array whose tasks write disjoint chunk ranges of ONE store."""
    if kind != "extract":
        raise ConfigError(f"--shards is for extract jobs, not {kind}")
    if opts.sweep or opts.zip or opts.sweep_file:
        raise ConfigError("--shards cannot be combined with --sweep or --zip")
    from bonnerlab.cluster.sweeps import submit_sweep
    from bonnerlab.config import default_store_name

    # every task must agree on the store before any of them starts: the name a plain extract uses
    output = cfg.output or default_store_name(cfg)
    output = str(Path(output).resolve())
    points = [{"shard_index": i, "num_shards": opts.shards, "output": output} for i in range(opts.shards)]
    sweep_dir = Path(opts.sweep_dir or Path("runs") / f"extract-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    tasks = submit_sweep(kind, cfg, points, slurm, sweep_dir, dry_run=opts.dry_run, task=opts.task)
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
    from bonnerlab.cluster import slurm_cli
    from bonnerlab.errors import ClusterError

    pending = [t for t in tasks if t.job is not None]
    while pending:
        pending = [t for t in pending if not t.job.done()]
        if pending:
            time.sleep(poll_s)
    # a task's result lands a moment before SLURM marks it finished: let squeue catch up
    ids = sorted({t.job_id for t in tasks if t.job_id and type(t.job).__name__ == "SlurmJob"})
    for _ in range(30):
        try:
            if not ids or not slurm_cli.active_ids(ids):
                return
        except ClusterError:
            return
        time.sleep(1)


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
