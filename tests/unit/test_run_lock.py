"""One writer per run folder (LOCK), a STATE that never lies (LOST, a full disk), reruns that
never destroy (--resume into a foreign folder, git records per restart, evaluate's output
folder), outputs that follow the umask, and a status that survives bad folders. Real processes
and real file systems throughout: a second training process, a dead pid, a small tmpfs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import REPO, SMOKE_FLAGS, cli_flags, fake_sweep, job, repo_env

from bonnerlab.cluster.status import status_all, sweep_status
from bonnerlab.config import EvaluateConfig
from bonnerlab.errors import DiskSpaceError, FolderInUseError, RunDirError, UserError
from bonnerlab.runs import (
    RunLock,
    RunPaths,
    read_lock,
    read_metrics,
    read_state,
    write_git_info,
)
from bonnerlab.train.evaluate import evaluate
from bonnerlab.train.loop import train

# A run that trains for a while (a few hundred steps), for tests that act on it meanwhile.
LONG = [*SMOKE_FLAGS, "--epochs", "40", "--data.batch_size", "32", "--log_every_steps", "2"]


def _take_lock_and_exit(run_dir: Path) -> int:
    """A real process that takes the LOCK and dies without releasing it: a stale lock whose pid
    is gone. Returns that pid."""
    code = (
        "import os, sys; from bonnerlab.runs import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print(os.getpid()); os._exit(0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)],
        env=repo_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def _wait_for(predicate, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) first")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_second_writer_fresh_or_resuming_is_refused_naming_the_holder(tiny_train_cfg, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [*job("train"), *LONG, "--run_dir", str(run)],
        env=repo_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists(), proc=first)
        holder = read_lock(run)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        beat = holder["heartbeat"]
        _wait_for(lambda: read_lock(run)["heartbeat"] > beat, timeout=30, proc=first)
        for resume in (True, False):
            with pytest.raises(FolderInUseError) as e:
                train(tiny_train_cfg(run_dir=str(run), resume=resume))
            message = str(e.value)
            assert "\n" not in message and f"pid {first.pid}" in message, message
            assert f"host {socket.gethostname()}" in message and "heartbeat" in message
        assert read_state(run) == "RUNNING" and read_lock(run)["pid"] == first.pid
        # the job script: the same refusal as one line and exit status 2
        out = subprocess.run(
            [*job("train"), *LONG, "--run_dir", str(run), "--resume"],
            env=repo_env(),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("error: run folder") and f"pid {first.pid}" in out.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert read_state(run) == "INTERRUPTED" and read_lock(run) is None
    epochs = [m["epoch"] for m in read_metrics(run)]
    assert epochs == list(range(1, len(epochs) + 1))  # no epoch written twice


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_line(tiny_train_cfg, capsys):
    cfg = tiny_train_cfg(epochs=1, max_steps_per_epoch=2)
    dead = _take_lock_and_exit(Path(cfg.run_dir))
    assert read_lock(cfg.run_dir)["pid"] == dead
    train(cfg)
    out = capsys.readouterr().out
    assert f"took over the stale lock of {cfg.run_dir}: host {socket.gethostname()} pid {dead}" in (
        out
    )
    assert read_state(cfg.run_dir) == "DONE" and read_lock(cfg.run_dir) is None


def test_a_lock_this_machine_cannot_check_is_refused_with_how_to_take_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    RunLock(run).acquire()
    record = json.loads(RunPaths(run).lock.read_text())
    RunPaths(run).lock.write_text(json.dumps({**record, "host": "node-elsewhere", "pid": 1}))
    with pytest.raises(
        FolderInUseError, match="host node-elsewhere pid 1.*if that process is gone"
    ):
        RunLock(run).acquire()
    # an earlier start of this very SLURM job (a requeue) is gone, wherever it ran
    RunPaths(run).lock.write_text(
        json.dumps({**record, "host": "node-elsewhere", "job_id": "77", "restart": 0})
    )
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(run)
    assert "took over the stale lock" in lock.acquire()
    assert read_lock(run)["token"] == lock.token
    lock.release()
    assert read_lock(run) is None


def test_processes_racing_for_one_stale_lock_leave_exactly_one_holder(tmp_path):
    run = tmp_path / "run"
    _take_lock_and_exit(run)
    code = (
        "import sys, time; from bonnerlab.errors import RunDirError; "
        "from bonnerlab.runs import RunLock\n"
        "lock = RunLock(sys.argv[1])\n"
        "try:\n    lock.acquire(); print('held', flush=True); time.sleep(3)\n"
        "except RunDirError as e:\n    print('refused', e)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(run)],
            env=repo_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum(o.startswith("held") for o in outs) == 1, outs
    assert sum(o.startswith("refused") and "is in use by" in o for o in outs) == 3, outs


def test_status_shows_a_run_whose_process_vanished_as_lost(tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg(run_dir=str(tmp_path / "runs" / "lost"), epochs=1, max_steps_per_epoch=2)
    train(cfg)
    live = tmp_path / "runs" / "live"
    train(replace(cfg, run_dir=str(live)))
    for run in (Path(cfg.run_dir), live):
        (run / "STATE").write_text("RUNNING\n")  # what a kill -9 during training leaves
    dead = _take_lock_and_exit(Path(cfg.run_dir))
    RunLock(live).acquire()  # this live process writes it
    rows = sweep_status(cfg.run_dir, write=False)
    assert rows["state"].tolist() == ["LOST"] and rows["failure"].tolist() == ["lost"]
    assert f"pid {dead}" in rows["error"][0] and "heartbeat" in rows["error"][0]
    assert "--resume" in rows["error"][0] and rows["heartbeat"][0].endswith("s")
    overview = status_all(tmp_path / "runs").set_index("folder")
    assert overview.loc["lost", "states"] == "LOST 1"
    assert overview.loc["live", "states"] == "RUNNING 1"


def test_one_unreadable_folder_is_its_own_row_and_every_other_run_is_listed(
    tiny_train_cfg, tmp_path
):
    runs = tmp_path / "runs"
    train(tiny_train_cfg(run_dir=str(runs / "good"), epochs=1, max_steps_per_epoch=2))
    train(tiny_train_cfg(run_dir=str(runs / "bad-yaml"), epochs=1, max_steps_per_epoch=2))
    (runs / "bad-yaml" / "slurm.yaml").write_text("partition: [cpu\nsubmitted: {job: train\n")
    fake_sweep(runs / "cut", ["DONE", "DONE"], curves=[[0.5], [0.7]], job_ids={0: "", 1: ""})
    with open(runs / "cut" / "manifest.jsonl", "a") as f:
        f.write('{"task": 2, "overrides": {"se')  # a launcher killed mid-line
    table = status_all(runs).set_index("folder")
    assert sorted(table.index) == ["bad-yaml", "cut", "good"]
    assert table.loc["good", "states"] == "DONE 1" and not table.loc["good", "error"]
    assert table.loc["bad-yaml", "error"].startswith("unreadable: ")
    assert "\n" not in table.loc["bad-yaml", "error"]
    assert table.loc["cut", "states"] == "DONE 2" and table.loc["cut", "best_val_acc"] == 0.7
    assert "manifest.jsonl line 3 is not a task record" in table.loc["cut", "error"]
    # the sweep on its own: both tasks listed, the cut line a warning
    assert sweep_status(runs / "cut", write=False)["task"].tolist() == [0, 1]


def test_resume_into_a_folder_that_is_no_run_is_refused_and_untouched(tiny_train_cfg, tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(RunDirError, match=r"not a run folder of bonnerlab \(no config.yaml\)"):
        train(tiny_train_cfg(run_dir=str(foreign), resume=True))
    assert sorted(p.name for p in foreign.iterdir()) == ["chapter1.tex"]  # no LOCK left either


def test_the_checkpoints_config_is_compared_when_config_yaml_is_gone(tiny_train_cfg):
    cfg = tiny_train_cfg(epochs=2, max_steps_per_epoch=2)
    train(cfg)
    RunPaths(cfg.run_dir).config_yaml.unlink()
    RunPaths(cfg.run_dir).state.write_text("INTERRUPTED\n")
    changed = replace(cfg, resume=True, optim=replace(cfg.optim, lr=0.5))
    with pytest.raises(RunDirError, match=r"different config \(optim.lr\).*saved in .*latest.pt"):
        train(changed)
    assert train(replace(cfg, resume=True))["epoch"] == 2
    assert RunPaths(cfg.run_dir).config_yaml.is_file()


def test_git_records_of_each_restart_are_kept(tmp_path):
    repo, run = tmp_path / "repo", tmp_path / "run"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    write_git_info(run, repo)
    first = (run / "git.txt").read_text()
    write_git_info(run, repo)  # the same code again: nothing new
    assert sorted(p.name for p in run.iterdir()) == ["git.diff", "git.txt"]
    (repo / "a.py").write_text("x = 2\n")
    write_git_info(run, repo)
    assert (run / "git.1.txt").read_text() == first and (run / "git.1.diff").read_text() == ""
    assert "+x = 2" in (run / "git.diff").read_text()
    subprocess.run([*git, "commit", "-q", "-am", "two"], check=True)
    write_git_info(run, repo)
    assert "+x = 2" in (run / "git.2.diff").read_text() and (run / "git.diff").read_text() == ""
    commits = {(run / n).read_text().split()[1] for n in ("git.1.txt", "git.2.txt", "git.txt")}
    assert len(commits) == 2  # restarts 1 and 2 ran the same commit, with and without the change


def test_evaluate_never_overwrites_files_it_did_not_write(tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg(epochs=1, max_steps_per_epoch=2)
    train(cfg)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my": "numbers"}')
    ask = EvaluateConfig(checkpoint=cfg.run_dir, device="cpu", output_dir=str(mine))
    with pytest.raises(UserError, match="already holds metrics.json, not written by evaluate"):
        evaluate(ask)
    assert (mine / "metrics.json").read_text() == '{"my": "numbers"}'
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.json"]
    again = replace(ask, output_dir=str(tmp_path / "eval"))
    assert evaluate(again)["acc"] == evaluate(again)["acc"]  # its own files: rewritten


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tiny_train_cfg, tmp_path, umask):
    runs = tmp_path / "runs"
    cfg = tiny_train_cfg(run_dir=str(runs / "run"), epochs=1, max_steps_per_epoch=2)
    previous = os.umask(umask)
    try:
        train(cfg)
        status = subprocess.run(
            [*job("status"), str(runs / "run")],
            env=repo_env(),
            capture_output=True,
            text=True,
            preexec_fn=lambda: os.umask(umask),
        )
        assert status.returncode == 0, status.stderr
    finally:
        os.umask(previous)
    paths = RunPaths(cfg.run_dir)
    files = [
        paths.config_yaml,
        paths.state,
        paths.metrics,
        paths.latest,
        paths.best,
        paths.git_txt,
        paths.results_csv,
        paths.report_html,
        next(paths.root.glob("events.out.tfevents.*")),
    ]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert paths.checkpoints.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few hundred KiB (we run as root in CI); skipped where mounting is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    # room for what a run writes before its first checkpoint (git.diff holds the checkout's
    # uncommitted changes, whatever their size now), not for the checkpoint
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO, capture_output=True).stdout
    size_kb = len(diff) // 1024 + 160
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip() or out.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_state_failed(tiny_train_cfg, small_disk):
    cfg = tiny_train_cfg(run_dir=str(small_disk / "run"), epochs=2, **{"model.width": 24})
    with pytest.raises(DiskSpaceError) as e:
        train(cfg)
    message = str(e.value)
    assert "\n" not in message and f"writing {small_disk / 'run' / 'checkpoints'}" in message
    assert "latest.pt" in message and "MiB free there" in message
    needed = int(message.split(" bytes")[0].rsplit("(", 1)[1].replace(",", ""))
    assert needed > 200_000  # the checkpoint's size, not the few bytes of a STATE
    assert read_state(cfg.run_dir) == "FAILED" and read_lock(cfg.run_dir) is None
    assert not list((small_disk / "run").rglob(".*.tmp"))  # no half-written temp file left


def test_the_job_on_a_full_disk_prints_one_line(small_disk):
    flags = cli_flags({"model.width": 24, "max_steps_per_epoch": 4})
    out = subprocess.run(
        [*job("train"), *SMOKE_FLAGS, *flags, "--run_dir", str(small_disk / "run")],
        env=repo_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "no space left on device writing" in out.stderr, (
        out.stderr
    )
    assert read_state(small_disk / "run") == "FAILED"


def test_status_combines_state_with_what_slurm_says(tmp_path):
    from bonnerlab.cluster.slurm_cli import JobInfo, parse_sacct

    fake_sweep(tmp_path / "sweep", ["RUNNING", "RUNNING", "DONE"])
    # sacct's own lines: a batch script that ended (hiding srun's status), one still running
    infos = parse_sacct("100|COMPLETED|60||0:0\n102|COMPLETED|60||0:0\n")
    infos["101"] = JobInfo("101", "RUNNING")
    rows = sweep_status(tmp_path / "sweep", write=False, infos=infos)
    assert rows["state"].tolist() == ["LOST", "RUNNING", "DONE"]
    assert "SLURM says its job COMPLETED" in rows["error"][0]
