"""Fixtures for every tier: a tiny, fast training config and the local SLURM cluster.
Everything else shared between test modules is in tests/helpers.py (the kit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [
    str(TESTS.parent),
    str(TESTS),
]  # bonnerlab from this checkout; `import helpers` from any tier

from helpers import local_slurm_cluster, tiny_train  # noqa: E402


@pytest.fixture
def tiny_train_cfg(tmp_path):
    """mnist_cnn on digits, a few steps: seconds on a laptop CPU. `tiny_train_cfg(epochs=1,
    ...)`."""

    def make(**overrides):
        return tiny_train(**{"run_dir": str(tmp_path / "run"), "progress": False, **overrides})

    return make


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM cluster, started once per session (see helpers.local_slurm_cluster)."""
    yield from local_slurm_cluster()
