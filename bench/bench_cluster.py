"""Cluster-side costs on the local SLURM cluster: submission, job overhead, preemption.

    python bench/bench_cluster.py            # starts the local cluster if it is not up (root)

1. Submitting a 16-point sweep: ONE job array vs 16 separate submissions, launcher wall time
   (library calls, and `jobs/launch.py` processes as a user runs them). Jobs are submitted held
   (`--hold`) and cancelled, so only submission is timed.
2. Job overhead on the idle cluster: submission -> batch script start -> first training step
   (the first step's wall time comes from the run's TensorBoard events, logged every step).
3. Preemption cost: a job in partition `urgent` preempts a training job; steps trained twice after
   the requeue vs the checkpoint interval.
4. Operating a 1,000-task sweep (a real array, submitted held, then cancelled): seconds and SLURM
   calls per status refresh while queued (squeue answers) and after (sacct answers); resubmitting
   10 retryable tasks of the 1,000: sbatch calls (arrays created).
   `python bench/bench_cluster.py --only status` runs just this part.
Prints a table; these are measurements, not tests.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bonnerlab.cluster.submit import SlurmConfig, submit  # noqa: E402
from bonnerlab.cluster.sweeps import submit_sweep  # noqa: E402
from bonnerlab.config import TrainConfig, apply_overrides  # noqa: E402

TINY = {"epochs": 1, "device": "cpu", "model.width": 8, "data.batch_size": 64, "log_every_steps": 1}


def ensure_cluster() -> None:
    lab = Path(os.environ.get("SLURMLAB", REPO / ".slurm-lab"))
    os.environ.setdefault("SLURM_CONF", str(lab / "etc" / "slurm.conf"))
    ping = (
        subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        if shutil.which("scontrol")
        else None
    )
    if ping is not None and "is UP" in ping.stdout:
        return
    print("starting the local cluster (slurm/start-cluster.sh) ...", flush=True)
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / "start-cluster.sh")], capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(
            "cannot start the local SLURM cluster: "
            f"{(out.stderr or out.stdout).strip().splitlines()[-1]}"
        )
    os.environ["SLURM_CONF"] = str(lab / "etc" / "slurm.conf")


def scancel(ids: list[str]) -> None:
    subprocess.run(["scancel", *sorted({i.split("_")[0] for i in ids})], capture_output=True)


def wait_gone(job_ids: list[str], timeout: float = 300) -> None:
    ids = ",".join(sorted({i.split("_")[0] for i in job_ids}))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not subprocess.run(
            ["squeue", "-h", "-j", ids], capture_output=True, text=True
        ).stdout.strip():
            return
        time.sleep(0.5)


# ----------------------------------------------------------------------------- 1. submission


def bench_submission(work: Path, n: int = 16) -> dict[str, float]:
    cfg = apply_overrides(TrainConfig(), TINY)
    held = SlurmConfig(time_minutes=5, additional_parameters={"hold": True})
    points = [{"optim.lr": 10 ** (-1 - 2 * i / (n - 1))} for i in range(n)]

    t = time.perf_counter()
    tasks = submit_sweep("train", cfg, points, held, work / "array")
    array_s = time.perf_counter() - t
    scancel([x.job_id for x in tasks])

    t = time.perf_counter()
    ids = [
        submit("train", apply_overrides(cfg, p), held, work / f"single-{i:02d}").job_id
        for i, p in enumerate(points)
    ]
    single_s = time.perf_counter() - t
    scancel(ids)

    # the same through the command line, as a user runs it (Python start-up included)
    launch = [
        sys.executable,
        str(REPO / "jobs" / "launch.py"),
        "--additional_parameters",
        "hold=true",
    ]
    lrs = ",".join(f"{p['optim.lr']:.4g}" for p in points)
    t = time.perf_counter()
    out = subprocess.run(
        [
            *launch,
            "--sweep",
            f"optim.lr={lrs}",
            "--sweep_dir",
            str(work / "cli-array"),
            "train",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    cli_array_s = time.perf_counter() - t
    cli_ids = re.findall(r"job array\(s\) (\d+)", out.stdout)
    t = time.perf_counter()
    for i, p in enumerate(points):
        out = subprocess.run(
            [
                *launch,
                "train",
                "--epochs",
                "1",
                "--optim.lr",
                str(p["optim.lr"]),
                "--run_dir",
                str(work / f"cli-single-{i:02d}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        cli_ids += re.findall(r"submitted train job (\d+)", out.stdout)
    cli_single_s = time.perf_counter() - t
    scancel(cli_ids)
    wait_gone([x.job_id for x in tasks] + ids + cli_ids)
    return {
        "array_s": array_s,
        "single_s": single_s,
        "cli_array_s": cli_array_s,
        "cli_single_s": cli_single_s,
    }


# ----------------------------------------------------------------------------- 2. overhead


def first_step_time(run_dir: Path) -> float:
    """Wall time of the first `train/loss` scalar in the run's TensorBoard events file."""
    from tensorboardX.proto import event_pb2

    times = []
    for path in run_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if any(v.tag == "train/loss" for v in event.summary.value):
                times.append(event.wall_time)
                break
    if not times:
        raise RuntimeError(f"no train/loss event in {run_dir}")
    return min(times)


def bench_overhead(work: Path, repeats: int = 3) -> dict[str, float]:
    cfg = apply_overrides(TrainConfig(), {**TINY, "max_steps_per_epoch": 2})
    slurm = SlurmConfig(time_minutes=5, setup=['echo "[bench] batch script start $(date +%s.%N)"'])
    start_to_step, submit_to_step, submit_to_start = [], [], []
    for i in range(repeats):
        run = work / f"overhead-{i}"
        t_submit = time.time()
        sub = submit("train", cfg, slurm, run)
        sub.job.result()
        log = "".join(p.read_text() for p in (run / "logs").glob("*_log.out"))
        started = float(re.search(r"batch script start (\d+\.\d+)", log).group(1))
        step = first_step_time(run)
        start_to_step.append(step - started)
        submit_to_step.append(step - t_submit)
        submit_to_start.append(started - t_submit)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "submit_to_start_s": med(submit_to_start),
        "start_to_step_s": med(start_to_step),
        "submit_to_step_s": med(submit_to_step),
    }


# ----------------------------------------------------------------------------- 3. preemption


def bench_preemption(work: Path, interval: int = 8) -> dict[str, float]:
    cfg = apply_overrides(
        TrainConfig(),
        {
            **TINY,
            "epochs": 8,
            "model.width": 16,
            "checkpoint_every_steps": interval,
            "log_every_steps": 10,
        },
    )
    run = work / "preempt"
    sub = submit(
        "train",
        cfg,
        SlurmConfig(partition="cpu", time_minutes=10, additional_parameters={"exclusive": True}),
        run,
    )
    while (
        "epoch 2/" not in "".join(p.read_text() for p in (run / "logs").glob("*_log.out"))
        if (run / "logs").exists()
        else True
    ):
        time.sleep(0.3)
    node = subprocess.run(
        ["squeue", "-h", "-j", sub.job_id, "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    t_preempt = time.time()
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
    result = sub.job.result()
    total = time.time() - t_preempt
    log = "".join(p.read_text() for p in (run / "logs").glob("*_log.out"))
    steps_per_epoch = result["step"] // 8
    stop = re.search(r"saved \S+ at epoch (\d+) step (\d+)", log)
    resume = re.search(r"resuming epoch (\d+) step (\d+)", log)
    if not (stop and resume):
        raise RuntimeError(f"no preemption seen in {run}/logs")
    redone = (int(stop[1]) - int(resume[1])) * steps_per_epoch + int(stop[2]) - int(resume[2])
    return {
        "interval": interval,
        "redone": redone,
        "steps_per_epoch": steps_per_epoch,
        "preempt_to_done_s": total,
    }


# ----------------------------------------------------------------------------- 4. status and retry


def bench_status(work: Path, n: int = 1000) -> dict[str, float]:
    import json

    from bonnerlab.cluster import slurm_cli
    from bonnerlab.cluster.status import status_all, sweep_status
    from bonnerlab.cluster.sweeps import retry_sweep
    from bonnerlab.runs import write_state

    cfg = apply_overrides(TrainConfig(), TINY)
    held = SlurmConfig(time_minutes=5, mem_gb=0.5, additional_parameters={"hold": True})
    sweep = work / "runs" / "status-1000"
    t = time.perf_counter()
    tasks = submit_sweep("train", cfg, [{"seed": i} for i in range(n)], held, sweep)
    submit_s = time.perf_counter() - t

    def refresh(fn) -> tuple[float, int]:
        best, calls = float("inf"), 0
        for _ in range(3):
            slurm_cli.CALLS.clear()
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
            calls = sum(slurm_cli.CALLS.values())
        return best, calls

    queued_s, queued_calls = refresh(lambda: sweep_status(sweep, write=False))
    queued_all_s, _ = refresh(lambda: status_all(work / "runs"))
    scancel([x.job_id for x in tasks])
    wait_gone([x.job_id for x in tasks])
    time.sleep(3)  # slurmdbd catches up
    done_s, done_calls = refresh(lambda: sweep_status(sweep, write=False))
    written_s, _ = refresh(lambda: sweep_status(sweep, write=True))

    # 10 of the 1,000 were preempted and not requeued, the rest finished: retry only those
    manifest = sweep / "manifest.jsonl"
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    for r in lines:
        r["job_id"] = ""
        write_state(r["run_dir"], "INTERRUPTED" if r["task"] % 100 == 7 else "DONE")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    t = time.perf_counter()
    plan = retry_sweep(sweep, held)
    retry_s = time.perf_counter() - t
    arrays = {x.job_id.split("_")[0] for x in plan.tasks}
    scancel([x.job_id for x in plan.tasks])
    wait_gone([x.job_id for x in plan.tasks])
    return {
        "n": n,
        "submit_s": submit_s,
        "queued_s": queued_s,
        "queued_calls": queued_calls,
        "queued_all_s": queued_all_s,
        "done_s": done_s,
        "done_calls": done_calls,
        "written_s": written_s,
        "retried": len(plan.tasks),
        "retry_sbatch": len(arrays),
        "retry_s": retry_s,
    }


def status_rows(st: dict[str, float]) -> list[tuple[str, str]]:
    n = st["n"]
    return [
        (f"{n}-task sweep submitted (held) as one array", f"{st['submit_s']:.1f} s"),
        (
            f"status refresh, {n} tasks queued (best of 3)",
            f"{st['queued_s']:.2f} s, {st['queued_calls']} SLURM calls",
        ),
        ("status of every folder under runs/ (same sweep)", f"{st['queued_all_s']:.2f} s"),
        (
            f"status refresh, {n} tasks finished (sacct)",
            f"{st['done_s']:.2f} s, {st['done_calls']} SLURM calls",
        ),
        ("  + results.csv, results.png, report.html", f"{st['written_s']:.2f} s"),
        (
            f"retry of {st['retried']} retryable tasks out of {n}",
            f"{st['retry_sbatch']} sbatch call(s), {st['retry_s']:.2f} s",
        ),
    ]


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 16))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    ensure_cluster()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    print(f"work folder {work}", flush=True)
    if sys.argv[1:] == ["--only", "status"]:
        print_rows(status_rows(bench_status(work)))
        shutil.rmtree(work, ignore_errors=True)
        return
    sub = bench_submission(work)
    over = bench_overhead(work)
    pre = bench_preemption(work)
    st = bench_status(work)
    rows = [
        ("16-point sweep, submit as ONE array (library)", f"{sub['array_s']:.2f} s"),
        ("16-point sweep, 16 submissions (library)", f"{sub['single_s']:.2f} s"),
        ("  ratio 16 submissions / one array", f"{sub['single_s'] / sub['array_s']:.1f}x"),
        ("16-point sweep, jobs/launch.py --sweep (1 process)", f"{sub['cli_array_s']:.2f} s"),
        ("16-point sweep, 16 x jobs/launch.py", f"{sub['cli_single_s']:.2f} s"),
        ("  ratio 16 launches / one", f"{sub['cli_single_s'] / sub['cli_array_s']:.1f}x"),
        (
            "submission -> batch script start (idle cluster, median of 3)",
            f"{over['submit_to_start_s']:.2f} s",
        ),
        ("batch script start -> first training step", f"{over['start_to_step_s']:.2f} s"),
        ("submission -> first training step", f"{over['submit_to_step_s']:.2f} s"),
        ("preemption: steps trained twice after requeue", f"{pre['redone']} steps"),
        (
            "  checkpoint interval (checkpoint_every_steps)",
            f"{pre['interval']} steps ({pre['steps_per_epoch']} steps/epoch)",
        ),
        ("  preemption -> requeued job finished (8 epochs)", f"{pre['preempt_to_done_s']:.1f} s"),
        *status_rows(st),
    ]
    print_rows(rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
