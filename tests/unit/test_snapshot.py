"""The code snapshot a queued job runs (bonnerlab.cluster.submit.snapshot_code): code only, never
a secret, a symlinked folder or a loop, content-addressed so resubmissions never overwrite it,
and one line above its size cap. Built on a checkout made here, with git and without."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bonnerlab.cluster.submit import SNAPSHOT_MAX_MB, snapshot_code, snapshot_files
from bonnerlab.errors import ClusterError

CODE = {
    "bonnerlab/__init__.py": "",
    "bonnerlab/mod.py": "X = 1\n",
    "bonnerlab/data/README.md": "tracked, not Python\n",
    "jobs/train.py": "print('train')\n",
}


def _checkout(root: Path) -> Path:
    """A checkout holding code and what must never be copied: secrets, a symlink to a data folder,
    symlink loops, caches."""
    for name, text in CODE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "jobs" / ".env").write_text("WANDB_API_KEY=secret\n")
    (root / "bonnerlab" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (root / "bonnerlab" / ".ssh").mkdir()
    (root / "bonnerlab" / ".ssh" / "key.py").write_text("KEY = 'secret'\n")
    data = root.parent / "data"
    data.mkdir()
    (data / "big.py").write_bytes(b"#" * 100_000)  # *.py, so only the symlink rule keeps it out
    (root / "bonnerlab" / "data_link").symlink_to(data)
    (root / "bonnerlab" / "linked.py").symlink_to(data / "big.py")
    (root / "bonnerlab" / "loop").symlink_to(root / "bonnerlab")  # a folder that contains itself
    (root / "jobs" / "a.py").symlink_to(root / "jobs" / "b.py")  # a loop of two links
    (root / "jobs" / "b.py").symlink_to(root / "jobs" / "a.py")
    (root / "bonnerlab" / "__pycache__").mkdir()
    (root / "bonnerlab" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    return root


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def _files(folder: Path) -> dict[str, str]:
    out = {}
    for here, _, files in os.walk(folder):
        for f in files:
            path = Path(here) / f
            assert not path.is_symlink()
            out[str(path.relative_to(folder))] = path.read_text()
    return out


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_with_git_the_snapshot_is_the_tracked_files_and_nothing_else(tmp_path, capsys):
    root = _checkout(tmp_path / "repo")
    _git(root, "init", "-q")
    # tracked on purpose or by accident: a dotfile and symlinks are still never copied
    (root / "bonnerlab" / ".secrets.py").write_text("TOKEN = 'x'\n")
    _git(root, "add", "-f", *CODE, "bonnerlab/.secrets.py", "bonnerlab/data_link", "jobs/a.py")
    (root / "bonnerlab" / "new.py").write_text("Y = 2\n")  # untracked code: named, not copied
    (root / "bonnerlab" / "mod.py").write_text("X = 2\n")  # a change not yet committed: copied
    snap = snapshot_code(tmp_path / "run" / "code", root)
    assert _files(snap) == {**CODE, "bonnerlab/mod.py": "X = 2\n"}
    assert "1 untracked file(s) left out of the code snapshot" in capsys.readouterr().err
    assert snap.parent == tmp_path / "run" / "code" and len(snap.name) == 16


def test_without_git_the_snapshot_is_the_python_files_and_nothing_else(tmp_path):
    root = _checkout(tmp_path / "repo")
    assert snapshot_files(root) == ["bonnerlab/__init__.py", "bonnerlab/mod.py", "jobs/train.py"]
    snap = snapshot_code(tmp_path / "run" / "code", root)
    assert _files(snap) == {k: v for k, v in CODE.items() if k.endswith(".py")}


def test_snapshots_are_content_addressed_and_never_overwritten(tmp_path):
    root = _checkout(tmp_path / "repo")
    code = tmp_path / "sweep" / "code"
    first = snapshot_code(code, root)
    assert snapshot_code(code, root) == first  # unchanged code: the same snapshot, not a copy
    (root / "bonnerlab" / "mod.py").write_text("X = 3\n")
    second = snapshot_code(code, root)
    assert second != first and sorted(p.name for p in code.iterdir()) == sorted(
        [first.name, second.name]
    )
    # a task still queued from the first submission keeps the code it was submitted with
    assert (first / "bonnerlab" / "mod.py").read_text() == "X = 1\n"
    assert (second / "bonnerlab" / "mod.py").read_text() == "X = 3\n"


def test_a_snapshot_over_its_cap_is_one_line_and_nothing_is_copied(tmp_path):
    root = _checkout(tmp_path / "repo")
    with open(root / "bonnerlab" / "weights.py", "wb") as f:  # sparse: no time spent writing it
        f.truncate((SNAPSHOT_MAX_MB + 1) * 2**20)
    with pytest.raises(ClusterError) as e:
        snapshot_code(tmp_path / "run" / "code", root)
    message = str(e.value)
    assert "\n" not in message and f"over its {SNAPSHOT_MAX_MB} MB cap" in message
    assert f"bonnerlab/weights.py ({SNAPSHOT_MAX_MB + 1:.1f} MB)" in message
    assert not (tmp_path / "run").exists()


def test_a_snapshot_without_the_package_is_one_line(tmp_path):
    root = tmp_path / "repo"
    (root / "bonnerlab").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "__init__.py").write_text("")
    (root / "bonnerlab" / "__init__.py").symlink_to(tmp_path / "elsewhere" / "__init__.py")
    with pytest.raises(ClusterError, match="would hold no bonnerlab/__init__.py"):
        snapshot_code(tmp_path / "run" / "code", root)
    assert not (tmp_path / "run").exists()
