"""Shared fixtures: a tiny, fast training config and paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(REPO))


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
