"""Sweeps: grid and zip of config overrides -> job arrays -> a sweep folder -> status, retries, results.

    points = combine(parse_sweep_args(["optim.lr=0.1,0.01"]), parse_zip_args(["epochs=2,4", "seed=0,1"]))
    tasks = submit_sweep("train", TrainConfig(), points, SlurmConfig(), "runs/sweep-lr")
    table = sweep_status("runs/sweep-lr")     # pandas DataFrame; works with no launcher alive
    tasks, notes = retry_sweep("runs/sweep-lr")   # resubmit what failed for a reason worth retrying

Sweep folder (bonnerlab.runs.SweepPaths):
    sweep.yaml         job, base config, spec and points, SLURM request
    manifest.jsonl     one line per task submission: task, overrides, run_dir, job_id, retries (last wins)
    code/              the code snapshot every task runs
    logs/              submitit's pickles and per-task logs (<array>_<task>_<rank>_log.out/.err)
    submit-<id>.sh     the sbatch script of each array
    task-000/ ...      one run folder per task (config.yaml, slurm.yaml, metrics.jsonl, checkpoints/, STATE)
    results.csv, results.png, report.html   written by `jobs/status.py`

Each refresh of any number of folders asks SLURM once (`bonnerlab.slurm.query`: one squeue, one sacct).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bonnerlab import slurm as slurm_commands
from bonnerlab.cluster import Submission, Task, chunks, spec_of, submit_tasks, yaml_text
from bonnerlab.config import SlurmConfig, apply_overrides, from_dict, to_dict
from bonnerlab.errors import ClusterError, ConfigError
from bonnerlab.runs import RunPaths, SweepPaths, load_yaml_if_exists, read_metrics, read_state

__all__ = ["chunks", "combine", "grid", "expand", "submit_sweep", "retry_sweep", "sweep_status", "status_all"]

# ----------------------------------------------------------------------------- sweep spec


def _parse_value(text: str) -> Any:
    """0.1 -> float, 3 -> int, 1e-3 -> float, true -> bool, adamw -> str."""
    for kind in (int, float):  # before YAML: YAML 1.1 reads 1e-3 as a string
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sweep_arg(arg: str, flag: str = "--sweep") -> tuple[str, list[Any]]:
    """"optim.lr=0.1,0.03,0.01" -> ("optim.lr", [0.1, 0.03, 0.01])."""
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
        raise ConfigError(f"{where}: zipped value lists must have equal lengths; got "
                          + ", ".join(f"{k} {n}" for k, n in lengths.items()))


def _spec_section(data: Any, path: Path, section: str) -> dict[str, list[Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"sweep file {path}: {section} must map keys to value lists, e.g. 'optim.lr: [0.1, 0.01]'")
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
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"sweep file {path} must map keys to value lists, e.g. 'optim.lr: [0.1, 0.01]'")
    if set(data) <= {"grid", "zip"}:
        grid_spec, zip_spec = _spec_section(data.get("grid"), path, "grid"), _spec_section(data.get("zip"), path, "zip")
        check_zip(zip_spec, f"sweep file {path}")
        return grid_spec, zip_spec
    return _spec_section(data, path, "the file"), {}


def grid(spec: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last key varying fastest."""
    keys = list(spec)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec[k] for k in keys))]


def combine(grid_spec: dict[str, list[Any]], zip_spec: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """The zip's points (paired values) times the grid's, the grid varying fastest."""
    zip_spec = zip_spec or {}
    both = sorted(set(grid_spec) & set(zip_spec))
    if both:
        raise ConfigError(f"{both[0]} is both zipped and swept; give it in one of --zip or --sweep")
    check_zip(zip_spec, "--zip")
    zipped = [dict(zip(zip_spec, values, strict=True)) for values in zip(*zip_spec.values(), strict=True)] or [{}]
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


def task_dir(sweep_dir: Path, index: int) -> Path:
    return SweepPaths(sweep_dir).task(index)


def read_manifest(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The latest manifest line of every task, in task order."""
    import json

    path = SweepPaths(sweep_dir).manifest
    latest: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[int(record["task"])] = record
    return [latest[k] for k in sorted(latest)]


def read_sweep_yaml(sweep_dir: Path) -> dict[str, Any]:
    data = load_yaml_if_exists(SweepPaths(sweep_dir).sweep_yaml)
    if not data:
        raise ClusterError(f"{sweep_dir} is not a sweep folder (no sweep.yaml)")
    return data


def submit_sweep(kind: str, base: Any, points: list[dict[str, Any]], slurm: SlurmConfig,
                 sweep_dir: str | Path, dry_run: bool = False, task: int = -1,
                 spec: dict[str, Any] | None = None) -> list[Task]:
    """Queue one array task per point (one sbatch per MaxArraySize tasks); returns what was queued.

    `task` >= 0 queues only that point (e.g. with cluster local, to try it before the rest); the
    sweep folder may then already exist, made with the same points. Without it an existing sweep
    folder is refused: `retry_sweep` resubmits its unfinished tasks.
    """
    spec_of(kind)
    sweep_dir = Path(sweep_dir).resolve()
    paths = SweepPaths(sweep_dir)
    configs = expand(base, points)
    if task >= len(points) or task < -1:
        raise ClusterError(f"--task {task} is out of range: the sweep has tasks 0-{len(points) - 1}")
    exists = sweep_dir.exists() and any(sweep_dir.iterdir())
    if exists and task < 0:
        raise ClusterError(f"sweep folder {sweep_dir} already exists; pass --resume to resubmit its "
                           "unfinished tasks, or choose another --sweep_dir")
    if exists:
        saved = read_sweep_yaml(sweep_dir)
        if _points_of(saved) != points:
            raise ClusterError(f"sweep folder {sweep_dir} was made with other points; use its own --sweep flags")
    todo = [task] if task >= 0 else list(range(len(points)))
    if not exists:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        paths.sweep_yaml.write_text(yaml_text({"job": kind, "spec": spec or {}, "points": points,
                                               "base": to_dict(base), "slurm": to_dict(slurm)}))
    tasks = [Task(i, points[i], paths.task(i), configs[i]) for i in todo]
    return submit_tasks(Submission(kind, sweep_dir, slurm, tasks, array=True, dry_run=dry_run,
                                   extra={"sweep_dir": str(sweep_dir)}))


def _points_of(saved: dict[str, Any]) -> list[dict[str, Any]]:
    return saved.get("points", saved.get("grid", []))


# ----------------------------------------------------------------------------- reading folders


def folder_kind(path: Path) -> str:
    """"sweep", "run", or a one-line ClusterError for anything else."""
    paths = SweepPaths(path)
    if paths.manifest.exists() or paths.sweep_yaml.exists():
        return "sweep"
    if paths.config_yaml.exists():
        return "run"
    raise ClusterError(f"{path} is neither a sweep folder (sweep.yaml, manifest.jsonl) nor a run folder (config.yaml)")


def task_records(path: Path) -> list[dict[str, Any]]:
    """One record per task of a sweep (every point, submitted or not), or one for a run folder."""
    path = Path(path)
    if folder_kind(path) == "sweep":
        latest = {r["task"]: r for r in read_manifest(path)}
        saved = load_yaml_if_exists(SweepPaths(path).sweep_yaml) or {}
        points = _points_of(saved)
        records = []
        for i in sorted(set(range(len(points))) | set(latest)):
            r = latest.get(i) or {"task": i, "overrides": points[i], "run_dir": str(SweepPaths(path).task(i)),
                                  "job_id": ""}
            records.append({**r, "logs": str(SweepPaths(path).logs)})
        return records
    submitted = (load_yaml_if_exists(RunPaths(path).slurm_yaml) or {}).get("submitted", {})
    return [{"task": submitted.get("task", 0), "overrides": submitted.get("overrides", {}), "run_dir": str(path),
             "job_id": str(submitted.get("job_id", "")), "retries": submitted.get("retries", 0),
             "logs": str(RunPaths(path).logs)}]


def log_path(record: dict[str, Any], rank: int = 0, err: bool = False) -> Path | None:
    """A task's log file from its job id: <logs>/<job_id>_<rank>_log.out (submitit's naming)."""
    job_id = record.get("job_id", "")
    if not job_id:
        return None
    return Path(record["logs"]) / f"{job_id}_{rank}_log.{'err' if err else 'out'}"


def _tail(path: Path, size: int = 65536) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def error_line(record: dict[str, Any]) -> str:
    """The exception message at the end of a task's error log ('' when there is none)."""
    path = log_path(record, err=True)
    if path is None or not path.exists():
        return ""
    text = _tail(path)
    lines = text.splitlines()
    for line in reversed(lines):  # SLURM's own reasons first: they explain a kill
        if re.search(r"oom[_-]kill|Exceeded (job|step) memory limit|memory limit", line, re.I):
            return line.strip()
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
                default=None)
    if start is None:
        return ""
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            return line.strip()
    return ""


# Failure kinds, and which of them `retry_sweep` resubmits.
RETRY_AS_IS = ("preempted", "node failure", "time limit", "not submitted")
RETRY_MORE_MEMORY = ("out of memory",)
RETRY_WHEN_ASKED = ("error", "cancelled")


def failure_kind(state: str, error: str) -> str:
    """Why an unfinished task stopped ('' for tasks done or still queued/running)."""
    if state in ("DONE", "COMPLETED") or state in slurm_commands.ACTIVE:
        return ""
    if state == "OUT_OF_MEMORY" or re.search(r"oom[_-]kill|memory limit|MemoryError", error, re.I):
        return "out of memory"
    if state in ("PREEMPTED", "INTERRUPTED"):
        return "preempted"
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return "node failure"
    if state in ("TIMEOUT", "DEADLINE") or "more than max_requeues" in error:
        return "time limit"
    if state == "CANCELLED":
        return "cancelled"
    if state in ("PENDING_UNSUBMITTED", "UNKNOWN"):
        return "not submitted"
    return "error"


def _state(record: dict[str, Any], info: slurm_commands.JobInfo | None, marker: str | None) -> str:
    """SLURM's state while it knows the job, corrected by the job's own marker."""
    if info is None:
        if marker == "PENDING" or marker is None:
            # written at submission: a job SLURM never saw (dry run, local run that died)
            return "PENDING_UNSUBMITTED" if not record.get("job_id") else (marker or "UNKNOWN")
        return marker
    if info.state == "COMPLETED" and marker:
        # SLURM says COMPLETED for a finished batch script; the marker says whether the job did
        return marker if marker != "RUNNING" else "DONE"
    if info.state in ("FAILED", "CANCELLED") and marker == "CANCELLED":
        return "CANCELLED"
    return info.state


def _hours(info: slurm_commands.JobInfo | None) -> tuple[float, float]:
    if info is None:
        return 0.0, 0.0
    return info.elapsed_s * info.gpus / 3600, info.elapsed_s * info.cpus / 3600


def task_rows(path: Path, records: list[dict[str, Any]], infos: dict[str, slurm_commands.JobInfo],
              metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        run_dir = Path(r["run_dir"])
        marker = read_state(run_dir) if run_dir.exists() else None
        info = infos.get(r.get("job_id", ""))
        state = _state(r, info, marker)
        error = error_line(r) if state not in ("DONE",) and state not in slurm_commands.ACTIVE else ""
        metrics = read_metrics(run_dir) if run_dir.exists() else []
        values = [m[metric] for m in metrics if isinstance(m.get(metric), int | float)]
        best = (max(values) if mode == "max" else min(values)) if values else math.nan
        gpu_h, cpu_h = _hours(info)
        rows.append({"task": int(r["task"]), **dict(r.get("overrides", {})),
                     "state": "PENDING" if state == "PENDING_UNSUBMITTED" else state,
                     "failure": failure_kind(state, error), "job_id": r.get("job_id", ""),
                     "retries": int(r.get("retries", 0) or 0), "epochs": len(metrics),
                     f"best_{metric}": best, f"last_{metric}": values[-1] if values else math.nan,
                     "gpu_hours": gpu_h, "cpu_hours": cpu_h, "error": error, "run_dir": str(run_dir)})
    return rows


def _query_or_warn(job_ids: list[str]) -> dict[str, slurm_commands.JobInfo]:
    """SLURM's view of these jobs; without a controller, a warning and the folders' own markers."""
    try:
        return slurm_commands.query(job_ids)
    except ClusterError as e:
        import sys

        print(f"warning: {e}; states below are the jobs' own markers", file=sys.stderr)
        return {}


def _needs_slurm(path: Path, records: list[dict[str, Any]]) -> bool:
    """Only jobs queued on SLURM have ids worth asking about (local executor ids are PIDs)."""
    if not any(r.get("job_id") for r in records):
        return False
    slurm_yaml = load_yaml_if_exists(RunPaths(records[-1]["run_dir"]).slurm_yaml) or {}
    return slurm_yaml.get("cluster", "slurm") == "slurm"


def sweep_status(path: str | Path, metric: str = "val_acc", mode: str = "max", write: bool = True,
                 infos: dict[str, slurm_commands.JobInfo] | None = None) -> Any:
    """A pandas DataFrame, one row per task: overrides, state, failure kind, error line, best and last
    `metric`, GPU/CPU hours, and `best` marking the best task.

    With `write`, also saves results.csv, results.png (metric vs each swept value) and report.html
    (bonnerlab/report.py) in `path`.
    """
    import pandas as pd

    path = Path(path)
    records = task_records(path)
    if infos is None:
        infos = _query_or_warn([r["job_id"] for r in records]) if _needs_slurm(path, records) else {}
    table = pd.DataFrame.from_records(task_rows(path, records, infos, metric, mode))
    col = f"best_{metric}"
    table["best"] = ""
    if table[col].notna().any():
        best_idx = table[col].idxmax() if mode == "max" else table[col].idxmin()
        table.loc[best_idx, "best"] = "*"
    if write:
        from bonnerlab.runs import atomic_write_text

        atomic_write_text(path / "results.csv", table.to_csv(index=False))
        keys = sorted({k for r in records for k in r.get("overrides", {})})
        if keys and table[col].notna().any():
            plot_sweep(table, keys, col, path / "results.png")
        from bonnerlab.report import write_report

        write_report(path, table, metric)
    return table


def state_counts(states: list[str]) -> str:
    """"RUNNING 3 · DONE 12 · FAILED 1" in a fixed order."""
    order = ["PENDING", "RUNNING", "REQUEUED", "DONE", "FAILED", "OUT_OF_MEMORY", "TIMEOUT", "PREEMPTED",
             "NODE_FAIL", "INTERRUPTED", "CANCELLED"]
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    keys = sorted(counts, key=lambda s: (order.index(s) if s in order else len(order), s))
    return " · ".join(f"{k} {counts[k]}" for k in keys)


def find_folders(runs_root: Path) -> list[Path]:
    """Every sweep and run folder under `runs_root` (a sweep's task folders belong to the sweep)."""
    found = []
    for root, dirs, files in os.walk(runs_root):
        here = Path(root)
        if "sweep.yaml" in files or "manifest.jsonl" in files or "config.yaml" in files:
            found.append(here)
            dirs.clear()
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("code", "logs", "checkpoints")]
    return found


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def status_all(runs_root: str | Path, metric: str = "val_acc", mode: str = "max") -> Any:
    """One row per run and sweep folder under `runs_root`, newest first; ONE SLURM query for all."""
    import pandas as pd

    folders = find_folders(Path(runs_root))
    records = {f: task_records(f) for f in folders}
    ids = [r["job_id"] for f in folders if _needs_slurm(f, records[f]) for r in records[f]]
    infos = _query_or_warn(ids) if ids else {}
    now = time.time()
    rows = []
    for f in folders:
        tasks = task_rows(f, records[f], infos, metric, mode)
        kind = "sweep" if folder_kind(f) == "sweep" else "run"
        saved = load_yaml_if_exists(SweepPaths(f).sweep_yaml if kind == "sweep" else RunPaths(f).slurm_yaml) or {}
        job = saved.get("job") or saved.get("submitted", {}).get("job") or "train"
        values = [t[f"best_{metric}"] for t in tasks if not math.isnan(t[f"best_{metric}"])]
        best = (max(values) if mode == "max" else min(values)) if values else math.nan
        born = min(p.stat().st_mtime for p in (f / n for n in ("sweep.yaml", "config.yaml", "manifest.jsonl"))
                   if p.exists())
        errors = [t["error"] for t in tasks if t["error"]]
        rows.append({"folder": str(f.relative_to(runs_root)) if f != Path(runs_root) else f.name,
                     "job": f"{job} {kind}" if kind == "sweep" else job, "tasks": len(tasks),
                     "states": state_counts([t["state"] for t in tasks]), f"best_{metric}": best,
                     "age": _age(now - born), "_born": born, "error": errors[-1] if errors else ""})
    table = pd.DataFrame.from_records(rows, columns=["folder", "job", "tasks", "states", f"best_{metric}", "age",
                                                     "_born", "error"])
    return table.sort_values("_born", ascending=False).drop(columns="_born").reset_index(drop=True)


# ----------------------------------------------------------------------------- retries


@dataclass
class RetryPlan:
    tasks: list[Task]
    notes: list[str]  # why other unfinished tasks were left alone
    changes: list[str]  # what a resubmitted task asks for differently (more memory)


def _what_was_submitted(path: Path, points: list[dict[str, Any]] | None) -> tuple[str, SlurmConfig, Any, list]:
    """(job kind, SLURM request, base config, points) a sweep or run folder was submitted with."""
    if folder_kind(path) == "run":
        data = load_yaml_if_exists(RunPaths(path).slurm_yaml)
        if not data or not data.get("submitted", {}).get("job"):
            raise ClusterError(f"--resume: {path} was not submitted by jobs/launch.py (no slurm.yaml)")
        kind = data.pop("submitted")["job"]
        cfg = from_dict(spec_of(kind).load_config_class(), yaml.safe_load(RunPaths(path).config_yaml.read_text()))
        return kind, from_dict(SlurmConfig, data), cfg, [{}]
    saved = read_sweep_yaml(path)
    if points is not None and points != _points_of(saved):
        raise ClusterError(f"--resume: {path} was made with other points ({_points_of(saved)}); "
                           "resume it with the same --sweep/--zip flags, or with none")
    kind = saved["job"]
    cfg = from_dict(spec_of(kind).load_config_class(), saved["base"])
    return kind, from_dict(SlurmConfig, saved["slurm"]), cfg, _points_of(saved)


def plan_retry(sweep_dir: str | Path, slurm: SlurmConfig | None = None, retry_failed: bool = False,
               max_retries: int = 3, mem_factor: float = 2.0, points: list[dict[str, Any]] | None = None,
               task: int = -1) -> tuple[str, SlurmConfig, RetryPlan]:
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
            plan.notes.append(f"task {row['task']}: {why} ({row['error'] or row['state']}); "
                              "not retried without --retry_failed")
            continue
        if row["retries"] >= max_retries:
            plan.notes.append(f"task {row['task']}: {why}, already retried {row['retries']} times (--max_retries)")
            continue
        run_dir = Path(row["run_dir"])
        request = base_request
        if why in RETRY_MORE_MEMORY:
            request = _more_memory(run_dir, base_request, row, mem_factor)
            plan.changes.append(f"task {row['task']}: out of memory, now mem_gb {request.mem_gb:g}")
        cfg = apply_overrides(base_cfg, all_points[row["task"]])
        plan.tasks.append(Task(row["task"], all_points[row["task"]], run_dir, cfg, request,
                               row["retries"] + (1 if row["job_id"] else 0)))
    return kind, base_request, plan


def _more_memory(run_dir: Path, base: SlurmConfig, row: dict[str, Any], factor: float) -> SlurmConfig:
    """The request the task ran out of memory with, times `factor`."""
    had = (load_yaml_if_exists(RunPaths(run_dir).slurm_yaml) or {}).get("mem_gb", 0) or base.mem_gb
    if not had:
        info = slurm_commands.query([row["job_id"]]).get(row["job_id"]) if row["job_id"] else None
        had = (info.mem_mb / 1024) if info and info.mem_mb else 0
    if not had:
        raise ClusterError(f"task {row['task']} ran out of memory with the partition's default memory; "
                           "pass --mem_gb to say how much to ask for")
    return SlurmConfig(**{**to_dict(base), "mem_gb": round(had * factor, 3)})


def retry_sweep(sweep_dir: str | Path, slurm: SlurmConfig | None = None, retry_failed: bool = False,
                max_retries: int = 3, mem_factor: float = 2.0, points: list[dict[str, Any]] | None = None,
                task: int = -1, dry_run: bool = False) -> RetryPlan:
    """Resubmit only the retryable tasks, as one array per request (out-of-memory ones with more
    memory); a run folder's one job is resubmitted the same way, as a plain job."""
    kind, base, plan = plan_retry(sweep_dir, slurm, retry_failed, max_retries, mem_factor, points, task)
    if plan.tasks:
        sweep_dir = Path(sweep_dir).resolve()
        sweep = folder_kind(sweep_dir) == "sweep"
        submit_tasks(Submission(kind, sweep_dir, base, plan.tasks, array=sweep, dry_run=dry_run,
                                extra={"sweep_dir": str(sweep_dir)} if sweep else {}))
    return plan


# ----------------------------------------------------------------------------- plot and text


def _log_axis(key: str, values: list[Any]) -> bool:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(values) or min(nums, default=0) <= 0:
        return False
    return key.split(".")[-1] in ("lr", "weight_decay") or max(nums) / min(nums) >= 100


def plot_sweep(table: Any, keys: list[str], col: str, out: Path) -> None:
    """One panel per swept key: the metric of every task against that key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = table[key].tolist()
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        others = [k for k in keys if k != key]
        groups = table.groupby(others, dropna=False) if others else [("", table)]
        for label, group in groups:
            group = group.sort_values(key) if numeric else group
            x = group[key] if numeric else group[key].astype(str)
            ax.plot(x, group[col], "o-", label=str(label) if others else None)
        if numeric and _log_axis(key, values):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(col)
        if others:
            ax.legend(title=",".join(others), fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def format_table(table: Any, metric: str = "val_acc") -> str:
    hidden = {"run_dir", "gpu_hours", "cpu_hours"}
    if not table["error"].astype(bool).any():
        hidden |= {"error", "failure"}
    if not table["retries"].astype(bool).any():
        hidden.add("retries")
    shown = [c for c in table.columns if c not in hidden]
    return table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}")
