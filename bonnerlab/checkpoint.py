"""Checkpoints: atomic save, weights-only load, and everything needed to resume exactly."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonnerlab.errors import CheckpointError
from bonnerlab.runs import NEWEST, RunPaths, atomic_write_bytes, latest_run


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # MT19937 keys followed by the position in them
        "numpy": torch.from_numpy(
            np.append(np.random.get_state()[1], np.random.get_state()[2]).astype(np.int64)
        ),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's own GPU only: resuming where fewer GPUs are visible must still work.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"].numpy()
    np.random.set_state(
        ("MT19937", numpy_state[:-1].astype(np.uint32), int(numpy_state[-1]), 0, 0.0)
    )
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list | tuple):  # checkpoints written before: one state per visible GPU
            cuda = cuda[0] if cuda else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialize to memory, then temp file + rename: a kill mid-save leaves the old file intact."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def why_unreadable(path: Path, error: BaseException) -> str:
    """Why torch.load or safetensors could not read `path`, in a few words, never empty: torch.load
    raises a bare `EOFError` for a 0-byte file (an interrupted copy, download or save)."""
    unfinished = "a copy, download or save that did not finish?"
    if path.stat().st_size == 0:
        return f"the file is empty (0 bytes): {unfinished}"
    if isinstance(error, EOFError):
        return f"the file ends early (EOFError): {unfinished}"
    # the first sentence: torch's zip reader appends a paragraph about internal miniz errors
    first = str(error).strip().splitlines()[0].split(". ")[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary code from pickles); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a checkpoint: {why_unreadable(path, e)}"
        ) from e
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a bonnerlab checkpoint (no model/config)")
    return payload


def find_checkpoint(
    run_or_file: str | Path = "", which: str = "best", runs_root: str | Path = "runs"
) -> Path:
    """A checkpoint file from a file path, a run folder, or the newest run under `runs_root`
    (`newest`, unless a folder of that name is here; or empty)."""
    if not str(run_or_file) or (str(run_or_file) == NEWEST and not Path(NEWEST).exists()):
        run = latest_run(runs_root)
        if run is None:
            raise CheckpointError(
                f"no runs under {runs_root}/; train one first or pass --checkpoint"
            )
        run_or_file = run
    path = Path(run_or_file)
    if path.is_dir():
        paths = RunPaths(path)
        chosen = paths.best if which == "best" else paths.latest
        if not chosen.exists() and paths.latest.exists():
            chosen = paths.latest
        if not chosen.exists():
            raise CheckpointError(f"run folder {path} has no checkpoints/{which}.pt")
        return chosen
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    return path
