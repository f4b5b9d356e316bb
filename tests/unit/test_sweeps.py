"""Sweep specs, the sweep folder, the status table and retries: no SLURM needed."""

from __future__ import annotations

import pytest
from helpers import TRACEBACK, error_log, fake_sweep, job

from bonnerlab.cluster.submit import chunks
from bonnerlab.cluster.sweeps import (
    expand,
    grid,
    load_sweep_file,
    parse_sweep_arg,
    parse_sweep_args,
    read_manifest,
    retry_sweep,
    submit_sweep,
    sweep_status,
)
from bonnerlab.config import SlurmConfig, TrainConfig
from bonnerlab.errors import ClusterError, ConfigError
from bonnerlab.runs import write_state


def test_sweep_arg_values_are_typed():
    assert parse_sweep_arg("optim.lr=0.1,0.03,1e-3") == ("optim.lr", [0.1, 0.03, 0.001])
    assert parse_sweep_arg("data.batch_size=64,128") == ("data.batch_size", [64, 128])
    assert parse_sweep_arg("data.augment=true,false") == ("data.augment", [True, False])
    assert parse_sweep_arg("optim.optimizer=sgd, adamw") == ("optim.optimizer", ["sgd", "adamw"])


@pytest.mark.parametrize(
    "arg, message",
    [
        ("optim.lr", "expected KEY=V1,V2"),
        ("=0.1,0.2", "expected KEY=V1,V2"),
        ("optim.lr=", "empty value list"),
        ("optim.lr=0.1,,0.2", "empty value list"),
    ],
)
def test_sweep_arg_syntax_errors(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep_arg(arg)


def test_same_key_twice_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        parse_sweep_args(["optim.lr=0.1", "optim.lr=0.2"])


def test_several_sweeps_form_a_grid_last_key_fastest():
    points = grid(parse_sweep_args(["optim.lr=0.1,0.01", "optim.optimizer=sgd,adamw,adadelta"]))
    assert len(points) == 6
    assert points[0] == {"optim.lr": 0.1, "optim.optimizer": "sgd"}
    assert points[1] == {"optim.lr": 0.1, "optim.optimizer": "adamw"}
    assert points[5] == {"optim.lr": 0.01, "optim.optimizer": "adadelta"}


@pytest.mark.parametrize(
    "point, message",
    [
        ({"optim.lrr": 0.1}, "unknown config key optim.lrr"),
        ({"optim.lr": "fast"}, "expected a number"),
        ({"epochs": 1.5}, "expected an integer"),
        ({"optim.lr": -1.0}, "optim.lr must be > 0"),
    ],
)
def test_sweep_points_are_validated_before_anything_is_queued(point, message):
    with pytest.raises(ConfigError, match=message):
        expand(TrainConfig(), [{"optim.lr": 0.1}, point])


def test_expand_applies_every_override():
    cfgs = expand(TrainConfig(), grid({"optim.lr": [0.1, 0.01], "epochs": [3]}))
    assert [(c.optim.lr, c.epochs) for c in cfgs] == [(0.1, 3), (0.01, 3)]
    assert cfgs[0].optim.optimizer == TrainConfig().optim.optimizer


def test_sweep_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("optim.lr: [0.1, 0.01]\nepochs: 3\n")
    assert load_sweep_file(path) == ({"optim.lr": [0.1, 0.01], "epochs": [3]}, {})
    path.write_text("grid:\n  seed: [0, 1]\nzip:\n  optim.lr: [0.1, 0.01]\n  epochs: [2, 4]\n")
    assert load_sweep_file(path) == ({"seed": [0, 1]}, {"optim.lr": [0.1, 0.01], "epochs": [2, 4]})
    path.write_text("zip:\n  optim.lr: [0.1, 0.01]\n  epochs: [2, 4, 8]\n")
    with pytest.raises(ConfigError, match="equal lengths; got optim.lr 2, epochs 3"):
        load_sweep_file(path)
    path.write_text("optim.lr: []\n")
    with pytest.raises(ConfigError, match="empty value list"):
        load_sweep_file(path)
    path.write_text("- 0.1\n")
    with pytest.raises(ConfigError, match="must map keys to value lists"):
        load_sweep_file(path)
    with pytest.raises(ConfigError, match="not found"):
        load_sweep_file(tmp_path / "missing.yaml")


def test_chunks_split_past_the_array_limit():
    assert [len(c) for c in chunks(list(range(2500)), 1001)] == [1001, 1001, 498]


def test_existing_sweep_folder_is_refused_without_resume(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "manifest.jsonl").write_text("")
    with pytest.raises(ClusterError, match="already exists; pass --resume"):
        submit_sweep(
            "train",
            TrainConfig(),
            [{"optim.lr": 0.1}],
            SlurmConfig(cluster="local"),
            tmp_path / "sweep",
        )
    with pytest.raises(ClusterError, match="does not exist"):
        retry_sweep(tmp_path / "new")
    with pytest.raises(ClusterError, match=r"--task 1 is out of range: the sweep has tasks 0-0"):
        submit_sweep(
            "train",
            TrainConfig(),
            [{"optim.lr": 0.1}],
            SlurmConfig(cluster="local"),
            tmp_path / "new",
            task=1,
        )
    assert not (tmp_path / "new").exists()


def test_status_table_marks_the_best_task_and_writes_csv_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    # as the tasks leave it, without configs; no job ids: states from the markers alone
    fake_sweep(
        sweep,
        ["DONE", "DONE", "FAILED"],
        points=[{"optim.lr": lr} for lr in (0.1, 0.01, 0.001)],
        curves=[[0.5, 0.6], [0.7, 0.9, 0.85], [0.2]],
        job_ids=dict.fromkeys(range(3), ""),
        configs=False,
    )
    table = sweep_status(sweep)
    assert table["task"].tolist() == [0, 1, 2]
    assert table["optim.lr"].tolist() == [0.1, 0.01, 0.001]
    assert table["state"].tolist() == ["DONE", "DONE", "FAILED"]
    assert table["best_val_acc"].tolist() == [0.6, 0.9, 0.2]
    assert table["last_val_acc"].tolist() == [0.6, 0.85, 0.2]
    assert table["best"].tolist() == ["", "*", ""]
    csv = (sweep / "results.csv").read_text().splitlines()
    assert csv[0].startswith("task,optim.lr,state") and len(csv) == 4
    assert (sweep / "results.png").read_bytes()[:4] == b"\x89PNG"
    by_loss = sweep_status(sweep, metric="val_loss", mode="min", write=False)
    assert by_loss["best"].tolist() == ["", "*", ""]


def test_manifest_keeps_the_latest_line_of_each_task(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(
        '{"task": 1, "overrides": {}, "run_dir": "b", "job_id": "5_1"}\n'
        '{"task": 0, "overrides": {}, "run_dir": "a", "job_id": "5_0"}\n'
        '{"task": 1, "overrides": {}, "run_dir": "b", "job_id": "9_0"}\n'
    )
    assert [(r["task"], r["job_id"]) for r in read_manifest(tmp_path)] == [(0, "5_0"), (1, "9_0")]


def test_status_of_a_single_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 2\n")
    (run / "slurm.yaml").write_text("partition: cpu\nsubmitted:\n  job: train\n  job_id: ''\n")
    (run / "metrics.jsonl").write_text(
        '{"epoch": 1, "val_acc": 0.4}\n{"epoch": 2, "val_acc": 0.5}\n'
    )
    write_state(run, "RUNNING")
    table = sweep_status(run)
    assert table[["task", "state", "epochs", "best_val_acc", "best"]].values.tolist() == [
        [0, "RUNNING", 2, 0.5, "*"]
    ]
    with pytest.raises(ClusterError, match="neither a sweep folder"):
        sweep_status(tmp_path / "run" / "..")


def test_dry_run_sweep_from_a_file(tmp_path):
    import subprocess

    spec = tmp_path / "sweep.yaml"
    spec.write_text("optim.lr: [0.1, 0.01]\noptim.optimizer: [sgd, adamw]\n")
    out = subprocess.run(
        [
            *job("launch"),
            "--dry-run",
            "--sweep_file",
            str(spec),
            "--sweep_dir",
            str(tmp_path / "s"),
            "train",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-3%4" in (tmp_path / "s" / "submit.sh").read_text()
    assert "dry run: 4 tasks" in out.stdout


# ----------------------------------------------------------------------------- zip, status, retries


def test_zip_pairs_values_and_multiplies_the_grid():
    from bonnerlab.cluster.sweeps import combine, parse_zip_args

    zipped = parse_zip_args(["optim.lr=0.1,0.01", "optim.weight_decay=1e-4,1e-5"])
    points = combine(parse_sweep_args(["seed=0,1,2"]), zipped)
    assert len(points) == 6
    assert points[0] == {"optim.lr": 0.1, "optim.weight_decay": 1e-4, "seed": 0}
    assert points[2] == {"optim.lr": 0.1, "optim.weight_decay": 1e-4, "seed": 2}
    assert points[3] == {"optim.lr": 0.01, "optim.weight_decay": 1e-5, "seed": 0}
    assert combine({}, zipped) == [
        {"optim.lr": 0.1, "optim.weight_decay": 1e-4},
        {"optim.lr": 0.01, "optim.weight_decay": 1e-5},
    ]
    assert len(combine({"seed": [0, 1]})) == 2


def test_zip_errors():
    from bonnerlab.cluster.sweeps import combine, parse_zip_args

    with pytest.raises(
        ConfigError,
        match=r"--zip: zipped value lists must have equal lengths; got optim.lr 2, seed 3",
    ):
        parse_zip_args(["optim.lr=0.1,0.01", "seed=0,1,2"])
    with pytest.raises(ConfigError, match="optim.lr is both zipped and swept"):
        combine({"optim.lr": [0.1]}, {"optim.lr": [0.2]})


def test_error_line_and_failure_kinds(tmp_path):
    from bonnerlab.cluster.status import error_line, failure_kind

    error_log(tmp_path, "7_2", TRACEBACK)
    record = {"job_id": "7_2", "logs": str(tmp_path)}
    assert error_line(record) == "ValueError: data.root /nope holds no images"
    error_log(
        tmp_path,
        "8",
        "slurmstepd: error: Detected 1 oom_kill event in StepId=8.0. Some of the step tasks "
        "have been OOM Killed.\n",
    )
    assert error_line({"job_id": "8", "logs": str(tmp_path)}).startswith(
        "slurmstepd: error: Detected 1 oom_kill"
    )
    assert error_line({"job_id": "9", "logs": str(tmp_path)}) == ""
    assert failure_kind("OUT_OF_MEMORY", "") == "out of memory"
    assert failure_kind("FAILED", "slurmstepd: error: Detected 1 oom_kill event") == "out of memory"
    assert failure_kind("PREEMPTED", "") == "preempted"
    assert failure_kind("INTERRUPTED", "") == "preempted"
    assert failure_kind("NODE_FAIL", "") == "node failure"
    assert failure_kind("TIMEOUT", "") == "time limit"
    assert (
        failure_kind("FAILED", "RuntimeError: requeued 4 times, more than max_requeues=3")
        == "time limit"
    )
    assert failure_kind("FAILED", "ValueError: x") == "error"
    assert failure_kind("CANCELLED", "") == "cancelled"
    assert (
        failure_kind("DONE", "") == failure_kind("RUNNING", "") == failure_kind("PENDING", "") == ""
    )


def test_status_shows_the_failed_tasks_error_line_and_kind(tmp_path):
    sweep = tmp_path / "sweep"
    fake_sweep(sweep, ["DONE", "FAILED", "INTERRUPTED"])
    error_log(sweep / "logs", "101", TRACEBACK)
    table = sweep_status(sweep, write=False)
    assert table["state"].tolist() == ["DONE", "FAILED", "INTERRUPTED"]
    assert table["failure"].tolist() == ["", "error", "preempted"]
    assert table["error"].tolist() == ["", "ValueError: data.root /nope holds no images", ""]


def test_retry_resubmits_only_retryable_tasks_unless_asked(tmp_path):
    from bonnerlab.cluster.sweeps import plan_retry, retry_sweep

    sweep = tmp_path / "sweep"
    fake_sweep(sweep, ["DONE", "FAILED", "INTERRUPTED", "CANCELLED"])
    error_log(sweep / "logs", "101", TRACEBACK)
    _, _, plan = plan_retry(sweep)
    assert [t.index for t in plan.tasks] == [2]
    assert plan.tasks[0].retries == 1
    assert plan.notes == [
        "task 1: error (ValueError: data.root /nope holds no images); not retried without "
        "--retry_failed",
        "task 3: cancelled (CANCELLED); not retried without --retry_failed",
    ]
    _, _, plan = plan_retry(sweep, retry_failed=True)
    assert [t.index for t in plan.tasks] == [1, 2, 3]
    _, _, plan = plan_retry(sweep, max_retries=0)
    assert (
        plan.tasks == []
        and "task 2: preempted, already retried 0 times (--max_retries)" in plan.notes
    )

    # a dry run writes the array script of just that task and submits nothing
    plan = retry_sweep(sweep, dry_run=True)
    assert [t.index for t in plan.tasks] == [2] and (sweep / "submit.sh").is_file()
    assert read_manifest(sweep)[2]["job_id"] == "102"


def test_status_of_every_folder_under_runs_root(tmp_path):
    from bonnerlab.cluster.status import status_all

    root = tmp_path / "runs"
    root.mkdir()
    fake_sweep(root / "sweep-a", ["DONE", "FAILED", "RUNNING"])
    run = root / "lab" / "run-b"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.75}\n')
    write_state(run, "DONE")
    (root / "empty").mkdir()
    table = status_all(root)
    assert table["folder"].tolist() == ["lab/run-b", "sweep-a"]  # newest first
    assert table["job"].tolist() == ["train", "train sweep"]
    assert table["states"].tolist() == ["DONE 1", "RUNNING 1 · DONE 1 · FAILED 1"]
    assert table["best_val_acc"].tolist()[0] == 0.75 and table["tasks"].tolist() == [1, 3]


OOM_LOG = """slurmstepd: error: Detected 1 oom_kill event in StepId=100.batch. Some of the step
tasks have been OOM Killed.
srun: error: node: task 0: Out Of Memory
"""


def test_out_of_memory_task_is_retried_with_more_memory_and_its_old_request_is_kept(tmp_path):
    """The retry-with-more-memory rule without SLURM (with it: tests/slurm/test_cluster_slurm.py's
    out-of-memory test): the request the task ran out of memory with, times the factor, written
    into the array script as sbatch reads it; the code error beside it is left alone."""
    import yaml

    from bonnerlab.cluster.sweeps import plan_retry
    from bonnerlab.config import to_dict

    sweep = tmp_path / "sweep"
    fake_sweep(sweep, ["FAILED", "FAILED"])
    error_log(sweep / "logs", "100", OOM_LOG)
    error_log(sweep / "logs", "101", TRACEBACK)
    first = {**to_dict(SlurmConfig(cluster="local", mem_gb=1.2)), "submitted": {"retries": 0}}
    (sweep / "task-000" / "slurm.yaml").write_text(yaml.safe_dump(first))

    _, _, plan = plan_retry(sweep, mem_factor=2.0)
    assert [t.index for t in plan.tasks] == [0]
    assert plan.tasks[0].slurm.mem_gb == pytest.approx(1.2 * 2.0)
    assert plan.changes == ["task 0: out of memory, now mem_gb 2.4"]
    assert plan.notes[0].startswith("task 1: error (ValueError: data.root /nope")
    _, _, plan = plan_retry(sweep, mem_factor=1.5)
    assert plan.tasks[0].slurm.mem_gb == pytest.approx(1.8)

    retry_sweep(sweep, mem_factor=2.0, dry_run=True)
    # 2.4 GB is not a whole number of GB: sbatch gets MB (int(2.4 * 1024))
    assert "#SBATCH --mem=2457MB" in (sweep / "submit.sh").read_text()
    now = yaml.safe_load((sweep / "task-000" / "slurm.yaml").read_text())
    assert now["mem_gb"] == 2.4 and now["submitted"]["retries"] == 1
    # the request it ran out of memory with is kept beside the new one
    assert yaml.safe_load((sweep / "task-000" / "slurm.1.yaml").read_text()) == first
    # out of memory again: twice as much again, and the first retry's script is kept
    write_state(sweep / "task-000", "FAILED")
    retry_sweep(sweep, mem_factor=2.0, dry_run=True)
    assert "#SBATCH --mem=2457MB" in (sweep / "submit.1.sh").read_text()
    assert "#SBATCH --mem=4915MB" in (sweep / "submit.sh").read_text()
    assert yaml.safe_load((sweep / "task-000" / "slurm.2.yaml").read_text())["mem_gb"] == 2.4

    # with the code error retried too, the dry run shows both arrays: each with its own request
    write_state(sweep / "task-000", "FAILED")
    retry_sweep(sweep, retry_failed=True, mem_factor=2.0, dry_run=True)
    first_script, second_script = (sweep / "submit.sh").read_text().split("# ---- ")[1:]
    assert first_script.startswith("sbatch script 1 of 2: tasks 0\n")
    assert "#SBATCH --mem=9830MB" in first_script and "#SBATCH --array=0-0%1" in first_script
    assert second_script.startswith("sbatch script 2 of 2: tasks 1\n")
    assert "--mem" not in second_script  # the sweep's own request: the partition's default


def test_a_half_written_manifest_line_spoils_only_itself(tmp_path):
    """A submission killed mid-append leaves a line without its newline: the next submission's
    records start on a line of their own, each whole JSON."""
    import json

    from bonnerlab.cluster.submit import Task, append_manifest
    from bonnerlab.runs import SweepPaths

    paths = SweepPaths(tmp_path)
    paths.manifest.write_text('{"task": 0, "job_id": "1"}\n{"task": 1, "job_')
    tasks = [Task(i, {"seed": i}, paths.task(i), job_id=f"2_{i}") for i in (1, 2)]
    append_manifest(paths, tasks, "now", SlurmConfig(mem_gb=3))
    lines = paths.manifest.read_text().splitlines()
    assert lines[:2] == ['{"task": 0, "job_id": "1"}', '{"task": 1, "job_']
    records = [json.loads(line) for line in lines[2:]]
    assert [(r["task"], r["job_id"], r["mem_gb"]) for r in records] == [
        (1, "2_1", 3),
        (2, "2_2", 3),
    ]
    append_manifest(paths, tasks[:1], "later", SlurmConfig())  # a whole file: no blank line
    assert json.loads(paths.manifest.read_text().splitlines()[4])["submitted_at"] == "later"


def test_a_sweep_refused_by_its_checks_leaves_no_folder_to_trip_over(tmp_path):
    """The checks of submit_tasks (inputs, the cluster, the snapshot's cap) come before sweep.yaml:
    a refused sweep left a folder that the corrected command then called "already exists"."""
    sweep = tmp_path / "sweep"
    base = TrainConfig(
        data=TrainConfig().data.__class__(dataset="mnist", root=str(tmp_path / "no"))
    )
    with pytest.raises(ClusterError, match="data.root .* does not exist"):
        submit_sweep("train", base, [{"seed": 0}, {"seed": 1}], SlurmConfig(), sweep, dry_run=True)
    assert not sweep.exists()
    submit_sweep("train", TrainConfig(), [{"seed": 0}, {"seed": 1}], SlurmConfig(), sweep, True)
    assert (sweep / "sweep.yaml").is_file() and (sweep / "task-001" / "config.yaml").is_file()
