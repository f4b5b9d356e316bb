"""Upload the W&B offline runs of run or sweep folders from a login node: compute nodes log
offline into each run folder's wandb/ (bonnerlab.train.trackers). This calls wandb's own
`wandb sync`, several runs at once; a resumed or requeued run's parts (one offline-run-* folder
per start, one id) go up in order, as one run; parts already synced are skipped. MLflow needs no
sync: its store is the run folder's mlflow.db (`mlflow ui --backend-store-uri
sqlite:///runs/<run>/mlflow.db`) or a tracking server.

python jobs/sync.py runs/<run>                  # one run folder
python jobs/sync.py runs/<sweep> --parallel 16  # every task of a sweep
python jobs/sync.py runs/<sweep> --dry-run      # list what would be uploaded

Kept out of bonnerlab.train (which imports torch): a login node runs this.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from _cli import parse_flags, run_folder, run_job

from bonnerlab.config.train import SyncConfig
from bonnerlab.errors import UserError


def offline_runs(folders: list[str]) -> list[Path]:
    """Every W&B offline run (offline-run-<time>-<id>/) of these run or sweep folders: a run
    folder's wandb/ and each task's."""
    runs: list[Path] = []
    for folder in map(run_folder, folders):
        for wandb_dir in (folder / "wandb", *sorted(folder.glob("*/wandb"))):
            runs += sorted(wandb_dir.glob("offline-run-*"))
    return runs


def main(argv: list[str]) -> int:
    args = parse_flags(SyncConfig, argv, prog="jobs/sync.py")
    runs = offline_runs(args.paths)
    if not runs:
        print(f"no W&B offline runs under {', '.join(args.paths)}")
        return 0
    if importlib.util.find_spec("wandb") is None:
        raise UserError("wandb is not installed here: pip install 'bonnerlab[wandb]'")
    ids = {r.name.rsplit("-", 1)[-1] for r in runs}
    print(f"{len(runs)} offline part(s) of {len(ids)} W&B run(s), {args.parallel} at once")
    cmd = [sys.executable, "-m", "wandb", "sync", "-n", str(args.parallel)]
    cmd += ["--dry-run"] if args.dry_run else []
    status = subprocess.run([*cmd, *map(str, runs)]).returncode
    if status:
        raise SystemExit(status)  # wandb sync's own status: it has printed why
    return status


if __name__ == "__main__":
    run_job(main, sys.argv[1:])
