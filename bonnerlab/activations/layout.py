"""The store's layout in names, and the digests its identity is made of: what the writer
(`store`) and `verify` share. Nothing here imports zarr or torch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PRESENTATION = "presentation"
COORDS = ("stimulus", "label")
CONTENT = "content_hash"  # per row: the stimulus's content, written with the row's chunk
DONE_DIR = ".done"
# 2: content hashes, crc32c on every chunk, all-NaN chunks written; 1 (no `format`): neither.
# Layers sharded along their features are format 2 too: each array's zarr metadata says whether
# it is sharded (the store reads its layout from there), so stores written before still resume.
FORMAT = 2
CONTENT_KEY = "content_sha256"  # the identity's part that finalize adds: all rows' content


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides the store's contents."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def identity_fingerprint(identity: dict[str, Any]) -> str:
    """The fingerprint a run compares to decide whether it may reuse a store: everything but the
    rows' content (which finalize adds, and each run checks row by row)."""
    return fingerprint({k: v for k, v in identity.items() if k != CONTENT_KEY})


def stimuli_digest(ids: Sequence[str], coords: dict[str, np.ndarray]) -> str:
    """sha256 of the stimulus ids in order and the sheet's columns: the identity's
    `stimuli_sha256`, which `verify` recomputes from the stored coordinates."""
    h = hashlib.sha256("\n".join(ids).encode())
    for name, values in sorted(coords.items()):
        h.update(name.encode())
        h.update("\n".join(map(str, np.asarray(values).tolist())).encode())
    return h.hexdigest()


def content_digest(hashes: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()
