"""Where a job runs (SlurmConfig, the sbatch request), jobs/launch.py's own options, and the
options of the folder tools (jobs/status.py, jobs/cancel.py, jobs/logs.py).

Some fields carry simple-parsing metadata (`alias`, `positional`, `custom_args`, `cmd`) written
as plain dicts: they are the keys `simple_parsing.field(...)` would write, and spelling them out
keeps simple-parsing (70 ms) out of `import bonnerlab.config`.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from bonnerlab.config.core import check, check_choice

CLUSTERS = ("slurm", "local", "debug")

# the SlurmConfig strings written into the sbatch script as `#SBATCH --<flag>=<value>`
SBATCH_TEXT_FIELDS = (
    "job_name",
    "partition",
    "account",
    "qos",
    "constraint",
    "mail_user",
    "mail_type",
)
# an sbatch option's name (`additional_parameters` keys): written into the script unquoted
SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def control_character(text: str) -> str | None:
    """The first newline or other control character of `text` (None when it has none).

    A value is quoted in the sbatch script, but a newline still ends the `#SBATCH` comment line,
    so whatever follows it would run as a shell line of the job (`--job_name $'x\ntouch F #'`).
    Unicode line and paragraph separators count too: Python's splitlines breaks on them.
    """
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)


def check_sbatch_text(name: str, value: str) -> None:
    """One line (ConfigError) for a value that would break out of its line of the sbatch script."""
    bad = control_character(value)
    check(
        bad is None,
        f"{name} {value!r} holds the control character {bad!r}: it would end its line of the "
        "sbatch script (and run the rest as shell); remove it",
    )


def check_additional_parameters(extras: dict[str, Any]) -> None:
    """sbatch options given as a mapping: names as sbatch spells them, one-line scalar values."""
    for key, value in extras.items():
        check(
            isinstance(key, str) and SBATCH_OPTION.fullmatch(key) is not None,
            f"additional_parameters: {key!r} is not an sbatch option name (letters, digits, "
            "- and _, e.g. reservation or gres)",
        )
        check(
            isinstance(value, str | int | float | bool),
            f"additional_parameters.{key}: expected a string, number or true, got {value!r}",
        )
        check_sbatch_text(f"additional_parameters.{key}", str(value))


class Repeat(argparse.Action):
    """One value per use of the flag, repeatable: `--sweep a=1,2 --sweep b=3`.

    The first use replaces the default rather than adding to it, so a list given on the command
    line replaces the one a `--config_path` file gave (argparse's own "append" would extend it).
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, self.dest, None)
        if items is None or items is self.default:
            items = []
        setattr(namespace, self.dest, [*items, values])


def repeatable(item_type: type = str, metavar: str = "KEY=VALUES") -> dict[str, Any]:
    """Metadata for a list field given one item per flag. One value per flag (not nargs="*") also
    keeps a list flag from swallowing the job name that follows it (`--sweep seed=0,1 train`)."""
    return {"custom_args": {"action": Repeat, "nargs": None, "type": item_type, "metavar": metavar}}


def switch(*aliases: str) -> dict[str, Any]:
    """Metadata for a bool flag that takes no value: simple-parsing's own bool flags take an
    optional one, which would read the job name after `--wait` as the flag's value."""
    return {"custom_args": {"action": "store_true"}, "alias": list(aliases)}


def positional() -> dict[str, Any]:
    """Metadata for the folder a tool works on: given without a flag (`jobs/status.py runs/x`)."""
    return {"positional": True, "custom_args": {"metavar": "PATH"}}


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
    # a shell line run before the job starts, e.g. "module load cuda" (repeatable)
    setup: list[str] = field(default_factory=list, metadata=repeatable(metavar="LINE"))
    # extra sbatch options, {"exclusive": true, "reservation": "lab"}; on the command line
    # --additional_parameters key=value (repeatable: LaunchConfig's flag, so not a flag here)
    additional_parameters: dict[str, Any] = field(default_factory=dict, metadata={"cmd": False})
    # most tasks of a job array that run at the same time
    array_parallelism: int = 64
    # most requeues (time limits and preemptions) before the job is failed
    max_requeues: int = 3
    # seconds before the time limit when SLURM sends SIGUSR2 so the job can save and requeue
    signal_delay_s: int = 90

    def __post_init__(self) -> None:
        check_choice("cluster", self.cluster, CLUSTERS)
        for name in SBATCH_TEXT_FIELDS:
            check_sbatch_text(name, getattr(self, name))
        check(
            isinstance(self.additional_parameters, dict),
            f"additional_parameters: expected a mapping, got {self.additional_parameters!r}",
        )
        check_additional_parameters(self.additional_parameters)
        for name in ("nodes", "cpus_per_task", "time_minutes", "array_parallelism"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "mem_gb", "max_requeues", "signal_delay_s"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node:
            # DDP runs one process per GPU; anything else leaves GPUs idle or shares one GPU
            check(
                self.tasks_per_node == self.gpus_per_node,
                f"tasks_per_node ({self.tasks_per_node}) must equal "
                f"gpus_per_node ({self.gpus_per_node}): "
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
    wait: bool = field(default=False, metadata=switch())
    # write and print the sbatch script (and a sweep's table of points); submit nothing
    dry_run: bool = field(default=False, metadata=switch("--dry-run"))
    # KEY=V1,V2: sweep a job config key; several --sweep flags form a grid
    sweep: list[str] = field(default_factory=list, metadata=repeatable())
    # KEY=V1,V2: values paired across --zip flags (equal lengths); times the --sweep grid
    zip: list[str] = field(default_factory=list, metadata=repeatable())
    # YAML file of the points: `grid:` and `zip:` sections (or a plain mapping = a grid)
    sweep_file: str = ""
    # sweep folder (default <runs_root>/sweep-<date>-<time>-<job>)
    sweep_dir: str = ""
    # resubmit the retryable tasks of --sweep_dir (preempted, node failure, time limit, out of
    # memory); --sweep_dir may also be a single run folder
    resume: bool = field(default=False, metadata=switch())
    # with --resume: also resubmit tasks that failed with an error in the job, or were cancelled
    retry_failed: bool = field(default=False, metadata=switch())
    # with --resume: most resubmissions of one task
    max_retries: int = 3
    # with --resume: out-of-memory tasks ask for this many times the memory they had
    retry_mem_factor: float = 2.0
    # run only this task of the sweep (e.g. with --cluster local, to try one point first); -1 = all
    task: int = -1
    # extract: split the stimuli over N array tasks that write one store
    shards: int = 0
    # start only after this succeeds (sbatch --dependency=afterok): a job id (1234, 1234_5,
    # 1234:1240) or a run or sweep folder that jobs/launch.py submitted (all its jobs; an array
    # as a whole)
    after: str = ""
    # extra sbatch option KEY=VALUE, e.g. exclusive=true or reservation=lab (repeatable)
    additional_parameters: list[str] = field(
        default_factory=list, metadata=repeatable(metavar="KEY=VALUE")
    )

    def __post_init__(self) -> None:
        check(self.max_retries >= 0, f"max_retries must be >= 0; got {self.max_retries}")
        check(
            self.retry_mem_factor >= 1,
            f"retry_mem_factor must be >= 1; got {self.retry_mem_factor}",
        )
        check(self.task >= -1, f"task must be >= 0 (or -1 = all); got {self.task}")
        check(self.shards >= 0, f"shards must be >= 1; got {self.shards}")
        check(not self.retry_failed or self.resume, "--retry_failed goes with --resume")


@dataclass
class StatusConfig:
    """Every run and sweep at a glance, or one folder's table; \
writes results.csv and results.png."""

    # sweep or run folder; none = every folder under --runs_root
    path: str = field(default="", metadata=positional())
    # where to look for runs and sweeps
    runs_root: str = "runs"
    # metrics.jsonl key to rank tasks by
    metric: str = "val_acc"
    # max: larger is better; min: smaller is
    mode: str = "max"
    # refresh every N seconds until nothing is queued or running (0 = once)
    watch: float = 0.0

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("max", "min"))
        check(self.watch >= 0, f"--watch must be >= 0; got {self.watch}")


@dataclass
class CancelConfig:
    """Cancel a run's or sweep's queued and running jobs (one scancel); marks them CANCELLED."""

    # run or sweep folder
    path: str = field(metadata=positional())
    # only this task (repeatable); none = every queued or running task
    task: list[int] = field(default_factory=list, metadata=repeatable(int, "K"))
    # return right after scancel instead of waiting for the jobs to stop
    no_wait: bool = field(default=False, metadata=switch())


@dataclass
class LogsConfig:
    """The tail of a task's output or error log, found from its run or sweep folder alone."""

    # run or sweep folder
    path: str = field(metadata=positional())
    # the sweep task; none = the first (the only task of a run)
    task: int | None = field(default=None, metadata={"custom_args": {"metavar": "K"}})
    # which process of a multi-task job
    rank: int = 0
    # stderr instead of stdout
    err: bool = field(default=False, metadata=switch())
    # how many lines from the end
    lines: int = 40
    # keep printing what is appended (Ctrl-C stops)
    follow: bool = field(default=False, metadata=switch())

    def __post_init__(self) -> None:
        check(self.rank >= 0, f"--rank must be >= 0; got {self.rank}")
        check(self.lines >= 0, f"--lines must be >= 0; got {self.lines}")
