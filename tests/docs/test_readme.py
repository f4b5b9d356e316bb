"""The README's `bash` and `python` blocks, run in order in a temporary copy of the repository.

The practice of simple-parsing's test_examples.py and pytorch/examples' run_python_examples.sh:
the README is the front door, so it is executed and cannot drift from the code. A block whose
first line is a marker is treated apart, and the marker is visible to readers:

    # needs: gpu | internet (...)   skipped here, with that line as the reason
    # not run: ...                  a reference block (placeholders, a real cluster), skipped
    # needs: slurm                  run by test_readme_slurm_blocks, on the local cluster

Shell blocks run under `bash -e -o pipefail` from the copy's root, and each starts with the
environment the previous one left (so `source .slurm-lab/env.sh` carries over, as in one
terminal). Python blocks run with the copy's `.venv/bin/python`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, TESTS, repo_env, slurm_lock

SKIPPED = ("gpu", "internet")  # `# needs:` kinds this machine is assumed not to have
KINDS = (*SKIPPED, "slurm")
# Not copied into the temporary repository: environments, outputs and caches.
IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".slurm-lab",
    "runs",
    "data",
    "activations",
    "*.zarr",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "notebook-runs",
    "out",
)


@dataclass(frozen=True)
class Block:
    index: int  # 1-based position among the README's bash/python blocks
    lang: str  # bash or python
    code: str
    line: int  # line of the opening fence in the README

    @property
    def first_line(self) -> str:
        return next((s for s in self.code.splitlines() if s.strip()), "")

    @property
    def marker(self) -> tuple[str, str] | None:
        """("gpu"|"internet"|"slurm"|"not run", the marker line) or None for a plain block."""
        first = self.first_line.strip()
        if first.startswith("# not run:"):
            return "not run", first
        m = re.match(r"# needs: (\w+)", first)
        if not m:
            return None
        if m.group(1) not in KINDS:
            raise ValueError(
                f"README line {self.line}: unknown marker {first!r}; "
                f"use # needs: {'|'.join(KINDS)} or # not run: REASON"
            )
        return m.group(1), first

    @property
    def name(self) -> str:
        return f"README block {self.index} (line {self.line}: {self.first_line!r})"


def parse_blocks(markdown: str) -> list[Block]:
    blocks = []
    for m in re.finditer(r"^```(bash|python)\n(.*?)^```$", markdown, flags=re.S | re.M):
        line = markdown.count("\n", 0, m.start()) + 1
        blocks.append(Block(len(blocks) + 1, m.group(1), m.group(2), line))
    return blocks


def readme_blocks() -> list[Block]:
    return parse_blocks((REPO / "README.md").read_text())


def make_workspace(dest: Path, venv: Path = Path(sys.prefix)) -> dict[str, str]:
    """Copy the repository to `dest` with `.venv` standing in for the venv running the tests.

    The stand-in holds the venv's own pyvenv.cfg and symlinks to its lib/ and bin/ entries, so
    `.venv/bin/python` is that venv, while the `make install` stamp is the copy's own: touched
    after the copy, so the README's `make` targets find the install done and never reinstall
    into the shared venv. Returns the environment the blocks start with.
    """
    if venv == Path(sys.base_prefix):
        pytest.skip("the tests must run from a virtual environment (make install builds .venv)")
    shutil.copytree(REPO, dest, ignore=IGNORE)
    stand_in = dest / ".venv"
    (stand_in / "bin").mkdir(parents=True)
    shutil.copy2(venv / "pyvenv.cfg", stand_in / "pyvenv.cfg")
    for name in ("lib", "lib64", "include", "share"):
        if (venv / name).exists():
            (stand_in / name).symlink_to((venv / name).resolve())
    for entry in (venv / "bin").iterdir():
        (stand_in / "bin" / entry.name).symlink_to(
            entry.resolve() if entry.name.startswith("python") else entry
        )
    (stand_in / ".installed").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "SLURM_"))}
    # The venv's editable install may point at another checkout: the copy comes first.
    env.update(
        PYTHONPATH=str(dest),
        PATH=f"{stand_in / 'bin'}:{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
    )
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: float = 600) -> dict[str, str]:
    """Run one block; return the environment it leaves (shell) or `env` (python).

    A failure names the block by its first line and shows the tail of its output.
    """
    env_file = cwd / ".readme-test-env"
    if block.lang == "bash":
        script = f"set -eo pipefail\n{block.code}\nenv -0 > {env_file}\n"
        cmd = ["bash", "-c", script]
    else:
        cmd = [str(cwd / ".venv" / "bin" / "python"), "-c", block.code]
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace"
        )
        pytest.fail(f"{block.name} did not finish in {timeout:.0f} s; output tail:\n{tail[-2000:]}")
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-25:])
        pytest.fail(
            f"{block.name} failed (exit {out.returncode}); output tail:\n{tail}", pytrace=False
        )
    if block.lang == "bash":
        pairs = (item.partition("=") for item in env_file.read_text().split("\0") if "=" in item)
        env = {k: v for k, _, v in pairs if k not in ("SHLVL", "_", "PWD", "OLDPWD")}
        env_file.unlink()
    return env


def run_blocks(blocks: list[Block], cwd: Path, env: dict[str, str]) -> list[tuple[Block, float]]:
    timings = []
    for block in blocks:
        t0 = time.perf_counter()
        env = run_block(block, cwd, env)
        timings.append((block, time.perf_counter() - t0))
    for block, seconds in timings:
        print(f"{seconds:6.1f} s  {block.name}")
    print(f"{sum(s for _, s in timings):6.1f} s  {len(timings)} blocks")
    return timings


# ---------------------------------------------------------------- the README itself


def test_readme_blocks_are_marked_correctly():
    blocks = readme_blocks()
    assert len(blocks) >= 8, "the first-hour walkthrough has gone missing"
    kinds = [b.marker[0] if b.marker else "run" for b in blocks]  # raises on unknown markers
    assert kinds.count("run") >= 6 and kinds.count("slurm") >= 2


@pytest.mark.slow
def test_readme_walkthrough(tmp_path):
    """Every unmarked block, in order: install, train, evaluate, DDP, extract, analysis."""
    blocks = [b for b in readme_blocks() if b.marker is None]
    env = make_workspace(tmp_path / "repo")
    run_blocks(blocks, tmp_path / "repo", env)
    repo = tmp_path / "repo"
    assert (repo / "runs/first/eval-val/metrics.json").is_file()
    assert (repo / "runs/ddp/checkpoints/best.pt").is_file()
    assert (repo / "activations/first.zarr").is_dir()


SKIPPED_BLOCKS = [b for b in readme_blocks() if b.marker and b.marker[0] in (*SKIPPED, "not run")]


@pytest.mark.parametrize("block", SKIPPED_BLOCKS, ids=[f"block{b.index}" for b in SKIPPED_BLOCKS])
def test_readme_block_not_run_here_still_parses(block):
    """A block this machine does not run (a GPU, the internet, a reference) is still checked for
    what needs neither: it parses, and the scripts and `make` targets it names exist. Then it is
    reported as skipped with its marker, so `-ra` lists what did not run."""
    if block.lang == "bash":
        out = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True, text=True)
        assert out.returncode == 0, f"{block.name} does not parse: {out.stderr.strip()}"
    else:
        compile(block.code, block.name, "exec")
    for script in re.findall(
        r"(?<![\w/.-])((?:jobs|bench|slurm|tests)/[\w/.-]+\.(?:py|sh))", block.code
    ):
        assert (REPO / script).is_file(), f"{block.name} names {script}, which does not exist"
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    for target in re.findall(r"\bmake ([\w-]+)", block.code):
        assert target in targets, (
            f"{block.name} runs `make {target}`; the Makefile has no such target"
        )
    pytest.skip(f"README block {block.index} (line {block.line}): {block.marker[1]}")


@pytest.fixture
def locked_cluster(request):
    """The local cluster, started and used while this process holds /tmp/slurm.lock."""
    with slurm_lock():
        yield request.getfixturevalue("slurm_cluster")


@pytest.mark.slurm
@pytest.mark.slow
def test_readme_slurm_blocks(tmp_path, locked_cluster):
    """The `# needs: slurm` blocks, in order: start the cluster, one job, a sweep, its status."""
    blocks = [b for b in readme_blocks() if b.marker and b.marker[0] == "slurm"]
    repo = tmp_path / "repo"
    env = make_workspace(repo)
    # `make slurm-up` in the copy must find the session's cluster, not start a second one.
    env["SLURMLAB"] = str(locked_cluster.lab)
    (repo / ".slurm-lab").symlink_to(locked_cluster.lab)
    run_blocks(blocks, repo, env)
    assert (repo / "runs/slurm-first/STATE").read_text().strip() == "DONE"
    assert len(list((repo / "runs/lr").glob("task-*/checkpoints/best.pt"))) == 3
    assert (repo / "runs/lr/results.csv").is_file()
    # extract -> analyze, chained with --after: the analysis folder holds both layers
    summary = json.loads((repo / "analysis/chain/summary.json").read_text())
    assert [row["layer"] for row in summary["layers"]] == ["features.1", "fc"]


# ---------------------------------------------------------------- the machinery


def test_failing_block_names_its_first_line_and_output_tail(tmp_path):
    markdown = "text\n\n```bash\n# make the data\necho made data\n\nexit 3\n```\n"
    [block] = parse_blocks(markdown)
    with pytest.raises(pytest.fail.Exception) as e:
        run_block(block, tmp_path, dict(os.environ))
    message = str(e.value)
    assert "README block 1 (line 3: '# make the data') failed (exit 3)" in message
    assert message.endswith("made data")


def test_shell_blocks_share_one_environment_and_markers_parse(tmp_path):
    markdown = (
        '```bash\nexport GREETING=hello\n```\n\n```bash\ntest "$GREETING" = hello\n```\n'
        "```python\n# needs: gpu\nimport torch\n```\n```text\nnot a block\n```\n"
    )
    first, second, third = parse_blocks(markdown)
    env = run_block(first, tmp_path, dict(os.environ))
    assert env["GREETING"] == "hello"
    run_block(second, tmp_path, env)
    assert (first.marker, third.marker) == (None, ("gpu", "# needs: gpu"))
    with pytest.raises(ValueError, match="unknown marker '# needs: gpus'"):
        _ = parse_blocks("```bash\n# needs: gpus\n```\n")[0].marker


def test_slurm_lock_waits_for_others_but_not_for_an_ancestor(tmp_path):
    lock = tmp_path / "slurm.lock"
    lock.touch()
    take = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from helpers import slurm_lock\n"
        f"with slurm_lock(__import__('pathlib').Path({str(lock)!r}), timeout=2): print('held')\n"
    )
    env = repo_env()
    # started under `flock LOCK`: the lock is already ours, so no deadlock
    out = subprocess.run(
        ["flock", str(lock), sys.executable, "-c", take],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "held", out.stderr[-1000:]
    # held by a process that is not an ancestor (a sibling): wait, then give up
    holder = subprocess.Popen(
        ["flock", str(lock), "-c", "echo locked; sleep 60"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = subprocess.run(
            [sys.executable, "-c", take], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and its sleep, which holds the lock too
        holder.wait()
    assert out.returncode != 0 and "still held by another process after 2 s" in out.stderr
