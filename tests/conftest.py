"""Shared fixtures: a tiny, fast training config and paths."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(REPO))


def assert_same_weights(a, b, atol=0.0):
    """Two state dicts hold the same tensors: bit for bit, or within `atol`."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if atol:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k
        else:
            assert torch.equal(a[k], b[k]), k


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone` (a free rendezvous port, so parallel test
    runs never collide) with 2 CPU workers; fails the test with the workers' own output.

    faulthandler is on in the workers: a worker killed by a signal (SIGABRT from C++, a fatal
    Python error at exit) prints its Python stack, which the agent's summary does not show.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        # The agent's own traceback and failure table come last and say only "exitcode -6":
        # keep what the workers printed before it.
        workers = out.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
        summary = out.stderr[-800:]
        raise AssertionError(f"torchrun exited {out.returncode}\n--- workers' stderr (tail) ---\n"
                             f"{workers[-4000:]}\n--- agent (tail) ---\n{summary}")
    return out


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


@pytest.fixture
def tiny_train_cfg(tmp_path):
    """mnist_cnn on digits, a few steps: seconds on a laptop CPU."""
    from bonnerlab.config import TrainConfig, apply_overrides

    def make(**overrides):
        base = {
            "run_dir": str(tmp_path / "run"),
            "epochs": 2,
            "device": "cpu",
            "progress": False,
            "model.width": 8,
            "data.batch_size": 64,
            "optim.lr": 0.02,
        }
        base.update(overrides)
        return apply_overrides(TrainConfig(), base)

    return make
