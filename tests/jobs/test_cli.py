"""The job scripts' own surface: --help text, the result line under torchrun, a crash's stack."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import JOBS, SMOKE_FLAGS, job, repo_env, torchrun

ENV = repo_env(OMP_NUM_THREADS="1")


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "extract.py", "launch.py"])
def test_help_shows_config_path_as_a_path(script):
    out = subprocess.run(
        [*job(script.removesuffix(".py")), "--help"], env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--config_path PATH" in out.stdout
    assert "--config_path None" not in out.stdout


@pytest.mark.slow
def test_torchrun_prints_one_result_line(tmp_path):
    out = torchrun(
        str(JOBS / "train.py"),
        *SMOKE_FLAGS,
        "--max_steps_per_epoch",
        "2",
        "--run_dir",
        str(tmp_path / "run"),
    )
    results = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1, out.stdout
    assert json.loads(results[0])["epoch"] == 1


def test_a_job_killed_by_a_fatal_signal_prints_its_python_stack(tmp_path):
    """SIGABRT from C++ (a collective library's thread) or a segfault: the job's stderr shows
    where Python was, not only the launcher's "exitcode -6"."""
    import signal
    import threading

    proc = subprocess.Popen(
        [
            *job("train"),
            "--device",
            "cpu",
            "--progress",
            "false",
            "--epochs",
            "50",
            "--model.width",
            "8",
            "--run_dir",
            str(tmp_path / "run"),
        ],
        env={k: v for k, v in ENV.items() if k != "PYTHONFAULTHANDLER"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killer = threading.Timer(120, proc.kill)  # a job that never reaches epoch 1 fails the test
    killer.start()
    try:
        for line in proc.stdout:  # training has started once the first epoch ends
            if line.startswith("[bonnerlab] epoch 1/"):
                break
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
    finally:
        killer.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and "bonnerlab/train/loop.py" in err, err[-2000:]
