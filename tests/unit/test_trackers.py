"""Experiment trackers (bonnerlab.train.trackers) with the real libraries: MLflow on a local SQLite
store read back with its tracking client, W&B offline read back with wandb's own reader of its
run files (`wandb leet inspect --json`). No network: W&B's address is a closed local port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import (
    REPO,
    cli_flags,
    job,
    job_module,
    mlflow_runs,
    repo_env,
    tiny_train,
    torchrun,
    wandb_offline_env,
    wandb_run,
)

from bonnerlab.errors import ConfigError, UserError
from bonnerlab.runs import RunPaths, read_metrics, read_state
from bonnerlab.train import trackers
from bonnerlab.train.loop import train

# few steps: every start of a tracked run pays wandb's and mlflow's imports and a new SQLite store
SHORT = {"max_steps_per_epoch": 6, "log_every_steps": 2, "progress": False}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connecting is refused


@pytest.fixture(scope="module", autouse=True)
def wandb_env(tmp_path_factory):
    env = wandb_offline_env(tmp_path_factory.mktemp("wandb-home"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def epoch_values(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["epoch"], float(m[key])) for m in metrics]


NUMERIC = ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


# ----------------------------------------------------------------------------- one run


def test_both_trackers_get_what_metrics_jsonl_and_tensorboard_get(tiny_train_cfg):
    cfg = tiny_train_cfg(**SHORT, **{"log.wandb": True, "log.mlflow": True})
    train(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    key = trackers.run_key(run_dir)
    saved = json.loads((run_dir / "trackers.json").read_text())
    assert saved["key"] == saved["wandb"]["id"] == key

    # MLflow: one run, every epoch's record equal to metrics.jsonl's, the config as params
    client, (run,) = mlflow_runs(run_dir)
    assert run.info.run_id == saved["mlflow"]["run_id"] and run.info.status == "FINISHED"
    for name in NUMERIC:
        assert history(client, run.info.run_id, f"epoch/{name}") == epoch_values(metrics, name)
    steps = [s for s, _ in history(client, run.info.run_id, "train/loss")]
    assert steps == list(range(2, metrics[-1]["step"] + 1, 2))  # every log_every_steps step
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["log.mlflow"] == "True"
    assert run.data.tags["bonnerlab.run_key"] == key
    assert run.data.tags["bonnerlab.run_dir"] == str(run_dir)
    commit = run.data.tags["mlflow.source.git.commit"]
    # git.txt is written a moment later: the same commit, or one HEAD has moved on to since
    ran = RunPaths(run_dir).git_txt.read_text().split()[1]
    is_ancestor = ["git", "merge-base", "--is-ancestor", commit, ran]
    assert subprocess.run(is_ancestor, cwd=REPO).returncode == 0, (commit, ran)
    assert run.info.run_name == run_dir.name

    # W&B: one offline run with that id, the config, every epoch, the same per-step points
    wb = wandb_run(run_dir)
    assert len(wb["parts"]) == 1 and [r["run_id"] for r in wb["runs"]] == [key]
    assert wb["runs"][0]["project"] == "bonnerlab"
    config = wb["config"]
    assert config["optim"]["lr"] == 0.02 and config["epochs"] == 2
    assert config["bonnerlab"] == {"run_dir": str(run_dir), "git_commit": commit}
    rows = [h for h in wb["history"] if "epoch" in h]
    for name in NUMERIC:
        assert [(h["epoch"], h[f"epoch/{name}"]) for h in rows] == epoch_values(metrics, name)
    steps = [(h["global_step"], h["train/loss"]) for h in wb["history"] if "global_step" in h]
    assert steps == history(client, run.info.run_id, "train/loss")  # two sinks, the same points


@pytest.mark.slow
def test_sigterm_then_resume_is_one_tracker_run_with_every_epoch_once(tmp_path, wandb_env):
    """jobs/train.py stopped by SIGTERM to its whole process group (as SLURM signals a job: the
    wandb-core helper gets it too), then --resume: one MLflow run, one W&B run id across both
    offline parts, each epoch and each logging step once; jobs/sync.py lists both parts."""
    run_dir = tmp_path / "run"
    flags = cli_flags(
        {
            **{k: v for k, v in SHORT.items() if k != "progress"},
            "device": "cpu",
            "progress": "false",
            "epochs": 6,
            "model.width": 8,
            "log.wandb": "true",
            "log.mlflow": "true",
            "run_dir": str(run_dir),
        }
    )
    env = repo_env(**wandb_env)
    proc = subprocess.Popen(
        [*job("train"), *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    end = time.monotonic() + 300
    while not RunPaths(run_dir).metrics.exists() and time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "stopped by a signal; saved" in out, out[-3000:]
    assert "warning" not in out, out[-3000:]
    assert read_state(run_dir) == "INTERRUPTED" and len(read_metrics(run_dir)) < 6
    resumed = subprocess.run(
        [*job("train"), *flags, "--resume", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning" not in resumed.stderr, resumed.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    every_step = list(range(2, metrics[-1]["step"] + 1, 2))

    client, (run,) = mlflow_runs(run_dir)
    assert run.info.status == "FINISHED"
    for name in NUMERIC:
        assert history(client, run.info.run_id, f"epoch/{name}") == epoch_values(metrics, name)
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == every_step

    wb = wandb_run(run_dir)
    key = trackers.run_key(run_dir)
    assert len(wb["parts"]) == 2 and [r["run_id"] for r in wb["runs"]] == [key, key]
    rows = [h for h in wb["history"] if "epoch" in h]
    for name in NUMERIC:
        assert [(h["epoch"], h[f"epoch/{name}"]) for h in rows] == epoch_values(metrics, name)
    assert [h["global_step"] for h in wb["history"] if "global_step" in h] == every_step

    listed = subprocess.run(
        [*job("sync"), str(run_dir), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "2 offline part(s) of 1 W&B run(s)" in listed.stdout
    assert listed.stderr.count(f"run-{key}.wandb") == 2  # wandb sync's own list
    env.pop("WANDB_API_KEY", None)
    unsent = subprocess.run(
        [*job("sync"), str(run_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert unsent.returncode != 0 and "API key" in unsent.stderr  # wandb's status and reason


@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(tmp_path):
    run_dir = tmp_path / "ddp"
    flags = {"device": "cpu", "progress": "false", "epochs": 2, "model.width": 8}
    flags.update({"max_steps_per_epoch": 4, "log_every_steps": 2, "run_dir": str(run_dir)})
    torchrun(*job("train")[1:], *cli_flags({**flags, "log.wandb": "true", "log.mlflow": "true"}))
    metrics = read_metrics(run_dir)
    client, (run,) = mlflow_runs(run_dir)
    assert history(client, run.info.run_id, "epoch/val_acc") == epoch_values(metrics, "val_acc")
    wb = wandb_run(run_dir)
    assert len(wb["parts"]) == 1 and [h["epoch"] for h in wb["history"] if "epoch" in h] == [1, 2]


def test_a_resumed_mlflow_run_logs_each_step_once(tmp_path):
    """A run killed after logging past its checkpoint redoes those steps: the points the run
    already holds are not logged again (read back from the store, not from this process)."""
    cfg = tiny_train(run_dir=str(tmp_path / "run"), **{"log.mlflow": True})
    ident = trackers.run_identity(cfg.run_dir)
    first = trackers.MlflowTracker(cfg, ident)
    for step in (2, 4, 6):
        first.scalars({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    first.epoch({"epoch": 1, "val_acc": 0.5})
    first.scalars({"train/loss": 0.125}, 8)
    first.flush()  # on disk; then the process dies without closing
    again = trackers.MlflowTracker(cfg, trackers.run_identity(cfg.run_dir))
    assert again.run_id == first.run_id
    for step in (6, 8, 10):  # resumed from a checkpoint at step 4
        again.scalars({"train/loss": 10.0 + step}, step)
    again.epoch({"epoch": 1, "val_acc": 0.75})
    again.epoch({"epoch": 2, "val_acc": 0.9})
    again.close()
    client, runs = mlflow_runs(tmp_path / "run")
    assert [r.info.run_id for r in runs] == [first.run_id]
    loss = history(client, first.run_id, "train/loss")
    assert loss == [(2, 0.5), (4, 0.25), (6, 1 / 6), (8, 0.125), (10, 20.0)]
    assert history(client, first.run_id, "epoch/val_acc") == [(1, 0.5), (2, 0.9)]


# ----------------------------------------------------------------------------- failures


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[bonnerlab] warning:")]


def test_an_unreachable_mlflow_server_is_one_warning_and_training_goes_on(tiny_train_cfg, capfd):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = tiny_train_cfg(epochs=1, **SHORT, **{"log.mlflow": True, "log.mlflow_uri": uri})
    start = time.monotonic()
    result = train(cfg)
    assert time.monotonic() - start < 120
    warnings = _warnings(capfd.readouterr().err)
    assert len(warnings) == 1 and "MLflow tracker did not open" in warnings[0], warnings
    assert uri in warnings[0]
    assert result["epoch"] == 1 and read_state(cfg.run_dir) == "DONE"
    assert "mlflow" not in trackers.read_trackers_json(cfg.run_dir)


@pytest.mark.slow
def test_a_tracker_failing_mid_run_is_one_warning_and_training_goes_on(tiny_train_cfg, capfd):
    """The MLflow run is deleted from its store by another client while training: its next
    write is refused by MLflow; training ends as it would have."""
    cfg = tiny_train_cfg(epochs=3, **SHORT, **{"log.mlflow": True, "log.wandb": True})
    run_dir = Path(cfg.run_dir)
    deleted = threading.Event()

    def delete_the_run() -> None:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            run_id = (trackers.read_trackers_json(run_dir).get("mlflow") or {}).get("run_id")
            if run_id:
                mlflow_runs(run_dir)[0].delete_run(run_id)
                deleted.set()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=delete_the_run, daemon=True)
    thread.start()
    result = train(cfg)
    thread.join(60)
    assert deleted.is_set()
    warnings = _warnings(capfd.readouterr().err)
    assert len(warnings) == 1 and "MLflow tracker failed" in warnings[0], warnings
    assert result["epoch"] == 3 and read_state(run_dir) == "DONE"
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    # the other tracker went on: W&B holds every epoch
    rows = [h for h in wandb_run(run_dir.resolve())["history"] if "epoch" in h]
    assert [h["epoch"] for h in rows] == [1, 2, 3]


def test_a_sweep_given_one_sqlite_file_is_refused_before_anything_is_written(tmp_path):
    sweep = tmp_path / "sweep"
    task = sweep / "task-001"
    task.mkdir(parents=True)
    # what submission writes into a sweep task's folder (bonnerlab.cluster.submit)
    submitted = {"job": "train", "sweep_dir": str(sweep), "task": 1}
    RunPaths(task).slurm_yaml.write_text(yaml.safe_dump({"submitted": submitted}))
    ident = trackers.run_identity(task)
    assert (ident.name, ident.sweep, ident.task) == ("sweep/task-001", "sweep", 1)
    assert ident.key == trackers.run_key(task) != trackers.run_key(sweep / "task-000")
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    # submission sets resume on every task, so a requeued task continues
    cfg = tiny_train(run_dir=str(task), resume=True, **{"log.mlflow": True, "log.mlflow_uri": uri})
    with pytest.raises(ConfigError, match="would all write one SQLite file at once"):
        train(cfg)
    written = {p.name for p in task.iterdir()} - {"slurm.yaml", "LOCK"}  # LOCK: the one writer
    assert not written and read_state(task) is None
    assert not (tmp_path / "shared.db").exists()


# ----------------------------------------------------------------------------- W&B's mode


def test_wandb_auto_mode_is_quick_offline_and_respects_wandb_mode(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("WANDB_MODE")
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert trackers.wandb_mode("auto") == "online"  # the service answers
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert trackers.wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert trackers.wandb_mode("auto") == "offline"  # the port is closed now
    assert trackers.wandb_mode("online") == "online" and trackers.wandb_mode("offline") == "offline"
    # an address nobody answers (TEST-NET-1, RFC 5737): connect waits, the check does not
    for url in ("http://192.0.2.1:443", "https://no-such-host.invalid"):
        monkeypatch.setenv("WANDB_BASE_URL", url)
        start = time.monotonic()
        assert trackers.wandb_mode("auto") == "offline"
        assert time.monotonic() - start < trackers.REACH_TIMEOUT_S + 0.25


# ----------------------------------------------------------------------------- job start, sync


def test_a_job_that_asks_for_no_tracker_imports_neither(tmp_path):
    """Job start unchanged: a whole training run without --log.* loads no wandb or mlflow."""
    code = (
        "import sys; sys.path.insert(0, 'jobs'); import train as job\n"
        "job.main(['--epochs', '1', '--max_steps_per_epoch', '2', '--device', 'cpu',\n"
        "          '--progress', 'false', '--model.width', '8', '--run_dir', sys.argv[1]])\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'wandb', 'mlflow'})\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        cwd=REPO,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout[-2000:]


def test_sync_finds_every_task_and_refuses_what_is_not_a_folder(tmp_path, capsys):
    sync = job_module("sync")
    sweep = tmp_path / "sweep"
    for task, starts in (("task-000", 1), ("task-001", 2)):
        for i in range(starts):
            (sweep / task / "wandb" / f"offline-run-2026120{i}_000000-{task[-3:]}id").mkdir(
                parents=True
            )
    (sweep / "task-002").mkdir()
    found = sync.offline_runs([str(sweep)])
    assert [p.relative_to(sweep).parts[0] for p in found] == ["task-000", "task-001", "task-001"]
    assert sync.offline_runs([str(sweep / "task-001")]) == found[1:]
    assert sync.main([str(sweep / "task-002")]) == 0
    assert "no W&B offline runs" in capsys.readouterr().out
    with pytest.raises(UserError, match="is not a folder"):
        sync.main([str(tmp_path / "nothing")])
