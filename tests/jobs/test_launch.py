"""jobs/launch.py, status.py, cancel.py and logs.py as programs: the generated sbatch script and run
folder (--dry-run), fail-fast one-line errors, no controller, the debug and local clusters, retries.
None of these need SLURM (the real cluster: tests/slurm/; the cluster room itself:
tests/unit/test_cluster.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import assert_same_weights, job, run_weights, torchrun_cmd, torchrun_env

from bonnerlab.cluster.slurm_cli import NO_CONTROLLER
from bonnerlab.runs import read_metrics, read_state

LAUNCH = job("launch")


def launch(*args, env=None, cwd=None):
    return subprocess.run(
        [*LAUNCH, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_dry_run_writes_the_sbatch_script_and_a_self_describing_run_folder(tmp_path):
    run = tmp_path / "run"
    out = launch(
        "--dry-run",
        "--partition",
        "gpu",
        "--gpus_per_node",
        "2",
        "--time_minutes",
        "20",
        "--mem_gb",
        "8",
        "--setup",
        "module load cuda",
        "--additional_parameters",
        "exclusive=true",
        "train",
        "--epochs",
        "1",
        "--optim.lr",
        "0.01",
        "--run_dir",
        str(run),
    )
    assert out.returncode == 0, out.stderr
    script = (run / "submit.sh").read_text()
    assert script in out.stdout and "nothing submitted" in out.stdout
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --time=20",
        "#SBATCH --mem=8GB",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --nodes=1",
        "#SBATCH --job-name=bonnerlab-train",
        f"export PYTHONPATH={run}/code",
        "export PYTHONSAFEPATH=1",
        "module load cuda",
        f"-m submitit.core._submit {run}/logs",
    ]:
        assert line in script, line
    assert script.index("module load cuda") < script.index("srun ")
    # the run folder explains itself before the job ever starts
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["run_dir"] == str(run) and cfg["resume"] is True and cfg["optim"]["lr"] == 0.01
    slurm = yaml.safe_load((run / "slurm.yaml").read_text())
    assert slurm["gpus_per_node"] == 2 and slurm["additional_parameters"] == {"exclusive": True}
    (code,) = (run / "code").iterdir()  # one snapshot, named by its content
    assert f"export PYTHONPATH={code}$" in script
    assert (code / "bonnerlab" / "train" / "loop.py").is_file()
    assert (code / "jobs" / "train.py").is_file()
    assert (run / "git.txt").read_text().startswith(("commit ", "not a git checkout"))
    assert read_state(run) == "PENDING"
    assert not list(run.rglob("*.pkl")), "a dry run pickled a job to submit"

    # the run folder's two YAML files ask for the same job again
    again = launch(
        "--dry-run",
        "--config_path",
        str(run / "slurm.yaml"),
        "train",
        "--config_path",
        str(run / "config.yaml"),
        "--run_dir",
        str(tmp_path / "again"),
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "submit.sh").read_text() == script.replace(
        str(run), str(tmp_path / "again")
    )


def test_dry_run_sweep_is_one_array_capped_by_parallelism(tmp_path):
    sweep = tmp_path / "sweep"
    out = launch(
        "--dry-run",
        "--array_parallelism",
        "2",
        "--sweep",
        "optim.lr=0.1,0.03,0.01",
        "--sweep",
        "epochs=1,2",
        "--sweep_dir",
        str(sweep),
        "train",
    )
    assert out.returncode == 0, out.stderr
    script = (sweep / "submit.sh").read_text()
    assert "#SBATCH --array=0-5%2" in script
    assert "%A_%a_0_log.out" in script
    assert sorted(p.name for p in sweep.glob("task-*")) == [f"task-{i:03d}" for i in range(6)]
    task4 = yaml.safe_load((sweep / "task-004" / "config.yaml").read_text())
    assert (task4["optim"]["lr"], task4["epochs"]) == (0.01, 1)
    assert task4["run_dir"] == str(sweep / "task-004")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "optim.nope=1,2", "train"], "unknown config key optim.nope"),
        (["--sweep", "optim.lr=fast,slow", "train"], "expected a number"),
        (["--sweep", "optim.lr=", "train"], "empty value list"),
        (["--gpus_per_node", "2", "--tasks_per_node", "3", "train"], "must equal gpus_per_node"),
        (["train", "--optim.lr", "-1"], "optim.lr must be > 0"),
        (["--partition", "gpu"], "no job given"),
    ],
)
def test_bad_launcher_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = (
        launch("--dry-run", "--sweep_dir", str(tmp_path / "s"), *args)
        if "--sweep" in args
        else launch(*args)
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "s").exists()


def test_no_sbatch_on_path_suggests_local(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + ":/bin:/usr/bin/nonexistent"}
    env.pop("SLURM_CONF", None)
    bin_dir = tmp_path / "bin"  # /bin may be /usr/bin (merged usr) and hold sbatch: hide it
    bin_dir.mkdir()
    for tool in ("git", "bash", "sh"):
        src = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if src:
            (bin_dir / tool).symlink_to(src)
    env["PATH"] = f"{Path(sys.executable).parent}:{bin_dir}"
    out = launch("train", "--run_dir", str(tmp_path / "run"), env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: " + NO_CONTROLLER.format(why="no sbatch on PATH")
    assert not (tmp_path / "run").exists()


def test_debug_cluster_runs_the_same_job_in_process(tmp_path):
    run = tmp_path / "run"
    out = launch(
        "--cluster",
        "debug",
        "--wait",
        "train",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "3",
        "--model.width",
        "8",
        "--device",
        "cpu",
        "--run_dir",
        str(run),
    )
    assert out.returncode == 0, out.stderr
    assert '"epoch": 1' in out.stdout
    assert read_state(run) == "DONE"
    assert (run / "checkpoints" / "latest.pt").is_file()
    assert (run / "slurm.yaml").is_file() and (run / "config.yaml").is_file()


def test_existing_run_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    out = launch("--cluster", "debug", "train", "--run_dir", str(run))
    assert out.returncode == 2
    assert "already exists; choose another --run_dir or pass --resume" in out.stderr


# ---------------------------------------------------------------------------- no SLURM, bad folders

STATUS, CANCEL, LOGS = job("status"), job("cancel"), job("logs")


def _no_slurm_env(tmp_path, conf: str | None = None):
    """PATH without SLURM's clients, or (conf) with them but pointing at a controller that is not
    there."""
    env = {**os.environ}
    env.pop("SLURM_CONF", None)
    if conf is not None:
        env["SLURM_CONF"] = conf
        return env
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("git", "bash", "sh"):
        src = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if src and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(src)
    env["PATH"] = f"{Path(sys.executable).parent}:{bin_dir}"
    return env


def _submitted_run(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "slurm.yaml").write_text("cluster: slurm\nsubmitted:\n  job: train\n  job_id: '4242'\n")
    return run


@pytest.mark.parametrize("why", ["no clients", "no controller"])
def test_cancel_and_launch_without_a_controller_say_so_in_one_line(tmp_path, why):
    if why == "no controller":
        if shutil.which("squeue") is None:
            pytest.skip("SLURM's clients are not installed here")
        conf = tmp_path / "slurm.conf"  # a controller on a port where nothing listens
        conf.write_text(
            "ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
            "AuthType=auth/none\nNodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n"
        )
        env = _no_slurm_env(tmp_path, str(conf))
    else:
        env = _no_slurm_env(tmp_path)
    run = _submitted_run(tmp_path)
    for cmd in ([*CANCEL, str(run)], [*LAUNCH, "train", "--run_dir", str(tmp_path / "new")]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        line = out.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert line.startswith("error: no SLURM controller reachable (") and line.endswith(
            "; start the local one (make slurm-up && source .slurm-lab/env.sh), "
            "run on a login node, "
            "or --cluster local"
        ), line
    assert not (tmp_path / "new").exists()
    # status still answers from the folders' own markers, with the same line as a warning
    status = subprocess.run(
        [*STATUS, str(run)], capture_output=True, text=True, env=env, timeout=120
    )
    assert status.returncode == 0, status.stderr
    assert "warning: no SLURM controller reachable" in status.stderr


@pytest.mark.parametrize("tool", [STATUS, CANCEL, LOGS])
def test_a_folder_that_is_neither_run_nor_sweep_is_one_line(tmp_path, tool):
    (tmp_path / "stuff").mkdir()
    out = subprocess.run(
        [*tool, str(tmp_path / "stuff")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {tmp_path / 'stuff'} is neither a sweep folder (sweep.yaml, "
        "manifest.jsonl) nor a run folder (config.yaml)"
    )


def test_logs_of_task_k_and_bad_task(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "logs").mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("job: train\npoints: [{seed: 0}, {seed: 1}]\n")
    (sweep / "manifest.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "task": i,
                    "overrides": {"seed": i},
                    "run_dir": f"{sweep}/task-00{i}",
                    "job_id": f"5_{i}",
                }
            )
            + "\n"
            for i in range(2)
        )
    )
    (sweep / "logs" / "5_1_0_log.out").write_text("".join(f"line {i}\n" for i in range(100)))
    (sweep / "logs" / "5_1_1_log.err").write_text("rank 1 says hi\n")
    out = subprocess.run(
        [*LOGS, str(sweep), "--task", "1", "--lines", "3"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:] == ["line 97", "line 98", "line 99"]
    out = subprocess.run(
        [*LOGS, str(sweep), "--task", "1", "--rank", "1", "--err"], capture_output=True, text=True
    )
    assert out.stdout.splitlines()[-1] == "rank 1 says hi"
    out = subprocess.run([*LOGS, str(sweep), "--task", "7"], capture_output=True, text=True)
    assert (
        out.returncode == 2
        and out.stderr.strip() == f"error: --task 7 is out of range: {sweep} has tasks 0-1"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--zip", "optim.lr=0.1,0.01", "--zip", "seed=1,2,3"],
            "zipped value lists must have equal lengths",
        ),
        (
            ["--zip", "optim.lr=0.1,0.01", "--sweep", "optim.lr=0.3"],
            "optim.lr is both zipped and swept",
        ),
        (
            ["--sweep", "optim.lr=0.1,0.01", "--task", "2"],
            "--task 2 is out of range: the sweep has tasks 0-1",
        ),
    ],
)
def test_bad_sweep_input_is_one_line_and_nothing_written(tmp_path, args, message):
    out = launch("--dry-run", "--sweep_dir", str(tmp_path / "s"), *args, "train")
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_dry_run_of_a_zip_sweep_prints_the_script_and_the_points(tmp_path):
    out = launch(
        "--dry-run",
        "--sweep_dir",
        str(tmp_path / "s"),
        "--zip",
        "optim.lr=0.1,0.01",
        "--zip",
        "epochs=2,4",
        "--sweep",
        "seed=0,1",
        "train",
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-3%4" in out.stdout
    rows = [
        line.split()
        for line in out.stdout.splitlines()
        if line.strip().startswith(("task", "0 ", "1 ", "2 ", "3 "))
    ]
    assert rows == [
        ["task", "optim.lr", "epochs", "seed"],
        ["0", "0.10", "2", "0"],
        ["1", "0.10", "2", "1"],
        ["2", "0.01", "4", "0"],
        ["3", "0.01", "4", "1"],
    ]
    assert (tmp_path / "s" / "submit.sh").is_file()  # the dry run wrote its script ...
    assert not list((tmp_path / "s").rglob("*.pkl")), "... and pickled no job to submit"


def test_retry_with_nothing_retryable_says_so_and_exits_0(tmp_path):
    sweep = tmp_path / "s"
    out = launch(
        "--cluster",
        "debug",
        "--wait",
        "--sweep_dir",
        str(sweep),
        "--sweep",
        "seed=0",
        "train",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "2",
        "--model.width",
        "8",
        "--device",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    again = launch("--sweep_dir", str(sweep), "--resume")
    assert again.returncode == 0, again.stderr
    assert f"nothing to resubmit: no task of {sweep} failed for a retryable reason" in again.stdout


@pytest.mark.slow
def test_one_task_of_a_sweep_runs_here_then_the_rest_is_queued_around_it(tmp_path):
    """`--task K --cluster local`: try one point on this machine, in its own task folder."""
    sweep = tmp_path / "s"
    flags = ["--sweep_dir", str(sweep), "--sweep", "optim.lr=0.1,0.01,0.001"]
    job = [
        "train",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "2",
        "--model.width",
        "8",
        "--device",
        "cpu",
    ]
    out = launch(*flags, "--task", "1", "--cluster", "local", *job)
    assert out.returncode == 0, out.stderr
    assert "submitted task 1 as 1 job array(s)" in out.stdout
    assert read_state(sweep / "task-001") == "DONE"
    assert yaml.safe_load((sweep / "task-001" / "config.yaml").read_text())["optim"]["lr"] == 0.01
    assert not (sweep / "task-000").exists() and not (sweep / "task-002").exists()
    # the other points are still to do: a dry-run resume would submit exactly those
    again = launch("--sweep_dir", str(sweep), "--resume", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "would resubmit tasks [0, 2]" in again.stdout
    # a different sweep in the same folder is refused
    other = launch(
        "--sweep_dir",
        str(sweep),
        "--sweep",
        "optim.lr=0.5",
        "--task",
        "0",
        "--cluster",
        "local",
        *job,
    )
    assert other.returncode == 2 and "was made with other points" in other.stderr


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_resume_ends_equal_to_an_uninterrupted_run(tmp_path):
    """jobs/train.py installs the stop handlers itself: torchrun passes its SIGTERM to both workers,
    which save latest.pt at the same step boundary and exit; --resume then ends bit for bit where
    an uninterrupted run ends."""
    import signal
    import time

    common = [
        "--device",
        "cpu",
        "--progress",
        "false",
        "--epochs",
        "12",
        "--model.width",
        "8",
        "--data.batch_size",
        "64",
        "--checkpoint_every_steps",
        "4",
    ]
    env = torchrun_env()

    def torchrun(run: Path, *extra: str) -> list[str]:
        return torchrun_cmd(*job("train")[1:], *common, "--run_dir", str(run), *extra)

    ref = subprocess.run(
        torchrun(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=600
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    end = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "training finished before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stopped by a signal; saved" in out, out[-3000:]
    assert read_state(run) == "INTERRUPTED"
    assert (run / "checkpoints" / "latest.pt").is_file() and len(read_metrics(run)) < 12
    resumed = subprocess.run(
        torchrun(run, "--resume", "true"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_state(run) == "DONE"

    assert_same_weights(run_weights(tmp_path / "ref"), run_weights(run))


def test_one_yaml_file_holds_launcher_and_slurm_keys_and_flags_win(tmp_path):
    spec = tmp_path / "launch.yaml"
    spec.write_text(
        "partition: gpu\narray_parallelism: 1\ndry_run: true\nsweep: ['optim.lr=0.1,0.01']\n"
    )
    out = launch("--config_path", str(spec), "--sweep_dir", str(tmp_path / "a"), "train")
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "a" / "submit.sh").read_text()
    assert "#SBATCH --array=0-1%1" in script and "#SBATCH --partition=gpu" in script
    out = launch(
        "--config_path",
        str(spec),
        "--sweep",
        "seed=0,1,2",
        "--partition",
        "cpu",
        "--sweep_dir",
        str(tmp_path / "b"),
        "train",
    )
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "b" / "submit.sh").read_text()
    assert "#SBATCH --array=0-2%1" in script and "#SBATCH --partition=cpu" in script
    spec.write_text("partition: gpu\nsweeps: [x]\n")
    bad = launch("--config_path", str(spec), "--dry-run", "train")
    assert bad.returncode == 2 and "unknown config key sweeps" in bad.stderr


def test_a_single_run_folder_is_retried_like_a_sweep_task(tmp_path):
    run = tmp_path / "run"
    out = launch(
        "--cluster",
        "debug",
        "--wait",
        "train",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "2",
        "--model.width",
        "8",
        "--device",
        "cpu",
        "--run_dir",
        str(run),
    )
    assert out.returncode == 0, out.stderr
    nothing = launch("--sweep_dir", str(run), "--resume")
    assert nothing.returncode == 0 and "nothing to resubmit" in nothing.stdout
    (run / "STATE").write_text(
        "INTERRUPTED\n"
    )  # as a preempted job that was never requeued leaves it
    again = launch("--sweep_dir", str(run), "--resume", "--wait")
    assert again.returncode == 0, again.stderr
    assert "submitted 1 tasks" in again.stdout and "tasks 0" in again.stdout
    assert read_state(run) == "DONE"
    assert yaml.safe_load((run / "slurm.yaml").read_text())["submitted"]["retries"] == 1
    # the first submission's request is kept beside the new one, not overwritten
    assert yaml.safe_load((run / "slurm.1.yaml").read_text())["submitted"]["retries"] == 0


INJECTION = "x\ntouch INJECTED #"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--job_name", INJECTION], "job_name 'x\\ntouch INJECTED #' holds the control character"),
        (["--partition", "cpu\rx"], "partition 'cpu\\rx' holds the control character '\\r'"),
        (["--account", "lab\x1b[2J"], "account 'lab\\x1b[2J' holds the control character"),
        (["--qos", INJECTION], "qos 'x\\ntouch INJECTED #' holds"),
        (["--constraint", "a100\u2028touch INJECTED"], "constraint 'a100\\u2028touch INJECTED'"),
        (["--mail_user", INJECTION], "mail_user 'x\\ntouch INJECTED #' holds"),
        (["--mail_type", "END\tFAIL"], "mail_type 'END\\tFAIL' holds the control character '\\t'"),
        (["--additional_parameters", f"comment={INJECTION}"], "--additional_parameters 'comment="),
        (["--additional_parameters", f"{INJECTION}=1"], "--additional_parameters 'x\\ntouch"),
        (["--additional_parameters", "x y=1"], "'x y' is not an sbatch option name"),
        ("qos: 'x\n\n  touch INJECTED #'\n", "qos 'x\\ntouch INJECTED #' holds"),
        (
            'additional_parameters:\n  comment: "x\\ntouch INJECTED #"\n',
            "additional_parameters.comment 'x\\ntouch",
        ),
        (
            'additional_parameters:\n  "x\\ntouch INJECTED #": 1\n',
            "'x\\ntouch INJECTED #' is not an sbatch option",
        ),
        (
            "additional_parameters:\n  nodelist: [a, b]\n",
            "additional_parameters.nodelist: expected a string, number",
        ),
    ],
)
def test_a_control_character_in_a_slurm_field_is_one_line_and_nothing_written(
    tmp_path, flags, message
):
    """A newline in a value ends its `#SBATCH` line and the rest would run as a shell line of the
    job: each field the sbatch script gets, from a flag or from a launch YAML file, is refused in
    one line before any file is written (a dry run writes submit.sh otherwise)."""
    if isinstance(flags, str):
        (tmp_path / "launch.yaml").write_text(flags)
        flags = ["--config_path", str(tmp_path / "launch.yaml")]
    run = tmp_path / "run"
    out = launch("--dry-run", *flags, "train", "--run_dir", str(run), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not run.exists() and not (tmp_path / "INJECTED").exists()


@pytest.mark.parametrize("sweep", [False, True])
def test_a_control_character_in_the_run_or_sweep_folder_is_one_line(tmp_path, sweep):
    folder = tmp_path / "runs\ntouch INJECTED #"
    where = ["--sweep", "seed=0,1", "--sweep_dir", str(folder)] if sweep else []
    out = launch(
        "--dry-run", *where, "train", *([] if sweep else ["--run_dir", str(folder)]), cwd=tmp_path
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "holds the control character '\\n'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
