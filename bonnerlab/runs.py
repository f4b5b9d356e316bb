"""The run folder: one per run, self-describing, written only by rank 0.

    runs/<name>/
      config.yaml        resolved config; --config_path reproduces the run
      git.txt, git.diff  commit and uncommitted changes of the code that ran
      metrics.jsonl      one JSON object per epoch
      events.out.tfevents.*  TensorBoard curves
      checkpoints/latest.pt, best.pt
      files.json         an image folder's scanned file list (the exact files trained on)
      eval-<split>/      what `evaluate` wrote: metrics.json, confusion matrix (CSV, PNG)
      STATE              PENDING | RUNNING | DONE | FAILED | INTERRUPTED | CANCELLED
      slurm.yaml         when launched on SLURM: the SlurmConfig and what was submitted
      submit.sh          the script given to sbatch (a single job's)
      code/              the code snapshot the queued job runs
      logs/              per-task stdout/stderr (submitit)

A sweep folder (`SweepPaths`) holds sweep.yaml, manifest.jsonl, code/, logs/, submit-<id>.sh and
one run folder per task (task-000/ ...), whose slurm.yaml points back at the sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

STATES = ("PENDING", "RUNNING", "DONE", "FAILED", "INTERRUPTED", "CANCELLED")
# a `checkpoint` value that means the newest run folder under runs_root (`latest` is always a
# run's checkpoints/latest.pt, chosen with `which`)
NEWEST = "newest"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically (a status page never shows half a PNG) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def timestamp() -> str:
    """The local time that names automatic run, sweep and shard folders: 20261201-114626."""
    return time.strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def state(self) -> Path:
        return self.root / "STATE"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def slurm_yaml(self) -> Path:
        return self.root / "slurm.yaml"

    @property
    def submit_sh(self) -> Path:
        return self.root / "submit.sh"

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def git_txt(self) -> Path:
        return self.root / "git.txt"

    @property
    def git_diff(self) -> Path:
        return self.root / "git.diff"

    @property
    def files_json(self) -> Path:
        """An image folder's scanned file list: the exact files the run trained and validated on."""
        return self.root / "files.json"

    def eval_dir(self, split: str) -> Path:
        return self.root / f"eval-{split}"

    # what `jobs/status.py` writes into a run or sweep folder
    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def results_png(self) -> Path:
        return self.root / "results.png"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"


class SweepPaths(RunPaths):
    """A sweep folder: the shared parts of RunPaths (code/, logs/, git.txt) plus the task
    folders."""

    @property
    def sweep_yaml(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.jsonl"

    def task(self, index: int) -> Path:
        return self.root / f"task-{index:03d}"

    def array_script(self, array_id: str) -> Path:
        return self.root / f"submit-{array_id}.sh"


def load_yaml_if_exists(path: str | Path) -> dict[str, Any] | None:
    import yaml

    path = Path(path)
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def default_run_name(arch: str, dataset: str) -> str:
    return f"{timestamp()}-{arch}-{dataset}"


def write_state(run_dir: str | Path, state: str) -> None:
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    atomic_write_text(RunPaths(run_dir).state, state + "\n")


def read_state(run_dir: str | Path) -> str | None:
    path = RunPaths(run_dir).state
    return path.read_text().strip() if path.exists() else None


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    # One short line per append: O_APPEND writes of this size are not interleaved.
    with open(RunPaths(run_dir).metrics, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = RunPaths(run_dir).metrics
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill; the epoch is redone on resume anyway
    return records


def truncate_metrics(run_dir: str | Path, last_epoch: int) -> None:
    """Drop records after `last_epoch`: a resumed run rewrites the epochs it redoes."""
    path = RunPaths(run_dir).metrics
    if path.exists():
        kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= last_epoch]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def write_git_info(run_dir: str | Path, source: str | Path | None = None) -> None:
    """Record the commit and uncommitted diff of the code (the package's own repository)."""
    source = Path(source) if source else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], source)
    root = Path(run_dir)
    if commit is None:
        atomic_write_text(RunPaths(root).git_txt, "not a git checkout\n")
        return
    status = _git(["status", "--short"], source) or ""
    atomic_write_text(RunPaths(root).git_txt, f"commit {commit.strip()}\n{status}")
    atomic_write_text(RunPaths(root).git_diff, _git(["diff", "HEAD"], source) or "")


def git_commit(source: str | Path | None = None) -> str | None:
    source = Path(source) if source else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], source)
    return commit.strip() if commit else None


def latest_run(runs_root: str | Path) -> Path | None:
    """The most recently modified run folder (one holding config.yaml) under `runs_root`."""
    root = Path(runs_root)
    if not root.is_dir():
        return None
    runs = [p.parent for p in root.glob("**/config.yaml")]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


class Sink(Protocol):
    """An experiment tracker beside TensorBoard (W&B, MLflow): gets what TensorBoard gets."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def epoch(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Logger:
    """metrics.jsonl + TensorBoard scalars (+ optional trackers); a no-op object on ranks other
    than 0."""

    def __init__(self, run_dir: str | Path | None, trackers: Sink | None = None) -> None:
        self.enabled = run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.trackers = trackers
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir), flush_secs=10)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self.trackers is not None:
            self.trackers.scalars(values, step)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_metrics(self.run_dir, record)
        if self.trackers is not None:
            self.trackers.epoch(record)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
