"""Every run and sweep at a glance, or one folder's table; writes results.csv and results.png.

    python jobs/status.py                          # every run and sweep under runs/, newest first
    python jobs/status.py --watch 10               # refresh every 10 s while anything runs
    python jobs/status.py runs/<sweep-or-run>      # one row per task, results.csv, results.png
    python jobs/status.py runs/<sweep> --metric val_loss --mode min

State comes from SLURM (one squeue and one sacct per refresh, for all folders together), then the
job's own STATE marker, so it works with no launcher alive, and without SLURM for local runs. A
RUNNING marker whose writer is gone (its LOCK's process, or no heartbeat for an hour) shows as
LOST, with the last heartbeat; a folder that cannot be read is listed with its problem.
A failed task's row shows its failure kind and the last line of its error. From an analysis
script: `from bonnerlab.cluster.status import sweep_status; df = sweep_status("runs/<sweep>")`.
"""

from __future__ import annotations

import sys
import time

from _cli import parse_flags, run_folder, run_job

from bonnerlab.config import StatusConfig


def main(argv: list[str]):
    args = parse_flags(StatusConfig, argv, prog="jobs/status.py")
    while True:
        table, active = show(args)
        if not args.watch or not active:
            return table
        time.sleep(args.watch)
        print()


def show(args: StatusConfig):
    from bonnerlab.cluster import slurm_cli
    from bonnerlab.cluster.status import format_table, status_all, sweep_status

    active_states = {"PENDING", *slurm_cli.ACTIVE}
    if not args.path:
        root = run_folder(args.runs_root, "--runs_root")
        table = status_all(root, metric=args.metric, mode=args.mode)
        if table.empty:
            print(f"no runs or sweeps under {root}")
            return table, False
        shown = table if table["error"].astype(bool).any() else table.drop(columns="error")
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        active = any(
            s.split()[0] in active_states
            for states in table["states"]
            for s in states.split(" · ")
            if s
        )
        return table, active
    path = run_folder(args.path)
    table = sweep_status(path, metric=args.metric, mode=args.mode)
    print(format_table(table))
    from bonnerlab.cluster.status import state_counts

    print(state_counts(table["state"].tolist()))
    written = [f for f in ("results.csv", "results.png", "report.html") if (path / f).exists()]
    if written:
        print(f"wrote {', '.join(str(path / f) for f in written)}")
    return table, bool(set(table["state"]) & active_states)


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
