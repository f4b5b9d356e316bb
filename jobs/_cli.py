"""Shared by the job scripts: run a job function and turn user errors into one line + exit 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Let `python jobs/x.py` work from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonnerlab.errors import UserError  # noqa: E402


def run_job(main: Callable[[list[str]], Any], argv: list[str] | None = None, save_on_signals: bool = False) -> None:
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


def print_result(result: Any) -> None:
    """Print the job's result as one JSON line, from rank 0 only.

    Not `distributed.print0`: the library tears the process group (and with it the rank it
    knew) down before returning, so the rank is read again from the launcher's environment;
    otherwise every torchrun rank prints and the lines run together.
    """
    from bonnerlab.distributed import resolve_env

    if resolve_env()[0] == 0:
        print(json.dumps(result), flush=True)
        if isinstance(result, dict) and result.get("interrupted"):
            print(f"stopped by a signal; saved. Continue with: --run_dir {result['run_dir']} --resume", flush=True)
