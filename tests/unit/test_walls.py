"""The house's walls (DESIGN.md), kept by tests: the login-node code loads no torch; no import
cycles and no import that runs against the flow of the data; the README's tree of files is the
repository's."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from helpers import REPO, job, repo_env, tiny_store

LIBRARY = REPO / "bonnerlab"

# ----------------------------------------------------------------------------- the rooms

# Each room of bonnerlab/ and its rank: a module may import its own room and rooms of a LOWER
# rank, nothing else. Rooms of one rank stand side by side and know nothing of each other
# (models no data, data no models, activations none of models/data). The data flows one way:
# data + models -> train -> checkpoints -> extract -> store (activations) -> analysis.
GROUND_FLOOR = {
    "errors",
    "runs",
    "interrupt",
    "distributed",
    "checkpoint",
    "seeds",
    "pixels",
    "pages",
}  # bonnerlab/<name>.py
RANKS = {
    "ground": 0,  # the GROUND_FLOOR modules (and bonnerlab/__init__.py)
    "config": 1,  # every job's dataclass; no torch at all (checked below)
    "models": 2,
    "data": 2,
    "activations": 2,
    "train": 3,
    "extract": 4,
    "analysis": 5,
}
# cluster/ sits apart: it wraps any job and reaches them through registry strings, so at module
# level it imports only these (inside a function, anything); and no other room imports it.
CLUSTER_MAY_IMPORT = {"ground", "config", "cluster"}
# analysis/ knows nothing of how activations were made: of the rooms below it, it reads the store
# (activations/) and the configs, never models/, data/, train/ or extract/.
ANALYSIS_MAY_IMPORT = {"ground", "config", "activations", "analysis"}
TORCH = {"torch", "torchvision"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # a bonnerlab module, or the top-level name of a third-party package
    where: str  # file:line
    module_level: bool  # False: inside a function (runs when called)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def library_modules() -> dict[str, Path]:
    return {
        module_name(p): p for p in sorted(LIBRARY.rglob("*.py")) if "__pycache__" not in p.parts
    }


def _known(name: str) -> str:
    """The longest prefix of `name` that is a bonnerlab module (`a.b.C` -> `a.b`)."""
    modules = library_modules()
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool) -> list[str]:
    modules = library_modules()
    if isinstance(node, ast.Import):
        return [
            _known(a.name) if a.name.split(".")[0] == "bonnerlab" else a.name.split(".")[0]
            for a in node.names
        ]
    if node.level:  # relative: from the importing module's package
        package = source if is_package else source.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base.split(".")[0] != "bonnerlab":
        return [base.split(".")[0]]
    # `from bonnerlab.x import y`: the submodule bonnerlab.x.y when there is one, else bonnerlab.x
    return [
        f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _known(base) for a in node.names
    ]


@cache
def library_imports() -> tuple[Import, ...]:
    """Every import statement in bonnerlab/ that runs: module level and inside functions; those
    under `if TYPE_CHECKING:` never run and are left out."""
    found = []
    for name, path in library_modules().items():
        rel = path.relative_to(REPO)

        def visit(node: ast.AST, in_function: bool, name=name, path=path, rel=rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(other, in_function)
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _targets(child, name, path.name == "__init__.py"):
                        found.append(Import(name, target, f"{rel}:{child.lineno}", not in_function))
                visit(
                    child,
                    in_function
                    or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda),
                )

        visit(ast.parse(path.read_text(), str(path)), False)
    return tuple(found)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in GROUND_FLOOR):
        return "ground"
    return parts[1]


def test_every_module_is_in_a_room_of_the_table():
    rooms = {module: room(module) for module in library_modules()}
    unknown = sorted(
        f"{m} (room {r!r})" for m, r in rooms.items() if r not in RANKS and r != "cluster"
    )
    assert not unknown, (
        f"modules in no room of the table in {__file__}: {', '.join(unknown)}; "
        "add the room (or the ground-floor module) to RANKS / GROUND_FLOOR"
    )


def test_the_import_walk_sees_what_is_there():
    """The walk itself: top-level and function-level imports, submodules resolved."""
    imports = library_imports()
    assert len(library_modules()) > 20 and len(imports) > 100
    assert any(not i.module_level for i in imports)  # lazy imports are walked too
    assert {i.target for i in imports if i.source == "bonnerlab.config"} >= {
        "bonnerlab.config.core"
    }


def against_the_flow(imports) -> list[str]:
    """The imports that break the table's rules, each as `file:line: what and why`."""
    wrong = []
    for i in imports:
        if not i.target.startswith("bonnerlab"):
            continue
        src, dst = room(i.source), room(i.target)
        if src == dst:
            continue
        if src == "cluster":
            if i.module_level and dst not in CLUSTER_MAY_IMPORT:
                wrong.append(
                    f"{i.where}: {i.source} imports {i.target} at module level "
                    f"(cluster/ reaches {dst}/ through registry strings or inside a function)"
                )
        elif dst == "cluster":
            wrong.append(
                f"{i.where}: {i.source} imports {i.target} (no room knows how it was started)"
            )
        elif src == "analysis" and dst not in ANALYSIS_MAY_IMPORT:
            wrong.append(
                f"{i.where}: {i.source} imports {i.target} "
                "(analysis/ knows nothing of how activations were made)"
            )
        elif src in RANKS and dst in RANKS and RANKS[dst] >= RANKS[src]:
            kind = "side by side with" if RANKS[dst] == RANKS[src] else "above"
            wrong.append(f"{i.where}: {i.source} imports {i.target} ({dst}/ is {kind} {src}/)")
    return wrong


def test_the_rules_catch_what_they_should():
    cases = {
        ("bonnerlab.models.cnn", "bonnerlab.data.datasets", True): True,  # side by side
        ("bonnerlab.activations.store", "bonnerlab.models.cnn", False): True,  # even in a function
        ("bonnerlab.checkpoint", "bonnerlab.config.core", True): True,  # ground floor below config
        ("bonnerlab.train.loop", "bonnerlab.extract.run", False): True,  # upward
        ("bonnerlab.train.loop", "bonnerlab.cluster.node", False): True,  # nobody imports cluster
        ("bonnerlab.cluster.node", "bonnerlab.train.loop", True): True,  # cluster, at module level
        ("bonnerlab.cluster.node", "bonnerlab.train.loop", False): False,  # ... in a function: fine
        ("bonnerlab.cluster.submit", "bonnerlab.config", True): False,
        ("bonnerlab.extract.run", "bonnerlab.activations.store", True): False,  # downward
        ("bonnerlab.data.datasets", "bonnerlab.data.folders", True): False,  # own room
        ("bonnerlab.analysis.gram", "bonnerlab.extract.run", False): True,  # below, but not its
        ("bonnerlab.analysis.gram", "bonnerlab.models.cnn", False): True,
        ("bonnerlab.analysis.gram", "bonnerlab.activations.reader", True): False,  # the store
    }
    for (source, target, module_level), wrong in cases.items():
        assert bool(against_the_flow([Import(source, target, "x.py:1", module_level)])) == wrong, (
            source,
            target,
        )


def test_no_import_runs_against_the_flow():
    wrong = against_the_flow(library_imports())
    assert not wrong, "imports against the house's flow:\n" + "\n".join(wrong)


def test_config_imports_no_torch_and_cluster_none_at_module_level():
    wrong = [
        f"{i.where}: {i.source} imports {i.target}"
        for i in library_imports()
        if i.target in TORCH
        and (room(i.source) == "config" or (room(i.source) == "cluster" and i.module_level))
    ]
    assert not wrong, "torch where the login node runs:\n" + "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    for i in library_imports():
        if i.target.startswith("bonnerlab") and i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
            where.setdefault((i.source, i.target), []).append(i.where)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]
    ]  # the finder finds
    lines = []
    for component in _cycles(edges):
        inside = sorted((a, b) for a in component for b in edges.get(a, ()) if b in component)
        lines.append(
            " <-> ".join(component)
            + ":\n"
            + "\n".join(f"  {w}: {a} imports {b}" for a, b in inside for w in where[a, b])
        )
    assert not lines, "import cycles:\n" + "\n".join(lines)


# -------------------------------------------------------------------- the login node loads no torch

# First on PYTHONPATH, so Python imports it at start: any import of torch (or torchvision) is
# refused AND logged with the importing frames (a `try: import torch` would otherwise hide it).
NO_TORCH = textwrap.dedent("""
    import os, sys, traceback

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "torchvision"):
                frames = [f"  {f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                          if not f.filename.startswith("<")]
                with open(os.environ["BONNERLAB_NO_TORCH_LOG"], "a") as log:
                    log.write(f"import {name}, from:\\n" + "\\n".join(frames) + "\\n")
                raise ImportError(f"{name} is blocked: this process must not load torch")
            return None

    sys.meta_path.insert(0, NoTorch())
""")


@pytest.fixture
def no_torch(tmp_path):
    """Runs a command where importing torch fails; returns (process, what tried to import it)."""
    site = tmp_path / "no-torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    log = tmp_path / "torch-imports.log"
    env = repo_env(BONNERLAB_NO_TORCH_LOG=str(log))
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"

    def run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, str]:
        log.unlink(missing_ok=True)
        out = subprocess.run(
            cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        return out, log.read_text() if log.exists() else ""

    return run


def test_config_and_every_cluster_module_import_without_torch(no_torch):
    modules = sorted(m for m in library_modules() if room(m) in ("config", "cluster"))
    code = "\n".join(f"import {m}" for m in modules) + textwrap.dedent("""
        try:
            import torch  # the control: the block works in this process
        except ImportError:
            print("torch blocked")
    """)
    out, torch_imports = no_torch([sys.executable, "-c", code])
    assert "bonnerlab.cluster.node" in modules and "bonnerlab.config.core" in modules
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "torch blocked"
    imports = torch_imports.split("import torch, from:")[0]  # the control's own attempt comes last
    assert not imports, f"importing {', '.join(modules)} loads torch:\n{imports}"


def test_dry_runs_of_every_job_load_no_torch(no_torch, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run folder to evaluate (nothing reads it yet)
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    store = tmp_path / "acts.zarr"  # an activation store to analyse: its metadata is all it reads
    tiny_store(store)
    launch = [*job("launch"), "--dry-run", "--cluster", "local"]
    for argv in (
        ["train", "--run_dir", str(tmp_path / "train")],
        ["evaluate", "--checkpoint", str(run), "--output_dir", str(tmp_path / "eval")],
        ["extract", "--output", str(tmp_path / "x.zarr")],
        ["analyze", "--store", str(store), "--output", str(tmp_path / "analysis")],
        # one array task per layer, after another job (--after reads its folder or takes ids)
        ["--after", "4242", "--sweep_dir", str(tmp_path / "an"), "analyze", "--store", str(store)],
    ):
        what = " ".join(a for a in argv if not a.startswith(str(tmp_path)))
        out, torch_imports = no_torch([*launch, *argv])
        assert out.returncode == 0, f"{what}: {out.stderr[-3000:]}"
        assert "nothing submitted" in out.stdout, out.stdout[-2000:]
        assert not torch_imports, f"launch.py --dry-run {what} loads torch:\n{torch_imports}"


def test_every_registered_job_names_a_config_and_a_function():
    from bonnerlab.cluster.registry import JOBS

    assert set(JOBS) >= {"train", "evaluate", "extract"}
    for name, spec in JOBS.items():
        assert isinstance(spec.load_config_class(), type), name
        assert callable(spec.load_function()), name


# ----------------------------------------------------------------------------- the README's tree

UNLISTED = {"__init__.py"}  # a package's folder line stands for its __init__.py


def _is_name(token: str) -> bool:
    """A path in the tree: a folder (`x/`, `.ci/run`), a file with an extension, or a Makefile."""
    return bool(re.fullmatch(r"[\w.-]+(?:/[\w.-]*)*", token)) and (
        "/" in token
        or bool(re.search(r"\.[A-Za-z]\w*$", token))
        or token in ("Makefile", "LICENSE")
    )


def readme_tree(markdown: str) -> list[str]:
    """The paths the README's file tree names (folders end with /), from the fenced block whose
    first line is `bonnerlab/`. Indentation gives nesting; names on one line are two spaces
    apart (a `(note)` between them is skipped); three or more spaces start the description; a
    line that starts in a description's column, or not with a name, continues a description."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)
    tree = next((b for b in blocks if b.lstrip().startswith("bonnerlab/")), None)
    assert tree is not None, "README.md has no fenced file tree starting with `bonnerlab/`"
    paths: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, folder path) of the open folders
    description_column = None
    for line in tree.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if description_column is not None and indent >= description_column:
            continue
        names_part = re.split(r" {3,}", line.strip(), maxsplit=1)[0]
        tokens = re.sub(r"\([^)]*\)", " ", names_part).split()
        names = []
        for token in tokens:
            if not _is_name(token):
                break
            names.append(token)
        if not names:
            continue
        rest = line.strip()[len(names_part) :]
        description_column = (
            indent + len(names_part) + len(rest) - len(rest.lstrip()) if rest else None
        )
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        for name in names:
            paths.append(parent + name)
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((indent, parent + names[0]))
    return paths


def test_the_tree_parser():
    tree = textwrap.dedent("""\
        ```
        bonnerlab/                 the library
          config/                  configs
            core.py                parsing: defaults < YAML < flags;
                                   continued.py is prose, not a file
          errors.py  runs.py       two on one line
        jobs/                      entry points
          train.py  launch.py (SLURM)  status.py
        Makefile  environment.yml
        .ci/run                    CI
        ```
    """)
    assert readme_tree(tree) == [
        "bonnerlab/",
        "bonnerlab/config/",
        "bonnerlab/config/core.py",
        "bonnerlab/errors.py",
        "bonnerlab/runs.py",
        "jobs/",
        "jobs/train.py",
        "jobs/launch.py",
        "jobs/status.py",
        "Makefile",
        "environment.yml",
        ".ci/run",
    ]


def test_readme_tree_names_every_library_and_job_file_and_only_files_that_exist():
    named = readme_tree((REPO / "README.md").read_text())
    files = sorted(
        p.relative_to(REPO).as_posix()
        for folder in ("bonnerlab", "jobs")
        for p in (REPO / folder).rglob("*.py")
        if "__pycache__" not in p.parts and p.name not in UNLISTED
    )
    missing = [f for f in files if f not in named]
    absent = [p for p in named if not (REPO / p).exists()]
    problems = [f"not in the README's tree: {', '.join(missing)}"] * bool(missing) + [
        f"named in the README's tree but absent: {', '.join(absent)}"
    ] * bool(absent)
    assert not problems, "\n".join(problems)
