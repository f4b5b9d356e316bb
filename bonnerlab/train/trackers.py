"""Experiment trackers (Weights & Biases, MLflow) as thin, optional outputs of a training run.

The run folder stays the source of truth (metrics.jsonl, TensorBoard events); a tracker gets what
TensorBoard gets, from rank 0 only: per-step `train/loss` and `train/lr` (against `global_step`),
each epoch's metrics.jsonl record as `epoch/<key>` (against `epoch`), the resolved config, the run
folder's path and the git commit. Off unless `--log.wandb` / `--log.mlflow`; wandb and mlflow are
imported only then, so a job that asks for neither starts as it did.

One tracker run per run folder. Its id is derived from the run folder's resolved path (a sweep
task's folder is its sweep folder + task-NNN, so the task is in it) and written to the run
folder's trackers.json before the tracker run is opened; --resume, a requeue and `launch.py
--sweep_dir ... --resume` read it back and continue the same W&B run (`id`, `resume="allow"`)
or MLflow run (its run_id, found again by the `bonnerlab.run_key` tag if trackers.json was lost).
Sweep tasks are grouped: W&B `group` and the MLflow experiment are the sweep folder's name.
A resumed MLflow run skips the points it already holds (steps redone after a hard kill); W&B is
not compared, so after a hard kill (SIGKILL, a lost node; a stop request saves where it stops) the
steps redone since the checkpoint appear twice there. A run folder deleted and started again at
the same path continues its old tracker run: choose a new --run_dir.

W&B writes into <run folder>/wandb/: offline (each start one offline-run-*-<id> folder, all with
the same id; `wandb sync` uploads them in order as one run) when `--log.wandb_mode offline`, when
WANDB_MODE says so, or in `auto` when the service does not answer a TCP connect within
REACH_TIMEOUT_S. `jobs/sync.py RUNS_OR_SWEEP` syncs them from a login node. MLflow logs to
`--log.mlflow_uri`, by default a SQLite store in the run folder (mlflow.db): one writer per file.
A sweep given a `sqlite:` URI is refused (many tasks writing one SQLite file over a shared file
system corrupt or lock it): leave the URI empty (one store per task) or run `mlflow server`.

A tracker failure never fails training: one warning line, then that tracker is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonnerlab.config import LogConfig, TrainConfig, flat_keys, to_dict
from bonnerlab.runs import (
    RunPaths,
    Sink,
    atomic_write_text,
    git_commit,
    load_yaml_if_exists,
    read_state,
)

TRACKERS_JSON = "trackers.json"  # in the run folder: the tracker runs' ids, reused on resume
WANDB_URL = "https://api.wandb.ai"
# auto mode's connect check: long enough for a login node's round trip to the service, short
# enough that an offline compute node loses no more than this at start
REACH_TIMEOUT_S = 0.5
# MLflow buffers per-step points and writes them in one batch at each epoch end, at close, and
# when this many seconds or points have gone by (one SQLite transaction per batch, not per step)
FLUSH_SECONDS = 10.0
FLUSH_POINTS = 1000  # MLflow's log_batch takes at most 1,000 metrics


def warn(message: str) -> None:
    print(f"[bonnerlab] warning: {message}", file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


# ----------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class RunIdentity:
    """What names a run folder's tracker run: the same folder, the same names, every start."""

    run_dir: Path  # resolved
    key: str  # the W&B run id and the MLflow `bonnerlab.run_key` tag
    name: str  # display name: the folder's name, <sweep>/task-NNN for a sweep task
    sweep: str | None  # the sweep folder's name: W&B group, MLflow experiment
    sweep_dir: Path | None
    task: int | None
    commit: str | None  # read once: every tracker records the same one


def run_key(run_dir: str | Path) -> str:
    """The tracker run id of a run folder: derived from its resolved path, so every start of the
    folder (resume, requeue, a retried sweep task) derives the same one."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def run_identity(run_dir: str | Path) -> RunIdentity:
    run_dir = Path(run_dir).resolve()
    # a sweep task's slurm.yaml (written at submission) names its sweep folder and task index
    submitted = (load_yaml_if_exists(RunPaths(run_dir).slurm_yaml) or {}).get("submitted") or {}
    sweep_dir = Path(submitted["sweep_dir"]) if submitted.get("sweep_dir") else None
    task = submitted.get("task") if sweep_dir is not None else None
    saved = read_trackers_json(run_dir)
    return RunIdentity(
        run_dir=run_dir,
        key=saved.get("key") or run_key(run_dir),
        name=f"{sweep_dir.name}/{run_dir.name}" if sweep_dir else run_dir.name,
        sweep=sweep_dir.name if sweep_dir else None,
        sweep_dir=sweep_dir,
        task=int(task) if task is not None else None,
        commit=_commit(run_dir),
    )


def read_trackers_json(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / TRACKERS_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_trackers_json(run_dir: Path, section: str, values: dict[str, Any]) -> None:
    data = read_trackers_json(run_dir)
    data.setdefault("key", run_key(run_dir))
    data[section] = values
    atomic_write_text(run_dir / TRACKERS_JSON, json.dumps(data, indent=1) + "\n")


def _commit(run_dir: Path) -> str | None:
    """The code's commit; a SLURM job runs a code snapshot (no .git), whose commit was written to
    the run folder's git.txt at submission."""
    commit = git_commit()
    if commit:
        return commit
    try:
        first = RunPaths(run_dir).git_txt.read_text().split()
    except OSError:
        return None
    return first[1] if len(first) > 1 and first[0] == "commit" else None


def _about(ident: RunIdentity) -> dict[str, Any]:
    """The run folder's facts every tracker records beside the config."""
    about: dict[str, Any] = {"run_dir": str(ident.run_dir), "git_commit": ident.commit}
    if ident.sweep_dir is not None:
        about.update(sweep_dir=str(ident.sweep_dir), task=ident.task)
    return about


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """An epoch record's numeric values as `epoch/<key>` (its `epoch` is the step)."""
    return {
        f"epoch/{k}": float(v)
        for k, v in record.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


# ----------------------------------------------------------------------------- reachability


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` seconds, name lookup
    included. getaddrinfo has no timeout of its own (an offline node's resolver may wait seconds
    per try), so the attempt runs in a daemon thread, left behind when the time is up."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True, name="bonnerlab-reachable")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def wandb_mode(configured: str, timeout: float = REACH_TIMEOUT_S) -> str:
    """online or offline: `--log.wandb_mode` unless auto; in auto, WANDB_MODE when set (W&B's
    own variable, as wandb itself reads it), else online when the service answers in time."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline"
    if env in ("online", "disabled"):
        return env
    return (
        "online" if reachable(os.environ.get("WANDB_BASE_URL") or WANDB_URL, timeout) else "offline"
    )


# ----------------------------------------------------------------------------- W&B


class WandbTracker:
    """One W&B run per run folder: id = the run folder's key, resumed with resume="allow"."""

    label = "W&B"

    def __init__(self, cfg: TrainConfig, ident: RunIdentity) -> None:
        import wandb

        mode = wandb_mode(cfg.log.wandb_mode)
        config = {**to_dict(cfg), "bonnerlab": _about(ident)}
        try:
            self.run = self._init(wandb, cfg, ident, mode)
        except Exception as e:
            if mode != "online" or cfg.log.wandb_mode == "online":
                raise
            # auto found the service but could not log in (no API key on this node, ...)
            warn(f"W&B online failed ({_first_line(e)}); logging offline instead")
            mode = "offline"
            self.run = self._init(wandb, cfg, ident, mode)
        # given here, not to init: a resumed run's resumable keys (resume, device, ...) may
        # differ from its first start's
        self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("global_step")
        self.run.define_metric("train/*", step_metric="global_step")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")
        self.run_dir, self.mode = ident.run_dir, mode
        _save_trackers_json(
            ident.run_dir,
            "wandb",
            {"id": ident.key, "project": self.run.project, "group": ident.sweep, "mode": mode},
        )
        where = self.run.url
        if mode == "offline":
            where = f"offline in {ident.run_dir / 'wandb'} (upload: jobs/sync.py {ident.run_dir})"
        print(f"[bonnerlab] W&B run {ident.key}: {where}", flush=True)

    @staticmethod
    def _init(wandb: Any, cfg: TrainConfig, ident: RunIdentity, mode: str) -> Any:
        return wandb.init(
            project=cfg.log.wandb_project or "bonnerlab",
            id=ident.key,
            resume="allow",
            name=ident.name,
            group=ident.sweep,
            job_type="train",
            dir=str(ident.run_dir),  # offline runs live in the run folder: jobs/sync.py finds them
            mode=mode,
            reinit="create_new",  # never take over (or finish) a run the caller opened itself
            # console off: the job's own output stays as it is (submitit keeps it in logs/)
            settings=wandb.Settings(console="off", quiet=True),
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        # epoch/ values come whole from `epoch`, against the epoch axis
        per_step = {k: v for k, v in values.items() if not k.startswith("epoch/")}
        if per_step:
            self.run.log({**per_step, "global_step": step})

    def epoch(self, record: dict[str, Any]) -> None:
        self.run.log({**_numbers(record), "epoch": record["epoch"]})

    def close(self) -> None:
        state = read_state(self.run_dir)
        if state == "INTERRUPTED":
            self.run.mark_preempting()  # shown as preempted until the resumed job continues it
        self.run.finish(exit_code=1 if state == "FAILED" else 0)


# ----------------------------------------------------------------------------- MLflow


def mlflow_uri(log: LogConfig, ident: RunIdentity) -> str:
    """`--log.mlflow_uri`, or a SQLite store in the run folder; a sweep's tasks are never given
    one SQLite file to write at once."""
    if ident.sweep_dir is not None:
        log.check_sweep(str(ident.sweep_dir))
    return log.mlflow_uri or f"sqlite:///{ident.run_dir / 'mlflow.db'}"


def _experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another task created it in between
        if found is None:
            raise
        return found.experiment_id


class MlflowTracker:
    """One MLflow run per run folder: created once, continued by its run_id on every resume."""

    label = "MLflow"

    def __init__(self, cfg: TrainConfig, ident: RunIdentity) -> None:
        uri = mlflow_uri(cfg.log, ident)
        if uri.startswith(("http://", "https://")):
            self._bound_retries()
            if not reachable(uri, timeout=5.0):
                raise ConnectionError(f"{uri} does not answer")
        import logging

        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        # its INFO lines at every new SQLite store ("Creating initial MLflow database tables")
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = client = MlflowClient(tracking_uri=uri)
        local = uri.startswith("sqlite:") and not cfg.log.mlflow_uri
        experiment = cfg.log.mlflow_experiment or ident.sweep or "bonnerlab"
        # a local store keeps its artifacts beside it, not in ./mlruns of the job's cwd
        artifacts = (ident.run_dir / "mlflow-artifacts").as_uri() if local else None
        experiment_id = _experiment_id(client, experiment, artifacts)
        about = _about(ident)
        tags = {
            "bonnerlab.run_key": ident.key,
            **{f"bonnerlab.{k}": str(v) for k, v in about.items() if v is not None},
        }
        if ident.sweep:
            tags["bonnerlab.sweep"] = ident.sweep
        if about["git_commit"]:
            tags["mlflow.source.git.commit"] = about["git_commit"]
        self.run_id = self._find(ident, uri, experiment_id)
        if self.run_id is None:
            run = client.create_run(experiment_id, tags=tags, run_name=ident.name)
            self.run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in flat_keys(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # log_batch's limit per call
                client.log_batch(self.run_id, params=params[i : i + 100])
            self.logged: dict[str, int] = {}
        else:
            client.update_run(self.run_id, status="RUNNING")
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.logged = self._logged_steps()
        _save_trackers_json(
            ident.run_dir,
            "mlflow",
            {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id},
        )
        self.run_dir = ident.run_dir
        self.pending: list[Any] = []
        self.flushed_at = time.monotonic()

    @staticmethod
    def _bound_retries() -> None:
        # mlflow retries an HTTP request 7 times with exponential backoff (minutes): bound it so a
        # server that dies mid-run costs seconds once (then the tracker is dropped), unless the
        # user set these themselves
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    def _find(self, ident: RunIdentity, uri: str, experiment_id: str) -> str | None:
        """The run this folder already has: trackers.json's run_id (same store), else the run
        tagged with its key (trackers.json lost), else None."""
        saved = read_trackers_json(ident.run_dir).get("mlflow") or {}
        if saved.get("tracking_uri") == uri and saved.get("run_id"):
            return saved["run_id"]
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`bonnerlab.run_key` = '{ident.key}'"
        )
        return found[0].info.run_id if found else None

    def _logged_steps(self) -> dict[str, int]:
        """The last step of each metric the run holds: a resumed run redoes the steps after its
        checkpoint, and each point is logged once (a hard kill may have logged some already)."""
        run = self.client.get_run(self.run_id)
        return {
            key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
            for key in run.data.metrics
        }

    def _add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            if step > self.logged.get(key, -1):
                self.pending.append(Metric(key, float(value), now, step))
                self.logged[key] = step

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:FLUSH_POINTS], self.pending[FLUSH_POINTS:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.flushed_at = time.monotonic()

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._add({k: v for k, v in values.items() if not k.startswith("epoch/")}, step)
        if len(self.pending) >= FLUSH_POINTS or time.monotonic() - self.flushed_at > FLUSH_SECONDS:
            self.flush()

    def epoch(self, record: dict[str, Any]) -> None:
        self._add(_numbers(record), int(record["epoch"]))
        self.flush()  # the tracker holds every epoch the checkpoint holds

    def close(self) -> None:
        self.flush()
        state = read_state(self.run_dir)
        status = {"INTERRUPTED": "KILLED", "FAILED": "FAILED"}.get(state or "", "FINISHED")
        self.client.set_terminated(self.run_id, status=status)


# ----------------------------------------------------------------------------- together


class Trackers:
    """The trackers a run opened, each behind a guard: its first exception is one warning line
    and the tracker is dropped; training goes on."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                self.trackers.remove(tracker)
                warn(f"{tracker.label} tracker failed ({_first_line(e)}); training goes on")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._each("scalars", values, step)

    def epoch(self, record: dict[str, Any]) -> None:
        self._each("epoch", record)

    def close(self) -> None:
        self._each("close")
        self.trackers = []


def check_trackers(cfg: TrainConfig, run_dir: Path) -> None:
    """Bad tracker input (a sweep given one SQLite file) as a ConfigError, before the run folder
    is touched."""
    if cfg.log.mlflow:
        mlflow_uri(cfg.log, run_identity(run_dir))


def open_trackers(cfg: TrainConfig, run_dir: Path) -> Sink | None:
    """The trackers `cfg.log` asks for, or None (nothing imported) when it asks for none.

    A tracker that cannot open (its package missing, an unreachable server) is one warning line;
    bad input (a sweep given one SQLite file) is a ConfigError before anything is written.
    """
    if not (cfg.log.wandb or cfg.log.mlflow):
        return None
    check_trackers(cfg, run_dir)
    ident = run_identity(run_dir)
    opened: list[Any] = []
    for wanted, kind, extra in (
        (cfg.log.wandb, WandbTracker, "wandb"),
        (cfg.log.mlflow, MlflowTracker, "mlflow"),
    ):
        if not wanted:
            continue
        try:
            opened.append(kind(cfg, ident))
        except ImportError as e:
            warn(f"{kind.label} is not installed ({e.name}): pip install 'bonnerlab[{extra}]'")
        except Exception as e:
            warn(f"{kind.label} tracker did not open ({_first_line(e)}); training goes on")
    return Trackers(opened) if opened else None
