"""The local SLURM cluster as a session fixture (import it from conftest or a test module).

    from slurm_fixtures import slurm_cluster  # noqa: F401

`slurm_cluster` runs slurm/start-cluster.sh once per test session (idempotent: a running cluster
is reused) and exports SLURM_CONF. Where the cluster cannot start (not root, no packages, no
apt-get) the tests that use it are skipped with the reason, unless BONNERLAB_REQUIRE_SLURM=1
(CI sets it): then that is a failure, so CI never passes without the cluster tests.
A cluster this fixture started is stopped at the end of the session (BONNERLAB_KEEP_SLURM=1
keeps it up for the next run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "slurm"


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
    out = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": str(conf)},
                         capture_output=True, text=True, timeout=30)
    return "is UP" in out.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    lab = Path(os.environ.get("SLURMLAB", REPO / ".slurm-lab"))
    if os.name != "posix" or os.geteuid() != 0:
        _unavailable("tests must run as root to start slurmd and munged (make slurm-up needs root)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        _unavailable("SLURM is not installed and there is no apt-get to install it")
    already_up = _cluster_is_up(lab)
    if not already_up:
        try:
            out = subprocess.run(["bash", str(SLURM_DIR / "start-cluster.sh")], capture_output=True,
                                 text=True, timeout=900, env={**os.environ, "SLURMLAB": str(lab)})
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
        subprocess.run(["bash", str(SLURM_DIR / "stop-cluster.sh")], capture_output=True,
                       env={**os.environ, "SLURMLAB": str(lab)}, timeout=300)
