"""Shared by the job scripts: run a job function and turn user errors into one line + exit 2;
parse a command line into a dataclass; the checks every folder tool makes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import simple_parsing

# Let `python jobs/x.py` work from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonnerlab.errors import ConfigError, UserError  # noqa: E402

T = TypeVar("T")


class FlagParser(simple_parsing.ArgumentParser):
    """simple-parsing with dotted flags for nested fields (`--optim.lr`, as parse_config makes
    them).

    A subclass, not arguments: simple-parsing builds a subcommand's parser as `parser_class()`
    with no arguments, and every new parser resets its flag-naming mode (a class-wide global),
    so every parser of one command line must be made with the same mode.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("argument_generation_mode", simple_parsing.ArgumentGenerationMode.NESTED)
        kwargs.setdefault("nested_mode", simple_parsing.NestedMode.WITHOUT_ROOT)
        kwargs.setdefault("add_config_path_arg", False)
        super().__init__(*args, **kwargs)


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str], known: bool = False
) -> argparse.Namespace:
    """`parser.parse_args(argv)` (or parse_known_args, dropping the rest), with a config's own
    check failing as one ConfigError line, as parse_config does."""
    try:
        return parser.parse_known_args(list(argv))[0] if known else parser.parse_args(list(argv))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e


def parse_flags(cls: type[T], argv: Sequence[str], prog: str) -> T:
    """A tool's options (a dataclass whose field comments are the --help) from its command line."""
    parser = FlagParser(prog=prog, description=cls.__doc__)
    parser.add_arguments(cls, dest="cfg")
    return parse(parser, argv).cfg


def run_folder(path: str | Path, flag: str = "") -> Path:
    """The folder a tool works on; a path that is not one is the user's error."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder" + (f" ({flag})" if flag else ""))
    return path


def check_task(records: dict[int, Any], task: int, path: Path) -> None:
    """`--task K` must name a task of the folder's manifest."""
    if task not in records:
        raise UserError(
            f"--task {task} is out of range: {path} has tasks {min(records)}-{max(records)}"
        )


def run_job(
    main: Callable[[list[str]], Any], argv: list[str] | None = None, save_on_signals: bool = False
) -> None:
    """`save_on_signals`: SIGTERM/SIGUSR2 (preemption, scancel, torchrun passing on its own SIGTERM)
    ask the job to save at its next step boundary instead of killing it (bonnerlab.interrupt)."""
    from bonnerlab import interrupt

    interrupt.enable_crash_stacks()
    if save_on_signals:
        interrupt.install_handlers()
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def env_rank() -> int:
    """This process's rank as the launcher's environment gives it, without importing torch:
    torchrun's RANK, else SLURM_PROCID inside a multi-task srun step, else 0. The rank
    `distributed.resolve_env` resolves (tests/jobs/test_analyze.py holds them equal), without
    its rendezvous side effects: a CPU job (analyze) prints its result without loading torch."""
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK"):
        return int(os.environ["RANK"])
    # the batch script also sees SLURM_NTASKS but is one process: only a step's count counts,
    # unless a rendezvous was exported (MASTER_ADDR), as resolve_env decides
    names = ["SLURM_STEP_NUM_TASKS"] + (["SLURM_NTASKS"] if os.environ.get("MASTER_ADDR") else [])
    ntasks = next((int(os.environ[name]) for name in names if os.environ.get(name)), None)
    if ntasks and ntasks > 1:
        return int(os.environ.get("SLURM_PROCID") or 0)
    return 0


def print_result(result: Any) -> None:
    """Print the job's result as one JSON line, from rank 0 only.

    Not `distributed.print0`: the library tears the process group (and with it the rank it
    knew) down before returning, so the rank is read again from the launcher's environment;
    otherwise every torchrun rank prints and the lines run together.
    """
    if env_rank() == 0:
        print(json.dumps(result), flush=True)
        if isinstance(result, dict) and result.get("interrupted"):
            print(
                f"stopped by a signal; saved. "
                f"Continue with: --run_dir {result['run_dir']} --resume",
                flush=True,
            )
