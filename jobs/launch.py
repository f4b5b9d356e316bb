"""Submit a job (or a sweep as ONE job array) to SLURM through submitit; returns at once.

    python jobs/launch.py train                                       # default partition, CPU
    python jobs/launch.py --partition gpu --gpus_per_node 1 train --optim.lr 0.01
    python jobs/launch.py --partition gpu --gpus_per_node 2 train     # DDP: one task per GPU
    python jobs/launch.py --sweep optim.lr=0.1,0.03,0.01 --sweep optim.optimizer=sgd,adamw train
    python jobs/launch.py --zip optim.lr=0.1,0.01 --zip optim.weight_decay=1e-4,1e-5 \
        --sweep seed=0,1 train
    python jobs/launch.py --sweep_file sweep.yaml --sweep_dir runs/lr-sweep train
    python jobs/launch.py --sweep_dir runs/lr-sweep --task 0 --cluster local \
        --sweep optim.lr=0.1,0.01 train
    python jobs/launch.py --sweep_dir runs/lr-sweep --resume          # what failed retryably
    python jobs/launch.py --sweep_dir runs/lr-sweep --resume --retry_failed   # code errors too
    python jobs/launch.py --dry-run train                             # write + print submit.sh only
    python jobs/launch.py --wait evaluate --checkpoint runs/<run>
    python jobs/launch.py --cluster local train                       # no SLURM: same job, locally
    python jobs/launch.py --shards 8 extract --checkpoint runs/<run> --stimuli /data/stimuli
    python jobs/launch.py analyze --store acts/x.zarr --layers layer3 avgpool   # a task per layer
    python jobs/launch.py --after runs/extract-<date> analyze --store acts/x.zarr --layers layer3
    python jobs/launch.py --after 1234 extract --checkpoint runs/<run>   # once job 1234 succeeded
    python jobs/status.py runs/lr-sweep                               # table, plot, report.html

Flags before the job name are the launcher's (LaunchConfig) and the SLURM request's (SlurmConfig);
flags after it are the job's own (`train --help`). `--config_path FILE` before the job name takes a
YAML file of both kinds of keys (`partition: gpu`, `sweep: ["optim.lr=0.1,0.01"]`; a run's
slurm.yaml works as is); flags win over it. `--resume` needs no job name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from _cli import FlagParser, parse, run_job

from bonnerlab.cluster.registry import JOBS
from bonnerlab.config import (
    AnalyzeConfig,
    EvaluateConfig,
    ExtractConfig,
    LaunchConfig,
    SlurmConfig,
    TrainConfig,
    from_dict,
    load_config,
    load_yaml,
)
from bonnerlab.errors import ConfigError
from bonnerlab.runs import SweepPaths, timestamp


@dataclasses.dataclass
class Launch:
    """One launcher command line: defaults < the --config_path files < flags."""

    slurm: SlurmConfig
    opts: LaunchConfig
    # train, evaluate, extract or analyze; "" for `--resume` alone (the sweep's job comes from
    # its sweep.yaml)
    kind: str = ""
    job: TrainConfig | EvaluateConfig | ExtractConfig | AnalyzeConfig | None = None
    # whether a SLURM value came from a flag or a file: --resume otherwise reuses each task's own
    slurm_given: bool = False


# a file's `additional_parameters` is SlurmConfig's mapping; KEY=VALUE strings are for flags only
SLURM_KEYS = {f.name for f in dataclasses.fields(SlurmConfig)}
LAUNCH_KEYS = {f.name for f in dataclasses.fields(LaunchConfig)} - SLURM_KEYS


def launch_parser(defaults: Launch | None) -> FlagParser:
    """The launcher's flags (LaunchConfig, SlurmConfig), then one subcommand per job of JOBS.

    `defaults=None` is the first pass: nothing has a default (argparse.SUPPRESS), so the
    namespace holds only what the command line gave, and no config is built or checked yet.
    """
    probe = defaults is None
    parser = FlagParser(
        prog="jobs/launch.py",
        description=__doc__,
        add_help=not probe,
        usage=f"jobs/launch.py [launcher and SlurmConfig flags] {{{','.join(JOBS)}}} [job flags]",
    )
    parser.add_argument(
        "--config_path",
        metavar="PATH",
        default=None,
        help="YAML file of SlurmConfig and LaunchConfig keys (a run's slurm.yaml works as is)",
    )
    parser.add_arguments(
        SlurmConfig, dest="slurm", default=argparse.SUPPRESS if probe else defaults.slurm
    )
    parser.add_arguments(
        LaunchConfig, dest="launch", default=argparse.SUPPRESS if probe else defaults.opts
    )
    # argparse's subparsers, not a simple-parsing `subparsers` field: a field's subcommand flags
    # are prefixed with the field's name (`train --job.optim.lr`), the launcher's with theirs
    subcommands = parser.add_subparsers(
        title="jobs",
        dest="kind",
        parser_class=FlagParser,
        metavar=f"{{{','.join(JOBS)}}}",
        required=False,
    )
    for kind, spec in JOBS.items():
        cls = spec.load_config_class()
        job = subcommands.add_parser(
            kind,
            help=(cls.__doc__ or "").splitlines()[0],
            description=cls.__doc__,
            add_help=not probe,
            prog=f"jobs/launch.py [flags] {kind}",
        )
        job.add_argument(
            "--config_path",
            dest="job_config_path",
            metavar="PATH",
            default=None,
            help="YAML file of this job's config values (command-line flags win)",
        )
        default = argparse.SUPPRESS if probe else defaults.job if defaults.kind == kind else None
        job.add_arguments(cls, dest="job", default=default)
    return parser


def launcher_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A --config_path file's SlurmConfig and LaunchConfig keys; a run's slurm.yaml also holds
    what was submitted, which is a record, not a request."""
    data = load_yaml(path)
    data.pop("submitted", None)
    unknown = sorted(set(data) - SLURM_KEYS - LAUNCH_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]} in {path}; valid keys: SlurmConfig's "
            f"{', '.join(sorted(SLURM_KEYS))} and LaunchConfig's {', '.join(sorted(LAUNCH_KEYS))}"
        )
    return (
        {k: v for k, v in data.items() if k in SLURM_KEYS},
        {k: v for k, v in data.items() if k in LAUNCH_KEYS},
    )


def parse_launch(argv: list[str]) -> Launch:
    """Two passes of the same parser: the first finds which --config_path belongs to whom (the
    parser, not a token scan, tells the launcher's from the job's), the second parses with those
    files as the defaults, so that flags win over files and each config is checked once, whole."""
    first = parse(launch_parser(None), argv, known=True)
    kind = first.kind or ""
    slurm_file, launch_file = launcher_file(first.config_path) if first.config_path else ({}, {})
    job_path = getattr(first, "job_config_path", None)
    defaults = Launch(
        slurm=from_dict(SlurmConfig, slurm_file),
        opts=from_dict(LaunchConfig, launch_file),
        kind=kind,
        job=load_config(JOBS[kind].load_config_class(), job_path) if kind and job_path else None,
    )
    final = parse(launch_parser(defaults), argv)
    opts: LaunchConfig = final.launch
    # the sbatch extras: the file's mapping, then the KEY=VALUE flags
    extras = {
        **slurm_file.get("additional_parameters", {}),
        **_key_values(opts.additional_parameters),
    }
    slurm = dataclasses.replace(final.slurm, additional_parameters=extras)
    given = (
        bool(getattr(first, "slurm", None)) or bool(slurm_file) or bool(opts.additional_parameters)
    )
    return Launch(
        slurm=slurm, opts=opts, kind=kind, job=getattr(final, "job", None), slurm_given=given
    )


def _key_values(items: list[str]) -> dict[str, Any]:
    import yaml

    from bonnerlab.config.cluster import check_sbatch_text
    from bonnerlab.config.core import parse_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--additional_parameters {item!r}: expected KEY=VALUE")
        # the flag as typed: YAML would fold a newline into a space and hide it
        check_sbatch_text("--additional_parameters", item)
        try:
            out[key] = parse_yaml(value) if value else True
        except yaml.YAMLError:
            out[key] = value  # a plain string sbatch reads as is (e.g. a bracketed node list)
    return out


def main(argv: list[str]) -> Any:
    if not argv:
        launch_parser(Launch(SlurmConfig(), LaunchConfig())).print_help()
        return None
    launch = parse_launch(argv)
    kind, cfg, slurm, opts = launch.kind, launch.job, launch.slurm, launch.opts
    if opts.resume and opts.after:
        raise ConfigError("--after is for new submissions; --resume resubmits without it")
    if opts.resume and (opts.sweep_dir or not kind):
        return launch_retry(kind, slurm if launch.slurm_given else None, opts)
    if opts.resume:
        raise ConfigError(
            "--resume is for sweep folders (with --sweep_dir); "
            "a train run resumes with train --resume"
        )
    if not kind:
        raise ConfigError(
            f"no job given: jobs/launch.py [flags] {{{','.join(JOBS)}}} [job flags] (--help)"
        )
    from bonnerlab.cluster.submit import dependency_ids

    # before anything else is checked or written: a bad --after queues nothing
    after = dependency_ids(opts.after) if opts.after else []
    if opts.shards:
        return launch_shards(kind, cfg, slurm, opts, after)
    if opts.sweep or opts.zip or opts.sweep_file:
        return launch_sweep(kind, cfg, slurm, opts, after)
    if kind == "analyze":
        return launch_layers(kind, cfg, slurm, opts, after)
    if opts.task >= 0:
        raise ConfigError(
            "--task picks a task of a sweep: give the sweep's --sweep/--zip/--sweep_file too"
        )
    return launch_one(kind, cfg, slurm, opts, after)


def waiting_for(after: list[str]) -> str:
    return f" after job(s) {', '.join(after)} (afterok)" if after else ""


def launch_one(
    kind: str, cfg: Any, slurm: SlurmConfig, opts: LaunchConfig, after: list[str]
) -> Any:
    from bonnerlab.cluster.submit import submit

    t0 = time.perf_counter()
    sub = submit(kind, cfg, slurm, dry_run=opts.dry_run, after=after)
    if opts.dry_run:
        print(sub.script.read_text())
        print(f"dry run: wrote {sub.script}; nothing submitted")
        return None
    print(
        f"submitted {kind} job {sub.job_id} ({slurm.cluster}){waiting_for(after)} "
        f"in {time.perf_counter() - t0:.2f}s"
    )
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
                raise ConfigError(
                    f"{key} is swept both on the command line and in {opts.sweep_file}"
                )
        grid_spec, zip_spec = {**grid_spec, **file_grid}, {**zip_spec, **file_zip}
    return combine(grid_spec, zip_spec), {"grid": grid_spec, "zip": zip_spec}


def launch_sweep(
    kind: str, cfg: Any, slurm: SlurmConfig, opts: LaunchConfig, after: list[str]
) -> Any:
    from bonnerlab.cluster.status import format_table, sweep_status
    from bonnerlab.cluster.sweeps import submit_sweep

    points, spec = sweep_points(opts)
    sweep_dir = Path(
        opts.sweep_dir or Path(getattr(cfg, "runs_root", "runs")) / f"sweep-{timestamp()}-{kind}"
    )
    t0 = time.perf_counter()
    tasks = submit_sweep(
        kind,
        cfg,
        points,
        slurm,
        sweep_dir,
        dry_run=opts.dry_run,
        task=opts.task,
        spec=spec,
        after=after,
    )
    if opts.dry_run:
        script = SweepPaths(sweep_dir.resolve()).submit_sh
        print(script.read_text())
        print(points_table(points, [t.index for t in tasks]))
        print(f"dry run: {len(tasks)} tasks in {sweep_dir}; wrote {script}; nothing submitted")
        return tasks
    arrays = sorted({t.job_id.split("_")[0] for t in tasks})
    what = f"task {opts.task}" if opts.task >= 0 else f"{len(tasks)} tasks"
    print(
        f"submitted {what} as {len(arrays)} job array(s) {', '.join(arrays)} ({slurm.cluster})"
        f"{waiting_for(after)} in {time.perf_counter() - t0:.2f}s"
    )
    print(f"  sweep folder: {sweep_dir.resolve()}")
    print(f"  status:       python jobs/status.py {sweep_dir}")
    # one task on this machine is a trial: wait for it, as `jobs/train.py` would
    if opts.wait or (opts.task >= 0 and slurm.cluster != "slurm"):
        wait_for_tasks(tasks)
        print(format_table(sweep_status(sweep_dir)))
    return tasks


def points_table(points: list[dict[str, Any]], indices: list[int]) -> str:
    import pandas as pd

    return pd.DataFrame.from_records([{"task": i, **points[i]} for i in indices]).to_string(
        index=False
    )


def launch_retry(kind: str, slurm: SlurmConfig | None, opts: LaunchConfig) -> Any:
    from bonnerlab.cluster.status import folder_kind, format_table, read_sweep_yaml, sweep_status
    from bonnerlab.cluster.sweeps import retry_sweep

    if not opts.sweep_dir:
        raise ConfigError("--resume needs --sweep_dir DIR (the sweep or run folder to resubmit)")
    sweep_dir = Path(opts.sweep_dir)
    if (
        sweep_dir.exists()
        and kind
        and folder_kind(sweep_dir) == "sweep"
        and read_sweep_yaml(sweep_dir).get("job") != kind
    ):
        raise ConfigError(
            f"{sweep_dir} is a {read_sweep_yaml(sweep_dir).get('job')} sweep, not {kind}"
        )
    points = sweep_points(opts)[0] if (opts.sweep or opts.zip or opts.sweep_file) else None
    t0 = time.perf_counter()
    plan = retry_sweep(
        sweep_dir,
        slurm,
        opts.retry_failed,
        opts.max_retries,
        opts.retry_mem_factor,
        points,
        opts.task,
        opts.dry_run,
    )
    for note in plan.notes:
        print(f"  {note}")
    if not plan.tasks:
        print(f"nothing to resubmit: no task of {sweep_dir} failed for a retryable reason")
        return plan.tasks
    if opts.dry_run:
        print(SweepPaths(sweep_dir.resolve()).submit_sh.read_text())
        print(f"dry run: would resubmit tasks {[t.index for t in plan.tasks]}; nothing submitted")
        return plan.tasks
    arrays = sorted({t.job_id.split("_")[0] for t in plan.tasks})
    print(
        f"submitted {len(plan.tasks)} tasks as {len(arrays)} job array(s) {', '.join(arrays)} "
        f"in {time.perf_counter() - t0:.2f}s: tasks {', '.join(str(t.index) for t in plan.tasks)}"
    )
    for change in plan.changes:
        print(f"  {change}")
    if opts.wait:
        wait_for_tasks(plan.tasks)
        print(format_table(sweep_status(sweep_dir)))
    return plan.tasks


def launch_shards(
    kind: str, cfg: Any, slurm: SlurmConfig, opts: LaunchConfig, after: list[str]
) -> Any:
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
    points = [
        {"shard_index": i, "num_shards": opts.shards, "output": output} for i in range(opts.shards)
    ]
    sweep_dir = Path(opts.sweep_dir or Path("runs") / f"extract-{timestamp()}")
    t0 = time.perf_counter()
    tasks = submit_sweep(
        kind, cfg, points, slurm, sweep_dir, dry_run=opts.dry_run, task=opts.task, after=after
    )
    if opts.dry_run:
        print(SweepPaths(sweep_dir.resolve()).submit_sh.read_text())
        print(f"dry run: {opts.shards} shards of {output}; nothing submitted")
        return tasks
    print(
        f"submitted {len(tasks)} extraction shard(s){waiting_for(after)} in "
        f"{time.perf_counter() - t0:.2f}s, writing {output}"
    )
    print(f"  folder: {sweep_dir.resolve()}  (the last shard to finish finalizes the store)")
    print(f"  status: python jobs/status.py {sweep_dir}")
    if opts.wait:
        wait_for_results(tasks)
    return tasks


def analysis_layers(cfg: AnalyzeConfig, after: list[str]) -> list[str]:
    """The layers of an analysis, one array task each: the store's layers the names and patterns
    match; a store that a job --after waits for may not exist yet: then its layers by name."""
    from bonnerlab.config import expand_layers, is_pattern

    store = Path(cfg.store)
    if not store.exists():
        if not after:
            raise ConfigError(f"store {store} does not exist (extract it first, or wait: --after)")
        if not cfg.layers or any(is_pattern(name) for name in cfg.layers):
            raise ConfigError(
                f"store {store} does not exist yet: name its layers exactly with --layers "
                "(patterns and all layers need the store)"
            )
        return list(cfg.layers)
    from bonnerlab.activations import store_info

    info = store_info(store)
    if not info.get("complete") and not after:
        raise ConfigError(
            f"store {store} is not complete (an extraction still running?); wait for it: --after"
        )
    return expand_layers(cfg.layers, list(info["layers"]), str(store))


def launch_layers(
    kind: str, cfg: AnalyzeConfig, slurm: SlurmConfig, opts: LaunchConfig, after: list[str]
) -> Any:
    """`analyze`: one job array, one task per layer, all writing one analysis folder."""
    from bonnerlab.cluster.sweeps import submit_sweep
    from bonnerlab.config import default_output

    layers = analysis_layers(cfg, after)
    # the node may start elsewhere: every path absolute, and one output folder for every task
    absolute = {
        name: str(Path(value).resolve())
        for name in ("store", "encode", "rsa", "cka")
        if (value := getattr(cfg, name))
    }
    cfg = dataclasses.replace(cfg, **absolute, output=str(Path(default_output(cfg)).resolve()))
    points = [{"layers": [layer]} for layer in layers]
    sweep_dir = Path(opts.sweep_dir or Path("runs") / f"analyze-{timestamp()}")
    t0 = time.perf_counter()
    tasks = submit_sweep(
        kind, cfg, points, slurm, sweep_dir, dry_run=opts.dry_run, task=opts.task, after=after
    )
    if opts.dry_run:
        print(SweepPaths(sweep_dir.resolve()).submit_sh.read_text())
        print(points_table(points, [t.index for t in tasks]))
        print(f"dry run: {len(tasks)} layer task(s) into {cfg.output}; nothing submitted")
        return tasks
    arrays = sorted({t.job_id.split("_")[0] for t in tasks})
    print(
        f"submitted {len(tasks)} layer task(s) as job array {', '.join(arrays)} "
        f"({slurm.cluster}){waiting_for(after)} in {time.perf_counter() - t0:.2f}s"
    )
    print(f"  analysis: {cfg.output}  (each task adds its layer; report.html covers all)")
    print(f"  status:   python jobs/status.py {sweep_dir}")
    if opts.wait:
        wait_for_results(tasks)
    return tasks


def wait_for_results(tasks: list[Any]) -> None:
    """`wait_for_tasks`, then each task's result: raises with the first failed task's traceback."""
    wait_for_tasks(tasks)
    for task in tasks:
        if task.job is not None:
            task.job.result()


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
