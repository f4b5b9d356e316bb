"""Every run and sweep folder read back: states, failure kinds, error lines, tables.

    table = sweep_status("runs/sweep-lr")    # one row per task; results.csv, results.png,
                                               report.html
    overview = status_all("runs")             # one row per run and sweep folder, newest first

State comes from SLURM while it knows the job (`bonnerlab.cluster.slurm_cli.query`: ONE squeue
and ONE sacct for any number of folders), corrected by the job's own STATE marker; without a
controller, from the markers alone. A task that did not finish gets a failure kind
(`failure_kind`) and the last line of its error log (`error_line`), which
`bonnerlab.cluster.sweeps.retry_sweep` acts on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from bonnerlab.cluster import slurm_cli
from bonnerlab.errors import ClusterError
from bonnerlab.runs import (
    RunPaths,
    SweepPaths,
    describe_holder,
    holder_alive,
    load_yaml_if_exists,
    read_lock,
    read_metrics,
    read_state,
)


def read_manifest(sweep_dir: str | Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The latest manifest line of every task, in task order.

    A line that is not a task's record (cut short by a killed launcher, edited by hand) is one
    ClusterError naming it; with `problems`, it is skipped and described there instead (status
    lists the rest).
    """
    path = SweepPaths(sweep_dir).manifest
    latest: dict[int, dict[str, Any]] = {}
    if path.exists():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                latest[int(record["task"])] = record
            except (ValueError, KeyError, TypeError) as e:
                problem = f"{path} line {number} is not a task record ({type(e).__name__})"
                if problems is None:
                    raise ClusterError(f"{problem}; repair or delete that line") from None
                problems.append(problem)
    return [latest[k] for k in sorted(latest)]


def read_sweep_yaml(sweep_dir: Path) -> dict[str, Any]:
    data = load_yaml_if_exists(SweepPaths(sweep_dir).sweep_yaml)
    if not data:
        raise ClusterError(f"{sweep_dir} is not a sweep folder (no sweep.yaml)")
    return data


def points_of(saved: dict[str, Any]) -> list[dict[str, Any]]:
    return saved.get("points", saved.get("grid", []))


# ----------------------------------------------------------------------------- reading folders


def folder_kind(path: Path) -> str:
    """ "sweep", "run", or a one-line ClusterError for anything else."""
    paths = SweepPaths(path)
    if paths.manifest.exists() or paths.sweep_yaml.exists():
        return "sweep"
    if paths.config_yaml.exists():
        return "run"
    raise ClusterError(
        f"{path} is neither a sweep folder (sweep.yaml, manifest.jsonl) "
        "nor a run folder (config.yaml)"
    )


def task_records(path: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per task of a sweep (every point, submitted or not), or one for a run folder.
    `problems`: see read_manifest."""
    path = Path(path)
    if folder_kind(path) == "sweep":
        latest = {r["task"]: r for r in read_manifest(path, problems)}
        saved = load_yaml_if_exists(SweepPaths(path).sweep_yaml) or {}
        points = points_of(saved)
        records = []
        for i in sorted(set(range(len(points))) | set(latest)):
            r = latest.get(i) or {
                "task": i,
                "overrides": points[i],
                "run_dir": str(SweepPaths(path).task(i)),
                "job_id": "",
            }
            records.append({**r, "logs": str(SweepPaths(path).logs)})
        return records
    submitted = (load_yaml_if_exists(RunPaths(path).slurm_yaml) or {}).get("submitted", {})
    return [
        {
            "task": submitted.get("task", 0),
            "overrides": submitted.get("overrides", {}),
            "run_dir": str(path),
            "job_id": str(submitted.get("job_id", "")),
            "retries": submitted.get("retries", 0),
            "logs": str(RunPaths(path).logs),
        }
    ]


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
    start = max(
        (i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
        default=None,
    )
    if start is None:
        return ""
    for line in lines[start + 1 :]:
        if line and not line[0].isspace():
            return line.strip()
    return ""


# Failure kinds, and which of them `retry_sweep` resubmits.
RETRY_AS_IS = ("preempted", "node failure", "lost", "time limit", "not submitted")
RETRY_MORE_MEMORY = ("out of memory",)
RETRY_WHEN_ASKED = ("error", "cancelled")


def failure_kind(state: str, error: str) -> str:
    """Why an unfinished task stopped ('' for tasks done or still queued/running)."""
    if state in ("DONE", "COMPLETED") or state in slurm_cli.ACTIVE:
        return ""
    if state == "OUT_OF_MEMORY" or re.search(r"oom[_-]kill|memory limit|MemoryError", error, re.I):
        return "out of memory"
    if state in ("PREEMPTED", "INTERRUPTED"):
        return "preempted"
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return "node failure"
    if state == "LOST":  # STATE said RUNNING, its process is gone: killed without a word
        return "lost"
    if state in ("TIMEOUT", "DEADLINE") or "more than max_requeues" in error:
        return "time limit"
    if state == "CANCELLED":
        return "cancelled"
    if state in ("PENDING_UNSUBMITTED", "UNKNOWN"):
        return "not submitted"
    return "error"


# A RUNNING run whose writer this machine cannot check (another host, no SLURM job) is LOST
# once its LOCK's heartbeat (refreshed at logging steps and epoch ends) is this old.
LOST_AFTER_S = 3600.0


def liveness(run_dir: Path) -> tuple[bool | None, str]:
    """Whether the run folder's writer (its LOCK) still runs (see runs.holder_alive; SLURM is
    asked by the caller, in one batch), and the age of its last heartbeat ('' without a LOCK)."""
    holder = read_lock(run_dir)
    if holder is None:
        return None, ""
    age = time.time() - holder.get("heartbeat", 0.0)
    alive = holder_alive(holder, ask_slurm=False)
    if alive is None and age > LOST_AFTER_S:
        alive = False
    return alive, _age(max(age, 0.0))


def _state(
    record: dict[str, Any],
    info: slurm_cli.JobInfo | None,
    marker: str | None,
    alive: bool | None = None,
) -> str:
    """SLURM's state while it knows the job, corrected by the job's own marker; a marker that
    says RUNNING for a writer that is gone (`alive` False) is LOST."""
    if info is None:
        if marker == "PENDING" or marker is None:
            # written at submission: a job SLURM never saw (dry run, local run that died)
            return "PENDING_UNSUBMITTED" if not record.get("job_id") else (marker or "UNKNOWN")
        return "LOST" if marker == "RUNNING" and alive is False else marker
    if info.state == "COMPLETED" and marker:
        # SLURM says COMPLETED for a finished batch script; the marker says whether the job did
        # (still RUNNING: its process ended without a word, e.g. a script that hides srun's
        # exit status)
        return marker if marker != "RUNNING" else "LOST"
    if info.state in ("FAILED", "CANCELLED") and marker == "CANCELLED":
        return "CANCELLED"
    return info.state


def _hours(info: slurm_cli.JobInfo | None) -> tuple[float, float]:
    if info is None:
        return 0.0, 0.0
    return info.elapsed_s * info.gpus / 3600, info.elapsed_s * info.cpus / 3600


def task_rows(
    path: Path,
    records: list[dict[str, Any]],
    infos: dict[str, slurm_cli.JobInfo],
    metric: str,
    mode: str,
) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        try:
            rows.append(_task_row(r, infos, metric, mode))
        except Exception as e:  # one task's unreadable files are its row's problem, not the table's
            rows.append(_problem_row(r, metric, problem_line(e)))
    return rows


def problem_line(error: Exception) -> str:
    """An exception as one line for a table's error column."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"unreadable: {type(error).__name__}: {text[:200]}"


def _problem_row(record: dict[str, Any], metric: str, problem: str) -> dict[str, Any]:
    return {
        "task": int(record.get("task", 0)),
        **dict(record.get("overrides", {})),
        "state": "UNKNOWN",
        "failure": "unreadable",
        "job_id": record.get("job_id", ""),
        "retries": 0,
        "epochs": 0,
        f"best_{metric}": math.nan,
        f"last_{metric}": math.nan,
        "heartbeat": "",
        "gpu_hours": 0.0,
        "cpu_hours": 0.0,
        "error": problem,
        "run_dir": str(record.get("run_dir", "")),
    }


def _task_row(
    r: dict[str, Any], infos: dict[str, slurm_cli.JobInfo], metric: str, mode: str
) -> dict[str, Any]:
    run_dir = Path(r["run_dir"])
    marker = read_state(run_dir) if run_dir.exists() else None
    info = infos.get(r.get("job_id", ""))
    alive, heartbeat = liveness(run_dir) if marker == "RUNNING" else (None, "")
    state = _state(r, info, marker, alive)
    error = error_line(r) if state not in ("DONE",) and state not in slurm_cli.ACTIVE else ""
    if state == "LOST":
        holder = read_lock(run_dir)
        if holder:
            gone = f"its process is gone ({describe_holder(holder)})"
        else:
            gone = f"SLURM says its job {info.state}" if info else "its process is gone"
        error = error or f"STATE says RUNNING but {gone}; continue it with --resume"
    metrics = read_metrics(run_dir) if run_dir.exists() else []
    values = [m[metric] for m in metrics if isinstance(m.get(metric), int | float)]
    best = (max(values) if mode == "max" else min(values)) if values else math.nan
    gpu_h, cpu_h = _hours(info)
    return {
        "task": int(r["task"]),
        **dict(r.get("overrides", {})),
        "state": "PENDING" if state == "PENDING_UNSUBMITTED" else state,
        "failure": failure_kind(state, error),
        "job_id": r.get("job_id", ""),
        "retries": int(r.get("retries", 0) or 0),
        "epochs": len(metrics),
        f"best_{metric}": best,
        f"last_{metric}": values[-1] if values else math.nan,
        "heartbeat": heartbeat,
        "gpu_hours": gpu_h,
        "cpu_hours": cpu_h,
        "error": error,
        "run_dir": str(run_dir),
    }


def _query_or_warn(job_ids: list[str]) -> dict[str, slurm_cli.JobInfo]:
    """SLURM's view of these jobs; without a controller, a warning and the folders' own markers."""
    try:
        return slurm_cli.query(job_ids)
    except ClusterError as e:
        import sys

        print(f"warning: {e}; states below are the jobs' own markers", file=sys.stderr)
        return {}


def _needs_slurm(path: Path, records: list[dict[str, Any]]) -> bool:
    """Only jobs queued on SLURM have ids worth asking about (local executor ids are PIDs)."""
    if not any(r.get("job_id") for r in records):
        return False
    try:
        slurm_yaml = load_yaml_if_exists(RunPaths(records[-1]["run_dir"]).slurm_yaml) or {}
    except Exception:  # unreadable (its row says so): ask SLURM, the default cluster
        return True
    return slurm_yaml.get("cluster", "slurm") == "slurm"


def sweep_status(
    path: str | Path,
    metric: str = "val_acc",
    mode: str = "max",
    write: bool = True,
    infos: dict[str, slurm_cli.JobInfo] | None = None,
) -> Any:
    """A pandas DataFrame, one row per task: overrides, state, failure kind, error line, best and
    last `metric`, GPU/CPU hours, and `best` marking the best task.

    With `write`, also saves results.csv, results.png (metric vs each swept value) and report.html
    (bonnerlab/cluster/report.py) in `path`.
    """
    import pandas as pd

    path = Path(path)
    problems: list[str] = []
    records = task_records(path, problems)
    for problem in problems:
        import sys

        print(f"warning: {problem}; the other tasks are listed", file=sys.stderr)
    if infos is None:
        infos = (
            _query_or_warn([r["job_id"] for r in records]) if _needs_slurm(path, records) else {}
        )
    table = pd.DataFrame.from_records(task_rows(path, records, infos, metric, mode))
    col = f"best_{metric}"
    table["best"] = ""
    if table[col].notna().any():
        best_idx = table[col].idxmax() if mode == "max" else table[col].idxmin()
        table.loc[best_idx, "best"] = "*"
    if write:
        from bonnerlab.cluster.report import write_results

        keys = sorted({k for r in records for k in r.get("overrides", {})})
        write_results(path, table, keys, metric)
    return table


def state_counts(states: list[str]) -> str:
    """ "RUNNING 3 · DONE 12 · FAILED 1" in a fixed order."""
    order = [
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "DONE",
        "FAILED",
        "OUT_OF_MEMORY",
        "TIMEOUT",
        "PREEMPTED",
        "NODE_FAIL",
        "INTERRUPTED",
        "LOST",
        "CANCELLED",
    ]
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
            dirs[:] = [
                d
                for d in dirs
                if not d.startswith(".") and d not in ("code", "logs", "checkpoints")
            ]
    return found


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def status_all(runs_root: str | Path, metric: str = "val_acc", mode: str = "max") -> Any:
    """One row per run and sweep folder under `runs_root`, newest first; ONE SLURM query for all.

    A folder that cannot be read (a malformed slurm.yaml or sweep.yaml, a cut manifest line) is
    its own row's error; every other folder is listed as usual.
    """
    import pandas as pd

    root = Path(runs_root)
    folders = find_folders(root)
    records: dict[Path, list[dict[str, Any]]] = {}
    problems: dict[Path, list[str]] = {f: [] for f in folders}
    ids = []
    for f in folders:
        try:
            records[f] = task_records(f, problems[f])
            if _needs_slurm(f, records[f]):
                ids += [r["job_id"] for r in records[f]]
        except Exception as e:  # this folder's problem, shown in its row
            problems[f].append(problem_line(e))
    infos = _query_or_warn(ids) if ids else {}
    rows = []
    for f in folders:
        name = str(f.relative_to(root)) if f != root else f.name
        try:
            row = _folder_row(f, records[f], infos, metric, mode) if f in records else None
        except Exception as e:
            problems[f].append(problem_line(e))
            row = None
        if row is None:
            row = {"job": "?", "tasks": 0, "states": "UNKNOWN 1", f"best_{metric}": math.nan}
            row.update(_born(f))
        if problems[f]:
            row["error"] = problems[f][-1]
        rows.append({"folder": name, **row})
    table = pd.DataFrame.from_records(
        rows,
        columns=["folder", "job", "tasks", "states", f"best_{metric}", "age", "_born", "error"],
    )
    table["error"] = table["error"].fillna("")
    return table.sort_values("_born", ascending=False).drop(columns="_born").reset_index(drop=True)


def _born(folder: Path) -> dict[str, Any]:
    """When the folder was made (its oldest description file), as `age` and a sort key."""
    times = [
        p.stat().st_mtime
        for p in (folder / n for n in ("sweep.yaml", "config.yaml", "manifest.jsonl"))
        if p.exists()
    ]
    born = min(times) if times else folder.stat().st_mtime
    return {"age": _age(time.time() - born), "_born": born}


def _folder_row(
    f: Path,
    records: list[dict[str, Any]],
    infos: dict[str, slurm_cli.JobInfo],
    metric: str,
    mode: str,
) -> dict[str, Any]:
    tasks = task_rows(f, records, infos, metric, mode)
    kind = "sweep" if folder_kind(f) == "sweep" else "run"
    saved = (
        load_yaml_if_exists(SweepPaths(f).sweep_yaml if kind == "sweep" else RunPaths(f).slurm_yaml)
        or {}
    )
    job = saved.get("job") or saved.get("submitted", {}).get("job") or "train"
    values = [t[f"best_{metric}"] for t in tasks if not math.isnan(t[f"best_{metric}"])]
    best = (max(values) if mode == "max" else min(values)) if values else math.nan
    errors = [t["error"] for t in tasks if t["error"]]
    return {
        "job": f"{job} {kind}" if kind == "sweep" else job,
        "tasks": len(tasks),
        "states": state_counts([t["state"] for t in tasks]),
        f"best_{metric}": best,
        **_born(f),
        "error": errors[-1] if errors else "",
    }


def format_table(table: Any) -> str:
    hidden = {"run_dir", "gpu_hours", "cpu_hours"}
    if not table["error"].astype(bool).any():
        hidden |= {"error", "failure"}
    if not table["retries"].astype(bool).any():
        hidden.add("retries")
    if "heartbeat" in table and not table["heartbeat"].astype(bool).any():
        hidden.add("heartbeat")
    shown = [c for c in table.columns if c not in hidden]
    return table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}")
