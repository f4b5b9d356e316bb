"""Against the real local SLURM cluster (slurm/start-cluster.sh): jobs, arrays, DDP, requeues.

Run with `pytest -m slurm`; skipped with the reason when the cluster cannot start, unless
BONNERLAB_REQUIRE_SLURM=1. Configs are tiny (mnist_cnn on digits) so each job takes seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAIN, assert_same_weights, cli_flags, job, run_weights, tiny_train

from bonnerlab.cluster import slurm_cli
from bonnerlab.cluster.status import read_manifest, sweep_status
from bonnerlab.cluster.submit import submit
from bonnerlab.cluster.sweeps import submit_sweep
from bonnerlab.config import EvaluateConfig, SlurmConfig, apply_overrides
from bonnerlab.errors import ClusterError
from bonnerlab.runs import RunPaths, read_metrics, read_state, write_state

# Run one after another (`make test` gives them their own pytest process; xdist_group keeps them
# on one worker under plain -n): a preemption test displaces every running job.
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.usefixtures("slurm_cluster"),
    pytest.mark.xdist_group("slurm"),
]

LAUNCH = job("launch")
tiny = tiny_train


def sacct_state(job_id: str) -> str:
    """Final state from slurmdbd (array tasks can take a few seconds to show up)."""
    for _ in range(30):
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True
        ).stdout.split()
        if out and out[0] not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"):
            return out[0]
        time.sleep(1)
    return out[0] if out else ""


def squeue_gone(job_id: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id.split("_")[0]], capture_output=True, text=True
        )
        if not out.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"job {job_id} still queued after {timeout}s")


weights = run_weights


def log_of(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*_log.out")))


# ----------------------------------------------------------------------------- single jobs


def test_launcher_submits_a_train_job_that_comes_back_with_metrics_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [
            *LAUNCH,
            "--partition",
            "cpu",
            "--time_minutes",
            "5",
            "train",
            *cli_flags(TINY_TRAIN),
            "--run_dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted train job (\d+)", out.stdout).group(1)
    assert f"tail -f {run}/logs/{job_id}_0_log.out" in out.stdout
    squeue_gone(job_id)
    assert sacct_state(job_id) == "COMPLETED"
    assert read_state(run) == "DONE"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[-1]["val_acc"] > 0.3  # digits: well above chance after 2 tiny epochs
    assert RunPaths(run).latest.is_file() and RunPaths(run).best.is_file()
    assert "#SBATCH --partition=cpu" in (run / "submit.sh").read_text()
    (code,) = (run / "code").iterdir()  # the snapshot, named by its content
    assert f"code from {code}/bonnerlab" in log_of(run)  # ran the snapshot, not the checkout
    assert str(job_id) == str(
        __import__("yaml").safe_load((run / "slurm.yaml").read_text())["submitted"]["job_id"]
    )


def test_live_cluster_checks_refuse_before_queueing(tmp_path):
    with pytest.raises(ClusterError, match="partition cpu has no GPUs per node"):
        submit("train", tiny(), SlurmConfig(partition="cpu", gpus_per_node=1), tmp_path / "a")
    with pytest.raises(ClusterError, match="unknown partition 'nope'"):
        submit("train", tiny(), SlurmConfig(partition="nope"), tmp_path / "b")
    with pytest.raises(ClusterError, match="over partition cpu's limit of 60 minutes"):
        submit("train", tiny(), SlurmConfig(partition="cpu", time_minutes=61), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")
    assert slurm_cli.max_array_size() == 1001


def test_gpu_partition_gives_the_job_its_gpus(tmp_path):
    """Fake GPUs (gres on the gpu node): SLURM sets CUDA_VISIBLE_DEVICES; a job on it runs on
    CPU."""
    run = tmp_path / "run"
    sub = submit(
        "train",
        tiny(epochs=1, max_steps_per_epoch=2),
        SlurmConfig(
            partition="gpu",
            gpus_per_node=1,
            time_minutes=5,
            setup=["echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"],
        ),
        run,
    )
    assert sub.job.result()["epoch"] == 1
    assert "CUDA_VISIBLE_DEVICES=0" in log_of(run)
    assert "#SBATCH --gpus-per-node=1" in (run / "submit.sh").read_text()


def test_evaluate_job_on_slurm(tmp_path):
    from bonnerlab.train.loop import train

    train(tiny(epochs=1, max_steps_per_epoch=3, run_dir=str(tmp_path / "trained"), progress=False))
    out = subprocess.run(
        [
            *LAUNCH,
            "--wait",
            "evaluate",
            "--checkpoint",
            str(tmp_path / "trained"),
            "--device",
            "cpu",
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["count"] == 359 and 0.0 <= metrics["acc"] <= 1.0  # the digits validation split
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    assert read_state(tmp_path / "eval") == "DONE"


def test_failing_job_ends_failed_in_slurm_and_in_its_folder(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    sub = submit(
        "evaluate",
        EvaluateConfig(checkpoint=str(bad), device="cpu"),
        SlurmConfig(time_minutes=5),
        tmp_path / "eval",
    )
    with pytest.raises(Exception, match="corrupt or not a checkpoint"):
        sub.job.result()
    squeue_gone(sub.job_id)
    assert sacct_state(sub.job_id) == "FAILED"
    assert read_state(tmp_path / "eval") == "FAILED"


# ----------------------------------------------------------------------------- sweeps


def test_sweep_is_one_job_array_and_status_reads_it_back(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            *LAUNCH,
            "--wait",
            "--array_parallelism",
            "3",
            "--sweep",
            "optim.lr=0.1,0.03,0.01",
            "--sweep_dir",
            str(sweep),
            "train",
            "--epochs",
            "1",
            "--model.width",
            "8",
            "--device",
            "cpu",
            "--data.batch_size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "submitted 3 tasks as 1 job array(s)" in out.stdout
    manifest = read_manifest(sweep)
    arrays = {r["job_id"].split("_")[0] for r in manifest}
    assert len(arrays) == 1 and [r["job_id"].split("_")[1] for r in manifest] == ["0", "1", "2"]
    (array_id,) = arrays
    assert "#SBATCH --array=0-2%3" in (sweep / f"submit-{array_id}.sh").read_text()
    for r in manifest:
        assert sacct_state(r["job_id"]) == "COMPLETED"
    status = subprocess.run(
        [*job("status"), str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr
    table = sweep_status(sweep, write=False)
    assert table["state"].tolist() == ["DONE"] * 3
    assert table["optim.lr"].tolist() == [0.1, 0.03, 0.01]
    best = table.loc[table["best"] == "*"]
    assert len(best) == 1 and best["best_val_acc"].item() == table["best_val_acc"].max()
    assert (sweep / "results.csv").is_file() and (sweep / "results.png").stat().st_size > 1000
    for i, lr in enumerate([0.1, 0.03, 0.01]):
        assert (
            __import__("yaml").safe_load((sweep / f"task-{i:03d}" / "config.yaml").read_text())[
                "optim"
            ]["lr"]
            == lr
        )

    # --resume resubmits only what did not finish: pretend task 1 was preempted and not requeued
    write_state(sweep / "task-001", "INTERRUPTED")
    again = subprocess.run(
        [
            *LAUNCH,
            "--wait",
            "--resume",
            "--sweep",
            "optim.lr=0.1,0.03,0.01",
            "--sweep_dir",
            str(sweep),
            "train",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "submitted 1 tasks" in again.stdout
    after = read_manifest(sweep)
    assert [r["job_id"] for r in after][0::2] == [manifest[0]["job_id"], manifest[2]["job_id"]]
    assert after[1]["job_id"] != manifest[1]["job_id"]
    assert read_state(sweep / "task-001") == "DONE"
    # a refused re-launch without --resume leaves the folder alone
    refused = subprocess.run(
        [*LAUNCH, "--sweep", "optim.lr=0.1", "--sweep_dir", str(sweep), "train"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "already exists; pass --resume" in refused.stderr


def test_sweep_past_max_array_size_is_split_into_several_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr("bonnerlab.cluster.slurm_cli.max_array_size", lambda: 2)
    points = [{"optim.lr": lr} for lr in (0.1, 0.03, 0.01)]
    tasks = submit_sweep(
        "train",
        tiny(epochs=1, max_steps_per_epoch=2),
        points,
        SlurmConfig(time_minutes=5),
        tmp_path / "sweep",
    )
    arrays = [t.job_id.split("_")[0] for t in tasks]
    assert arrays[0] == arrays[1] != arrays[2]
    # a chunk of one is a plain job (submitit submits single jobs without --array)
    assert [t.job_id.partition("_")[2] for t in tasks] == ["0", "1", ""]
    for t in tasks:
        assert t.job.result()["epoch"] == 1
    assert len(list((tmp_path / "sweep").glob("submit-*.sh"))) == 2


# ----------------------------------------------------------------------------- DDP


def test_two_task_gloo_job_matches_one_process_with_the_same_global_batch(tmp_path):
    cfg = tiny(epochs=1, max_steps_per_epoch=8, **{"model.batchnorm": False, "data.rotation": 20.0})
    one = submit("train", cfg, SlurmConfig(partition="cpu", time_minutes=5), tmp_path / "one")
    two = submit(
        "train",
        cfg,
        SlurmConfig(partition="cpu", tasks_per_node=2, time_minutes=5),
        tmp_path / "two",
    )
    one.job.result()
    results = two.job.results()
    assert len(results) == 2  # one result per task
    assert "2 process(es)" in log_of(tmp_path / "two")
    assert "#SBATCH --ntasks-per-node=2" in (tmp_path / "two" / "submit.sh").read_text()
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert m2[0]["val_acc"] == pytest.approx(m1[0]["val_acc"], abs=1e-3)


# ----------------------------------------------------------------------------- requeues

# Long enough (~10 s of compute) that a job is still training when the test preempts or signals it.
LONG = {"epochs": 40, "checkpoint_every_steps": 4, "model.width": 16, "data.batch_size": 64}


def redone_steps(log: str, steps_per_epoch: int) -> list[int]:
    """Steps trained twice at each restart: where the job stopped minus where it resumed."""
    stops = [(int(e), int(s)) for e, s in re.findall(r"saved \S+ at epoch (\d+) step (\d+)", log)]
    resumes = [(int(e), int(s)) for e, s in re.findall(r"resuming epoch (\d+) step (\d+)", log)]
    return [
        (e1 - e2) * steps_per_epoch + (s1 - s2)
        for (e1, s1), (e2, s2) in zip(stops, resumes, strict=False)
    ]


def assert_few_steps_redone(log: str, steps_per_epoch: int) -> None:
    """At least one restart saved and resumed, and none redid more than a checkpoint interval."""
    redone = redone_steps(log, steps_per_epoch)
    assert redone, (
        "no 'saved ... at epoch E step S' then 'resuming epoch E step S' in the log:\n"
        f"{log[-2000:]}"
    )
    assert all(0 <= r <= LONG["checkpoint_every_steps"] for r in redone), redone


def _wait_until_training(run: Path, timeout: float = 120, queue_timeout: float = 600) -> None:
    """Until the run reports a finished first epoch: `timeout` seconds from the moment its job
    runs, after up to `queue_timeout` queued (on this small cluster a job may wait for another
    test's job to finish, longer on a loaded machine)."""
    from bonnerlab.runs import read_state

    end = time.monotonic() + queue_timeout
    while read_state(run) in (None, "PENDING") and not (run / "metrics.jsonl").exists():
        if time.monotonic() > end:
            raise AssertionError(
                f"{run}'s job never started (state {read_state(run)}):\n{log_of(run)[-2000:]}"
            )
        time.sleep(0.5)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (run / "metrics.jsonl").exists():
            return
        time.sleep(0.5)
    raise AssertionError(f"{run} never started training:\n{log_of(run)[-2000:]}")


def test_preempted_job_saves_requeues_and_ends_with_uninterrupted_weights(tmp_path):
    cfg = tiny(**LONG)
    # the reference runs alone on the other node, with the same cores per task
    ref = submit("train", cfg, SlurmConfig(partition="gpu", time_minutes=10), tmp_path / "ref")
    run = tmp_path / "run"
    sub = submit(
        "train",
        cfg,
        SlurmConfig(partition="cpu", time_minutes=10, additional_parameters={"exclusive": True}),
        run,
    )
    _wait_until_training(run)
    node = subprocess.run(
        ["squeue", "-h", "-j", sub.job_id, "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    urgent = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "urgent",
            "--nodelist",
            node,
            "--exclusive",
            "-o",
            str(tmp_path / "urgent.out"),
            "--wrap",
            "sleep 2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    result = sub.job.result()
    ref.job.result()
    assert result["epoch"] == LONG["epochs"]
    assert sacct_state(urgent) == "COMPLETED"
    log = log_of(run)
    assert "restart 1" in log and "resuming epoch" in log
    assert read_state(run) == "DONE"
    assert_same_weights(weights(tmp_path / "ref"), weights(run))
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, LONG["epochs"] + 1))
    steps_per_epoch = result["step"] // LONG["epochs"]
    assert_few_steps_redone(log, steps_per_epoch)


def test_timed_out_job_checkpoints_requeues_and_ends_with_uninterrupted_weights(tmp_path):
    # SLURM checks time limits every 30 s and signals up to that much early: with a 2-minute limit
    # and signal_delay_s=60, SIGUSR2 comes 30-60 s into each run. The job must outlast that: 300
    # epochs of the width-16 model take ~85 s of compute on an idle 2-core machine.
    epochs = 300
    cfg = tiny(**{**LONG, "epochs": epochs})
    ref = submit("train", cfg, SlurmConfig(partition="gpu", time_minutes=10), tmp_path / "ref")
    run = tmp_path / "run"
    # each run trains 30-60 s: on a loaded shared machine that is few epochs, so allow many requeues
    sub = submit(
        "train",
        cfg,
        SlurmConfig(partition="cpu", time_minutes=2, signal_delay_s=60, max_requeues=10),
        run,
    )
    result = sub.job.result()
    ref.job.result()
    assert result["epoch"] == epochs
    log = log_of(run)
    err = "".join(p.read_text() for p in (run / "logs").glob("*_log.err"))
    # submitit's handler (called by ClusterJob after the save) requeued it; SLURM killed the old run
    assert "Caught signal SIGUSR2" in err and "DUE TO JOB REQUEUE" in err
    assert "restart 1" in log
    assert_same_weights(weights(tmp_path / "ref"), weights(run))
    steps_per_epoch = result["step"] // epochs
    assert_few_steps_redone(log, steps_per_epoch)
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, epochs + 1))


def test_array_task_requeues_alone(tmp_path):
    """SIGUSR2 (what SLURM sends before a time limit) to one array task: it saves, is requeued by
    itself and resumes; the other task is never restarted."""
    sweep = tmp_path / "sweep"
    tasks = submit_sweep(
        "train",
        tiny(**LONG),
        [{"epochs": 1, "max_steps_per_epoch": 2}, {"epochs": 30}],
        SlurmConfig(partition="cpu", time_minutes=10),
        sweep,
    )
    _wait_until_training(sweep / "task-001")
    subprocess.run(["scancel", "--signal=USR2", tasks[1].job_id], check=True)
    assert [t.job.result()["epoch"] for t in tasks] == [1, 30]
    logs = {p.name: p.read_text() for p in (sweep / "logs").glob("*_log.out")}
    first = logs[f"{tasks[0].job_id}_0_log.out"]
    second = logs[f"{tasks[1].job_id}_0_log.out"]
    assert "restart 0" in first and "restart 1" not in first
    assert "restart 1" in second and "resuming epoch" in second
    squeue_gone(tasks[0].job_id)
    assert (
        sacct_state(tasks[0].job_id) == "COMPLETED" and sacct_state(tasks[1].job_id) == "COMPLETED"
    )
    assert read_state(sweep / "task-000") == read_state(sweep / "task-001") == "DONE"


def test_preempted_two_task_ddp_job_resumes_to_uninterrupted_weights(tmp_path):
    """Both ranks stop at the same step (the stop flag is all-reduced), rank 0 saves, both
    resume."""
    cfg = tiny(**{**LONG, "epochs": 15, "model.batchnorm": False})
    ref = submit(
        "train",
        cfg,
        SlurmConfig(partition="gpu", tasks_per_node=2, time_minutes=10),
        tmp_path / "ref",
    )
    run = tmp_path / "run"
    sub = submit(
        "train",
        cfg,
        SlurmConfig(
            partition="cpu",
            tasks_per_node=2,
            time_minutes=10,
            additional_parameters={"exclusive": True},
        ),
        run,
    )
    _wait_until_training(run)
    node = subprocess.run(
        ["squeue", "-h", "-j", sub.job_id, "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    preempt(node)
    assert [r["epoch"] for r in sub.job.results()] == [15, 15]
    ref.job.results()
    log = log_of(run)
    assert "2 process(es)" in log and "restart 1" in log
    steps_per_epoch = sub.job.results()[0]["step"] // 15
    assert redone_steps(log, steps_per_epoch) == [0]
    assert_same_weights(weights(tmp_path / "ref"), weights(run), atol=1e-6)


# ----------------------------------------------------------------------------- extraction shards


def test_extract_shards_are_one_array_writing_one_store_equal_to_a_single_job(tmp_path):
    from bonnerlab.activations import open_activations, stored_layers
    from bonnerlab.config import ExtractConfig
    from bonnerlab.extract.run import extract

    args = [
        "--stimuli",
        "digits",
        "--split",
        "all",
        "--limit",
        "96",
        "--layers",
        "features.1",
        "fc",
        "--batch_size",
        "16",
        "--device",
        "cpu",
        "--progress",
        "false",
    ]
    store = tmp_path / "sharded.zarr"
    out = subprocess.run(
        [
            *LAUNCH,
            "--partition",
            "cpu",
            "--time_minutes",
            "5",
            "--shards",
            "3",
            "--wait",
            "--sweep_dir",
            str(tmp_path / "shards"),
            "extract",
            *args,
            "--output",
            str(store),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "submitted 3 extraction shard(s)" in out.stdout
    (array_id,) = {row["job_id"].split("_")[0] for row in read_manifest(tmp_path / "shards")}
    assert len(read_manifest(tmp_path / "shards")) == 3
    single = extract(
        apply_overrides(
            ExtractConfig(),
            {
                "stimuli": "digits",
                "split": "all",
                "limit": 96,
                "layers": ["features.1", "fc"],
                "batch_size": 16,
                "device": "cpu",
                "progress": False,
                "output": str(tmp_path / "single.zarr"),
            },
        )
    )
    assert single["outcome"] != "reused"
    assert sorted(stored_layers(store)) == ["fc", "features.1"]
    assert stored_layers(store) == stored_layers(tmp_path / "single.zarr")
    for layer in stored_layers(store):
        a = open_activations(store, layer)
        b = open_activations(tmp_path / "single.zarr", layer)
        assert a.shape[0] == 96
        assert np.array_equal(a.values, b.values), layer
        assert list(a["stimulus"].values) == list(b["stimulus"].values)
    assert sacct_state(array_id + "_0") == "COMPLETED"


# ------------------------------------------------------------------------ operating runs and sweeps

STATUS, CANCEL, LOGS = job("status"), job("cancel"), job("logs")


def test_status_of_many_folders_asks_slurm_once_and_shows_the_error_line(tmp_path):
    from bonnerlab.cluster.status import status_all

    runs = tmp_path / "runs"
    tasks = submit_sweep(
        "train",
        tiny(epochs=1, max_steps_per_epoch=2),
        [{"seed": s} for s in range(4)],
        SlurmConfig(time_minutes=5),
        runs / "sweep",
    )
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    failing = submit(
        "evaluate",
        EvaluateConfig(checkpoint=str(bad), device="cpu"),
        SlurmConfig(time_minutes=5),
        runs / "eval",
    )
    single = submit(
        "train", tiny(epochs=1, max_steps_per_epoch=2), SlurmConfig(time_minutes=5), runs / "one"
    )
    for t in tasks:
        t.job.result()
    single.job.result()
    with pytest.raises(Exception, match="corrupt or not a checkpoint"):
        failing.job.result()
    for job_id in [tasks[0].job_id, failing.job_id, single.job_id]:
        squeue_gone(job_id)
        sacct_state(job_id)  # until slurmdbd has the final state

    slurm_cli.CALLS.clear()
    table = status_all(runs)
    assert dict(slurm_cli.CALLS) == {"squeue": 1, "sacct": 1}
    rows = {r["folder"]: r for r in table.to_dict("records")}
    assert rows["sweep"]["states"] == "DONE 4" and rows["one"]["states"] == "DONE 1"
    assert rows["eval"]["states"] == "FAILED 1" and rows["eval"]["job"] == "evaluate"
    assert "corrupt or not a checkpoint" in rows["eval"]["error"]

    out = subprocess.run(
        [*STATUS, "--runs_root", str(runs)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "corrupt or not a checkpoint" in out.stdout and "DONE 4" in out.stdout
    one = subprocess.run([*STATUS, str(runs / "eval")], capture_output=True, text=True, timeout=120)
    assert "error" in one.stdout and "corrupt or not a checkpoint" in one.stdout
    # the log of task 2, found from the sweep folder alone
    logs = subprocess.run(
        [*LOGS, str(runs / "sweep"), "--task", "2"], capture_output=True, text=True, timeout=60
    )
    assert logs.returncode == 0 and f"{runs / 'sweep' / 'task-002'}" in logs.stdout


def test_cancel_of_a_running_sweep_leaves_cancelled_in_sacct_and_in_the_folders(tmp_path):
    sweep = tmp_path / "sweep"
    tasks = submit_sweep(
        "train", tiny(**LONG), [{"seed": 0}, {"seed": 1}], SlurmConfig(time_minutes=10), sweep
    )
    _wait_until_training(sweep / "task-000")
    out = subprocess.run([*CANCEL, str(sweep)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cancelled 2 job(s)" in out.stdout
    for t in tasks:
        assert sacct_state(t.job_id) == "CANCELLED"
        assert read_state(t.run_dir) == "CANCELLED"
    table = sweep_status(sweep, write=False)
    assert (
        table["state"].tolist() == ["CANCELLED"] * 2
        and table["failure"].tolist() == ["cancelled"] * 2
    )
    again = subprocess.run([*CANCEL, str(sweep)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout
    # cancelled tasks come back only when asked
    retry = subprocess.run(
        [*LAUNCH, "--sweep_dir", str(sweep), "--resume", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        "nothing to resubmit" in retry.stdout
        and "not retried without --retry_failed" in retry.stdout
    )


def test_out_of_memory_task_is_retried_with_doubled_memory_and_a_code_error_is_not(tmp_path):
    """Task 0 trains past its 1.2 GB (slurmstepd kills it: "exceeded memory limit"); task 1 raises
    (an image folder with no images) while still under it. --resume resubmits task 0 alone, as
    one array, with 2.4 GB, and it finishes; task 1 waits for a fix and --retry_failed."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            *LAUNCH,
            "--wait",
            "--time_minutes",
            "5",
            "--mem_gb",
            "1.2",
            "--sweep_dir",
            str(sweep),
            "--zip",
            "data.dataset=digits,imagefolder",
            "--zip",
            "model.width=64,8",
            "--zip",
            "data.batch_size=1024,64",
            "train",
            "--epochs",
            "1",
            "--max_steps_per_epoch",
            "6",
            "--device",
            "cpu",
            "--data.root",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    manifest = read_manifest(sweep)
    for r in manifest:
        squeue_gone(r["job_id"])
        sacct_state(r["job_id"])
    table = sweep_status(sweep, write=False)
    assert table["failure"].tolist() == ["out of memory", "error"], table[
        ["state", "error"]
    ].to_dict("records")
    assert "exceeded job memory limit" in table["error"][0].lower()
    assert "DataError: image folder" in table["error"][1] and "need at least 2" in table["error"][1]

    retry = subprocess.run(
        [*LAUNCH, "--wait", "--sweep_dir", str(sweep), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert retry.returncode == 0, retry.stderr
    assert "submitted 1 tasks as 1 job array(s)" in retry.stdout and "tasks 0" in retry.stdout
    assert "task 0: out of memory, now mem_gb 2.4" in retry.stdout
    assert "task 1: error (bonnerlab.errors.DataError: image folder" in retry.stdout
    after = read_manifest(sweep)
    assert (
        after[0]["job_id"] != manifest[0]["job_id"]
        and after[0]["retries"] == 1
        and after[0]["mem_gb"] == 2.4
    )
    assert after[1]["job_id"] == manifest[1]["job_id"]
    array_id = after[0]["job_id"].split("_")[0]
    assert "#SBATCH --mem=2457MB" in (sweep / f"submit-{array_id}.sh").read_text()
    assert read_state(sweep / "task-000") == "DONE"
    assert sweep_status(sweep, write=False)["state"].tolist() == ["DONE", "FAILED"]


# ----------------------------------------------------------------------------- two nodes


def preempt(node: str) -> None:
    """A job on the preempting `urgent` partition takes `node` whole: what runs there is
    requeued."""
    subprocess.run(
        [
            "sbatch",
            "-p",
            "urgent",
            "--nodelist",
            node,
            "--exclusive",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 1",
        ],
        check=True,
        capture_output=True,
    )


MULTI = {"partition": "multi", "nodes": 2, "tasks_per_node": 1}


def test_two_node_gloo_job_matches_one_process(tmp_path):
    cfg = tiny(epochs=1, max_steps_per_epoch=8, **{"model.batchnorm": False, "data.rotation": 20.0})
    one = submit("train", cfg, SlurmConfig(partition="cpu", time_minutes=5), tmp_path / "one")
    two = submit("train", cfg, SlurmConfig(**MULTI, time_minutes=5), tmp_path / "two")
    one.job.result()
    assert len(two.job.results()) == 2
    nodes = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "NNodes,NodeList", "-j", two.job_id],
        capture_output=True,
        text=True,
    ).stdout.split("\n")[0]
    assert nodes.startswith("2|"), nodes
    assert "2 process(es)" in log_of(tmp_path / "two")
    assert "#SBATCH --nodes=2" in (tmp_path / "two" / "submit.sh").read_text()
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


def test_preempted_two_node_job_requeues_and_resumes_to_the_same_weights(tmp_path):
    cfg = tiny(**{**LONG, "epochs": 15, "model.batchnorm": False})
    ref = submit(
        "train",
        cfg,
        SlurmConfig(partition="gpu", tasks_per_node=2, time_minutes=10),
        tmp_path / "ref",
    )
    run = tmp_path / "run"
    sub = submit("train", cfg, SlurmConfig(**MULTI, time_minutes=10), run)
    _wait_until_training(run)
    node = subprocess.run(
        ["sinfo", "-h", "-p", "cpu", "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    preempt(node)
    assert [r["epoch"] for r in sub.job.results()] == [15, 15]
    ref.job.results()
    log = log_of(run)
    assert "2 process(es)" in log and "restart 1" in log
    assert_same_weights(weights(tmp_path / "ref"), weights(run), atol=1e-6)
