"""Job start: what a training job imports before its first step (the local cluster bench:
bench/bench_job_start.py). torchvision (via torch._dynamo) and scikit-learn (via scipy.stats)
each cost 1-2 s of every job's start and the default job needs neither."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import repo_env


def test_digits_read_without_sklearn_equal_sklearns_own():
    from sklearn.datasets import load_digits

    from bonnerlab.data.datasets import _digits_arrays

    images, labels = _digits_arrays()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


@pytest.mark.slow
def test_default_training_job_imports_neither_torchvision_nor_sklearn(tmp_path):
    code = (
        "import sys\n"
        "from bonnerlab.config import TrainConfig, apply_overrides\n"
        "from bonnerlab.train.loop import train\n"
        "cfg = apply_overrides(TrainConfig(), {'epochs': 1, 'max_steps_per_epoch': 1, "
        "'device': 'cpu',\n"
        f"    'progress': False, 'model.width': 8, 'run_dir': {str(tmp_path / 'run')!r}}})\n"
        "assert train(cfg)['epoch'] == 1\n"
        "print(sorted(m for m in ('torchvision', 'sklearn', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=repo_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
