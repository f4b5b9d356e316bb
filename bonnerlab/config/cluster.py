"""Where a job runs (SlurmConfig, the sbatch request) and jobs/launch.py's own options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bonnerlab.config.core import check, check_choice

CLUSTERS = ("slurm", "local", "debug")


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
    time_minutes: int = 30
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
        check_choice("cluster", self.cluster, CLUSTERS)
        for name in ("nodes", "cpus_per_task", "time_minutes", "array_parallelism"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "mem_gb", "max_requeues", "signal_delay_s"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node:
            # DDP runs one process per GPU; anything else leaves GPUs idle or shares one GPU
            check(
                self.tasks_per_node == self.gpus_per_node,
                f"tasks_per_node ({self.tasks_per_node}) must equal gpus_per_node ({self.gpus_per_node}): "
                "one process per GPU (leave tasks_per_node at 0 to get that)",
            )
        check(
            self.cluster != "debug" or self.ntasks == 1,
            "cluster debug runs in this process: it cannot run several tasks; use --cluster local",
        )

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def ntasks(self) -> int:
        return self.ntasks_per_node * self.nodes


@dataclass
class LaunchConfig:
    """jobs/launch.py's own options (the SLURM request is SlurmConfig, the job's its own config)."""

    # block until the job (or every sweep task) ends; print the results
    wait: bool = False
    # write and print the sbatch script (and a sweep's table of points); submit nothing
    dry_run: bool = False
    # KEY=V1,V2: sweep a job config key; several --sweep flags form a grid
    sweep: list[str] = field(default_factory=list)
    # KEY=V1,V2: values paired across --zip flags (equal lengths); times the --sweep grid
    zip: list[str] = field(default_factory=list)
    # YAML file of the points: `grid:` and `zip:` sections (or a plain mapping = a grid)
    sweep_file: str = ""
    # sweep folder (default <runs_root>/sweep-<date>-<time>-<job>)
    sweep_dir: str = ""
    # resubmit the retryable tasks of --sweep_dir (preempted, node failure, time limit, out of memory);
    # --sweep_dir may also be a single run folder
    resume: bool = False
    # with --resume: also resubmit tasks that failed with an error in the job, or were cancelled
    retry_failed: bool = False
    # with --resume: most resubmissions of one task
    max_retries: int = 3
    # with --resume: out-of-memory tasks ask for this many times the memory they had
    retry_mem_factor: float = 2.0
    # run only this task of the sweep (e.g. with --cluster local, to try one point first); -1 = all
    task: int = -1
    # extract: split the stimuli over N array tasks that write one store
    shards: int = 0
    # extra sbatch option KEY=VALUE, e.g. exclusive=true or reservation=lab (repeatable)
    additional_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.max_retries >= 0, f"max_retries must be >= 0; got {self.max_retries}")
        check(self.retry_mem_factor >= 1, f"retry_mem_factor must be >= 1; got {self.retry_mem_factor}")
        check(self.task >= -1, f"task must be >= 0 (or -1 = all); got {self.task}")
        check(self.shards >= 0, f"shards must be >= 1; got {self.shards}")
        check(not self.retry_failed or self.resume, "--retry_failed goes with --resume")
