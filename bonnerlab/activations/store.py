"""The activation store: one Zarr (v3) store per extraction, read lazily with xarray.

Layout of `<store>.zarr/`:
```
zarr.json                 group attrs: identity + fingerprint, provenance, chunk size, complete
stimulus, label, ...      coordinates along `presentation` (written once, at creation; a stimulus
                          sheet's extra columns are typed coordinates too)
<layer>/                  one array per layer: (presentation, channel, y, x) or
                          (presentation, neuroid)
.done/<layer>/<chunk>     a marker per finished chunk, written temp + rename (atomic)
```
Why this shape:
- Arrays are chunked along `presentation` only, one chunk per batch, so a batch is written as
  whole chunk files: no read-modify-write, no locks, and a shard owns a chunk-aligned range.
- A chunk counts as done only when its marker exists; the marker is written after the chunk, so a
  job killed at any point redoes exactly the unmarked chunks (same batches, same bits).
- The store is first built in a temporary folder and renamed into place, so two shards starting at
  once never see (or clobber) a half-made store: one rename wins, the other opens the winner's.
- No HDF5, no file locks: safe on network filesystems.

The writer side; analysis reads with `bonnerlab.activations.reader`. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.errors import StoreError

PRESENTATION = "presentation"
COORDS = ("stimulus", "label")
DONE_DIR = ".done"


@contextlib.contextmanager
def _quiet_zarr():
    # Zarr warns that consolidated metadata is not in the v3 spec yet, and that `.done` is not a
    # zarr node; both are expected here and would only clutter job logs and notebooks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component.*")
        yield


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that decides the store's contents."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any, n: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


@dataclass
class LayerSpec:
    """One layer's array: feature dims and shape (without the presentation dim) and its attrs."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str = "float32"
    attrs: dict[str, Any] = field(default_factory=dict)


def shard_chunks(n_chunks: int, shard_index: int, num_shards: int) -> range:
    """The contiguous, disjoint range of chunk ids that shard `shard_index` of `num_shards` owns."""
    if not 0 <= shard_index < num_shards:
        raise StoreError(f"shard_index {shard_index} is out of range for num_shards {num_shards}")
    base, extra = divmod(n_chunks, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return range(start, start + base + (1 if shard_index < extra else 0))


class ActivationStore:
    """Writer side of a store: which chunks are missing, write one chunk, finalize."""

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        with _quiet_zarr():
            self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        attrs = dict(self.group.attrs)
        if "bonnerlab" not in attrs:
            raise StoreError(f"{self.path} is not a bonnerlab activation store")
        meta = attrs["bonnerlab"]
        self.layers: list[str] = list(meta["layers"])
        self.n: int = int(meta["n_presentations"])
        self.chunk_size: int = int(meta["chunk_size"])
        self.fingerprint: str = meta["fingerprint"]
        self.identity: dict[str, Any] = meta["identity"]
        self._arrays = {name: self.group[name] for name in self.layers}

    # ------------------------------------------------------------------ chunks and markers
    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.n))

    def _marker(self, layer: str, chunk: int) -> Path:
        return self.path / DONE_DIR / layer / str(chunk)

    def clear_partial_writes(self, chunks: Iterable[int]) -> int:
        """Remove zarr's half-written temp files (`*.partial`) from `chunks`, left by a process
        killed mid-write; only chunks this process is about to rewrite, since a sibling shard
        may be writing its own chunks right now. Returns how many were removed."""
        removed = 0
        for layer in self.layers:
            for chunk in chunks:
                folder = self.path / layer / "c" / str(chunk)
                if folder.is_dir():
                    for leftover in folder.rglob("*.partial"):
                        leftover.unlink(missing_ok=True)
                        removed += 1
        return removed

    def missing_chunks(self, chunks: Iterable[int] | None = None) -> list[int]:
        chunks = range(self.n_chunks) if chunks is None else chunks
        done = {layer: set(os.listdir(self.path / DONE_DIR / layer)) for layer in self.layers}
        return [c for c in chunks if any(str(c) not in done[layer] for layer in self.layers)]

    def write_chunk(
        self, chunk: int, data: dict[str, np.ndarray], skipped: Sequence[str] = ()
    ) -> None:
        """Write one chunk of every layer, then mark each one done (temp file + rename)."""
        sl = self.chunk_slice(chunk)
        payload = json.dumps({"skipped": list(skipped)}) if skipped else ""
        for layer in self.layers:
            values = data[layer]
            if values.shape[0] != sl.stop - sl.start:
                raise ValueError(
                    f"chunk {chunk} of {layer}: {values.shape[0]} rows, "
                    f"expected {sl.stop - sl.start}"
                )
            self._arrays[layer][sl] = values
            marker = self._marker(layer, chunk)
            tmp = marker.with_name(f".{chunk}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.write_text(payload)
            os.replace(tmp, marker)

    def skipped_stimuli(self) -> list[str]:
        """Stimuli that could not be read (their rows are NaN), from the chunk markers."""
        out: list[str] = []
        first = self.path / DONE_DIR / self.layers[0]
        for name in sorted(os.listdir(first), key=lambda s: int(s) if s.isdigit() else -1):
            if not name.isdigit():
                continue
            text = (first / name).read_text()
            if text:
                out.extend(json.loads(text)["skipped"])
        return out

    def finalize(self) -> dict[str, Any]:
        """Check every chunk of every layer is marked, then consolidate the metadata."""
        import zarr

        missing = self.missing_chunks()
        if missing:
            raise StoreError(
                f"{self.path}: {len(missing)} of {self.n_chunks} chunks not written yet "
                f"(first missing: {missing[:5]}); run the remaining shards (same config) first"
            )
        skipped = self.skipped_stimuli()
        meta = dict(self.group.attrs["bonnerlab"])
        meta.update(complete=True, skipped_stimuli=skipped)
        with _quiet_zarr():
            self.group.attrs["bonnerlab"] = meta
            zarr.consolidate_metadata(str(self.path), zarr_format=3)
        return {"store": str(self.path), "chunks": self.n_chunks, "skipped": len(skipped)}


def open_store(
    path: str | Path,
    *,
    identity: dict[str, Any],
    layers: Sequence[LayerSpec],
    stimuli: Sequence[str],
    labels: Sequence[int] | None,
    chunk_size: int,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
    compression: str = "zstd",
    coords: dict[str, np.ndarray] | None = None,
) -> tuple[ActivationStore, str]:
    """Open the store at `path` for writing, creating it if needed.

    Returns the store and what happened: "created", "reused" (same fingerprint: resume or no-op)
    or "replaced" (different fingerprint and `overwrite`). A store made with a different identity
    is refused unless `overwrite`; a path that is not a zarr store is never touched.
    """
    path = Path(path)
    fp = fingerprint(identity)
    for _attempt in range(3):
        if path.exists():
            existing = _read_meta(path)
            if existing is None:
                raise StoreError(
                    f"{path} exists and is not an activation store; choose another output path"
                )
            if existing.get("fingerprint") == fp:
                return ActivationStore(path), "reused"
            if not overwrite:
                diff = _differences(existing.get("identity", {}), identity)
                raise StoreError(
                    f"{path} was made with a different config "
                    f"({'; '.join(diff[:3]) or 'unknown'}); "
                    "pass --overwrite to replace it or choose another output path"
                )
            # Rename aside first: atomic, so of several shards told to overwrite only one
            # removes it.
            aside = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
            overwrite = False  # the old one is gone; a store that appears now is a sibling shard's
            outcome = "replaced"
        else:
            outcome = "created"
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        _create(
            tmp,
            fp,
            identity,
            layers,
            stimuli,
            labels,
            chunk_size,
            attrs or {},
            compression,
            coords or {},
        )
        try:
            os.rename(tmp, path)
        except OSError:
            # Another shard renamed its store into place first; use that one if it matches.
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        return ActivationStore(path), outcome
    raise StoreError(f"{path}: could not create the store (other jobs keep replacing it)")


def _read_meta(path: Path) -> dict[str, Any] | None:
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta.get("attributes", {}).get("bonnerlab")


def _compressors(name: str) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return None
    if name == "zstd":
        return ZstdCodec(level=1)
    if name == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    raise StoreError(f"compression must be none, zstd or lz4; got {name!r}")


def _create(
    path: Path,
    fp: str,
    identity: dict[str, Any],
    layers: Sequence[LayerSpec],
    stimuli: Sequence[str],
    labels: Sequence[int] | None,
    chunk_size: int,
    attrs: dict[str, Any],
    compression: str,
    coords: dict[str, np.ndarray],
) -> None:
    import zarr

    names = [spec.name for spec in layers]
    coord_names = (*COORDS, *coords)
    clash = set(names) & set(coord_names)
    if clash or len(set(names)) != len(names) or not names:
        raise StoreError(f"layer names must be unique and not {coord_names}; got {names}")
    n = len(stimuli)
    with _quiet_zarr():
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs["bonnerlab"] = {
            "fingerprint": fp,
            "identity": identity,
            "layers": names,
            "n_presentations": n,
            "chunk_size": chunk_size,
            "complete": False,
            "skipped_stimuli": [],
            **attrs,
        }
        stim = group.create_array(
            "stimulus", shape=(n,), dtype=str, chunks=(max(n, 1),), dimension_names=[PRESENTATION]
        )
        stim[:] = np.asarray(list(stimuli), dtype=str)
        lab = group.create_array(
            "label",
            shape=(n,),
            dtype="int64",
            chunks=(max(n, 1),),
            dimension_names=[PRESENTATION],
            fill_value=-1,
        )
        lab[:] = np.asarray(list(labels) if labels is not None else [-1] * n, dtype=np.int64)
        for name, values in coords.items():  # sheet columns: typed coordinates on presentation
            values = np.asarray(values)
            dtype = str if values.dtype.kind in "OUS" else values.dtype
            arr = group.create_array(
                name, shape=(n,), dtype=dtype, chunks=(max(n, 1),), dimension_names=[PRESENTATION]
            )
            arr[:] = values.astype(str) if dtype is str else values
        for spec in layers:
            group.create_array(
                spec.name,
                shape=(n, *spec.shape),
                dtype=spec.dtype,
                chunks=(chunk_size, *spec.shape),
                dimension_names=[PRESENTATION, *spec.dims],
                compressors=_compressors(compression),
                fill_value=np.nan,
                attributes={"coordinates": " ".join(coord_names), **spec.attrs},
            )
            (path / DONE_DIR / spec.name).mkdir(parents=True)


def finalize(path: str | Path) -> dict[str, Any]:
    """Finalize a store by hand (after all shards ran):
    `python -m bonnerlab.activations finalize PATH`."""
    if not Path(path, "zarr.json").is_file():
        raise StoreError(f"{path} is not an activation store")
    return ActivationStore(path).finalize()
