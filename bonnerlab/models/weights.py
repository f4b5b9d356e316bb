"""Weights files: reading a state dict from any of the formats labs pass around, checking it fits,
hashing files and weights, and the one-line error for a download that cannot happen offline."""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonnerlab.checkpoint import why_unreadable
from bonnerlab.errors import UserError, WeightsError

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """sha256 over parameter/buffer names and bytes: identifies the weights whatever their
    source."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # a view, no copy
    return h.hexdigest()


def is_weights_file(weights: str) -> bool:
    path = Path(weights)
    return path.suffix in WEIGHT_FILE_SUFFIXES or path.is_file()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pt/.pth/.safetensors file (or a bonnerlab checkpoint's model)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot load weights file {path}: {why_unreadable(path, e)}") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a bonnerlab checkpoint
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # open_clip / lightning checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict")
    return obj


def check_weights_file(path: Path) -> None:
    """A 0-byte or cut-short weights file as one line naming it, before a library reads it (theirs
    name no file, and torch.load of an empty file raises a bare EOFError). Reads only the
    header: the safetensors header lists every tensor's extent, and torch's zip format keeps its
    directory at the end, so a file cut short anywhere fails here."""
    try:
        if path.stat().st_size == 0:
            raise EOFError
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        else:
            with open(path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6
            if zipped:
                zipfile.ZipFile(path).close()  # reads the directory at the end
    except Exception as e:
        raise WeightsError(f"cannot load weights file {path}: {why_unreadable(path, e)}") from e


def folder_weights(folder: Path) -> list[Path]:
    """The weights files of a save_pretrained-style folder, each checked (`check_weights_file`)."""
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES and p.is_file())
    for path in found:
        check_weights_file(path)
    return found


def fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)


def load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], weights: str, arch: str
) -> None:
    """Load `state` into `model`, or a one-line error saying what does not fit."""
    if not fits(model, state):
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        shape = [k for k in own if k in state and own[k].shape != state[k].shape]
        detail = (
            f"missing {missing[:2]}"
            if missing
            else f"unexpected {extra[:2]}"
            if extra
            else f"shape differs at {shape[:2]}"
        )
        raise WeightsError(f"weights {weights} do not fit model.arch {arch}: {detail}")
    model.load_state_dict(state)


@contextlib.contextmanager
def downloading(
    what: str,
    cache: str,
    local: str = "a local file with --model.weights /path/to/weights",
    detail: bool = False,
) -> Iterator[None]:
    """Turn a failed download (URLError, HTTPError, socket errors, a hub library's own: offline)
    into one line naming the two fixes; `detail` adds the library's first line of error."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        reason = (
            f"{type(e).__name__}: {first}" if detail and first else f"{type(e).__name__}: offline?"
        )
        raise WeightsError(
            f"cannot {what} ({reason}); download it on a login node with internet (it lands in "
            f"{cache}) or pass {local}"
        ) from e
