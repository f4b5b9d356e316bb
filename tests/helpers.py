"""The test kit: what more than one test module needs, written once.

Test modules import from here (`from helpers import REPO, torchrun`); fixtures live in
tests/conftest.py (`tiny_train_cfg`, `slurm_cluster`). No test module imports from another
test module. The tiers: tests/unit/ (one file per library room), tests/jobs/ (the job scripts
and CLIs run as programs), tests/slurm/ (the real local cluster), tests/docs/ (the README and
the notebooks), tests/golden/ (recorded sbatch scripts). Test file names are unique across the
tiers (the folders are not packages, so pytest imports each file by its basename).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# ----------------------------------------------------------------------------- paths

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
JOBS = REPO / "jobs"
GOLDEN = TESTS / "golden"
SLURM_DIR = REPO / "slurm"
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH (the venv's editable
    install may point at another checkout), plus `extra` (e.g. OMP_NUM_THREADS="1")."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def job(name: str) -> list[str]:
    """The command that runs jobs/<name>.py with this interpreter:
    `[*job("train"), "--epochs", "1"]`."""
    return [sys.executable, str(JOBS / f"{name}.py")]


def job_module(name: str):
    """jobs/<name>.py imported into this process, to call its `main(argv)` directly."""
    if str(JOBS) not in sys.path:
        sys.path.insert(0, str(JOBS))
    return importlib.import_module(name)


# ----------------------------------------------------------------------------- tiny training runs

# mnist_cnn on the embedded digits, a few seconds a run on a laptop CPU
TINY_TRAIN = {
    "epochs": 2,
    "device": "cpu",
    "model.width": 8,
    "data.batch_size": 64,
    "optim.lr": 0.02,
}


def tiny_train(**overrides: Any):
    """A TrainConfig of TINY_TRAIN with `overrides` (dotted keys) on top."""
    from bonnerlab.config import TrainConfig, apply_overrides

    return apply_overrides(TrainConfig(), {**TINY_TRAIN, **overrides})


def cli_flags(overrides: dict[str, Any]) -> list[str]:
    """{"optim.lr": 0.1} -> ["--optim.lr", "0.1"]: the same overrides as a job's flags."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]


# a one-epoch CPU run of the smallest mnist_cnn, as job flags (the torchrun and subprocess tests)
SMOKE_FLAGS = cli_flags({"device": "cpu", "progress": "false", "epochs": 1, "model.width": 8})


def extract_cfg(out, **fields: Any):
    """An ExtractConfig writing `out` in this process, on the CPU, without a progress bar."""
    from bonnerlab.config import ExtractConfig

    return ExtractConfig(
        **{"num_workers": 0, "device": "cpu", "output": str(out), "progress": False, **fields}
    )


def tiny_store(path, n: int = 12, layers=(("conv", (2, 3, 3)), ("fc", (5,))), seed: int = 0):
    """A finalized activation store of random features written without a model (no torch):
    `n` stimuli s00.png ..., labels i % 3, one float32 layer per (name, shape); its path."""
    import numpy as np

    from bonnerlab.activations.store import LayerSpec, open_store

    rng = np.random.default_rng(seed)
    specs = [
        LayerSpec(
            name,
            ("channel", "y", "x")[-len(shape) :] if len(shape) > 1 else ("neuroid",),
            shape,
            "float32",
        )
        for name, shape in layers
    ]
    store, _ = open_store(
        path,
        identity={"tiny": seed, "n": n, "layers": [list(map(str, x)) for x in layers]},
        layers=specs,
        stimuli=[f"s{i:02d}.png" for i in range(n)],
        labels=[i % 3 for i in range(n)],
        chunk_size=max(1, n // 2),
    )
    full = {name: rng.standard_normal((n, *shape)).astype(np.float32) for name, shape in layers}
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in full.items()})
    store.finalize()
    return path


def run_weights(run_dir, which: str = "latest") -> dict:
    """The model's state dict from a run folder's latest.pt (or best.pt)."""
    from bonnerlab.checkpoint import load_checkpoint
    from bonnerlab.runs import RunPaths

    paths = RunPaths(run_dir)
    return load_checkpoint(paths.latest if which == "latest" else paths.best)["model"]


def assert_same_weights(a, b, atol=0.0):
    """Two state dicts hold the same tensors: bit for bit, or within `atol`."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if atol:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k
        else:
            assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def stop_at_check(n: int):
    """A stop request at the n-th time training checks for one (as a signal would arrive), so
    an interrupted run stops at a chosen step; the real check is restored afterwards."""
    from bonnerlab import interrupt

    real, calls = interrupt.stop_requested, [0]

    def stop_requested() -> bool:
        calls[0] += 1
        return calls[0] == n

    interrupt.stop_requested = stop_requested
    try:
        yield
    finally:
        interrupt.stop_requested = real


# ----------------------------------------------------------------------------- torchrun


def torchrun_env() -> dict[str, str]:
    """faulthandler is on in the workers: a worker killed by a signal (SIGABRT from C++, a fatal
    Python error at exit) prints its Python stack, which the agent's summary does not show."""
    return repo_env(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run --standalone` (a free rendezvous port, so parallel test
    runs never collide) with `nproc` CPU workers, for Popen; `torchrun` runs it and checks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *args,
    ]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun_cmd run to the end; fails the test with the workers' own output."""
    out = subprocess.run(
        torchrun_cmd(*args, nproc=nproc),
        env=torchrun_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        # The agent's own traceback and failure table come last and say only "exitcode -6":
        # keep what the workers printed before it.
        workers = out.stderr.split('Traceback (most recent call last):\n  File "<frozen runpy>"')[0]
        summary = out.stderr[-800:]
        raise AssertionError(
            f"torchrun exited {out.returncode}\n--- workers' stderr (tail) ---\n"
            f"{workers[-4000:]}\n--- agent (tail) ---\n{summary}"
        )
    return out


# ----------------------------------------------------------------------------- photographs


@functools.cache
def _sample_arrays() -> tuple:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def sample_photos() -> list:
    """scikit-learn's two real photographs (china, flower; 427 x 640 RGB) as PIL images."""
    from PIL import Image

    return [Image.fromarray(a) for a in _sample_arrays()]


def photo_crops(n: int, seed: int = 0) -> list:
    """n crops of the two photographs (uint8 arrays) at many sizes and aspect ratios."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = _sample_arrays()
    out = []
    for _ in range(n):
        img = images[rng.integers(len(images))]
        h, w = rng.integers(40, 160), rng.integers(40, 160)
        top, left = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
        out.append(img[top : top + h, left : left + w])
    return out


# ----------------------------------------------------------------------------- sweep folders

TRACEBACK = """submitit ERROR (2026-11-27) - Submitted job triggered an exception
Traceback (most recent call last):
  File "/x/bonnerlab/cluster/node.py", line 140, in __call__
    raise ValueError("bad input")
ValueError: data.root /nope holds no images
srun: error: node: task 0: Exited with exit code 1
"""


def error_log(logs: Path, job_id: str, text: str) -> None:
    """A task's submitit error log (`<job_id>_0_log.err`) holding `text`."""
    logs.mkdir(exist_ok=True)
    (logs / f"{job_id}_0_log.err").write_text(text)


def fake_sweep(
    root: Path,
    states: list[str],
    *,
    points: list[dict] | None = None,
    curves: list[list[float]] | None = None,
    job_ids: dict[int, str] | None = None,
    configs: bool = True,
) -> list[dict]:
    """A sweep folder as the launcher and its tasks leave it, without running anything.

    One task per entry of `states` (its STATE marker); `points` (default {"seed": i}) are the
    manifest's overrides; `curves` give each task's metrics.jsonl (val_acc per epoch, val_loss =
    1 - val_acc); `job_ids` default to 100 + i ("" = never submitted: states from the markers
    alone). With `configs`, also sweep.yaml and each task's config.yaml and slurm.yaml, for tiny
    train tasks on the local executor (what status, report and retries read).
    """
    from bonnerlab.config import SlurmConfig, TrainConfig, apply_overrides, to_dict
    from bonnerlab.runs import write_state

    points = points or [{"seed": i} for i in range(len(states))]
    root.mkdir()
    if configs:
        from bonnerlab.cluster.submit import yaml_text

        base = apply_overrides(
            TrainConfig(),
            {
                "epochs": 1,
                "max_steps_per_epoch": 2,
                "model.width": 8,
                "device": "cpu",
                "progress": False,
            },
        )
        (root / "sweep.yaml").write_text(
            yaml_text(
                {
                    "job": "train",
                    "points": points,
                    "base": to_dict(base),
                    "slurm": to_dict(SlurmConfig(cluster="local")),
                }
            )
        )
    lines = []
    for i, state in enumerate(states):
        run = root / f"task-{i:03d}"
        run.mkdir()
        if configs:
            cfg = apply_overrides(base, {**points[i], "run_dir": str(run)})
            (run / "config.yaml").write_text(yaml_text(to_dict(cfg)))
            (run / "slurm.yaml").write_text(
                yaml_text({**to_dict(SlurmConfig(cluster="local")), "submitted": {}})
            )
        if curves is not None:
            (run / "metrics.jsonl").write_text(
                "".join(
                    json.dumps({"epoch": e + 1, "val_acc": acc, "val_loss": 1 - acc}) + "\n"
                    for e, acc in enumerate(curves[i])
                )
            )
        write_state(run, state)
        job_id = (job_ids or {}).get(i, f"{100 + i}")
        lines.append(
            json.dumps({"task": i, "overrides": points[i], "run_dir": str(run), "job_id": job_id})
        )
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return points


# -------------------------------------------------------------------------- the local SLURM cluster


@dataclass(frozen=True)
class LocalCluster:
    lab: Path
    conf: Path


def _unavailable(reason: str) -> None:
    if os.environ.get("BONNERLAB_REQUIRE_SLURM") == "1":
        pytest.fail(f"local SLURM cluster required (BONNERLAB_REQUIRE_SLURM=1) but: {reason}")
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


def _cluster_is_up(lab: Path) -> bool:
    conf = lab / "etc" / "slurm.conf"
    if not conf.exists() or shutil.which("scontrol") is None:
        return False
    out = subprocess.run(
        ["scontrol", "ping"],
        env={**os.environ, "SLURM_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "is UP" in out.stdout


def local_slurm_cluster() -> Iterator[LocalCluster]:
    """The body of conftest's session fixture `slurm_cluster`.

    Runs slurm/start-cluster.sh once per test session (idempotent: a running cluster is reused)
    and exports SLURM_CONF. Where the cluster cannot start (not root, no packages, no apt-get)
    the tests that use it are skipped with the reason, unless BONNERLAB_REQUIRE_SLURM=1 (CI sets
    it): then that is a failure, so CI never passes without the cluster tests. A cluster this
    started is stopped at the end of the session (BONNERLAB_KEEP_SLURM=1 keeps it up).
    """
    lab = Path(os.environ.get("SLURMLAB", REPO / ".slurm-lab"))
    if os.name != "posix" or os.geteuid() != 0:
        _unavailable("tests must run as root to start slurmd and munged (make slurm-up needs root)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _unavailable("SLURM is not installed and there is no apt-get to install it")
    already_up = _cluster_is_up(lab)
    if not already_up:
        try:
            out = subprocess.run(
                ["bash", str(SLURM_DIR / "start-cluster.sh")],
                capture_output=True,
                text=True,
                timeout=900,
                env={**os.environ, "SLURMLAB": str(lab)},
            )
        except subprocess.TimeoutExpired:
            _unavailable("slurm/start-cluster.sh did not finish in 15 minutes")
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            _unavailable(f"slurm/start-cluster.sh failed: {' | '.join(tail)}")
    conf = lab / "etc" / "slurm.conf"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # submitit's sbatch/sacct calls inherit it
    yield LocalCluster(lab, conf)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    if not already_up and os.environ.get("BONNERLAB_KEEP_SLURM") != "1":
        subprocess.run(
            ["bash", str(SLURM_DIR / "stop-cluster.sh")],
            capture_output=True,
            env={**os.environ, "SLURMLAB": str(lab)},
            timeout=300,
        )


SLURM_LOCK = Path("/tmp/slurm.lock")


@contextlib.contextmanager
def slurm_lock(path: Path = SLURM_LOCK, timeout: float = 1800) -> Iterator[None]:
    """Hold the machine-wide SLURM lock (as `flock /tmp/slurm.lock CMD` does), waiting for it.

    When an ancestor of this process already holds it (the tests were started under `flock`),
    waiting would deadlock: the lock is then ours already.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if _held_by_ancestor(path):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} still held by another process after {timeout:.0f} s")
                time.sleep(1)
        yield
    finally:
        os.close(fd)  # releases the lock if this process took it


def _held_by_ancestor(path: Path) -> bool:
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            holders.add(int(fields[4]))
    pid = os.getpid()
    while pid > 1:
        if pid in holders:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def write_store(
    path,
    layers: dict,
    stimuli=None,
    *,
    identity: dict | None = None,
    chunk_size: int = 8,
    skipped: dict | None = None,
    finalize: bool = True,
    overwrite: bool = False,
):
    """A store holding exactly `layers` ({name: (n, ...) array}, any float dtype), written
    without a model; `skipped` ({chunk: [stimulus, ...]}) marks stimuli as unreadable. Its path."""
    import numpy as np

    from bonnerlab.activations.store import LayerSpec, open_store

    n = len(next(iter(layers.values())))
    specs = [
        LayerSpec(
            name,
            tuple(f"d{i}" for i in range(x.ndim - 1)) if x.ndim > 2 else ("neuroid",),
            x.shape[1:],
            str(x.dtype),
        )
        for name, x in layers.items()
    ]
    store, _ = open_store(
        path,
        identity=identity or {"layers": sorted(layers)},
        layers=specs,
        stimuli=list(stimuli) if stimuli is not None else [f"s{i:03d}.png" for i in range(n)],
        labels=[i % 3 for i in range(n)],
        chunk_size=chunk_size,
        overwrite=overwrite,
    )
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(
            c, {k: np.asarray(v[sl]) for k, v in layers.items()}, (skipped or {}).get(c, [])
        )
    if finalize:
        store.finalize()
    return path


# ----------------------------------------------------------------------------- experiment trackers


def wandb_offline_env(home: Path) -> dict[str, str]:
    """W&B offline and silent, writing only under `home`, with no network: its address is a
    closed local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(home),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed}",
        "WANDB_DISABLE_GIT": "true",
    }


def wandb_run(run_dir: Path) -> dict:
    """A run folder's W&B offline parts (one per start), read by wandb itself (`wandb leet
    inspect --json`, its transaction-log reader) and merged: parts, run records, config, history
    rows."""
    parts = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    records = []
    for part in parts:
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(part)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        records += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    config: dict = {}
    for r in records:
        if r["type"] in ("run", "config"):
            config.update((r["run"]["config"] if r["type"] == "run" else r["config"])["update"])
    return {
        "parts": parts,
        "runs": [r["run"] for r in records if r["type"] == "run"],
        "config": config,
        "history": [r["history"]["item"] for r in records if r["type"] == "history"],
    }


def mlflow_runs(run_dir: Path, experiment: str = "bonnerlab") -> tuple[Any, list]:
    """(tracking client, runs of `experiment`) of the SQLite store in a run folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment} in {run_dir}"
    return client, client.search_runs([found.experiment_id])


def flip_in_inner_chunk(shard: Path, n_inner: int, j: int) -> None:
    """Flip one bit in the middle of inner chunk `j` of a zarr v3 shard file of `n_inner` inner
    chunks, found by the sharding spec's index (at the end: (offset, nbytes) little-endian
    uint64 pairs, then a crc32c)."""
    import numpy as np

    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4) : -4]), "<u8").reshape(n_inner, 2)
    offset, nbytes = (int(v) for v in index[j])
    data[offset + nbytes // 2] ^= 0x10
    shard.write_bytes(bytes(data))
