"""The tail of a task's output or error log, found from its run or sweep folder alone.

python jobs/logs.py runs/<run>                    # rank 0's stdout, last 40 lines
python jobs/logs.py runs/<sweep> --task 3 --err   # task 3's stderr (its traceback)
python jobs/logs.py runs/<sweep> --task 3 --rank 1 --follow   # like tail -f
"""

from __future__ import annotations

import sys
import time

from _cli import check_task, parse_flags, run_folder, run_job

from bonnerlab.config import LogsConfig
from bonnerlab.errors import UserError


def main(argv: list[str]) -> str:
    args = parse_flags(LogsConfig, argv, prog="jobs/logs.py")
    from bonnerlab.cluster.status import log_path, task_records

    path = run_folder(args.path)
    records = {r["task"]: r for r in task_records(path)}
    task = args.task if args.task is not None else min(records)
    check_task(records, task, path)
    log = log_path(records[task], args.rank, args.err)
    if log is None:
        raise UserError(f"task {task} of {path} was never submitted: it has no log")
    if not log.exists():
        raise UserError(
            f"{log} does not exist yet (the task has not started, or has no rank {args.rank})"
        )
    lines = log.read_text(errors="replace").splitlines()[-args.lines :] if args.lines else []
    text = "\n".join(lines)
    print(f"==> {log} <==")
    print(text)
    if args.follow:
        with open(log, errors="replace") as f:
            f.seek(0, 2)
            while True:
                chunk = f.read()
                if chunk:
                    print(chunk, end="", flush=True)
                else:
                    time.sleep(0.5)
    return text


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
