"""A hand-written batch script running `srun python jobs/train.py` with 2 tasks, on the real local
cluster: the two tasks meet at the first node's NodeAddr (its name, vm-cpu, resolves nowhere)
and train as one 2-process job, or stop with one line naming the host and port they tried;
never hang."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    JOBS,
    REPO,
    SMOKE_FLAGS,
    assert_same_weights,
    cli_flags,
    repo_env,
    run_weights,
    slurm_lock,
)

from bonnerlab.runs import read_metrics, read_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

FLAGS = [
    *SMOKE_FLAGS,
    *cli_flags({"model.batchnorm": "false", "data.batch_size": 64, "max_steps_per_epoch": 8}),
]


@pytest.fixture
def cluster(request):
    with slurm_lock():
        yield request.getfixturevalue("slurm_cluster")


def _srun_script(run: Path, log: Path, *exports: str) -> str:
    """A batch script as a user writes it: 2 tasks, `srun python jobs/train.py`."""
    return "\n".join(
        [
            "#!/bin/bash",
            "#SBATCH --ntasks=2",
            "#SBATCH --partition=cpu",
            "#SBATCH --mem=4G",
            "#SBATCH --time=5",
            f"#SBATCH --output={log}",
            f"export PYTHONPATH={REPO} OMP_NUM_THREADS=1",
            *exports,
            f"srun {sys.executable} {JOBS / 'train.py'} {' '.join(FLAGS)} --run_dir {run}",
            "",
        ]
    )


def _sbatch(script: str) -> str:
    out = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _wait_gone(job_id: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    raise AssertionError(f"job {job_id} still running after {timeout:.0f} s: it hangs")


def test_srun_with_two_tasks_trains_as_one_job_within_two_minutes(cluster, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    job_id = _sbatch(_srun_script(run, log))
    _wait_gone(job_id, timeout=120)
    text = log.read_text() if log.exists() else ""
    assert read_state(run) == "DONE", text[-3000:]
    assert "2 process(es)" in text and len(read_metrics(run)) == 1
    # the same global batch in one process reaches the same weights (bonnerlab.distributed)
    one = subprocess.run(
        [sys.executable, str(JOBS / "train.py"), *FLAGS, "--run_dir", str(tmp_path / "one")],
        env=repo_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert_same_weights(run_weights(tmp_path / "one"), run_weights(run), atol=1e-5)


def test_srun_whose_rendezvous_host_is_unreachable_ends_in_one_line(cluster, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.out"
    # an address that answers nothing (TEST-NET-1), the way a wrong MASTER_ADDR would be
    env = "export MASTER_ADDR=192.0.2.1 MASTER_PORT=29999 BONNERLAB_RENDEZVOUS_TIMEOUT_S=10"
    _wait_gone(_sbatch(_srun_script(run, log, env)), timeout=120)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, text[-3000:]  # one line per task
    assert all("no rendezvous at 192.0.2.1:29999 within 10s" in line for line in errors), errors
    assert not run.exists()  # nothing written
