"""The run folder: one per run, self-describing, written only by rank 0.

    runs/<name>/
      config.yaml        resolved config; --config_path reproduces the run
      LOCK               the one live writer (RunLock): host, pid, SLURM job; mtime = heartbeat
      git.txt, git.diff  commit and uncommitted changes of the code that ran (git.1.txt ... earlier)
      metrics.jsonl      one JSON object per epoch
      events.out.tfevents.*  TensorBoard curves
      checkpoints/latest.pt, best.pt
      files.json         an image folder's scanned file list (the exact files trained on)
      eval-<split>/      what `evaluate` wrote: metrics.json, confusion matrix (CSV, PNG)
      STATE              PENDING | RUNNING | DONE | FAILED | INTERRUPTED | CANCELLED
                         (status shows LOST for a RUNNING one whose writer is gone)
      slurm.yaml         when launched on SLURM: the SlurmConfig and what was submitted
      submit.sh          the script given to sbatch (a single job's)
      code/              the code snapshot the queued job runs
      logs/              per-task stdout/stderr (submitit)

A sweep folder (`SweepPaths`) holds sweep.yaml, manifest.jsonl, code/, logs/, submit-<id>.sh and
one run folder per task (task-000/ ...), whose slurm.yaml points back at the sweep.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bonnerlab.errors import DiskSpaceError, FolderInUseError, RunDirError

STATES = ("PENDING", "RUNNING", "DONE", "FAILED", "INTERRUPTED", "CANCELLED")
# a `checkpoint` value that means the newest run folder under runs_root (`latest` is always a
# run's checkpoints/latest.pt, chosen with `which`)
NEWEST = "newest"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file.

    The file gets the user's umask (0644 under umask 022), as `open()` would give it: lab mates
    on a shared file system read it. `tempfile.mkstemp` would make every output 0600. A full
    disk is one DiskSpaceError line naming the file and the space it needed, the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise _disk_error(e, path, len(data)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _disk_error(e, path, len(data)) from None
        raise


def _disk_error(error: OSError, path: Path, size: int) -> OSError | DiskSpaceError:
    """ENOSPC/EDQUOT as one line (which file, how much it needed, how much is free); any other
    OSError as it is."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    why = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
    return DiskSpaceError(
        f"{why} writing {path}: it needs {size / 2**20:.1f} MiB ({size:,} bytes), {free} there; "
        "free space (or --run_dir elsewhere) and resume"
    )


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
    def lock(self) -> Path:
        """The one live writer: host, pid, SLURM job id, start time; its mtime is the heartbeat."""
        return self.root / "LOCK"

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
    line = json.dumps(record) + "\n"
    path = RunPaths(run_dir).metrics
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as e:
        raise _disk_error(e, path, len(line)) from None


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


def keep_previous(*paths: Path) -> None:
    """Move an earlier attempt's files aside before a restart writes its own: git.txt and git.diff
    become git.1.txt and git.1.diff (the next ones git.2.*, one number for the set), so what
    each attempt ran is kept; the plain names are always the newest."""
    n = 1
    while any(p.with_name(f"{p.stem}.{n}{p.suffix}").exists() for p in paths):
        n += 1
    for p in paths:
        if p.exists():
            os.replace(p, p.with_name(f"{p.stem}.{n}{p.suffix}"))


def write_git_info(run_dir: str | Path, source: str | Path | None = None) -> None:
    """Record the commit and uncommitted diff of the code (the package's own repository).

    A restart that runs other code keeps the earlier record (git.1.txt, git.1.diff, ...); the
    same code again adds nothing. Code that is no git checkout (a job's code/ snapshot) leaves
    the submitter's record alone.
    """
    source = Path(source) if source else Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], source)
    paths = RunPaths(run_dir)
    if commit is None:
        if not paths.git_txt.exists():
            atomic_write_text(paths.git_txt, "not a git checkout\n")
        return
    status = _git(["status", "--short"], source) or ""
    texts = {
        paths.git_txt: f"commit {commit.strip()}\n{status}",
        paths.git_diff: _git(["diff", "HEAD"], source) or "",
    }
    if all(p.exists() and p.read_text(errors="replace") == t for p, t in texts.items()):
        return
    keep_previous(*texts)
    for path, text in texts.items():
        atomic_write_text(path, text)


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


# ----------------------------------------------------------------------------- one writer


def _slurm_job() -> str:
    """This process's SLURM job as squeue names it (`123_4` for an array task), or ''."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot; '' where /proc has none): a pid
    reused by another process after a reboot or a wrap-around starts at another time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def read_lock(run_dir: str | Path) -> dict[str, Any] | None:
    """The LOCK of a run folder (None when there is none), with `heartbeat`: its mtime, which
    the writer refreshes at logging steps. A LOCK that does not parse reads as
    {"unreadable": True, ...}: being written, or cut short."""
    path = RunPaths(run_dir).lock
    try:
        heartbeat = path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": True, "heartbeat": path.stat().st_mtime if path.exists() else 0.0}
    if not isinstance(holder, dict):
        return {"unreadable": True, "heartbeat": heartbeat}
    return {**holder, "heartbeat": heartbeat}


def describe_holder(holder: dict[str, Any]) -> str:
    """ "host gpu07 pid 4121 (SLURM job 812_3), started 2026-12-01 14:02:11, heartbeat 12s ago" """
    if holder.get("unreadable"):
        return "an unreadable LOCK"
    job = f" (SLURM job {holder['job_id']})" if holder.get("job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    age = max(0.0, time.time() - holder.get("heartbeat", 0.0))
    return (
        f"host {holder.get('host')} pid {holder.get('pid')}{job}, started {started}, "
        f"heartbeat {age:.0f}s ago"
    )


def _slurm_job_active(job_id: str) -> bool | None:
    """Whether SLURM still runs `job_id`: one squeue; None when no controller answers."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # a job too old for slurmctld's memory is "Invalid job id specified": it has ended
        return False if "Invalid job id" in out.stderr else None
    states = out.stdout.split()
    return bool(states) and any(s not in ("COMPLETED", "FAILED", "CANCELLED") for s in states)


def holder_alive(holder: dict[str, Any], ask_slurm: bool = True) -> bool | None:
    """True when the LOCK's writer still runs, False when it is gone, None when this machine
    cannot tell (another host, no SLURM job to ask about).

    Gone: its pid is not running on this host (or runs a process started at another time); it
    was an earlier start of this very SLURM job (a requeue: the same job cannot run twice); or
    SLURM says its job has ended. No `flock`: that does not hold across the nodes of a cluster.
    """
    if holder.get("unreadable"):
        # a LOCK is written whole (os.link of a complete file): unparseable for a minute = cut short
        return None if time.time() - holder.get("heartbeat", 0.0) < 60 else False
    job, ours = str(holder.get("job_id") or ""), _slurm_job()
    if job and job == ours and int(holder.get("restart", 0)) < _restart_count():
        return False
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", 0))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        started = holder.get("pid_start", "")
        return not (started and _process_start(pid) and _process_start(pid) != started)
    if job and ask_slurm:
        return _slurm_job_active(job)
    return None


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class RunLock:
    """The one writer of a run folder: `acquire` before the first write, `beat` at logging
    steps, `release` at the end.

    Taken by hard-linking a complete file to LOCK (atomic on NFS and Lustre, where O_EXCL and
    `flock` have not always been); a stale LOCK (see `holder_alive`) is taken over under a
    second lock, so two processes never both take over the same one.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = RunPaths(run_dir).lock
        self.token = secrets.token_hex(8)
        self.held = False
        self._created_dir = False

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _process_start(pid),
            "job_id": _slurm_job(),
            "restart": _restart_count(),
            "started": time.time(),
            "token": self.token,
        }

    def _link(self) -> bool:
        tmp = self.path.with_name(f".LOCK.{self.token}.tmp")
        text = json.dumps(self._record()) + "\n"
        try:
            tmp.write_text(text)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _disk_error(e, self.path, len(text)) from None
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise _disk_error(e, self.path, len(text)) from None
            # a file system without hard links: O_EXCL, then the content
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> str:
        """Take the folder (creating it); returns '' or the line saying a stale lock was taken
        over. Raises a one-line RunDirError naming the live (or unknown) holder."""
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        note = ""
        for _ in range(20):
            if self._link():
                self.held = True
                return note
            holder = read_lock(self.run_dir)
            if holder is None:
                continue  # released between our link and our read
            alive = holder_alive(holder)
            if alive is not False:
                self._undo_mkdir()
                how = (
                    "wait for it to end or stop it"
                    if alive
                    else f"if that process is gone, delete {self.path}"
                )
                raise FolderInUseError(
                    f"run folder {self.run_dir} is in use by {describe_holder(holder)}: one "
                    f"writer per run folder; {how}"
                )
            if self._take_over(holder):
                note = f"took over the stale lock of {self.run_dir}: {describe_holder(holder)}"
        self._undo_mkdir()
        raise RunDirError(f"could not take {self.path}: other processes keep taking it")

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Remove the stale LOCK `stale` if it is still the one there; False if another process
        is taking it over right now."""
        guard = self.path.with_name("LOCK.takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > 60:  # its taker died mid-way
                    guard.unlink()
            time.sleep(0.2)
            return False
        os.close(fd)
        try:
            now = read_lock(self.run_dir)
            if now is not None and now.get("token") == stale.get("token"):
                self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _undo_mkdir(self) -> None:
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only when still empty: nothing of ours is left behind

    def beat(self) -> None:
        """The heartbeat: LOCK's mtime, one metadata write (status reads its age)."""
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self, remove_dir_if_empty: bool = False) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.run_dir)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if remove_dir_if_empty:
            self._undo_mkdir()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
