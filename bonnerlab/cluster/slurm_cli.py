"""Every call to SLURM's commands (sinfo, squeue, sacct, scancel, scontrol), batched.

    parts = partitions()                       # sinfo: what the fail-fast checks compare against
    jobs = query(["12_0", "12_1", "13"])       # ONE squeue + at most ONE sacct, any number of ids
    cancel(["12", "13_4"])                     # ONE scancel

Submission itself is submitit's sbatch call (bonnerlab/cluster/submit.py). When no controller
answers, every function raises the same one-line `ClusterError` (NO_CONTROLLER) instead of SLURM's
own message (`resolve_ctls_from_dns_srv: res_nsearch error`), so every command says what to do.
`CALLS` counts the commands run in this process (the status benchmark and tests read it).
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

from bonnerlab.errors import ClusterError

NO_CONTROLLER = (
    "no SLURM controller reachable ({why}); start the local one "
    "(make slurm-up && source .slurm-lab/env.sh), run on a login node, or --cluster local"
)

# What SLURM's clients print when they cannot find or reach slurmctld (22.05 and later).
_NO_CONTROLLER_TEXT = re.compile(
    r"Unable to contact slurm controller|Could not establish a configuration source"
    r"|resolve_ctls_from_dns_srv"
    r"|Connection refused|connect failure|Unable to establish control machine"
    r"|Socket timed out",
    re.I,
)

# Job states in which a job is still queued or running (squeue's long names).
ACTIVE = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "STAGE_OUT",
        "SIGNALING",
        "STOPPED",
    }
)

CALLS: Counter[str] = Counter()


def run(cmd: list[str], timeout: float = 30) -> str:
    """Run one SLURM client command; its stdout, or a one-line ClusterError."""
    CALLS[cmd[0]] += 1
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ClusterError(NO_CONTROLLER.format(why=f"no {cmd[0]} on PATH")) from e
    except subprocess.TimeoutExpired as e:
        raise ClusterError(
            NO_CONTROLLER.format(why=f"{cmd[0]} got no answer in {timeout:.0f}s")
        ) from e
    if out.returncode != 0:
        text = (out.stderr or out.stdout).strip()
        first = text.splitlines()[0] if text else f"exit status {out.returncode}"
        if _NO_CONTROLLER_TEXT.search(text):
            raise ClusterError(NO_CONTROLLER.format(why=f"{cmd[0]}: {_strip_prefix(first)}"))
        raise ClusterError(f"{' '.join(cmd[:3])} ... failed: {first}")
    return out.stdout


def _strip_prefix(line: str) -> str:
    return re.sub(r"^\w+: error: ", "", line)


def require_client() -> None:
    """Before any submission: this machine must have SLURM's clients (sbatch) at all."""
    if shutil.which("sbatch") is None:
        CALLS["sbatch?"] += 1
        raise ClusterError(NO_CONTROLLER.format(why="no sbatch on PATH"))


# ----------------------------------------------------------------------------- partitions


def parse_time_minutes(text: str) -> float:
    """SLURM time ([days-]hours:minutes:seconds, minutes, infinite) in minutes."""
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
    max_time_minutes: float
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
        found[name] = Partition(name, default, parse_time_minutes(limit), gpus, nodes)
    return found


def partitions() -> dict[str, Partition]:
    """Every partition of the cluster, as `sinfo` reports it."""
    return parse_sinfo(run(["sinfo", "-h", "-o", SINFO_FORMAT]))


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it (`scontrol show config`)."""
    out = run(["scontrol", "show", "config"])
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else 1001


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobInfo:
    """What SLURM knows of one job or array task."""

    job_id: str
    # squeue/sacct long name, e.g. RUNNING, COMPLETED, OUT_OF_MEMORY
    # ("CANCELLED by 0" -> CANCELLED)
    state: str
    elapsed_s: int = 0  # sacct ElapsedRaw (0 while queued)
    gpus: int = 0  # allocated GPUs (all nodes)
    cpus: int = 0  # allocated CPUs (all nodes)
    mem_mb: int = 0  # allocated memory (per node, as requested)
    exit_code: str = ""  # sacct ExitCode "code:signal"
    reason: str = ""  # squeue's reason a job waits (Priority, Resources, ...)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def array_of(job_id: str) -> str:
    """ "12_3" -> "12"; a plain job id is its own array."""
    return job_id.split("_")[0]


def _tres(text: str, key: str) -> float:
    match = re.search(rf"(?:^|,){re.escape(key)}=([\d.]+)([KMGT]?)", text)
    if not match:
        return 0.0
    scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2)]
    return float(match.group(1)) * (scale if key == "mem" else 1)


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """`sacct -n -X -P -o JobID,State,ElapsedRaw,AllocTRES,ExitCode` -> job id -> JobInfo (last
    line wins)."""
    found: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, state, elapsed, tres, code = parts[:5]
        if "[" in jid:  # a pending array's summary line ("12_[3-9]"): squeue covers these
            continue
        found[jid] = JobInfo(
            jid,
            state.split()[0] if state.strip() else "",
            int(elapsed or 0),
            int(_tres(tres, "gres/gpu")),
            int(_tres(tres, "cpu")),
            int(_tres(tres, "mem")),
            code,
        )
    return found


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """`squeue -h -r -o %i|%T|%r` -> job id -> JobInfo."""
    found = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 2:
            found[parts[0].strip()] = JobInfo(
                parts[0].strip(),
                parts[1].strip(),
                reason=parts[2].strip() if len(parts) > 2 else "",
            )
    return found


def query(job_ids: list[str]) -> dict[str, JobInfo]:
    """job id -> JobInfo for every id SLURM still knows: ONE squeue, then ONE sacct for the rest.

    squeue lists this user's queued and running jobs (one line per array task with -r), all at
    once: asking by id fails as a whole when one id is too old for slurmctld. sacct is asked by
    array id, so a sweep of 1,000 tasks is one short command line.
    """
    ids = sorted({j for j in job_ids if j})
    if not ids:
        return {}
    live = parse_squeue(run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"]))
    found = {j: live[j] for j in ids if j in live}
    missing = sorted({array_of(j) for j in ids if j not in found})
    if missing:
        done = parse_sacct(
            run(
                [
                    "sacct",
                    "-n",
                    "-X",
                    "-P",
                    "-o",
                    "JobID,State,ElapsedRaw,AllocTRES,ExitCode",
                    "-j",
                    ",".join(missing),
                ]
            )
        )
        for j in ids:
            if j not in found and j in done:
                found[j] = done[j]
    return found


def active_ids(job_ids: list[str]) -> list[str]:
    """The ids among `job_ids` still queued or running: one squeue."""
    live = parse_squeue(run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"]))
    wanted = set(job_ids)
    return sorted(
        j for j, info in live.items() if (j in wanted or array_of(j) in wanted) and info.active
    )


def cancel(job_ids: list[str]) -> None:
    """scancel them all in one call (array ids cancel every task of the array)."""
    if job_ids:
        run(["scancel", *sorted(set(job_ids))])
