"""Sweeps: a grid of config overrides -> ONE SLURM job array -> a sweep folder -> a results table.

    points = grid(parse_sweep_args(["optim.lr=0.1,0.03,0.01", "optim.optimizer=sgd,adamw"]))
    tasks = submit_sweep("train", TrainConfig(), points, SlurmConfig(), "runs/sweep-lr")
    table = sweep_status("runs/sweep-lr")       # pandas DataFrame; works with no launcher alive

Sweep folder:
    sweep.yaml         job, base config, grid and SLURM request
    manifest.jsonl     one line per task submission: task, overrides, run_dir, job_id (last wins)
    code/              the code snapshot every task runs
    logs/              submitit's pickles and per-task logs (<array>_<task>_0_log.out)
    submit-<id>.sh     the sbatch script of each array
    task-000/ ...      one run folder per task (config.yaml, slurm.yaml, metrics.jsonl, checkpoints/, STATE)
    results.csv, results.png   written by `jobs/status.py`
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bonnerlab.cluster import (
    JOBS,
    ClusterError,
    ClusterJob,
    SlurmConfig,
    _code_env,
    _patched_env,
    check_against_cluster,
    check_job_paths,
    job_setup_lines,
    make_executor,
    max_array_size,
    prepare_job_config,
    sbatch_script,
    snapshot_code,
    update_slurm_yaml,
    write_run_description,
)
from bonnerlab.config import apply_overrides, to_dict
from bonnerlab.errors import ConfigError

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


def parse_sweep_arg(arg: str) -> tuple[str, list[Any]]:
    """"optim.lr=0.1,0.03,0.01" -> ("optim.lr", [0.1, 0.03, 0.01])."""
    key, sep, values = arg.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--sweep {arg!r}: expected KEY=V1,V2,... e.g. optim.lr=0.1,0.01")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
        raise ConfigError(f"--sweep {arg!r}: empty value list (or an empty item between commas)")
    return key, [_parse_value(v) for v in items]


def parse_sweep_args(args: list[str]) -> dict[str, list[Any]]:
    spec: dict[str, list[Any]] = {}
    for arg in args:
        key, values = parse_sweep_arg(arg)
        if key in spec:
            raise ConfigError(f"--sweep {key} given twice; list all its values in one flag")
        spec[key] = values
    return spec


def load_sweep_file(path: str | Path) -> dict[str, list[Any]]:
    """A YAML mapping of dotted keys to value lists (a scalar counts as a one-value list)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"sweep file {path} must map keys to value lists, e.g. 'optim.lr: [0.1, 0.01]'")
    spec = {}
    for key, values in data.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"sweep file {path}: {key} has an empty value list")
        spec[str(key)] = values
    return spec


def grid(spec: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last key varying fastest."""
    keys = list(spec)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec[k] for k in keys))]


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


@dataclass
class Task:
    index: int
    overrides: dict[str, Any]
    run_dir: Path
    job_id: str = ""
    job: Any = None  # the submitit Job, when submitted from this process


def task_dir(sweep_dir: Path, index: int) -> Path:
    return sweep_dir / f"task-{index:03d}"


def read_manifest(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The latest manifest line of every task, in task order."""
    path = Path(sweep_dir) / "manifest.jsonl"
    latest: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[int(record["task"])] = record
    return [latest[k] for k in sorted(latest)]


def _append_manifest(sweep_dir: Path, tasks: list[Task]) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(sweep_dir / "manifest.jsonl", "a") as f:
        for t in tasks:
            f.write(json.dumps({"task": t.index, "overrides": t.overrides, "run_dir": str(t.run_dir),
                                "job_id": t.job_id, "submitted_at": now}) + "\n")


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def submit_sweep(kind: str, base: Any, points: list[dict[str, Any]], slurm: SlurmConfig,
                 sweep_dir: str | Path, resume: bool = False, dry_run: bool = False) -> list[Task]:
    """Queue one array task per point (one sbatch per MaxArraySize tasks); returns what was queued.

    `resume` on an existing sweep folder resubmits only tasks that are neither DONE nor still
    queued or running; without it an existing sweep folder is refused.
    """
    if kind not in JOBS:
        raise ClusterError(f"unknown job {kind!r}; choose one of {', '.join(JOBS)}")
    sweep_dir = Path(sweep_dir).resolve()
    configs = expand(base, points)
    for cfg in configs:
        check_job_paths(kind, cfg)
    if slurm.cluster == "slurm" and not dry_run:
        check_against_cluster(slurm)

    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        if not resume:
            raise ClusterError(f"sweep folder {sweep_dir} already exists; pass --resume to resubmit its "
                               "unfinished tasks, or choose another --sweep_dir")
        todo = _unfinished_tasks(sweep_dir, points)
    else:
        if resume:
            raise ClusterError(f"--resume: sweep folder {sweep_dir} does not exist")
        todo = list(range(len(points)))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({
            "job": kind, "grid": points, "base": to_dict(base), "slurm": to_dict(slurm)}, sort_keys=False))
    if not todo:
        return []

    # a fresh snapshot on every (re)submission: what runs is what the checkout holds now
    code_dir = snapshot_code(sweep_dir / "code")
    logs = sweep_dir / "logs"
    name = slurm.job_name or f"bonnerlab-{kind}-sweep"
    setup = job_setup_lines(slurm, code_dir)
    from bonnerlab.runs import write_git_info

    write_git_info(sweep_dir)  # once; every task folder gets a copy
    tasks = []
    for i in todo:
        run_dir = task_dir(sweep_dir, i)
        cfg = prepare_job_config(kind, configs[i], run_dir)
        if not (run_dir / "config.yaml").exists():
            write_run_description(run_dir, kind, cfg, slurm, {
                "run_dir": str(run_dir), "sweep_dir": str(sweep_dir), "task": i, "overrides": points[i]},
                git_from=sweep_dir)
        tasks.append((Task(i, points[i], run_dir), cfg))

    if dry_run:
        script = sbatch_script(slurm, logs, name, setup, array=min(len(tasks), _max_array_size_or_default()))
        (sweep_dir / "submit.sh").write_text(script)
        return [t for t, _ in tasks]

    per_array = max_array_size() if slurm.cluster == "slurm" else len(tasks)
    executor = make_executor(slurm, logs, name, setup)
    submitted: list[Task] = []
    for chunk in chunks(tasks, per_array):
        with _patched_env(_code_env(code_dir) if slurm.cluster == "local" else {}):
            with executor.batch():
                jobs = [executor.submit(ClusterJob(kind, cfg, str(t.run_dir), slurm.max_requeues,
                                                   slurm.gpus_per_node)) for t, cfg in chunk]
        for (t, _), job in zip(chunk, jobs, strict=True):
            t.job_id, t.job = str(job.job_id), job
            update_slurm_yaml(t.run_dir, {"job_id": t.job_id})
            submitted.append(t)
        array_id = str(jobs[0].job_id).split("_")[0]
        src = logs / f"{array_id}_submission.sh"
        if src.exists():
            (sweep_dir / f"submit-{array_id}.sh").write_text(src.read_text())
        _append_manifest(sweep_dir, [t for t, _ in chunk])
    return submitted


def _max_array_size_or_default() -> int:
    try:
        return max_array_size()
    except ClusterError:
        return 1001


def _unfinished_tasks(sweep_dir: Path, points: list[dict[str, Any]]) -> list[int]:
    saved = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) if (sweep_dir / "sweep.yaml").exists() else None
    if saved is not None and saved.get("grid") != points:
        raise ClusterError(f"--resume: {sweep_dir} was made with another grid ({saved.get('grid')}); "
                           "resume it with the same --sweep flags")
    table = sweep_status(sweep_dir, write=False)
    active = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
    done = {"DONE", "COMPLETED"}
    return [int(row.task) for row in table.itertuples() if row.state not in done | active]


# ----------------------------------------------------------------------------- status


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> state, from squeue (queued/running) then sacct (finished); {} without SLURM."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    states: dict[str, str] = {}
    try:
        # -r: one line per array task (a pending array is otherwise one "12_[3-9]" line)
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(sorted({i.split('_')[0] for i in ids}))],
                             capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid.strip()] = state.strip()
        missing = [i for i in ids if i not in states]
        if missing:
            out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(missing)],
                                 capture_output=True, text=True, timeout=30)
            for line in out.stdout.splitlines():
                if "|" in line:
                    jid, state = line.split("|", 1)
                    # "CANCELLED by 0" -> CANCELLED
                    states.setdefault(jid.strip(), state.split()[0] if state.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return states
    return states


def _tasks_of(path: Path) -> list[dict[str, Any]]:
    """Manifest rows of a sweep folder, or one row for a single run folder."""
    manifest = read_manifest(path)
    if manifest:
        return manifest
    from bonnerlab.runs import load_yaml_if_exists

    submitted = (load_yaml_if_exists(path / "slurm.yaml") or {}).get("submitted", {})
    if not (path / "config.yaml").exists():
        raise ClusterError(f"{path} is neither a sweep folder (manifest.jsonl) nor a run folder (config.yaml)")
    return [{"task": submitted.get("task", 0), "overrides": submitted.get("overrides", {}), "run_dir": str(path),
             "job_id": str(submitted.get("job_id", ""))}]


def sweep_status(path: str | Path, metric: str = "val_acc", mode: str = "max", write: bool = True) -> Any:
    """A pandas DataFrame, one row per task: overrides, state (squeue, sacct, then the job's marker),
    best and last `metric` from metrics.jsonl, and `best` marking the best task.

    With `write`, also saves results.csv and results.png (metric vs each swept value) in `path`.
    """
    import pandas as pd

    from bonnerlab.runs import read_metrics, read_state

    path = Path(path)
    rows = _tasks_of(path)
    slurm_states = _slurm_states([r["job_id"] for r in rows])
    records = []
    for r in rows:
        run_dir = Path(r["run_dir"])
        marker = read_state(run_dir) if run_dir.exists() else None
        state = slurm_states.get(r["job_id"]) or marker or "UNKNOWN"
        # SLURM says COMPLETED for a finished batch script; the marker says whether training did
        if state == "COMPLETED" and marker:
            state = marker
        metrics = read_metrics(run_dir) if run_dir.exists() else []
        values = [m[metric] for m in metrics if isinstance(m.get(metric), int | float)]
        best = (max(values) if mode == "max" else min(values)) if values else math.nan
        record = {"task": int(r["task"]), **{k: v for k, v in r["overrides"].items()},
                  "state": state, "job_id": r["job_id"], "epochs": len(metrics),
                  f"best_{metric}": best, f"last_{metric}": values[-1] if values else math.nan,
                  "run_dir": str(run_dir)}
        records.append(record)
    table = pd.DataFrame.from_records(records)
    col = f"best_{metric}"
    table["best"] = ""
    if table[col].notna().any():
        best_idx = table[col].idxmax() if mode == "max" else table[col].idxmin()
        table.loc[best_idx, "best"] = "*"
    if write:
        table.to_csv(path / "results.csv", index=False)
        keys = sorted({k for r in rows for k in r["overrides"]})
        if keys and table[col].notna().any():
            plot_sweep(table, keys, col, path / "results.png")
    return table


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
    shown = [c for c in table.columns if c not in ("run_dir",)]
    return table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}")
