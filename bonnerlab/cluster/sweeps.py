"""Sweeps: grid and zip of config overrides -> job arrays -> a sweep folder; retries by failure
kind.

    points = combine(parse_sweep_args(["optim.lr=0.1,0.01"]),
                     parse_zip_args(["epochs=2,4", "seed=0,1"]))
    tasks = submit_sweep("train", TrainConfig(), points, SlurmConfig(), "runs/sweep-lr")
    table = sweep_status("runs/sweep-lr")     # pandas DataFrame; works with no launcher alive
    tasks, notes = retry_sweep("runs/sweep-lr")   # resubmit what failed for a reason worth retrying

Sweep folder (bonnerlab.runs.SweepPaths):
    sweep.yaml         job, base config, spec and points, SLURM request
    manifest.jsonl     one line per task submission: task, overrides, run_dir, job_id, retries
                       (last wins)
    code/<hash>/       the code snapshot the tasks run (one per distinct submitted checkout)
    logs/              submitit's pickles and per-task logs (<array>_<task>_<rank>_log.out/.err)
    submit-<id>.sh     the sbatch script of each array
    task-000/ ...      one run folder per task (config.yaml, slurm.yaml, metrics.jsonl,
                       checkpoints/, STATE)
    results.csv, results.png, report.html   written by `jobs/status.py`

Reading folders back (states, failure kinds, error lines, tables) is bonnerlab/cluster/status.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bonnerlab.cluster import slurm_cli
from bonnerlab.cluster.status import (
    RETRY_AS_IS,
    RETRY_MORE_MEMORY,
    RETRY_WHEN_ASKED,
    folder_kind,
    format_table,
    points_of,
    read_manifest,
    read_sweep_yaml,
    status_all,
    sweep_status,
)
from bonnerlab.cluster.submit import (
    Submission,
    Task,
    check_folder_text,
    chunks,
    read_record,
    spec_of,
    submit_tasks,
    submitted_record,
)
from bonnerlab.config import SlurmConfig, apply_overrides, from_dict, load_yaml, to_dict
from bonnerlab.config.core import DuplicateKeyError, parse_yaml, yaml_error
from bonnerlab.errors import ClusterError, ConfigError
from bonnerlab.runs import RunPaths, SweepPaths

# status is bonnerlab/cluster/status.py's; these names stay importable from here for analysis
# scripts
__all__ = [
    "chunks",
    "combine",
    "grid",
    "expand",
    "submit_sweep",
    "retry_sweep",
    "sweep_status",
    "status_all",
    "read_manifest",
    "format_table",
]

# ----------------------------------------------------------------------------- sweep spec


def _parse_value(text: str) -> Any:
    """0.1 -> float, 3 -> int, 1e-3 -> float, true -> bool, adamw -> str."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def parse_sweep_arg(arg: str, flag: str = "--sweep") -> tuple[str, list[Any]]:
    """ "optim.lr=0.1,0.03,0.01" -> ("optim.lr", [0.1, 0.03, 0.01])."""
    key, sep, values = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} {arg!r}: expected KEY=V1,V2,... e.g. optim.lr=0.1,0.01")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
        raise ConfigError(f"{flag} {arg!r}: empty value list (or an empty item between commas)")
    return key, [_parse_value(v) for v in items]


def parse_sweep_args(args: list[str], flag: str = "--sweep") -> dict[str, list[Any]]:
    spec: dict[str, list[Any]] = {}
    for arg in args:
        key, values = parse_sweep_arg(arg, flag)
        if key in spec:
            raise ConfigError(f"{flag} {key} given twice; list all its values in one flag")
        spec[key] = values
    return spec


def parse_zip_args(args: list[str]) -> dict[str, list[Any]]:
    """--zip flags: values paired by position, so every list must have the same length."""
    spec = parse_sweep_args(args, "--zip")
    check_zip(spec, "--zip")
    return spec


def check_zip(spec: dict[str, list[Any]], where: str) -> None:
    lengths = {k: len(v) for k, v in spec.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            f"{where}: zipped value lists must have equal lengths; got "
            + ", ".join(f"{k} {n}" for k, n in lengths.items())
        )


def _spec_section(data: Any, path: Path, section: str) -> dict[str, list[Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"sweep file {path}: {section} must map keys to value lists, "
            "e.g. 'optim.lr: [0.1, 0.01]'"
        )
    spec = {}
    for key, values in data.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"sweep file {path}: {key} has an empty value list")
        spec[str(key)] = values
    return spec


def load_sweep_file(path: str | Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """(grid, zip) from a YAML file: `grid:` and `zip:` sections, or a plain mapping (a grid)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    try:
        data = parse_yaml(path.read_text())
    except DuplicateKeyError as e:
        raise ConfigError(f"sweep file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {yaml_error(e)}") from e
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"sweep file {path} must map keys to value lists, e.g. 'optim.lr: [0.1, 0.01]'"
        )
    if set(data) <= {"grid", "zip"}:
        grid_spec, zip_spec = (
            _spec_section(data.get("grid"), path, "grid"),
            _spec_section(data.get("zip"), path, "zip"),
        )
        check_zip(zip_spec, f"sweep file {path}")
        return grid_spec, zip_spec
    return _spec_section(data, path, "the file"), {}


def grid(spec: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last key varying fastest."""
    keys = list(spec)
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec[k] for k in keys))
    ]


def combine(
    grid_spec: dict[str, list[Any]], zip_spec: dict[str, list[Any]] | None = None
) -> list[dict[str, Any]]:
    """The zip's points (paired values) times the grid's, the grid varying fastest."""
    zip_spec = zip_spec or {}
    both = sorted(set(grid_spec) & set(zip_spec))
    if both:
        raise ConfigError(f"{both[0]} is both zipped and swept; give it in one of --zip or --sweep")
    check_zip(zip_spec, "--zip")
    zipped = [
        dict(zip(zip_spec, values, strict=True)) for values in zip(*zip_spec.values(), strict=True)
    ] or [{}]
    return [{**z, **g} for z in zipped for g in grid(grid_spec)]


def expand(base: Any, points: list[dict[str, Any]]) -> list[Any]:
    """One validated config per point: unknown keys and wrong types fail here, before queueing."""
    if not points:
        raise ConfigError("the sweep has no points")
    configs = []
    for point in points:
        try:
            configs.append(apply_overrides(base, point))
        except ConfigError as e:
            raise ConfigError(f"sweep point {point}: {e}") from e
    return configs


# ----------------------------------------------------------------------------- submission


def submit_sweep(
    kind: str,
    base: Any,
    points: list[dict[str, Any]],
    slurm: SlurmConfig,
    sweep_dir: str | Path,
    dry_run: bool = False,
    task: int = -1,
    spec: dict[str, Any] | None = None,
    after: list[str] | None = None,
) -> list[Task]:
    """Queue one array task per point (one sbatch per MaxArraySize tasks); returns what was queued.
    `after`: job ids every task waits for (afterok).

    `task` >= 0 queues only that point (e.g. with cluster local, to try it before the rest); the
    sweep folder may then already exist, made with the same points. Without it an existing sweep
    folder is refused: `retry_sweep` resubmits its unfinished tasks.
    """
    spec_of(kind)
    sweep_dir = Path(sweep_dir).resolve()
    check_folder_text(sweep_dir)  # before sweep.yaml is written
    paths = SweepPaths(sweep_dir)
    configs = expand(base, points)
    if kind == "train":  # before anything is queued (each task checks again)
        for c in configs:
            c.log.check_sweep(str(sweep_dir))
    if task >= len(points) or task < -1:
        raise ClusterError(
            f"--task {task} is out of range: the sweep has tasks 0-{len(points) - 1}"
        )
    exists = sweep_dir.exists() and any(sweep_dir.iterdir())
    if exists and task < 0:
        raise ClusterError(
            f"sweep folder {sweep_dir} already exists; pass --resume to resubmit its "
            "unfinished tasks, or choose another --sweep_dir"
        )
    if exists:
        saved = read_record(paths.sweep_yaml) or read_sweep_yaml(sweep_dir)
        if points_of(saved) != points:
            raise ClusterError(
                f"sweep folder {sweep_dir} was made with other points; use its own --sweep flags"
            )
    todo = [task] if task >= 0 else list(range(len(points)))
    record = {
        "job": kind,
        "spec": spec or {},
        "points": points,
        "base": to_dict(base),
        "slurm": to_dict(slurm),
    }
    tasks = [Task(i, points[i], paths.task(i), configs[i]) for i in todo]
    return submit_tasks(
        Submission(
            kind,
            sweep_dir,
            slurm,
            tasks,
            array=True,
            dry_run=dry_run,
            extra={"sweep_dir": str(sweep_dir)},
            after=after or [],
            sweep_record=None if exists else record,
        )
    )


# ----------------------------------------------------------------------------- retries


@dataclass
class RetryPlan:
    tasks: list[Task]
    notes: list[str]  # why other unfinished tasks were left alone
    changes: list[str]  # what a resubmitted task asks for differently (more memory)


def _what_was_submitted(
    path: Path, points: list[dict[str, Any]] | None
) -> tuple[str, SlurmConfig, Any, list]:
    """(job kind, SLURM request, base config, points) a sweep or run folder was submitted with."""
    if folder_kind(path) == "run":
        slurm_yaml = RunPaths(path).slurm_yaml
        data = read_record(slurm_yaml)
        if not data or not submitted_record(data, slurm_yaml).get("job"):
            raise ClusterError(
                f"--resume: {path} was not submitted by jobs/launch.py (no slurm.yaml)"
            )
        kind = data.pop("submitted")["job"]
        cfg = from_dict(
            spec_of(kind).load_config_class(),
            load_yaml(RunPaths(path).config_yaml),
        )
        return kind, from_dict(SlurmConfig, data), cfg, [{}]
    saved = read_record(SweepPaths(path).sweep_yaml) or read_sweep_yaml(path)
    if points is not None and points != points_of(saved):
        raise ClusterError(
            f"--resume: {path} was made with other points ({points_of(saved)}); "
            "resume it with the same --sweep/--zip flags, or with none"
        )
    kind = saved["job"]
    cfg = from_dict(spec_of(kind).load_config_class(), saved["base"])
    return kind, from_dict(SlurmConfig, saved["slurm"]), cfg, points_of(saved)


def plan_retry(
    sweep_dir: str | Path,
    slurm: SlurmConfig | None = None,
    retry_failed: bool = False,
    max_retries: int = 3,
    mem_factor: float = 2.0,
    points: list[dict[str, Any]] | None = None,
    task: int = -1,
) -> tuple[str, SlurmConfig, RetryPlan]:
    """Which tasks of a sweep (or a run folder, one task) to resubmit and with what request:
    (job kind, base request, plan)."""
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.exists():
        raise ClusterError(f"--resume: sweep folder {sweep_dir} does not exist")
    kind, saved_request, base_cfg, all_points = _what_was_submitted(sweep_dir, points)
    base_request = slurm or saved_request
    table = sweep_status(sweep_dir, write=False)
    if task >= len(table) or task < -1:
        raise ClusterError(f"--task {task} is out of range: the sweep has tasks 0-{len(table) - 1}")
    wanted = RETRY_AS_IS + RETRY_MORE_MEMORY + (RETRY_WHEN_ASKED if retry_failed else ())
    plan = RetryPlan([], [], [])
    for row in table.to_dict("records"):
        if task >= 0 and row["task"] != task:
            continue
        why = row["failure"]
        if not why:
            continue
        if why not in wanted:
            plan.notes.append(
                f"task {row['task']}: {why} ({row['error'] or row['state']}); "
                "not retried without --retry_failed"
            )
            continue
        if row["retries"] >= max_retries:
            plan.notes.append(
                f"task {row['task']}: {why}, already retried {row['retries']} times (--max_retries)"
            )
            continue
        run_dir = Path(row["run_dir"])
        request = base_request
        if why in RETRY_MORE_MEMORY:
            request = _more_memory(run_dir, base_request, row, mem_factor)
            plan.changes.append(f"task {row['task']}: out of memory, now mem_gb {request.mem_gb:g}")
        cfg = apply_overrides(base_cfg, all_points[row["task"]])
        plan.tasks.append(
            Task(
                row["task"],
                all_points[row["task"]],
                run_dir,
                cfg,
                request,
                row["retries"] + (1 if row["job_id"] else 0),
            )
        )
    return kind, base_request, plan


def _more_memory(
    run_dir: Path, base: SlurmConfig, row: dict[str, Any], factor: float
) -> SlurmConfig:
    """The request the task ran out of memory with, times `factor`."""
    had = (read_record(RunPaths(run_dir).slurm_yaml) or {}).get("mem_gb", 0) or base.mem_gb
    if not had:
        info = slurm_cli.query([row["job_id"]]).get(row["job_id"]) if row["job_id"] else None
        had = (info.mem_mb / 1024) if info and info.mem_mb else 0
    if not had:
        raise ClusterError(
            f"task {row['task']} ran out of memory with the partition's default memory; "
            "pass --mem_gb to say how much to ask for"
        )
    return SlurmConfig(**{**to_dict(base), "mem_gb": round(had * factor, 3)})


def retry_sweep(
    sweep_dir: str | Path,
    slurm: SlurmConfig | None = None,
    retry_failed: bool = False,
    max_retries: int = 3,
    mem_factor: float = 2.0,
    points: list[dict[str, Any]] | None = None,
    task: int = -1,
    dry_run: bool = False,
) -> RetryPlan:
    """Resubmit only the retryable tasks, as one array per request (out-of-memory ones with more
    memory); a run folder's one job is resubmitted the same way, as a plain job."""
    kind, base, plan = plan_retry(
        sweep_dir, slurm, retry_failed, max_retries, mem_factor, points, task
    )
    if plan.tasks:
        sweep_dir = Path(sweep_dir).resolve()
        sweep = folder_kind(sweep_dir) == "sweep"
        submit_tasks(
            Submission(
                kind,
                sweep_dir,
                base,
                plan.tasks,
                array=sweep,
                dry_run=dry_run,
                extra={"sweep_dir": str(sweep_dir)} if sweep else {},
            )
        )
    return plan
