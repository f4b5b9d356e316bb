"""The tail of a task's output or error log, found from its run or sweep folder alone.

    python jobs/logs.py runs/<run>                    # rank 0's stdout, last 40 lines
    python jobs/logs.py runs/<sweep> --task 3 --err   # task 3's stderr (its traceback)
    python jobs/logs.py runs/<sweep> --task 3 --rank 1 --follow   # like tail -f
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _cli import run_job

from bonnerlab.errors import UserError


def main(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="jobs/logs.py", description=__doc__.splitlines()[0])
    p.add_argument("path", help="run or sweep folder")
    p.add_argument("--task", type=int, default=None, help="the sweep task (default: 0, the only task of a run)")
    p.add_argument("--rank", type=int, default=0, help="which process of a multi-task job")
    p.add_argument("--err", action="store_true", help="stderr instead of stdout")
    p.add_argument("--lines", type=int, default=40, help="how many lines from the end")
    p.add_argument("--follow", action="store_true", help="keep printing what is appended (Ctrl-C stops)")
    args = p.parse_args(argv)
    from bonnerlab.cluster.status import log_path, task_records

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    records = {r["task"]: r for r in task_records(path)}
    task = args.task if args.task is not None else min(records)
    if task not in records:
        raise UserError(f"--task {task} is out of range: {path} has tasks {min(records)}-{max(records)}")
    log = log_path(records[task], args.rank, args.err)
    if log is None:
        raise UserError(f"task {task} of {path} was never submitted: it has no log")
    if not log.exists():
        raise UserError(f"{log} does not exist yet (the task has not started, or has no rank {args.rank})")
    lines = log.read_text(errors="replace").splitlines()[-args.lines:] if args.lines else []
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
