"""Submission from the login node: SlurmConfig -> fail-fast checks -> submitit -> run folders.

    sub = submit("train", TrainConfig(), SlurmConfig(partition="gpu", gpus_per_node=1))
    sub.job.result()                                   # returns at once; this waits

ONE path queues everything: a single job, a sweep's job array, the retry of some of its tasks
(each task may carry its own request, e.g. more memory), extraction shards and an analysis's
per-layer array all become a `Submission` of `Task`s handed to `submit_tasks`, which may wait
for other jobs (`after`: sbatch --dependency=afterok, so train -> extract -> analyze runs
unattended). What differs per kind of job lives on its
`JobSpec` (bonnerlab/cluster/registry.py), not in branches here. What runs on the node is
bonnerlab/cluster/node.py; every SLURM command other than submitit's sbatch is
bonnerlab/cluster/slurm_cli.py.

The code a job runs is a snapshot copied into the run (or sweep) folder at submission
(code/<content hash>/ on PYTHONPATH), so editing the checkout after submitting does not change a
queued job; it holds the files git tracks under bonnerlab/ and jobs/, never a symlink or a
dotfile (`snapshot_files`). Every string that reaches the sbatch script is checked for control
characters first (SlurmConfig's fields in its __post_init__, the folders here): a newline would
turn the rest of a value into a shell line of the job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonnerlab.cluster import slurm_cli
from bonnerlab.cluster.node import ClusterJob
from bonnerlab.cluster.registry import JOBS, JobSpec
from bonnerlab.config import SlurmConfig, apply_overrides, to_dict
from bonnerlab.config.cluster import control_character
from bonnerlab.errors import ClusterError
from bonnerlab.runs import NEWEST, RunPaths, SweepPaths, keep_previous, write_git_info


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClusterError(message)


def read_record(path: Path) -> dict[str, Any] | None:
    """A YAML file the launcher wrote (slurm.yaml, sweep.yaml): None when there is none, one line
    (ClusterError) when it is cut short, edited into invalid YAML or holds no mapping."""
    import yaml

    from bonnerlab.config.core import parse_yaml, yaml_error

    if not path.exists():
        return None
    try:
        data = parse_yaml(path.read_text(errors="replace"))
    except yaml.YAMLError as e:
        raise ClusterError(f"{path} is not valid YAML ({yaml_error(e)}): fix or remove it") from e
    _check(
        isinstance(data, dict | None),
        f"{path} holds no mapping of keys (a {type(data).__name__}): fix or remove it",
    )
    return data or {}


def submitted_record(data: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """slurm.yaml's `submitted` record, checked to be a mapping."""
    record = (data or {}).get("submitted") or {}
    _check(isinstance(record, dict), f"{path}: `submitted` is not a mapping: fix or remove it")
    return record


def spec_of(kind: str) -> JobSpec:
    _check(kind in JOBS, f"unknown job {kind!r}; choose one of {', '.join(JOBS)}")
    return JOBS[kind]


# ----------------------------------------------------------------------------- fail-fast checks


def check_partition(cfg: SlurmConfig, parts: dict[str, slurm_cli.Partition]) -> slurm_cli.Partition:
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
            f"{cfg.gpus_per_node} were requested; "
            f"partitions with enough: {', '.join(with_gpus) or 'none'}",
        )
    _check(
        cfg.time_minutes <= part.max_time_minutes,
        f"time_minutes {cfg.time_minutes} is over partition {part.name}'s limit of "
        f"{part.max_time_minutes:.0f} minutes",
    )
    _check(
        cfg.nodes <= part.nodes,
        f"{cfg.nodes} nodes requested; partition {part.name} has {part.nodes}",
    )
    return part


def check_against_cluster(cfg: SlurmConfig) -> slurm_cli.Partition:
    """Fail fast, before anything is queued, against the live cluster."""
    slurm_cli.require_client()
    return check_partition(cfg, slurm_cli.partitions())


def check_job_inputs(kind: str, cfg: Any) -> None:
    """Inputs that must exist before queueing (a job failing after an hour in the queue is
    worse). Not checked for a job that waits for others (`after`): they may be what makes them."""
    if kind == "train" and cfg.data.dataset != "digits":
        _check(Path(cfg.data.root).exists(), f"data.root {cfg.data.root} does not exist")
    for name in spec_of(kind).input_fields:
        value = getattr(cfg, name, "")
        if value and value != NEWEST:
            _check(Path(value).exists(), f"{name} {value} does not exist")


# ----------------------------------------------------------------------------- dependencies


def dependency_ids(after: str) -> list[str]:
    """`--after`'s job ids: given as ids (1234, 1234_5, 1234:1240), or every job a run or sweep
    folder was submitted as (its slurm.yaml / manifest.jsonl); an array task's id becomes its
    whole array (afterok on an array waits for every task of it)."""
    from bonnerlab.cluster.status import folder_kind, read_manifest

    after = after.strip()
    if re.fullmatch(r"\d+(_\d+)?(:\d+(_\d+)?)*", after):
        return after.split(":")
    path = Path(after)
    _check(path.is_dir(), f"--after {after}: neither a job id (1234) nor a run or sweep folder")
    if folder_kind(path) == "run":
        slurm_yaml = RunPaths(path).slurm_yaml
        submitted = submitted_record(read_record(slurm_yaml), slurm_yaml)
        ids = [str(submitted["job_id"])] if submitted.get("job_id") else []
    else:
        ids = [str(r["job_id"]) for r in read_manifest(path) if r.get("job_id")]
    _check(
        bool(ids),
        f"--after {after}: the folder holds no submitted job id (a --dry-run, or not launched "
        "on SLURM)",
    )
    return sorted({slurm_cli.array_of(i) for i in ids}, key=lambda i: (len(i), i))


def with_dependency(cfg: SlurmConfig, after: list[str]) -> SlurmConfig:
    """The request as sbatch gets it: afterok on `after` (kept out of slurm.yaml's SlurmConfig
    keys, so a later --config_path slurm.yaml does not wait for long-gone jobs)."""
    if not after:
        return cfg
    extras = {**cfg.additional_parameters, "dependency": "afterok:" + ":".join(after)}
    return dataclasses.replace(cfg, additional_parameters=extras)


# ----------------------------------------------------------------------------- the sbatch request


def sbatch_parameters(cfg: SlurmConfig, job_name: str, setup: list[str]) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (names as in submitit's _make_sbatch_string)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": cfg.time_minutes,
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
        params["mem"] = (
            f"{int(cfg.mem_gb)}GB"
            if cfg.mem_gb == int(cfg.mem_gb)
            else f"{int(cfg.mem_gb * 1024)}MB"
        )
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


def submitit_command(folder: Path, python: str | None = None) -> str:
    return " ".join(
        [
            shlex.quote(python or sys.executable),
            "-u -m submitit.core._submit",
            shlex.quote(str(folder)),
        ]
    )


def sbatch_script(
    cfg: SlurmConfig,
    folder: Path,
    job_name: str,
    setup: list[str],
    array: int | None = None,
    python: str | None = None,
) -> str:
    """The script submitit hands to sbatch, without submitting (for --dry-run and the golden
    test)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, job_name, setup)
    return _make_sbatch_string(
        command=submitit_command(folder, python), folder=folder, map_count=array, **params
    )


def make_executor(cfg: SlurmConfig, folder: Path, job_name: str, setup: list[str]) -> Any:
    """A submitit executor for `cfg.cluster` writing its pickles and logs to `folder`."""
    import submitit

    if cfg.cluster == "slurm":
        slurm_cli.require_client()
        executor: Any = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        executor.update_parameters(**sbatch_parameters(cfg, job_name, setup))
        return executor
    if cfg.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        executor.update_parameters(
            timeout_min=cfg.time_minutes,
            tasks_per_node=cfg.ntasks_per_node,
            gpus_per_node=cfg.gpus_per_node,
            cpus_per_task=cfg.cpus_per_task,
        )
        return executor
    return submitit.DebugExecutor(folder=folder)


# the code snapshot: bonnerlab/ and jobs/ as the checkout holds them, nothing else
SNAPSHOT_DIRS = ("bonnerlab", "jobs")
# ~40x the package today: above it something that is not code (data, weights) is tracked there
SNAPSHOT_MAX_MB = 20


def _git_listed(root: Path, *flags: str) -> list[str] | None:
    """`git ls-files FLAGS -- bonnerlab jobs` in `root` (paths relative to it); None without git,
    outside a work tree, or when git lists nothing there (a package copied into some other
    repository)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", *flags, "--", *SNAPSHOT_DIRS],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    names = [n for n in out.stdout.decode(errors="surrogateescape").split("\0") if n]
    return names or None


def _python_files(root: Path) -> list[str]:
    """Without git: the *.py files under bonnerlab/ and jobs/ (symlinked folders not entered)."""
    names = []
    for top in SNAPSHOT_DIRS:
        for here, dirs, files in os.walk(root / top):  # followlinks=False: never leaves the tree
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            rel = Path(here).relative_to(root)
            names += [str(rel / f) for f in files if f.endswith(".py")]
    return names


def _is_code(root: Path, name: str) -> bool:
    """A regular file reached without any symlink, and no dotfile or file in a dot-folder
    (.env, .ssh/): secrets live there, code does not."""
    import stat

    parts = Path(name).parts
    if any(p.startswith(".") or p == "__pycache__" for p in parts) or name.endswith(".pyc"):
        return False
    path = root
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # tracked but deleted in the checkout
            return False
        if stat.S_ISLNK(mode):
            return False
    return stat.S_ISREG(mode)


def snapshot_files(root: Path) -> list[str]:
    """What a snapshot copies, relative to the checkout `root`: the files git tracks under
    bonnerlab/ and jobs/ (only *.py where there is no git), never through a symlink, no
    dotfiles; sorted."""
    tracked = _git_listed(root, "--cached")
    names = tracked if tracked is not None else _python_files(root)
    if tracked is not None:
        untracked = [n for n in _git_listed(root, "--others", "--exclude-standard") or ()]
        untracked = [n for n in untracked if n.endswith(".py") and _is_code(root, n)]
        if untracked:
            # the job would fail to import them after an hour in the queue: say so now
            print(
                f"note: {len(untracked)} untracked file(s) left out of the code snapshot "
                f"(git add them to ship them): {', '.join(untracked[:5])}",
                file=sys.stderr,
            )
    return sorted({n for n in names if _is_code(root, n)})


def snapshot_code(code_root: Path, source: Path | None = None) -> Path:
    """Copy the checkout's code (`snapshot_files`) into code_root/<content hash>/ and return that
    folder: the job imports from there, not from the checkout.

    Content-addressed: a resubmission of unchanged code reuses its snapshot, and one of changed
    code gets its own folder beside the earlier ones, so a task still queued from an earlier
    submission keeps running the code it was submitted with. Above SNAPSHOT_MAX_MB it stops, in
    one line, before anything is copied.
    """
    import hashlib

    if source is None:
        import bonnerlab

        source = Path(bonnerlab.__file__).resolve().parent.parent
    names = snapshot_files(source)
    _check(
        "bonnerlab/__init__.py" in names,
        f"the code snapshot of {source} would hold no bonnerlab/__init__.py (is bonnerlab/ a "
        "symlink, or not tracked by git?): the job could not import it",
    )
    sizes = {n: os.lstat(source / n).st_size for n in names}
    total = sum(sizes.values())
    if total > SNAPSHOT_MAX_MB * 2**20:
        big = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise ClusterError(
            f"the code snapshot of {source} would be {total / 2**20:.1f} MB, over its "
            f"{SNAPSHOT_MAX_MB} MB cap; largest: "
            + ", ".join(f"{n} ({sizes[n] / 2**20:.1f} MB)" for n in big)
            + "; keep data and weights out of bonnerlab/ and jobs/"
        )
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode(errors="surrogateescape") + b"\0")
        digest.update((source / name).read_bytes() + b"\0")
    dest = code_root / digest.hexdigest()[:16]
    if dest.is_dir():
        return dest
    code_root.mkdir(parents=True, exist_ok=True)
    import uuid

    # built beside its final name and renamed: a half-copied snapshot is never used (mkdir, not
    # mkdtemp: that one is 0700, and lab mates read run folders)
    tmp = code_root / f".partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, tmp / name, follow_symlinks=False)
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():  # not another submission that made the same one meanwhile
            raise
    return dest


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


def _code_env(cluster: str, code_dir: Path) -> dict[str, str]:
    """Local executors run the snapshot like an sbatch job would (sbatch gets it from the
    script)."""
    if cluster != "local":
        return {}
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{code_dir}:{path}" if path else str(code_dir), "PYTHONSAFEPATH": "1"}


# ----------------------------------------------------------------------------- run folders


def prepare_job_config(kind: str, cfg: Any, run_dir: Path) -> Any:
    """The job's config as it runs on the node: its run folder (absolute), resumable, unattended."""
    spec = spec_of(kind)
    overrides: dict[str, Any] = dict(spec.unattended)
    if spec.run_dir_field:
        overrides[spec.run_dir_field] = str(run_dir)
    if spec.resume_field:
        overrides[spec.resume_field] = True
    return apply_overrides(cfg, overrides)


def default_run_dir(kind: str, cfg: Any) -> Path:
    from bonnerlab.runs import default_run_name, timestamp

    runs_root = getattr(cfg, "runs_root", "runs")
    if kind == "train":
        name = default_run_name(cfg.model.arch, cfg.data.dataset)
    else:
        name = f"{timestamp()}-{kind}"
    return Path(runs_root) / name


def yaml_text(data: Any) -> str:
    import yaml

    # the C emitter when PyYAML has it: a sweep writes two YAML files per task
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def check_folder_text(folder: Path) -> None:
    """A folder whose path goes into the sbatch script (logs, the code snapshot): no newline or
    other control character, which would end its line and run the rest as shell."""
    bad = control_character(str(folder))
    _check(
        bad is None,
        f"folder {str(folder)!r} holds the control character {bad!r}: it would end its line of "
        "the sbatch script (and run the rest as shell); choose another name",
    )


def write_run_description(
    run_dir: Path,
    kind: str,
    cfg: Any,
    slurm: SlurmConfig,
    extra: dict[str, Any],
    git_from: Path | None = None,
) -> None:
    """config.yaml, slurm.yaml, git.txt/git.diff and STATE=PENDING, written at submission.

    Plain writes: nothing reads these before the job is queued, and a sweep writes them for every
    task (fsync per file made a 16-task submission several times slower). `git_from`: a folder
    whose git.txt/git.diff to copy instead of asking git again (the sweep folder).
    """
    paths = RunPaths(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths.config_yaml.write_text(yaml_text(to_dict(cfg)))
    # SlurmConfig's fields (so `jobs/launch.py --config_path slurm.yaml` asks for the same again)
    # and what was submitted under `submitted`
    keep_previous(paths.slurm_yaml)
    paths.slurm_yaml.write_text(yaml_text({**to_dict(slurm), "submitted": {"job": kind, **extra}}))
    if git_from is None or git_from == run_dir:
        write_git_info(run_dir)
    else:
        copies = [
            (src, dest)
            for src, dest in (
                (RunPaths(git_from).git_txt, paths.git_txt),
                (RunPaths(git_from).git_diff, paths.git_diff),
            )
            if src.exists()
        ]
        keep_previous(*(dest for _, dest in copies))  # one number for the pair
        for src, dest in copies:
            shutil.copyfile(src, dest)
    paths.state.write_text("PENDING\n")


def update_slurm_yaml(run_dir: Path, values: dict[str, Any]) -> None:
    path = RunPaths(run_dir).slurm_yaml
    data = read_record(path) or {}
    data["submitted"] = {**submitted_record(data, path), **values}
    path.write_text(yaml_text(data))


def refuse_existing_run_dir(kind: str, cfg: Any, run_dir: Path) -> None:
    spec = spec_of(kind)
    user_resume = bool(spec.resume_field and getattr(cfg, spec.resume_field))
    if run_dir.exists() and any(run_dir.iterdir()) and not user_resume:
        resume_hint = " or pass --resume to continue it" if spec.resume_field else ""
        raise ClusterError(
            f"run folder {run_dir} already exists; choose another --run_dir{resume_hint}"
        )


# ----------------------------------------------------------------------------- the one submit path


@dataclass
class Task:
    """One job of a submission: a single run, or one point of a sweep (its array index)."""

    index: int
    overrides: dict[str, Any]
    run_dir: Path
    cfg: Any = None  # the job's config before prepare_job_config
    slurm: SlurmConfig | None = (
        None  # this task's own request (a retry with more memory); None = the submission's
    )
    retries: int = 0  # resubmissions so far (kept in the manifest)
    job_id: str = ""
    job: Any = None  # the submitit Job, when submitted from this process


@dataclass
class Submission:
    """What to queue: tasks of one job kind, in `folder` (a run folder, or a sweep folder when
    `array`)."""

    kind: str
    folder: Path
    slurm: SlurmConfig
    tasks: list[Task]
    # a sweep: tasks go out as job arrays (split at MaxArraySize), recorded in the folder's manifest
    array: bool = False
    dry_run: bool = False
    # written into each task's slurm.yaml `submitted` record
    extra: dict[str, Any] = field(default_factory=dict)
    # job ids to wait for (sbatch --dependency=afterok); see dependency_ids
    after: list[str] = field(default_factory=list)
    # a new sweep's sweep.yaml, written once every check has passed: a refused sweep leaves no
    # folder that a corrected command would then find "already exists"
    sweep_record: dict[str, Any] | None = None

    @property
    def job_name(self) -> str:
        return self.slurm.job_name or f"bonnerlab-{self.kind}" + ("-sweep" if self.array else "")


def _request_key(cfg: SlurmConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True, default=str)


def submit_tasks(sub: Submission) -> list[Task]:
    """Check everything, describe every run folder, snapshot the code, queue (returns at once).

    Tasks sharing a request go out as one job array (one sbatch per MaxArraySize tasks); a task
    with its own request (more memory on a retry) goes in the array of its request.
    """
    spec_of(sub.kind)
    folder = sub.folder
    for path in {folder, *(t.run_dir for t in sub.tasks)}:
        check_folder_text(path)
    _check(
        not sub.after or sub.slurm.cluster == "slurm" or sub.dry_run,
        f"--after needs --cluster slurm: a {sub.slurm.cluster} job starts at once, without waiting",
    )
    for t in sub.tasks if not sub.after else ():
        check_job_inputs(sub.kind, t.cfg)
    requests: dict[str, SlurmConfig] = {}
    for t in sub.tasks:
        requests.setdefault(_request_key(t.slurm or sub.slurm), t.slurm or sub.slurm)
    partition = ""
    if sub.slurm.cluster == "slurm" and not sub.dry_run:
        for request in requests.values():
            partition = check_against_cluster(request).name

    paths = SweepPaths(folder)
    # what runs is what the checkout holds now (checked against the size cap before anything is
    # written); an unchanged checkout reuses its snapshot
    code_dir = snapshot_code(paths.code)
    if sub.sweep_record is not None:
        paths.sweep_yaml.write_text(yaml_text(sub.sweep_record))
    write_git_info(folder)  # once; every task folder gets a copy
    job_cfgs = []
    for t in sub.tasks:
        job_cfg = prepare_job_config(sub.kind, t.cfg, t.run_dir)
        write_run_description(
            t.run_dir,
            sub.kind,
            job_cfg,
            t.slurm or sub.slurm,
            {
                "run_dir": str(t.run_dir),
                **sub.extra,
                **({"task": t.index, "overrides": t.overrides} if sub.array else {}),
                **({"after": sub.after} if sub.after else {}),
                "partition_used": partition or sub.slurm.partition,
                "retries": t.retries,
            },
            git_from=folder,
        )
        job_cfgs.append(job_cfg)

    by_request: dict[str, list[tuple[Task, Any]]] = {}
    for t, job_cfg in zip(sub.tasks, job_cfgs, strict=True):
        by_request.setdefault(_request_key(t.slurm or sub.slurm), []).append((t, job_cfg))
    if sub.dry_run:
        _write_dry_run(sub, paths, code_dir, {k: requests[k] for k in by_request}, by_request)
        return sub.tasks

    per_array = (
        (slurm_cli.max_array_size() if sub.slurm.cluster == "slurm" else len(sub.tasks))
        if sub.array
        else 1
    )
    for key, group in by_request.items():
        request = requests[key]
        executor = make_executor(
            with_dependency(request, sub.after),
            paths.logs,
            sub.job_name,
            job_setup_lines(request, code_dir),
        )
        for chunk in chunks(group, per_array):
            jobs_fn = [
                ClusterJob(
                    sub.kind, cfg, str(t.run_dir), request.max_requeues, request.gpus_per_node
                )
                for t, cfg in chunk
            ]
            with _patched_env(_code_env(request.cluster, code_dir)):
                if sub.array:
                    with executor.batch():
                        jobs = [executor.submit(fn) for fn in jobs_fn]
                else:
                    jobs = [executor.submit(jobs_fn[0])]
            _record(sub, paths, [t for t, _ in chunk], jobs)
    return sub.tasks


def _write_dry_run(
    sub: Submission,
    paths: SweepPaths,
    code_dir: Path,
    requests: dict[str, SlurmConfig],
    groups: dict[str, list[tuple[Task, Any]]],
) -> None:
    """submit.sh as sbatch would get it, submitting nothing: one script per request (a retry
    whose out-of-memory tasks ask for more memory is a second array), one after the other."""
    scripts = []
    for n, (key, group) in enumerate(groups.items(), 1):
        request = requests[key]
        script = sbatch_script(
            with_dependency(request, sub.after),
            paths.logs,
            sub.job_name,
            job_setup_lines(request, code_dir),
            array=min(len(group), _max_array_size_or_default()) if sub.array else None,
        )
        if len(groups) > 1:
            tasks = ", ".join(str(t.index) for t, _ in group)
            script = f"# ---- sbatch script {n} of {len(groups)}: tasks {tasks}\n{script}"
        scripts.append(script)
    keep_previous(paths.submit_sh)
    paths.submit_sh.write_text("\n".join(scripts))


def _record(sub: Submission, paths: SweepPaths, tasks: list[Task], jobs: list[Any]) -> None:
    """Job ids into each task's slurm.yaml, the sbatch script beside them, the manifest (sweeps)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for t, job in zip(tasks, jobs, strict=True):
        t.job_id, t.job = str(job.job_id), job
        update_slurm_yaml(t.run_dir, {"job_id": t.job_id, "submitted_at": now})
    array_id = slurm_cli.array_of(tasks[0].job_id)
    src = paths.logs / f"{array_id}_submission.sh"
    if src.exists():
        dest = paths.array_script(array_id) if sub.array else paths.submit_sh
        keep_previous(dest)
        shutil.copyfile(src, dest)
    if sub.array:
        append_manifest(paths, tasks, now, sub.slurm)


def append_manifest(paths: SweepPaths, tasks: list[Task], now: str, default: SlurmConfig) -> None:
    """One line per task, in one write; a line an earlier submission left half-written (killed,
    full disk) is ended first, so it spoils only itself and never the records after it."""
    text = "".join(
        json.dumps(
            {
                "task": t.index,
                "overrides": t.overrides,
                "run_dir": str(t.run_dir),
                "job_id": t.job_id,
                "submitted_at": now,
                "retries": t.retries,
                "mem_gb": (t.slurm or default).mem_gb,
            }
        )
        + "\n"
        for t in tasks
    )
    with open(paths.manifest, "ab+") as f:  # appends whatever the position; reads for the check
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _max_array_size_or_default() -> int:
    try:
        return slurm_cli.max_array_size()
    except ClusterError:
        return 1001


# ----------------------------------------------------------------------------- a single job


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


def submit(
    kind: str,
    cfg: Any,
    slurm: SlurmConfig,
    run_dir: str | Path | None = None,
    dry_run: bool = False,
    after: list[str] | None = None,
) -> Submitted:
    """Queue one job in its own run folder (returns at once); `after`: job ids to wait for."""
    spec = spec_of(kind)
    if run_dir is None and spec.run_dir_field and getattr(cfg, spec.run_dir_field):
        run_dir = getattr(cfg, spec.run_dir_field)
    run_dir = Path(run_dir or default_run_dir(kind, cfg)).resolve()
    check_folder_text(run_dir)
    if not after:
        check_job_inputs(kind, cfg)
    refuse_existing_run_dir(kind, cfg, run_dir)
    (task,) = submit_tasks(
        Submission(
            kind, run_dir, slurm, [Task(0, {}, run_dir, cfg)], dry_run=dry_run, after=after or []
        )
    )
    script = RunPaths(run_dir).submit_sh
    return Submitted(task.job, run_dir, task.job_id, script if script.exists() else None)
