"""States and results of a sweep (or one run) as a table; writes results.csv and results.png.

    python jobs/status.py runs/<sweep-or-run>
    python jobs/status.py runs/<sweep> --metric val_loss --mode min

State comes from squeue (queued, running), then sacct (finished), then the job's own STATE
marker, so it works with no launcher alive, and without SLURM for local runs. From an analysis
script: `from bonnerlab.sweeps import sweep_status; df = sweep_status("runs/<sweep>")`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _cli import run_job

from bonnerlab.errors import UserError


def main(argv: list[str]):
    p = argparse.ArgumentParser(prog="jobs/status.py", description=__doc__.splitlines()[0])
    p.add_argument("path", help="sweep folder (manifest.jsonl) or run folder")
    p.add_argument("--metric", default="val_acc", help="metrics.jsonl key to rank tasks by")
    p.add_argument("--mode", default="max", choices=("max", "min"), help="whether larger is better")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    from bonnerlab.sweeps import format_table, sweep_status

    table = sweep_status(path, metric=args.metric, mode=args.mode)
    print(format_table(table, args.metric))
    counts = table["state"].value_counts().to_dict()
    print("  ".join(f"{state}: {n}" for state, n in sorted(counts.items())))
    written = [f for f in ("results.csv", "results.png") if (path / f).exists()]
    if written:
        print(f"wrote {', '.join(str(path / f) for f in written)}")
    return table


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
