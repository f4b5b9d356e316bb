"""Cooperative stop: a signal sets a flag, the training loop saves at the next step boundary.

SLURM sends SIGTERM on preemption and scancel (and, before a time limit, the SIGUSR2 asked for
with `--signal`); torchrun forwards the SIGTERM it receives to its workers. Killing the process
from inside the handler would lose the step in flight and could leave a half-written checkpoint,
so handlers only set a flag that `train` polls between steps (and record which signal came, so
the job wrapper knows whether to requeue itself or wait for SLURM).

Ctrl-C (SIGINT) is a stop request too: the first saves at the next step boundary, like SIGTERM;
a second one aborts at once (KeyboardInterrupt), for when the user will not wait.

Every entry point installs the same handlers: jobs/*.py through `install_handlers()`, the SLURM
job wrapper (`bonnerlab.cluster.node.ClusterJob`) too, restoring submitit's own afterwards.
A job may register `on_stop` (the training loop marks its folder INTERRUPTED at once): a process
that is killed before it reaches the next step boundary (torchrun kills its workers 30 s after
passing them its SIGTERM) then does not leave STATE saying RUNNING.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

_stop = threading.Event()
_received: list[int] = []
_on_stop: list[Callable[[], None]] = []


def request_stop(signum: int | None = None, _frame: Any = None) -> None:
    """Ask the running job to save and return at the next step boundary (usable as a handler).

    A second SIGINT while the first is pending raises KeyboardInterrupt: Ctrl-C twice aborts.
    """
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt
    if signum is not None:
        _received.append(signum)
    if signum == signal.SIGINT:
        print(
            "\n[bonnerlab] Ctrl-C: saving at the next step, then stopping "
            "(Ctrl-C again to abort at once)",
            file=sys.stderr,
            flush=True,
        )
    _stop.set()
    for callback in list(_on_stop):
        callback()


def on_stop(callback: Callable[[], None] | None) -> None:
    """Call `callback` (in the signal handler, so: short, no locks) when a stop is requested;
    None clears it."""
    _on_stop.clear()
    if callback is not None:
        _on_stop.append(callback)


def stop_requested() -> bool:
    return _stop.is_set()


def received() -> list[int]:
    """The signals that asked for a stop since the last `reset`, oldest first."""
    return list(_received)


def reset() -> None:
    _stop.clear()
    _received.clear()


Handlers = dict[int, Callable[..., Any] | int | None]


def install_handlers(signals: tuple[int, ...] = STOP_SIGNALS) -> Handlers:
    """Route `signals` to `request_stop`; returns the previous handlers. Only valid in the main
    thread."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, request_stop)
    return previous


def enable_crash_stacks() -> None:
    """A process killed by a fatal signal (SIGSEGV, or SIGABRT from C++ code such as a collective
    library's thread) prints its Python stack to stderr: torchrun's own report says only
    "exitcode -6". Skipped where stderr has no file descriptor (a notebook, a captured stream)."""
    import faulthandler
    import io

    with contextlib.suppress(io.UnsupportedOperation, ValueError, RuntimeError):
        faulthandler.enable()


def restore_handlers(previous: Handlers) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
