"""Where a SLURM training job's first seconds go: batch script start -> first training step.

    flock /tmp/slurm.lock python bench/bench_job_start.py [--repeats 5]

Submits tiny train jobs (2 steps) to the local cluster, as `make bench-cluster` does, and
timestamps every line the job prints (a bash loop in the batch script), so the time splits into:
  script start -> Python imported submitit + unpickled the job + entered the job wrapper
  (the wrapper's "[bonnerlab] train job in ..." line) -> train() built data and model (its
  "[bonnerlab] starting" line) -> first step (the run's TensorBoard event). Beside each job, a
  fresh interpreter times `import torch, torch._dynamo`: the floor, which moves with the
  machine's speed. One more job runs with `python -X importtime` to name the slowest imports.
  Medians; measurements, not tests.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_cluster import TINY, ensure_cluster, first_step_time  # noqa: E402

from bonnerlab.cluster.submit import SlurmConfig, submit  # noqa: E402
from bonnerlab.config import TrainConfig, apply_overrides  # noqa: E402

# A sitecustomize put first on the job's PYTHONPATH prefixes each line the job prints with the
# epoch time (srun writes the task's output straight to the log, so the shell cannot).
SITECUSTOMIZE = """
import sys, time

class _Stamped:
    def __init__(self, stream):
        self.stream, self.line_start = stream, True

    def write(self, text):
        out = []
        for part in text.splitlines(keepends=True):
            if self.line_start:
                out.append(f"{time.time():.6f} ")
            out.append(part)
            self.line_start = part.endswith("\\n")
        return self.stream.write("".join(out))

    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stdout = _Stamped(sys.stdout)
print("[bench] python start", flush=True)
"""


def one_job(run: Path, hook: Path, importtime: bool = False) -> dict[str, float]:
    cfg = apply_overrides(TrainConfig(), {**TINY, "max_steps_per_epoch": 2})
    setup = [
        'echo "$(date +%s.%N) [bench] batch script start"',
        f"export PYTHONPATH={hook}:$PYTHONPATH",
        *(["export PYTHONPROFILEIMPORTTIME=1"] if importtime else []),
    ]
    sub = submit("train", cfg, SlurmConfig(time_minutes=5, setup=setup), run)
    sub.job.result()
    log = "".join(p.read_text() for p in (run / "logs").glob("*_log.out"))

    def at(pattern: str) -> float:
        return float(re.search(rf"^(\d+\.\d+) .*{pattern}", log, re.M).group(1))

    start, python = at(r"\[bench\] batch script start"), at(r"\[bench\] python start")
    wrapper, built, step = at(r"train job in"), at(r"\] starting"), first_step_time(run)
    return {
        "python": python - start,
        "wrapper": wrapper - python,
        "built": built - wrapper,
        "step": step - built,
        "total": step - start,
    }


def bare_torch_import() -> float:
    """The floor no job start can go below, measured beside the jobs: a fresh interpreter that
    imports torch and torch._dynamo (which torch.optim's first parameter group imports)."""
    code = (
        "import time; t = time.perf_counter(); import torch, torch._dynamo; "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def slowest_imports(run: Path, n: int = 12) -> list[tuple[float, str]]:
    """Top-level imports (and bonnerlab modules) by cumulative time, from -X importtime."""
    err = "".join(p.read_text() for p in (run / "logs").glob("*_log.err"))
    rows = []
    for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", err):
        cumulative, depth, name = int(m.group(1)) / 1e6, len(m.group(2)), m.group(3)
        if depth <= 1 or name.startswith("bonnerlab"):
            rows.append((cumulative, name))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    ensure_cluster()
    work = Path(tempfile.mkdtemp(prefix="bench-job-start-"))
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    runs, floors = [], []
    for i in range(args.repeats):  # interleaved, so both see the same machine
        runs.append(one_job(work / f"job-{i}", hook))
        floors.append(bare_torch_import())
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    floor = statistics.median(floors)
    print(f"median of {args.repeats} tiny train jobs on the local cluster (work folder {work})")
    print(
        "  batch script start -> python running (srun, interpreter start)         "
        f"{med['python']:.2f} s"
    )
    print(
        "  -> job wrapper running (submitit import, unpickle, wrapper imports)    "
        f"{med['wrapper']:.2f} s"
    )
    print(
        "  job wrapper -> train() built data, model, run folder                   "
        f"{med['built']:.2f} s"
    )
    print(
        "  -> first training step done                                            "
        f"{med['step']:.2f} s"
    )
    print(
        "  batch script start -> first training step                              "
        f"{med['total']:.2f} s"
    )
    print("  each run: " + "  ".join(f"{r['total']:.2f}" for r in runs))
    print(
        f"reference: `import torch, torch._dynamo` in a fresh interpreter, median    {floor:.2f} s"
    )
    print(
        "  the job's own cost above it (submitit, unpickle, data, model, 1 step)  "
        f"{med['total'] - floor:.2f} s"
        f"  (job start / reference: {med['total'] / floor:.2f}x)"
    )
    one_job(work / "importtime", hook, importtime=True)
    print("slowest imports in the job (cumulative, under -X importtime):")
    for seconds, name in slowest_imports(work / "importtime"):
        print(f"  {seconds:6.2f} s  {name}")


if __name__ == "__main__":
    main()
