from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    JOBS,
    REPO,
    SMOKE_FLAGS,
    assert_same_weights,
    job,
    repo_env,
    run_weights,
    stop_at_check,
    torchrun,
)

from bonnerlab.checkpoint import load_checkpoint
from bonnerlab.config import EvaluateConfig
from bonnerlab.errors import CheckpointError, RunDirError
from bonnerlab.runs import RunPaths, read_metrics, read_state
from bonnerlab.train.evaluate import evaluate
from bonnerlab.train.loop import train

_weights = run_weights


def test_train_reaches_accuracy_and_writes_a_complete_run_folder(tiny_train_cfg):
    cfg = tiny_train_cfg(epochs=4, **{"model.width": 16})
    result = train(cfg)
    assert result["val_acc"] > 0.9  # real handwritten digits, 4 short epochs
    paths = RunPaths(cfg.run_dir)
    for f in (paths.config_yaml, paths.latest, paths.best, paths.root / "git.txt"):
        assert f.exists(), f
    assert read_state(cfg.run_dir) == "DONE"
    metrics = read_metrics(cfg.run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert {"epoch", "train_loss", "val_loss", "val_acc", "lr"} <= metrics[-1].keys()
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    assert list(paths.root.glob("events.out.tfevents.*")), "no TensorBoard curves"
    ckpt = load_checkpoint(paths.latest)
    assert ckpt["state"]["epoch"] == 4 and ckpt["arch"] == "mnist_cnn"
    assert {"model", "optimizer", "scheduler", "rng", "config", "preprocess"} <= ckpt.keys()

    # evaluate reproduces the best epoch's validation accuracy, writes the confusion matrix
    ev = evaluate(EvaluateConfig(checkpoint=cfg.run_dir, device="cpu"))
    assert ev["acc"] == pytest.approx(result["best_val_acc"], abs=1e-9)
    out = paths.root / "eval-val"
    assert (out / "confusion_matrix.csv").exists() and (out / "confusion_matrix.png").exists()
    assert sum(map(sum, ev["confusion"])) == ev["count"] == 359
    assert len(ev["per_class_acc"]) == 10


def test_resume_after_stop_matches_uninterrupted_run(tiny_train_cfg, tmp_path):
    ref_cfg = tiny_train_cfg(run_dir=str(tmp_path / "ref"), **{"model.dropout": 0.3})
    train(ref_cfg)

    cfg = tiny_train_cfg(run_dir=str(tmp_path / "split"), **{"model.dropout": 0.3})
    with stop_at_check(15):  # mid-way through epoch 2 (22 steps per epoch)
        first = train(cfg)
    assert first["interrupted"] and read_state(cfg.run_dir) == "INTERRUPTED"
    from dataclasses import replace

    second = train(replace(cfg, resume=True))
    assert_same_weights(_weights(ref_cfg.run_dir), _weights(cfg.run_dir))
    ref_metrics, metrics = read_metrics(ref_cfg.run_dir), read_metrics(cfg.run_dir)
    assert [m["val_acc"] for m in metrics] == [m["val_acc"] for m in ref_metrics]
    assert metrics[-1]["train_loss"] == pytest.approx(ref_metrics[-1]["train_loss"], rel=1e-9)
    assert second["val_acc"] == ref_metrics[-1]["val_acc"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """Kill the process at an arbitrary moment (no chance to save), resume from latest.pt."""
    common = [
        "--device",
        "cpu",
        "--progress",
        "false",
        "--epochs",
        "3",
        "--model.width",
        "8",
        "--data.batch_size",
        "32",
        "--checkpoint_every_steps",
        "4",
        "--max_steps_per_epoch",
        "16",
    ]
    env = repo_env()
    job_cmd = [*job("train"), *common]
    subprocess.run(
        [*job_cmd, "--run_dir", str(tmp_path / "ref")], check=True, env=env, capture_output=True
    )
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*job_cmd, "--run_dir", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it right after its first mid-epoch checkpoint, wherever it then is: still training.
    deadline = time.time() + 60
    while not (run / "checkpoints" / "latest.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert read_state(run) == "RUNNING"  # it never got to finish
    from bonnerlab.cluster.status import sweep_status

    assert sweep_status(run, write=False)["state"].tolist() == ["LOST"]  # status does not lie
    resumed = subprocess.run(
        [*job_cmd, "--run_dir", str(run), "--resume"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert f"took over the stale lock of {run}" in resumed.stdout
    assert_same_weights(_weights(tmp_path / "ref"), _weights(run))
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    common = [
        *SMOKE_FLAGS,
        "--model.batchnorm",
        "false",
        "--data.batch_size",
        "64",
        "--max_steps_per_epoch",
        "8",
        "--data.rotation",
        "20",
    ]
    env = repo_env(OMP_NUM_THREADS="1")
    train_py = str(JOBS / "train.py")
    subprocess.run(
        [*job("train"), *common, "--run_dir", str(tmp_path / "one")],
        check=True,
        env=env,
        capture_output=True,
    )
    out = torchrun(train_py, *common, "--run_dir", str(tmp_path / "two"))
    assert "2 process(es)" in out.stdout
    assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"), atol=1e-5)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert two[0]["val_acc"] == pytest.approx(one[0]["val_acc"], abs=1e-3)


def test_run_folder_holding_a_run_is_refused(tiny_train_cfg):
    cfg = tiny_train_cfg(epochs=1, max_steps_per_epoch=2)
    train(cfg)
    before = RunPaths(cfg.run_dir).latest.read_bytes()
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        train(cfg)
    from dataclasses import replace

    changed = replace(cfg, resume=True, optim=replace(cfg.optim, lr=0.5))
    with pytest.raises(RunDirError, match="different config .*optim.lr"):
        train(changed)
    assert RunPaths(cfg.run_dir).latest.read_bytes() == before


def test_checkpoint_errors(tiny_train_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(EvaluateConfig(checkpoint=str(tmp_path / "nope.pt"), device="cpu"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate(EvaluateConfig(checkpoint=str(corrupt), device="cpu"))
    with pytest.raises(CheckpointError, match="no runs under"):
        evaluate(EvaluateConfig(runs_root=str(tmp_path / "empty"), device="cpu"))
    # a checkpoint whose weights belong to another architecture
    cfg = tiny_train_cfg(epochs=1, max_steps_per_epoch=2)
    train(cfg)
    payload = load_checkpoint(RunPaths(cfg.run_dir).latest)
    payload["config"]["model"]["arch"] = "resnet18"
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    with pytest.raises(CheckpointError, match="does not fit resnet18"):
        evaluate(EvaluateConfig(checkpoint=str(other), device="cpu"))


def test_jobs_print_one_line_errors_and_exit_2(tmp_path):
    env = repo_env()
    cases = [
        (
            [
                "jobs/train.py",
                "--data.dataset",
                "imagefolder",
                "--data.root",
                str(tmp_path / "none"),
            ],
            "does not exist",
        ),
        (["jobs/train.py", "--optim.lr", "0"], "optim.lr must be > 0"),
        (["jobs/train.py", "--model.arch", "resnet181"], "did you mean resnet18"),
        (["jobs/evaluate.py", "--checkpoint", str(tmp_path / "x.pt")], "not found"),
    ]
    for args, message in cases:
        out = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            out.stderr
        )


def test_evaluate_job_with_no_arguments_finds_newest_run(tmp_path):
    env = repo_env()
    common = [
        "--device",
        "cpu",
        "--progress",
        "false",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "3",
    ]
    subprocess.run([*job("train"), *common], cwd=tmp_path, env=env, check=True, capture_output=True)
    out = subprocess.run(job("evaluate"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (run,) = list((tmp_path / "runs").iterdir())
    result = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert result["count"] == 359 and 0.0 <= result["acc"] <= 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-node.invalid"])
def test_a_task_that_meets_no_one_stops_in_one_line_naming_host_and_port(tmp_path, host):
    """Rank 1 of a 2-task SLURM step whose rank 0 never comes (or whose host resolves nowhere):
    one line naming the rendezvous, after the timeout, not a hang."""
    port = _free_port()
    env = repo_env(
        SLURM_STEP_NUM_TASKS="2",
        SLURM_PROCID="1",
        SLURM_LOCALID="1",
        SLURM_JOB_ID="4242",
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
        BONNERLAB_RENDEZVOUS_TIMEOUT_S="3",
    )
    start = time.monotonic()
    out = subprocess.run(
        [*job("train"), *SMOKE_FLAGS, "--run_dir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 of 2:") and f"{host}" in last and str(port) in last
    assert time.monotonic() - start < 90
    assert not (tmp_path / "run").exists()
