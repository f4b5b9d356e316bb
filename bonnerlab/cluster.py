"""SLURM through submitit: `SlurmConfig`, fail-fast checks, the resumable job wrapper, submission.

    cfg = SlurmConfig(partition="gpu", gpus_per_node=1)
    sub = submit("train", TrainConfig(), cfg)          # returns at once; sub.job.result() waits

What happens on the node (`ClusterJob.__call__`):
  * STATE markers RUNNING -> DONE | FAILED in the run folder (the job writes them, not the launcher);
  * SIGTERM (preemption, scancel) and SIGUSR2 (submitit's "time limit is near") only set
    `bonnerlab.interrupt`'s flag; `train` saves `latest.pt` at the next step boundary and returns;
  * after a SIGUSR2 save, submitit's own handler runs `checkpoint()` and `scontrol requeue`s the job;
    after a SIGTERM save, SLURM itself requeues (preemption) or cancels the job, so the process waits
    to be killed instead of reporting a result that is not final;
  * every start resumes from `latest.pt` when it exists: on this SLURM a preempted job restarts from
    its original submission without `checkpoint()` ever being called;
  * `max_requeues` bounds the loop through `SLURM_RESTART_COUNT`.
The code the job runs is a snapshot copied into the run folder at submission (PYTHONPATH), so
editing the checkout after submitting does not change a queued job.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonnerlab.errors import UserError

CLUSTERS = ("slurm", "local", "debug")


class ClusterError(UserError):
    """A job that SLURM would refuse or could not run: nothing was queued."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClusterError(message)


# ----------------------------------------------------------------------------- config


@dataclass
class SlurmConfig:
    """Where and how a job runs: the sbatch request, built into a submitit executor."""

    # slurm (sbatch through submitit), local (a subprocess on this machine) or debug (in-process,
    # breakpoints work); local and debug run the very same job function
    cluster: str = "slurm"
    # SLURM partition; empty = the cluster's default partition
    partition: str = ""
    # number of nodes
    nodes: int = 1
    # GPUs per node (0 = CPU-only job)
    gpus_per_node: int = 0
    # processes per node; 0 = one per GPU (DDP), or 1 without GPUs
    tasks_per_node: int = 0
    # CPU cores per process (also sets OMP_NUM_THREADS and torch's thread count)
    cpus_per_task: int = 1
    # memory per node in GB (0 = the partition's default)
    mem_gb: float = 0.0
    # time limit in minutes; a job that reaches it saves, requeues and resumes
    time_min: int = 30
    # account to charge (sbatch --account); empty = your default
    account: str = ""
    # quality of service (sbatch --qos); empty = the default
    qos: str = ""
    # node features required (sbatch --constraint), e.g. "a100|h100"
    constraint: str = ""
    # e-mail address for job notifications
    mail_user: str = ""
    # when to e-mail: BEGIN, END, FAIL, ALL (comma-separated)
    mail_type: str = ""
    # job name shown by squeue; empty = bonnerlab-<job>
    job_name: str = ""
    # shell lines run before the job starts (e.g. "module load cuda")
    setup: list[str] = field(default_factory=list)
    # extra sbatch options, {"exclusive": true, "reservation": "lab"}; on the command line
    # --additional_parameters key=value (repeatable)
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # most tasks of a job array that run at the same time
    array_parallelism: int = 64
    # most requeues (time limits and preemptions) before the job is failed
    max_requeues: int = 3
    # seconds before the time limit when SLURM sends SIGUSR2 so the job can save and requeue
    signal_delay_s: int = 90

    def __post_init__(self) -> None:
        _check(self.cluster in CLUSTERS, f"cluster must be one of {', '.join(CLUSTERS)}; got {self.cluster!r}")
        _check(self.nodes >= 1, f"nodes must be >= 1; got {self.nodes}")
        _check(self.gpus_per_node >= 0, f"gpus_per_node must be >= 0; got {self.gpus_per_node}")
        _check(self.tasks_per_node >= 0, f"tasks_per_node must be >= 0; got {self.tasks_per_node}")
        _check(self.cpus_per_task >= 1, f"cpus_per_task must be >= 1; got {self.cpus_per_task}")
        _check(self.mem_gb >= 0, f"mem_gb must be >= 0; got {self.mem_gb}")
        _check(self.time_min >= 1, f"time_min must be >= 1; got {self.time_min}")
        _check(self.array_parallelism >= 1, f"array_parallelism must be >= 1; got {self.array_parallelism}")
        _check(self.max_requeues >= 0, f"max_requeues must be >= 0; got {self.max_requeues}")
        _check(self.signal_delay_s >= 0, f"signal_delay_s must be >= 0; got {self.signal_delay_s}")
        if self.gpus_per_node and self.tasks_per_node:
            # DDP runs one process per GPU; anything else leaves GPUs idle or shares one GPU
            _check(
                self.tasks_per_node == self.gpus_per_node,
                f"tasks_per_node ({self.tasks_per_node}) must equal gpus_per_node ({self.gpus_per_node}): "
                "one process per GPU (leave tasks_per_node at 0 to get that)",
            )
        _check(
            self.cluster != "debug" or self.ntasks == 1,
            "cluster debug runs in this process: it cannot run several tasks; use --cluster local",
        )

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def ntasks(self) -> int:
        return self.ntasks_per_node * self.nodes


# ----------------------------------------------------------------------------- the cluster


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ClusterError(f"{cmd[0]} not found: SLURM is not installed here; use --cluster local") from e
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"{' '.join(cmd)} did not answer in {timeout:.0f}s: is slurmctld up?") from e
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()
        raise ClusterError(f"{' '.join(cmd)} failed: {first[0] if first else out.returncode}")
    return out.stdout


def require_slurm() -> None:
    """One clear line when this machine has no SLURM client (nothing else can work)."""
    if shutil.which("sbatch") is None:
        raise ClusterError("no sbatch on PATH: this machine has no SLURM; run with --cluster local")


def parse_time_min(text: str) -> float:
    """SLURM time limit ([days-]hours:minutes:seconds, minutes, infinite) in minutes."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return float("inf")
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:  # minutes
        return days * 1440 + parts[0]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 1440 + h * 60 + m + s / 60


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    max_time_min: float
    gpus_per_node: int  # the most GPUs a node of the partition has (0: a CPU-only partition)
    nodes: int


SINFO_FORMAT = "%P|%l|%G|%D"


def parse_sinfo(text: str) -> dict[str, Partition]:
    """`sinfo -h -o SINFO_FORMAT` (one line per partition and node configuration) -> partitions."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, limit, gres, count = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        match = re.search(r"gpu(?::[^:,(]+)?:(\d+)", gres)
        gpus = int(match.group(1)) if match else 0
        nodes = int(count)
        old = found.get(name)
        if old is not None:  # several node kinds in one partition
            gpus, nodes = max(gpus, old.gpus_per_node), nodes + old.nodes
        found[name] = Partition(name, default, parse_time_min(limit), gpus, nodes)
    return found


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, as `sinfo` reports it."""
    return parse_sinfo(_run(["sinfo", "-h", "-o", SINFO_FORMAT]))


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it (`scontrol show config`)."""
    out = _run(["scontrol", "show", "config"])
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else 1001


def check_partition(cfg: SlurmConfig, parts: dict[str, Partition]) -> Partition:
    """Refuse what SLURM would refuse or never schedule on these partitions."""
    _check(bool(parts), "sinfo lists no partitions: is slurmctld up? (make slurm-up)")
    if cfg.partition:
        _check(
            cfg.partition in parts,
            f"unknown partition {cfg.partition!r}; this cluster has: {', '.join(sorted(parts))}",
        )
        part = parts[cfg.partition]
    else:
        defaults = [p for p in parts.values() if p.default]
        _check(bool(defaults), "this cluster has no default partition; pass --partition")
        part = defaults[0]
    if cfg.gpus_per_node:
        with_gpus = sorted(p.name for p in parts.values() if p.gpus_per_node >= cfg.gpus_per_node)
        _check(
            part.gpus_per_node >= cfg.gpus_per_node,
            f"partition {part.name} has {part.gpus_per_node or 'no'} GPUs per node but "
            f"{cfg.gpus_per_node} were requested; partitions with enough: {', '.join(with_gpus) or 'none'}",
        )
    _check(
        cfg.time_min <= part.max_time_min,
        f"time_min {cfg.time_min} is over partition {part.name}'s limit of {part.max_time_min:.0f} minutes",
    )
    _check(cfg.nodes <= part.nodes, f"{cfg.nodes} nodes requested; partition {part.name} has {part.nodes}")
    return part


def check_against_cluster(cfg: SlurmConfig) -> Partition:
    """Fail fast, before anything is queued, against the live cluster."""
    require_slurm()
    return check_partition(cfg, partitions())


# ----------------------------------------------------------------------------- job registry


@dataclass(frozen=True)
class JobSpec:
    """A job the launcher can run: its config class and function, as lazy "module:name" paths."""

    config: str
    function: str
    # config field that holds the run folder (set by the launcher), or None: the launcher's folder
    run_dir_field: str | None = None
    # config field that means "continue from the run folder's latest checkpoint"
    resume_field: str | None = None

    def load_config_class(self) -> type:
        return _import(self.config)

    def load_function(self) -> Any:
        return _import(self.function)


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# Adding a job to the launcher is one line here.
JOBS: dict[str, JobSpec] = {
    "train": JobSpec("bonnerlab.config:TrainConfig", "bonnerlab.training:train", "run_dir", "resume"),
    "evaluate": JobSpec("bonnerlab.config:EvaluateConfig", "bonnerlab.training:evaluate", "output_dir"),
    "extract": JobSpec("bonnerlab.extraction:ExtractConfig", "bonnerlab.extraction:extract"),
}


# ----------------------------------------------------------------------------- on the node


def _write_state(run_dir: Path, state: str) -> None:
    from bonnerlab.runs import write_state

    write_state(run_dir, state)


def _node_addr(node: str) -> str:
    """A node's address when its name does not resolve (the local cluster's second node)."""
    try:
        socket.gethostbyname(node)
        return node
    except OSError:
        out = _run(["scontrol", "show", "node", node, "-o"])
        match = re.search(r"NodeAddr=(\S+)", out)
        return match.group(1) if match else node


def export_distributed_env(gpus_per_node: int) -> None:
    """torch.distributed env:// variables for this submitit task (no-op for a single task).

    Works for SLURM and for the local executor's tasks. submitit seeds MASTER_PORT from the job
    id, so two jobs on one node do not collide. Device mapping is left to
    `bonnerlab.distributed` (cuda:LOCAL_RANK among the visible GPUs): submitit's
    CUDA_VISIBLE_DEVICES=local_rank would name the wrong physical GPU whenever SLURM gave this job
    GPUs other than 0..n-1.
    """
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    try:
        job_env = submitit.JobEnvironment()
        num_tasks, num_nodes = job_env.num_tasks, job_env.num_nodes
    except RuntimeError:  # not inside a submitit job (the debug executor)
        return
    if num_tasks <= 1:
        return
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        os.environ["MASTER_ADDR"] = _node_addr(env.master_addr)
    per_node = num_tasks // num_nodes
    if gpus_per_node:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if per_node > len(visible):
            raise RuntimeError(
                f"{per_node} tasks per node (SLURM_NTASKS_PER_NODE="
                f"{os.environ.get('SLURM_NTASKS_PER_NODE', '?')}) but {len(visible)} GPUs visible "
                f"(CUDA_VISIBLE_DEVICES={','.join(visible)}): one task per GPU is required"
            )


class ClusterJob:
    """The callable submitit pickles and runs on the node: one job in its run folder, resumable.

    A `submitit.helpers.Checkpointable` in spirit: `checkpoint()` returns a DelayedSubmission of
    the same job, which resumes from the run folder's `latest.pt`.
    """

    def __init__(self, kind: str, cfg: Any, run_dir: str, max_requeues: int = 3, gpus_per_node: int = 0):
        self.kind = kind
        self.cfg = cfg
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues
        self.gpus_per_node = gpus_per_node

    def __call__(self) -> dict[str, Any]:
        from bonnerlab import interrupt

        run_dir = Path(self.run_dir)
        rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts > self.max_requeues:
            if rank == 0:
                _write_state(run_dir, "FAILED")
            raise RuntimeError(f"requeued {restarts} times, more than max_requeues={self.max_requeues}")

        received: list[int] = []
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}

        def on_signal(signum: int, _frame: Any) -> None:
            received.append(signum)
            interrupt.request_stop()

        interrupt.reset()
        for sig in previous:
            signal.signal(sig, on_signal)
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if rank == 0:
            import bonnerlab

            _write_state(run_dir, "RUNNING")
            print(f"[bonnerlab] {self.kind} job in {run_dir}: restart {restarts}, code from "
                  f"{Path(bonnerlab.__file__).parent}", flush=True)
        try:
            try:
                export_distributed_env(self.gpus_per_node)
                cfg = self._resumable_config()
                result = JOBS[self.kind].load_function()(cfg)
            except BaseException:
                if rank == 0 and not received:
                    _write_state(run_dir, "FAILED")
                raise
            if isinstance(result, dict) and result.get("interrupted"):
                self._stop_after_save(run_dir, rank, received, previous[signal.SIGUSR2])
            if rank == 0:
                _write_state(run_dir, "DONE")
            return result
        finally:
            # the debug executor runs jobs inside the launcher: give its handlers back
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
                # The result is final. SLURM sends the time-limit signal up to a minute early, so
                # it can land after training: submitit's handler would requeue a finished job,
                # and during interpreter shutdown (handlers reset to default) it kills the
                # process, turning a COMPLETED job into FAILED. SIG_IGN survives shutdown.
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def _resumable_config(self) -> Any:
        spec = JOBS[self.kind]
        if spec.resume_field is None:
            return self.cfg
        from bonnerlab.config import apply_overrides

        return apply_overrides(self.cfg, {spec.resume_field: True})

    def _stop_after_save(self, run_dir: Path, rank: int, received: list[int], submitit_handler: Any) -> None:
        """latest.pt is saved: hand over to whoever asked us to stop. Never returns."""
        if received and received[-1] == signal.SIGUSR2 and callable(submitit_handler):
            # time limit near: submitit calls self.checkpoint(), `scontrol requeue`s this job and
            # exits (rank 0); other ranks return from it and are killed by the requeue. When
            # submitit refuses (too many timeouts) it raises, and the job ends FAILED.
            try:
                submitit_handler(signal.SIGUSR2, None)
            except Exception:
                if rank == 0:
                    _write_state(run_dir, "FAILED")
                raise
        # SIGTERM: SLURM is preempting (it requeues the job itself) or cancelling it. Returning
        # would report a result that is not final, so wait for the SIGKILL that follows.
        print(f"[bonnerlab] saved after signal {received}; waiting for SLURM to stop this task", flush=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1)
        raise RuntimeError("stopped by a signal but never killed or requeued")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on SIGUSR2: resubmit the same job; it resumes from latest.pt."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(type(self)(self.kind, self.cfg, self.run_dir, self.max_requeues,
                                            self.gpus_per_node))


# ----------------------------------------------------------------------------- submission


def sbatch_parameters(cfg: SlurmConfig, job_name: str, setup: list[str]) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (names as in submitit's _make_sbatch_string)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": cfg.time_min,
        "nodes": cfg.nodes,
        "ntasks_per_node": cfg.ntasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "array_parallelism": cfg.array_parallelism,
        "signal_delay_s": cfg.signal_delay_s,
        "setup": setup,
        # the job is requeued by submitit (time limit) and SLURM (preemption): allow it
        "additional_parameters": {"requeue": True, **cfg.additional_parameters},
    }
    if cfg.partition:
        params["partition"] = cfg.partition
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem"] = f"{int(cfg.mem_gb)}GB" if cfg.mem_gb == int(cfg.mem_gb) else f"{int(cfg.mem_gb * 1024)}MB"
    for name in ("account", "qos", "constraint", "mail_user", "mail_type"):
        if getattr(cfg, name):
            params[name] = getattr(cfg, name)
    return params


def job_setup_lines(cfg: SlurmConfig, code_dir: Path) -> list[str]:
    """Shell lines before the job: run the code snapshot, one thread per allotted core."""
    return [
        # the snapshot wins over the checkout; PYTHONSAFEPATH stops `python -m` from putting the
        # working directory (maybe the checkout itself) first on sys.path
        f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export PYTHONSAFEPATH=1",
        f"export OMP_NUM_THREADS={cfg.cpus_per_task}",
        *cfg.setup,
    ]


def snapshot_code(dest: Path) -> Path:
    """Copy bonnerlab/ and jobs/ into `dest` (the job imports from there, not the checkout)."""
    import bonnerlab

    package = Path(bonnerlab.__file__).resolve().parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(package, dest / "bonnerlab", ignore=ignore, dirs_exist_ok=True)
    jobs = package.parent / "jobs"
    if jobs.is_dir():
        shutil.copytree(jobs, dest / "jobs", ignore=ignore, dirs_exist_ok=True)
    return dest


def submitit_command(folder: Path) -> str:
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: SlurmConfig, folder: Path, job_name: str, setup: list[str], array: int | None = None) -> str:
    """The script submitit hands to sbatch, without submitting (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, job_name, setup)
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, map_count=array, **params)


def make_executor(cfg: SlurmConfig, folder: Path, job_name: str, setup: list[str]) -> Any:
    """A submitit executor for `cfg.cluster` writing its pickles and logs to `folder`."""
    import submitit

    if cfg.cluster == "slurm":
        require_slurm()
        executor: Any = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        executor.update_parameters(**sbatch_parameters(cfg, job_name, setup))
        return executor
    if cfg.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        executor.update_parameters(timeout_min=cfg.time_min, tasks_per_node=cfg.ntasks_per_node,
                                   gpus_per_node=cfg.gpus_per_node, cpus_per_task=cfg.cpus_per_task)
        return executor
    return submitit.DebugExecutor(folder=folder)


def _code_env(code_dir: Path) -> dict[str, str]:
    """Environment for local executors: run the snapshot like an sbatch job would."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{code_dir}:{path}" if path else str(code_dir), "PYTHONSAFEPATH": "1"}


class _patched_env:
    """Set environment variables while local jobs are spawned (they inherit them)."""

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_job_config(kind: str, cfg: Any, run_dir: Path) -> Any:
    """The job's config with its run folder filled in (absolute: the job may start elsewhere)."""
    from bonnerlab.config import apply_overrides

    spec = JOBS[kind]
    if spec.run_dir_field:
        cfg = apply_overrides(cfg, {spec.run_dir_field: str(run_dir)})
    if spec.resume_field:
        cfg = apply_overrides(cfg, {spec.resume_field: True})
    if kind == "train":
        # the job runs unattended: no progress bar in the log files
        cfg = apply_overrides(cfg, {"progress": False})
    return cfg


def check_job_paths(kind: str, cfg: Any) -> None:
    """Inputs that must exist before queueing (a job failing after an hour in the queue is worse)."""
    if kind == "train" and cfg.data.dataset != "digits":
        _check(Path(cfg.data.root).exists(), f"data.root {cfg.data.root} does not exist")
    checkpoint = getattr(cfg, "checkpoint", "")
    if checkpoint:
        _check(Path(checkpoint).exists(), f"checkpoint {checkpoint} does not exist")


def default_run_dir(kind: str, cfg: Any) -> Path:
    from bonnerlab.runs import default_run_name

    runs_root = getattr(cfg, "runs_root", "runs")
    if kind == "train":
        name = default_run_name(cfg.model.arch, cfg.data.dataset)
    else:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"
    return Path(runs_root) / name


def _yaml(data: Any) -> str:
    import yaml

    # the C emitter when PyYAML has it: a sweep writes two YAML files per task
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def write_run_description(run_dir: Path, kind: str, cfg: Any, slurm: SlurmConfig, extra: dict[str, Any],
                          git_from: Path | None = None) -> None:
    """config.yaml, slurm.yaml, git.txt/git.diff and STATE=PENDING, written at submission.

    Plain writes: nothing reads these before the job is queued, and a sweep writes them for every
    task (fsync per file made a 16-task submission several times slower). `git_from`: a folder
    whose git.txt/git.diff to copy instead of asking git again (the sweep folder).
    """
    from bonnerlab.config import to_dict
    from bonnerlab.runs import RunPaths, write_git_info

    run_dir.mkdir(parents=True, exist_ok=True)
    RunPaths(run_dir).config_yaml.write_text(_yaml(to_dict(cfg)))
    # SlurmConfig's fields (so `jobs/launch.py --config_path slurm.yaml` asks for the same again)
    # and what was submitted under `submitted`
    (run_dir / "slurm.yaml").write_text(_yaml({**to_dict(slurm), "submitted": {"job": kind, **extra}}))
    if git_from is None:
        write_git_info(run_dir)
    else:
        for name in ("git.txt", "git.diff"):
            if (git_from / name).exists():
                shutil.copyfile(git_from / name, run_dir / name)
    RunPaths(run_dir).state.write_text("PENDING\n")


def update_slurm_yaml(run_dir: Path, values: dict[str, Any]) -> None:
    from bonnerlab.runs import load_yaml_if_exists

    data = load_yaml_if_exists(run_dir / "slurm.yaml") or {}
    data.setdefault("submitted", {}).update(values)
    (run_dir / "slurm.yaml").write_text(_yaml(data))


@dataclass
class Submitted:
    job: Any  # submitit Job (None for a dry run)
    run_dir: Path
    job_id: str
    script: Path | None  # the sbatch script (submit.sh)

    def log_hint(self) -> str:
        if self.job is None:
            return ""
        out = getattr(self.job.paths, "stdout", None)
        return f"tail -f {out}" if out else ""


def refuse_existing_run_dir(kind: str, cfg: Any, run_dir: Path) -> None:
    spec = JOBS[kind]
    user_resume = bool(spec.resume_field and getattr(cfg, spec.resume_field))
    if run_dir.exists() and any(run_dir.iterdir()) and not user_resume:
        resume_hint = " or pass --resume to continue it" if spec.resume_field else ""
        raise ClusterError(f"run folder {run_dir} already exists; choose another --run_dir{resume_hint}")


def submit(kind: str, cfg: Any, slurm: SlurmConfig, run_dir: str | Path | None = None,
           dry_run: bool = False) -> Submitted:
    """Check, describe the run folder, snapshot the code, and queue one job (returns at once)."""
    _check(kind in JOBS, f"unknown job {kind!r}; choose one of {', '.join(JOBS)}")
    spec = JOBS[kind]
    if run_dir is None and spec.run_dir_field and getattr(cfg, spec.run_dir_field):
        run_dir = getattr(cfg, spec.run_dir_field)
    run_dir = Path(run_dir or default_run_dir(kind, cfg)).resolve()
    check_job_paths(kind, cfg)
    partition = check_against_cluster(slurm) if slurm.cluster == "slurm" and not dry_run else None
    refuse_existing_run_dir(kind, cfg, run_dir)

    job_cfg = prepare_job_config(kind, cfg, run_dir)
    name = slurm.job_name or f"bonnerlab-{kind}"
    write_run_description(run_dir, kind, job_cfg, slurm, {
        "run_dir": str(run_dir), "partition_used": partition.name if partition else slurm.partition})
    code_dir = snapshot_code(run_dir / "code")
    logs = run_dir / "logs"
    setup = job_setup_lines(slurm, code_dir)
    if dry_run:
        script = run_dir / "submit.sh"
        script.write_text(sbatch_script(slurm, logs, name, setup))
        return Submitted(None, run_dir, "", script)

    job_fn = ClusterJob(kind, job_cfg, str(run_dir), slurm.max_requeues, slurm.gpus_per_node)
    executor = make_executor(slurm, logs, name, setup)
    with _patched_env(_code_env(code_dir) if slurm.cluster == "local" else {}):
        job = executor.submit(job_fn)
    script = _copy_submission_script(logs, job.job_id, run_dir / "submit.sh")
    update_slurm_yaml(run_dir, {"job_id": str(job.job_id), "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return Submitted(job, run_dir, str(job.job_id), script)


def _copy_submission_script(logs: Path, job_id: str, dest: Path) -> Path | None:
    src = logs / f"{job_id}_submission.sh"
    if not src.exists():
        return None
    shutil.copyfile(src, dest)
    return dest


def config_summary(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
