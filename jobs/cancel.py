"""Cancel a run's or sweep's queued and running jobs (one scancel); marks them CANCELLED, deletes
nothing.

python jobs/cancel.py runs/<sweep>                # every queued or running task
python jobs/cancel.py runs/<sweep> --task 3 --task 7
python jobs/cancel.py runs/<run>
python jobs/launch.py --sweep_dir runs/<sweep> --resume --retry_failed   # resubmit them later
"""

from __future__ import annotations

import sys
import time

from _cli import check_task, parse_flags, run_folder, run_job

from bonnerlab.config import CancelConfig


def main(argv: list[str]) -> list[int]:
    args = parse_flags(CancelConfig, argv, prog="jobs/cancel.py")
    from bonnerlab.cluster import slurm_cli
    from bonnerlab.cluster.status import task_records
    from bonnerlab.runs import write_state

    path = run_folder(args.path)
    records = task_records(path)
    by_task = {r["task"]: r for r in records}
    for k in args.task:
        check_task(by_task, k, path)
    chosen = [by_task[k] for k in args.task] if args.task else records
    ids = [r["job_id"] for r in chosen if r.get("job_id")]
    active = (
        set(slurm_cli.active_ids(ids)) if ids else set()
    )  # one squeue (also: no controller -> one line)
    targets = [r for r in chosen if r.get("job_id") in active]
    if not targets:
        print(f"nothing to cancel: no task of {path} is queued or running")
        return []
    slurm_cli.cancel(sorted(r["job_id"] for r in targets))
    # a cancelled training job saves at its next step and writes INTERRUPTED: wait for it to stop,
    # then record what really happened
    end = time.monotonic() + (0 if args.no_wait else 120)
    while time.monotonic() < end and slurm_cli.active_ids([r["job_id"] for r in targets]):
        time.sleep(1)
    for r in targets:
        write_state(r["run_dir"], "CANCELLED")
    tasks = [int(r["task"]) for r in targets]
    print(
        f"cancelled {len(targets)} job(s) of {path}: tasks {', '.join(map(str, tasks))} "
        f"(job ids {', '.join(r['job_id'] for r in targets)})"
    )
    return tasks


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
