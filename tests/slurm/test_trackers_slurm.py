"""Experiment trackers on the real local SLURM cluster: a sweep's tasks are one tracker run each,
grouped by the sweep, and `launch.py --sweep_dir ... --resume` continues a task's runs."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import job, mlflow_runs, slurm_lock, wandb_offline_env, wandb_run

from bonnerlab.runs import write_state
from bonnerlab.train.trackers import run_key

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

LRS = (0.1, 0.03, 0.01)


@pytest.fixture
def locked_cluster(request):
    """The local cluster, used while this process holds /tmp/slurm.lock."""
    with slurm_lock():
        yield request.getfixturevalue("slurm_cluster")


def test_a_sweep_is_one_tracker_run_per_task_grouped_and_resumed(tmp_path, locked_cluster):
    sweep = tmp_path / "lr"
    # sbatch hands the launcher's environment to the jobs: W&B offline, no network
    env = {**os.environ, **wandb_offline_env(tmp_path / "wandb-home")}
    launch = [
        *job("launch"),
        "--wait",
        "--array_parallelism",
        "3",
        "--sweep",
        "optim.lr=" + ",".join(map(str, LRS)),
        "--sweep_dir",
        str(sweep),
        "train",
    ]
    flags = ["--epochs", "1", "--model.width", "8", "--device", "cpu", "--progress", "false"]
    flags += ["--max_steps_per_epoch", "4", "--log_every_steps", "2"]
    flags += ["--log.wandb", "true", "--log.mlflow", "true"]
    out = subprocess.run([*launch, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    keys = []
    for i, lr in enumerate(LRS):
        task = sweep / f"task-{i:03d}"
        key = run_key(task)
        assert json.loads((task / "trackers.json").read_text())["key"] == key
        wb = wandb_run(task)
        assert [(r["run_id"], r["run_group"], r["display_name"]) for r in wb["runs"]] == [
            (key, "lr", f"lr/task-{i:03d}")
        ]
        assert wb["config"]["optim"]["lr"] == lr
        assert [h["epoch"] for h in wb["history"] if "epoch" in h] == [1]
        # MLflow: each task its own SQLite store, the sweep's experiment, its task tagged
        (run,) = mlflow_runs(task, experiment="lr")[1]
        tags = run.data.tags
        assert (tags["bonnerlab.sweep"], tags["bonnerlab.task"]) == ("lr", str(i))
        assert run.data.params["optim.lr"] == str(lr) and run.info.status == "FINISHED"
        keys.append(key)
    assert len(set(keys)) == 3

    # --resume resubmits a task that did not finish: it continues its own tracker runs
    task = sweep / "task-001"
    (run_before,) = mlflow_runs(task, experiment="lr")[1]
    write_state(task, "INTERRUPTED")
    again = subprocess.run(
        [*job("launch"), "--resume", *launch[len(job("launch")) :]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted 1 tasks" in again.stdout
    wb = wandb_run(task)
    assert len(wb["parts"]) == 2 and {r["run_id"] for r in wb["runs"]} == {keys[1]}
    assert [h["epoch"] for h in wb["history"] if "epoch" in h] == [1]  # not logged twice
    (run,) = mlflow_runs(task, experiment="lr")[1]
    assert run.info.run_id == run_before.info.run_id and run.info.status == "FINISHED"
