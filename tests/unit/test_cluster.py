"""SlurmConfig checks, time formats, partition checks against an sinfo listing, the golden sbatch
scripts, and the job wrapper run in-process: the cluster room without SLURM and without a
launcher process (those: tests/jobs/test_launch.py; the real cluster: tests/slurm/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import GOLDEN

from bonnerlab.cluster.node import ClusterJob
from bonnerlab.cluster.slurm_cli import parse_time_minutes
from bonnerlab.cluster.submit import prepare_job_config
from bonnerlab.config import EvaluateConfig, SlurmConfig
from bonnerlab.errors import ClusterError, ConfigError
from bonnerlab.runs import read_state


def test_tasks_default_to_one_per_gpu():
    assert SlurmConfig().ntasks_per_node == 1
    assert SlurmConfig(gpus_per_node=4).ntasks_per_node == 4
    assert SlurmConfig(gpus_per_node=2, nodes=3).ntasks == 6
    assert SlurmConfig(tasks_per_node=2).ntasks_per_node == 2  # CPU DDP


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"gpus_per_node": 2, "tasks_per_node": 1},
            r"tasks_per_node \(1\) must equal gpus_per_node \(2\)",
        ),
        ({"cluster": "kubernetes"}, "cluster must be one of slurm, local, debug"),
        ({"time_minutes": 0}, "time_minutes must be >= 1"),
        ({"nodes": 0}, "nodes must be >= 1"),
        ({"cluster": "debug", "tasks_per_node": 2}, "cannot run several tasks"),
    ],
)
def test_slurm_config_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SlurmConfig(**kwargs)


def test_slurm_time_formats():
    assert parse_time_minutes("60") == 60
    assert parse_time_minutes("1:00:00") == 60
    assert parse_time_minutes("30:00") == 30
    assert parse_time_minutes("2-00:00:00") == 2880
    assert parse_time_minutes("infinite") == float("inf")


def test_failing_job_raises_and_marks_failed(tmp_path):
    """A job whose function raises must end FAILED (SLURM then reports FAILED, not COMPLETED)."""
    run = tmp_path / "run"
    run.mkdir()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = prepare_job_config("evaluate", EvaluateConfig(checkpoint=str(bad), device="cpu"), run)
    with pytest.raises(Exception, match="corrupt or not a checkpoint"):
        ClusterJob("evaluate", cfg, str(run))()
    assert read_state(run) == "FAILED"


def test_requeues_past_max_requeues_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(RuntimeError, match="requeued 3 times, more than max_requeues=2"):
        ClusterJob("evaluate", EvaluateConfig(), str(tmp_path), max_requeues=2)()
    assert read_state(tmp_path) == "FAILED"


def test_partition_checks():
    """The checks on an sinfo listing of the local cluster's shape (the live one:
    tests/slurm/test_cluster_slurm.py)."""
    from bonnerlab.cluster.slurm_cli import parse_sinfo
    from bonnerlab.cluster.submit import check_partition

    parts = parse_sinfo(
        "cpu*|1:00:00|(null)|1\ngpu|2:00:00|gpu:2|1\nurgent|30:00|gpu:2|1\nurgent|30:00|(null)|1\n"
    )
    assert (
        parts["cpu"].default
        and parts["cpu"].gpus_per_node == 0
        and parts["cpu"].max_time_minutes == 60
    )
    assert parts["gpu"].gpus_per_node == 2 and not parts["gpu"].default
    assert parts["urgent"].gpus_per_node == 2 and parts["urgent"].nodes == 2
    assert parse_sinfo("a100|infinite|gpu:a100:8(S:0-1)|4\n")["a100"].gpus_per_node == 8
    assert check_partition(SlurmConfig(), parts).name == "cpu"
    with pytest.raises(
        ClusterError,
        match="partition cpu has no GPUs per node .* partitions with enough: gpu, urgent",
    ):
        check_partition(SlurmConfig(gpus_per_node=1), parts)
    with pytest.raises(ClusterError, match="partitions with enough: none"):
        check_partition(SlurmConfig(partition="gpu", gpus_per_node=4), parts)
    with pytest.raises(
        ClusterError, match="unknown partition 'big'; this cluster has: cpu, gpu, urgent"
    ):
        check_partition(SlurmConfig(partition="big"), parts)
    with pytest.raises(ClusterError, match="over partition gpu's limit of 120"):
        check_partition(SlurmConfig(partition="gpu", time_minutes=121), parts)
    with pytest.raises(ClusterError, match="2 nodes requested; partition cpu has 1"):
        check_partition(SlurmConfig(nodes=2), parts)


@pytest.mark.parametrize(
    "name, array", [("sbatch_gpu_job.sh", None), ("sbatch_sweep_array.sh", 12)]
)
def test_sbatch_script_matches_its_golden_file(name, array):
    """submitit's practice: the generated script is compared to a recorded one. A deliberate change
    is recorded with BONNERLAB_UPDATE_GOLDEN=1 and reviewed in the diff."""
    from bonnerlab.cluster.submit import job_setup_lines, sbatch_script

    cfg = SlurmConfig(
        partition="gpu",
        gpus_per_node=2,
        mem_gb=7.5,
        time_minutes=20,
        account="lab",
        qos="high",
        setup=["module load cuda"],
        additional_parameters={"exclusive": True},
        array_parallelism=4,
    )
    script = sbatch_script(
        cfg,
        Path("/lab/runs/x/logs"),
        "bonnerlab-train",
        job_setup_lines(cfg, Path("/lab/runs/x/code")),
        array=array,
        python="/lab/venv/bin/python",
    )
    golden = GOLDEN / name
    if os.environ.get("BONNERLAB_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert script == golden.read_text()


@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\x1b", "\t", "\x85", "\u2028"])
@pytest.mark.parametrize(
    "field", ["job_name", "partition", "account", "qos", "constraint", "mail_user", "mail_type"]
)
def test_every_sbatch_text_field_refuses_control_characters(field, char):
    from bonnerlab.config.cluster import SBATCH_TEXT_FIELDS

    assert field in SBATCH_TEXT_FIELDS  # the list the check walks holds every such field
    with pytest.raises(ConfigError, match=f"^{field} .* holds the control character"):
        SlurmConfig(**{field: f"a{char}touch INJECTED"})
    with pytest.raises(ConfigError, match="additional_parameters.comment .* holds the control"):
        SlurmConfig(additional_parameters={"comment": f"a{char}b"})
    with pytest.raises(ConfigError, match="is not an sbatch option name"):
        SlurmConfig(additional_parameters={f"a{char}b": 1})


def test_every_string_field_of_slurm_config_that_reaches_sbatch_is_checked():
    """A new string field must join SBATCH_TEXT_FIELDS (or be cluster, which has choices)."""
    import dataclasses

    from bonnerlab.config.cluster import SBATCH_TEXT_FIELDS

    strings = {f.name for f in dataclasses.fields(SlurmConfig) if f.type in ("str", str)}
    assert strings - {"cluster"} == set(SBATCH_TEXT_FIELDS)
    assert strings >= {"cluster"}


HOSTILE = SlurmConfig(
    job_name="x; touch INJECTED #",
    account="`touch INJECTED`",
    qos="$(touch INJECTED)",
    constraint="a100|h100&touch INJECTED",
    mail_user="o'brien@lab.org",
    additional_parameters={"comment": "it's; touch INJECTED", "exclusive": True},
)
HOSTILE_RUN = Path("/lab/runs/o'brien $(touch INJECTED) `x`")


def test_shell_text_in_slurm_fields_renders_quoted_as_its_golden_file():
    """Values that are legal but full of shell syntax: each stays inside its own line, quoted
    (recorded in tests/golden/sbatch_hostile_values.sh; BONNERLAB_UPDATE_GOLDEN=1 re-records)."""
    from bonnerlab.cluster.submit import job_setup_lines, sbatch_script

    script = sbatch_script(
        HOSTILE,
        HOSTILE_RUN / "logs",
        HOSTILE.job_name,
        job_setup_lines(HOSTILE, HOSTILE_RUN / "code" / "0123abcd"),
        python="/lab/venv/bin/python",
    )
    golden = GOLDEN / "sbatch_hostile_values.sh"
    if os.environ.get("BONNERLAB_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert script == golden.read_text()


def test_the_hostile_golden_script_runs_no_injected_command(tmp_path):
    """bash runs the recorded script (srun replaced by a stub that records its arguments): no
    value ran as a command, and srun got each path as one argument, intact."""
    import subprocess

    script = (GOLDEN / "sbatch_hostile_values.sh").read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > args\n')
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "touch").write_text("#!/bin/sh\necho ran > INJECTED\n")  # even if PATH is used
    (bin_dir / "touch").chmod(0o755)
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "INJECTED").exists()
    logs = HOSTILE_RUN / "logs"
    assert (tmp_path / "args").read_text().splitlines() == [
        "--unbuffered",
        "--output",
        f"{logs}/%j_%t_log.out",
        "--error",
        f"{logs}/%j_%t_log.err",
        "/lab/venv/bin/python",
        "-u",
        "-m",
        "submitit.core._submit",
        str(logs),
    ]
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --job-name='x; touch INJECTED #'" in directives
    assert "#SBATCH --qos='$(touch INJECTED)'" in directives


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "cluster: slurm\nsubmitted: {job: train, job_id: 12",
            "is not valid YAML (did not find expected",
        ),
        ("- just\n- a list\n", "holds no mapping of keys (a list)"),
        ("submitted: [1, 2]\n", "`submitted` is not a mapping"),
        ("submitted:\n  job: train\n  job: evaluate\n", "key 'job' given twice (lines 2 and 3)"),
    ],
)
def test_a_malformed_slurm_yaml_is_one_line_for_after_and_resume(tmp_path, text, message):
    """A slurm.yaml cut short by a full disk or edited by hand: --after and --resume name the file
    in one line instead of a traceback from deep inside PyYAML."""
    from bonnerlab.cluster.submit import dependency_ids
    from bonnerlab.cluster.sweeps import plan_retry

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "slurm.yaml").write_text(text)
    for call in (lambda: dependency_ids(str(run)), lambda: plan_retry(run)):
        with pytest.raises(ClusterError) as e:
            call()
        assert str(e.value).startswith(f"{run / 'slurm.yaml'}") and message in str(e.value)
        assert "\n" not in str(e.value)
