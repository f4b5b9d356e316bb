"""Cooperative stop: a signal sets a flag, the training loop saves at the next step boundary.

SLURM sends SIGTERM on preemption (and after a time limit's grace signal, submitit's SIGUSR2).
Killing the process from inside the handler would lose the step in flight and could leave a
half-written checkpoint, so handlers only set a flag that `train` polls between steps.
"""

from __future__ import annotations

import signal
import threading

_stop = threading.Event()


def request_stop(*_args: object) -> None:
    """Ask the running job to save and return at the next step boundary (usable as a handler)."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def reset() -> None:
    _stop.clear()


def install_handlers(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR2)) -> None:
    """Route `signals` to `request_stop`. Only valid in the main thread."""
    for sig in signals:
        signal.signal(sig, request_stop)
