"""The activation store: one Zarr (v3) store per extraction, read lazily with xarray.

Layout of `<store>.zarr/`:
```
zarr.json                 group attrs: identity + fingerprint, provenance, chunk size, complete
stimulus, label, ...      coordinates along `presentation` (written once, at creation; a stimulus
                          sheet's extra columns are typed coordinates too)
content_hash              a coordinate too: each stimulus's content (blake2b of the file's bytes,
                          or of the array), written with its chunk
<layer>/                  one array per layer: (presentation, channel, y, x) or
                          (presentation, neuroid); c/<chunk>/0/... one shard file per batch
.done/<layer>/<chunk>     a marker per finished chunk, written temp + rename (atomic)
```
Why this shape:
- A layer has one file per batch (a zarr shard spanning the batch's rows and every feature), so a
  batch is written as whole files: no read-modify-write, no locks, and a job shard owns a
  chunk-aligned range. The store writes that file itself (`_write_shard`): zarr would read the
  old one first, and fail on a damaged one.
- Inside, the file holds inner chunks (the decode units) of a few indices of the first feature
  dim, ~FEATURES_PER_INNER_CHUNK features each (`array.chunks[1]` indices): an analysis reading a
  panel of features (`da[:, a:b]`, every stimulus, as the Gram does) decodes only the inner chunks
  holding it, each once, not every batch whole.
- A store written before sharding (format 2, one chunk per batch) keeps its layout: everything
  here reads the layout from each array's metadata, never from the constants.
- A chunk counts as done only when its marker exists; the marker is written after the chunk, so a
  job killed at any point redoes exactly the unmarked chunks (same batches, same bits).
- The store is first built in a temporary folder and renamed into place, so two shards starting at
  once never see (or clobber) a half-made store: one rename wins, the other opens the winner's.
- No HDF5, no file locks: safe on network filesystems.
- Every chunk file, and in a shard every inner chunk and the index, ends in a crc32c checksum
  (zarr's codec, after any compression) and is written even when it holds only NaN, so a missing
  or damaged chunk is found without decoding (`verify`, the reader), named down to the inner
  chunk's features, and rewritten by the next run, never read as NaN.
- The identity fingerprint decides whether a run may reuse a store; finalizing folds the rows'
  content hashes into it (`content_sha256`), so a cache keyed by the fingerprint (the analysis
  Gram) changes when any stimulus did.

The writer side; analysis reads with `bonnerlab.activations.reader`. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.activations.layout import (
    CONTENT,
    CONTENT_KEY,
    COORDS,
    DONE_DIR,
    FORMAT,
    PRESENTATION,
    content_digest,
    fingerprint,
    identity_fingerprint,
    stimuli_digest,
)
from bonnerlab.activations.shard_file import (
    DAMAGED,
    as_array,
    crc_ok,
    ends_in_crc,
    entry_problem,
    inner_per_shard,
    read_index,
    sharding_codec,
    tail,
    thread_buffer,
    through,
)
from bonnerlab.activations.verify import verify_store
from bonnerlab.errors import StoreError

__all__ = [  # the layout's names, for the modules that import them from here
    "CONTENT",
    "COORDS",
    "DONE_DIR",
    "PRESENTATION",
    "fingerprint",
    "stimuli_digest",
]


@contextlib.contextmanager
def _quiet_zarr():
    # Zarr warns that consolidated metadata is not in the v3 spec yet, and that `.done` is not a
    # zarr node; both are expected here and would only clutter job logs and notebooks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component.*")
        yield


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - {CONTENT_KEY})
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
    """Writer side of a store: which chunks are missing or damaged, write one chunk, finalize."""

    def __init__(self, path: str | Path, mode: str = "r+"):
        import zarr

        self.path = Path(path)
        with _quiet_zarr():
            self.group = zarr.open_group(str(self.path), mode=mode, zarr_format=3)
        attrs = dict(self.group.attrs)
        if "bonnerlab" not in attrs:
            raise StoreError(f"{self.path} is not a bonnerlab activation store")
        meta = attrs["bonnerlab"]
        self.layers: list[str] = list(meta["layers"])
        self.n: int = int(meta["n_presentations"])
        self.chunk_size: int = int(meta["chunk_size"])
        self.fingerprint: str = meta["fingerprint"]
        self.identity: dict[str, Any] = meta["identity"]
        self.format: int = int(meta.get("format", 1))
        self.key: str = meta.get("store_id") or self.fingerprint  # this store, not its config
        self._arrays: dict[str, Any] = {}  # opened when first used
        self._decoders: dict[str, Any] = {}  # read_features' decoder per layer
        self._content = self.group[CONTENT] if (self.path / CONTENT).is_dir() else None

    # ------------------------------------------------------------------ chunks and markers
    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    @property
    def has_content(self) -> bool:
        return self._content is not None

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.n))

    def array(self, name: str) -> Any:
        """The zarr array of a layer (or coordinate), opened once. `write_empty_chunks` is a
        runtime setting, not stored in the metadata: without it here, zarr would skip an all-NaN
        chunk (or inner chunk) written through a reopened store, and that gap would read as
        damage."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def inner_chunk_width(self, layer: str) -> int | None:
        """How many indices of the first feature dim one inner chunk of a sharded layer spans
        (its `array.chunks[1]`); None for a layer written without shards (format 2 before
        sharding: one chunk file = one decode unit)."""
        array = self.array(layer)
        if getattr(array, "shards", None) is None or array.ndim < 2:
            return None
        return int(array.chunks[1])

    def chunk_file(self, layer: str, chunk: int) -> Path:
        array = self.array(layer)
        return (
            self.path / layer / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
        )

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

    def content_hashes(self) -> np.ndarray:
        """Every row's content hash ("" where none was recorded: not yet written, an unreadable
        file, or a store written without them)."""
        if self._content is None:
            return np.full(self.n, "", dtype=object)
        return np.asarray(self._content[:], dtype=object)

    def write_chunk(
        self,
        chunk: int,
        data: dict[str, np.ndarray],
        skipped: Sequence[str] = (),
        content: Sequence[str] | None = None,
        keep: Sequence[int] = (),
    ) -> None:
        """Write one chunk of every layer (its rows' content hashes first), then mark each layer
        done (temp file + rename). Rows `keep` (positions in the chunk) keep their stored values
        (`--update`: only the changed rows change). A chunk that is rewritten loses its markers
        first, so a kill halfway never leaves a marked chunk half old, half new."""
        sl = self.chunk_slice(chunk)
        for layer in self.layers:
            self._marker(layer, chunk).unlink(missing_ok=True)
        if content is not None and self._content is not None:
            self._content[sl] = np.asarray(list(content), dtype=str)
        payload = json.dumps({"skipped": list(skipped)}) if skipped else ""
        for layer in self.layers:
            values = data[layer]
            if values.shape[0] != sl.stop - sl.start:
                raise ValueError(
                    f"chunk {chunk} of {layer}: {values.shape[0]} rows, "
                    f"expected {sl.stop - sl.start}"
                )
            if len(keep):
                values = np.array(values)
                values[list(keep)] = self.read_chunk(layer, chunk)[list(keep)]
            if sharding_codec(self.array(layer)) is None:
                self.array(layer)[sl] = values  # one whole chunk file: zarr reads nothing
            else:
                self._write_shard(layer, chunk, values)
            marker = self._marker(layer, chunk)
            tmp = marker.with_name(f".{chunk}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.write_text(payload)
            os.replace(tmp, marker)

    def _write_shard(self, layer: str, chunk: int, values: np.ndarray) -> None:
        """One chunk of a sharded layer as its whole shard file, written temp + rename.

        Not `array[rows] = values`: zarr merges any write into the shard file already there
        (reading it, and failing on a damaged one, so a rerun could not repair it) even when the
        write covers it whole, and copies each inner chunk into a fresh NaN-filled one, then
        the whole shard into one buffer (a ResNet-50 batch: +14-23% CPU over unsharded, against
        +0-8% here, and 1.6x the memory; bench/bench_store_write.py). Here
        zarr's own codecs (the layer's inner pipeline) encode each inner chunk from its slice of
        the batch, and the file is their bytes then the index, in the order zarr writes: the
        same bytes as `array[rows] = values` (tests/unit/test_store_sharding.py checks it)."""
        import google_crc32c
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.buffer.cpu import NDBuffer
        from zarr.core.common import concurrent_map
        from zarr.core.sync import sync

        array = self.array(layer)
        sharding = sharding_codec(array)
        per_shard = inner_per_shard(array)
        if any(n != 1 for i, n in enumerate(per_shard) if i != 1):
            # not split as `_create` does (along the first feature dim only): zarr's way
            self.chunk_file(layer, chunk).unlink(missing_ok=True)  # so it reads no old shard
            array[self.chunk_slice(chunk)] = values
            return
        shard = tuple(array.shards)
        values = np.asarray(values, dtype=array.dtype)
        if values.shape != shard:  # the last chunk's rows, a padded feature dim: fill the rest
            block = np.full(shard, array.fill_value, dtype=array.dtype)
            block[tuple(slice(0, n) for n in values.shape)] = values
            values = block
        spec = sharding._get_chunk_spec(
            array.metadata.get_chunk_spec(
                (chunk,) + (0,) * (array.ndim - 1), array.config, default_buffer_prototype()
            )
        )
        pieces = [values]  # no feature dims: one inner chunk
        if array.ndim > 1:
            width = array.chunks[1]
            pieces = [values[:, j : j + width] for j in range(0, shard[1], width)]

        async def encode(piece: np.ndarray) -> Any:
            # copied out of the batch here, under the limit: a few inner chunks at a time
            buffer = NDBuffer.from_numpy_array(np.ascontiguousarray(piece))
            [out] = await sharding.codec_pipeline.encode([(buffer, spec)])
            return out

        # as zarr encodes chunks: concurrently, on its threads (the codecs release the GIL)
        limit = zarr.config.get("async.concurrency")
        encoded = sync(concurrent_map([(p,) for p in pieces], encode, limit))
        parts = [b.as_numpy_array() for b in encoded]  # every inner chunk, all-NaN ones too
        sizes = np.array([p.nbytes for p in parts], dtype="<u8")
        index = np.stack([np.cumsum(sizes) - sizes, sizes], axis=1).astype("<u8").tobytes()
        index += np.uint32(google_crc32c.value(index)).astype("<u4").tobytes()
        path = self.chunk_file(layer, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")  # as zarr names its
        try:
            with open(tmp, "wb") as f:
                f.writelines([*parts, index])
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ damage
    def _where(self, layer: str, chunk: int, inner: int | None = None) -> str:
        """The store, layer and chunk (its rows), and a sharded layer's inner chunk `inner` (its
        range of the first feature dim)."""
        sl = self.chunk_slice(chunk)
        where = f"{self.path}: layer {layer} chunk {chunk} (rows {sl.start}-{sl.stop - 1})"
        if inner is None:
            return where
        array = self.array(layer)
        if array.ndim < 2:
            return f"{where}, its only inner chunk"
        width = self.inner_chunk_width(layer) or array.shape[1]
        stop = min((inner + 1) * width, array.shape[1])
        dim = (array.metadata.dimension_names or [None, "feature"])[1]
        return f"{where}, inner chunk {inner} ({dim} {inner * width}-{stop - 1})"

    def chunk_skipped(self, chunk: int, layer: str | None = None) -> list[str]:
        """The stimuli recorded as unreadable in one chunk (its marker); [] if unmarked."""
        try:
            text = self._marker(layer or self.layers[0], chunk).read_text()
        except FileNotFoundError:
            return []
        return json.loads(text)["skipped"] if text else []

    def check_chunk_file(
        self, layer: str, chunk: int, checksum: bool = True, features: range | None = None
    ) -> str | None:
        """Why one written chunk file is damaged (missing; a crc32c does not match), or None.
        Decodes nothing. With `checksum`, reads the file's bytes and checks its crc32c or, for a
        sharded layer (a file per chunk holding inner chunks, each with its own crc32c, and an
        index with one), every inner chunk's or only those holding `features` (indices of the
        first feature dim). Without, only that the file is there and, sharded, that its index is
        whole and lists the inner chunks (zarr would read a never-written one as NaN).
        Format-1 stores have no checksums (and left all-NaN chunks unwritten)."""
        path = self.chunk_file(layer, chunk)
        sharded = sharding_codec(self.array(layer)) is not None and self.checksummed(layer)
        try:
            if checksum:
                data = path.read_bytes()
            elif sharded:
                data = tail(path, self._index_size(layer))  # the index and the file's size
            elif not path.is_file():
                raise FileNotFoundError(path)
        except FileNotFoundError:
            sl = self.chunk_slice(chunk)
            if self.format < 2 and len(self.chunk_skipped(chunk, layer)) == sl.stop - sl.start:
                return None  # every row unreadable: zarr 3 did not write an all-NaN chunk
            return f"{self._where(layer, chunk)}: its file {path.relative_to(self.path)} is missing"
        if sharded:
            return self._check_shard(layer, chunk, data, features)
        if checksum and self.checksummed(layer) and not crc_ok(data):
            return f"{self._where(layer, chunk)}: its {DAMAGED}"
        return None

    def _index_size(self, layer: str) -> int:
        """Bytes of a sharded layer's shard index: 16 per inner chunk, then a crc32c."""
        array = self.array(layer)
        return 16 * int(np.prod(inner_per_shard(array))) + 4

    def _check_shard(
        self, layer: str, chunk: int, data: bytes | tuple[bytes, int], features: range | None
    ) -> str | None:
        """The first damage in a shard file (`data`: its bytes, or its index and size). The index
        (at the end: zarr's default, required by `checksummed`) is one little-endian uint64
        (offset, nbytes) pair per inner chunk in C order (2**64-1 twice: never written), then its
        crc32c; each inner chunk ends in its own crc32c (checked when `data` is all the bytes)."""
        array = self.array(layer)
        per_shard = inner_per_shard(array)
        size = self._index_size(layer)
        index_bytes, file_size = data if isinstance(data, tuple) else (data[-size:], len(data))
        index = read_index(index_bytes, file_size, size)
        if index is None:
            return f"{self._where(layer, chunk)}: its shard index {DAMAGED} (or it is truncated)"
        inner = range(len(index))
        if features is not None and array.ndim > 1 and len(index) == per_shard[1]:
            width = array.chunks[1]  # only the first feature dim is split (as `_create` does)
            inner = range(features.start // width, min(len(index), -(-features.stop // width)))
        for j in inner:
            problem = entry_problem(index[j], file_size - size)
            if problem:
                return f"{self._where(layer, chunk, j)}: {problem}"
            offset, nbytes = (int(v) for v in index[j])
            if not isinstance(data, tuple) and not crc_ok(data[offset : offset + nbytes]):
                return f"{self._where(layer, chunk, j)}: its {DAMAGED}"
        return None

    def checksummed(self, layer: str) -> bool:
        """Whether a layer's chunk files can be checked without decoding: each ends in a crc32c
        of the rest (format 2), or is a shard whose index and inner chunks each end in one, with
        the index at the end (zarr's default; `_check_shard` reads it there)."""
        array = self.array(layer)
        sharding = sharding_codec(array)
        if sharding is None:
            return ends_in_crc(array.metadata.codecs)
        return (
            ends_in_crc(sharding.codecs)
            and ends_in_crc(sharding.index_codecs)
            and str(getattr(sharding.index_location, "value", sharding.index_location)) == "end"
        )

    def read_features(
        self, layer: str, chunk: int, features: slice, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        """One chunk's rows of `features` (a range of the first feature dim), read from the shard
        file by the store itself: the index, then only the inner chunks holding them (one read),
        each checked by its crc32c and decoded by its codec (numcodecs' zstd or blosc, or none)
        into `out` (rows, len(features), ...) if given. Less than half the CPU of the same read
        through zarr (bench/bench_analysis.py), and it scales in threads, where zarr's reads
        share one event loop. The read and decode buffers are the calling thread's own, reused:
        fresh ones cost a page fault per 4 kB, as much as the copy. None where this layer's
        layout or codecs are not the writer's (`_create`): read through zarr then. A damaged file
        raises the StoreError `check_chunk_file` names."""
        decode = self._inner_decoder(layer)
        if decode is None:
            return None
        array = self.array(layer)
        width, size = int(array.chunks[1]), self._index_size(layer)
        first, last = features.start // width, -(-features.stop // width)
        path = self.chunk_file(layer, chunk)
        try:
            with open(path, "rb", buffering=0) as f:
                file_size = f.seek(0, os.SEEK_END)
                f.seek(max(0, file_size - size))
                index = read_index(f.read(size), file_size, size)
                if index is None or last > len(index):
                    raise StoreError(self._damage(layer, chunk))
                entries = index[first:last]
                if any(entry_problem(e, file_size - size) for e in entries):
                    raise StoreError(self._damage(layer, chunk))
                start = int(entries[:, 0].min())
                stop = int((entries[:, 0] + entries[:, 1]).max())
                f.seek(start)
                raw = thread_buffer("raw", stop - start)  # the inner chunks in order: one read
                if f.readinto(raw) != len(raw):
                    raise StoreError(self._damage(layer, chunk))
        except FileNotFoundError:
            raise StoreError(self._damage(layer, chunk)) from None
        rows = self.chunk_slice(chunk)
        n_rows, rest = rows.stop - rows.start, tuple(array.shape[2:])
        inner = (int(array.chunks[0]), width, *rest)
        if out is None:
            out = np.empty((n_rows, features.stop - features.start, *rest), dtype=array.dtype)
        piece = thread_buffer("piece", math.prod(inner) * array.dtype.itemsize)
        for j in range(first, last):
            a = int(index[j, 0]) - start
            data = raw[a : a + int(index[j, 1])]
            if not crc_ok(data):
                raise StoreError(self._damage(layer, chunk))
            values = decode(data[:-4], piece).view(array.dtype).reshape(inner)
            lo, hi = max(features.start, j * width), min(features.stop, (j + 1) * width)
            out[:, lo - features.start : hi - features.start] = values[
                :n_rows, lo - j * width : hi - j * width
            ]
        return out

    def _damage(self, layer: str, chunk: int) -> str:
        problem = self.check_chunk_file(layer, chunk) or f"{self._where(layer, chunk)}: unreadable"
        return f"{problem}; rerun the extraction with the same config to rewrite it"

    def _inner_decoder(self, layer: str) -> Any:
        """(bytes, out) -> the decoded bytes as uint8, for a layer sharded as `_create`
        shards (along the first feature dim only, little-endian bytes, one compression codec or
        none, a crc32c last, the index at the end); None for any other layout."""
        if layer in self._decoders:
            return self._decoders[layer]
        array = self.array(layer)
        sharding = sharding_codec(array)
        decode = None
        if (
            sharding is not None
            and self.checksummed(layer)
            and array.ndim > 1
            and all(n == 1 for i, n in enumerate(inner_per_shard(array)) if i != 1)
            and array.dtype.byteorder in "<=|"
        ):
            from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

            codecs = list(sharding.codecs)
            middle = codecs[1:-1]
            if isinstance(codecs[0], BytesCodec) and str(codecs[0].endian.value) == "little":
                if not middle:
                    decode = as_array
                elif len(middle) == 1 and isinstance(middle[0], ZstdCodec):
                    from numcodecs import Zstd

                    decode = through(Zstd())
                elif len(middle) == 1 and isinstance(middle[0], BloscCodec):
                    from numcodecs import Blosc

                    decode = through(Blosc())
        self._decoders[layer] = decode
        return decode

    def read_chunk(self, layer: str, chunk: int) -> np.ndarray:
        """One chunk's values; a StoreError naming the layer and chunk if it cannot be read."""
        try:
            return np.asarray(self.array(layer)[self.chunk_slice(chunk)])
        except Exception as e:  # any codec's error: zstd, blosc, crc32c, a truncated file
            raise StoreError(
                f"{self._where(layer, chunk)} cannot be decoded ({_one_line(e)}); "
                "rerun the extraction with the same config to rewrite it"
            ) from e

    def damaged_chunks(self, chunks: Iterable[int], workers: int = 4) -> dict[int, str]:
        """Marked chunks (of `chunks`) whose file in some layer is missing or damaged, with the
        first problem: what a rerun rewrites. Checksums where the store has them, else a decode."""
        from concurrent.futures import ThreadPoolExecutor

        def problem(chunk: int) -> str | None:
            for layer in self.layers:
                found = self.check_chunk_file(layer, chunk)
                unchecked = not self.checksummed(layer)
                if found is None and unchecked and self.chunk_file(layer, chunk).is_file():
                    try:
                        self.read_chunk(layer, chunk)
                    except StoreError as e:
                        found = str(e)
                if found:
                    return found
            return None

        chunks = list(chunks)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # file reads and crc release the GIL
            found = list(pool.map(problem, chunks))
        return {c: p for c, p in zip(chunks, found, strict=True) if p}

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

    def _set_meta(self, **changes: Any) -> None:
        meta = dict(self.group.attrs["bonnerlab"])
        meta.update(changes)
        with _quiet_zarr():
            self.group.attrs["bonnerlab"] = meta

    def mark_incomplete(self) -> None:
        """Before rewriting chunks of a finished store (repair, --update): readers see it is not
        finished until the run finalizes it again."""
        if self.group.attrs["bonnerlab"].get("complete"):
            self._set_meta(complete=False)

    def finalize(self) -> dict[str, Any]:
        """Check every chunk of every layer is marked and verify the store (chunks decode,
        checksums, ids, NaN rows), fold the rows' content into the identity, consolidate."""
        import zarr

        missing = self.missing_chunks()
        if missing:
            raise StoreError(
                f"{self.path}: {len(missing)} of {self.n_chunks} chunks not written yet "
                f"(first missing: {missing[:5]}); run the remaining shards (same config) first"
            )
        report = verify_store(self)
        if report["problems"]:
            raise StoreError(
                f"{report['problems'][0]} ({len(report['problems'])} problems in all; "
                "rerun the extraction with the same config to rewrite the damaged chunks)"
            )
        skipped = self.skipped_stimuli()
        identity = dict(self.identity)
        if self.has_content:
            identity[CONTENT_KEY] = content_digest(self.content_hashes())
        self.identity, self.fingerprint = identity, fingerprint(identity)
        self._set_meta(
            identity=identity, fingerprint=self.fingerprint, complete=True, skipped_stimuli=skipped
        )
        with _quiet_zarr():
            zarr.consolidate_metadata(str(self.path), zarr_format=3)
        return {
            "store": str(self.path),
            "chunks": self.n_chunks,
            "skipped": len(skipped),
            "verify_seconds": report["seconds"],
        }


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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
    replace: str | None = None,
) -> tuple[ActivationStore, str]:
    """Open the store at `path` for writing, creating it if needed.

    Returns the store and what happened: "created", "reused" (same identity: resume or no-op)
    or "replaced" (different identity and `overwrite`, an older format and `overwrite`, or the
    store whose `key` is `replace`: one whose stimuli changed). A store made with a different
    identity is refused unless `overwrite`; a path that is not a zarr store is never touched.
    """
    path = Path(path)
    fp = identity_fingerprint(identity)
    coord_names = (*COORDS, CONTENT, *(coords or {}))
    names = [spec.name for spec in layers]
    if set(names) & set(coord_names) or len(set(names)) != len(names) or not names:
        raise StoreError(f"layer names must be unique and not {coord_names}; got {names}")
    for _attempt in range(3):
        if path.exists():
            existing = _read_meta(path)
            if existing is None:
                raise StoreError(
                    f"{path} exists and is not an activation store; choose another output path"
                )
            old_format = int(existing.get("format", 1)) < FORMAT
            same = identity_fingerprint(existing.get("identity", {})) == fp
            mine = replace is not None and (existing.get("store_id") or "") == replace
            if same and not old_format and not mine:
                return ActivationStore(path), "reused"
            if old_format and not overwrite:
                raise StoreError(
                    f"{path} was made by an older bonnerlab (no content hashes or checksums); "
                    "pass --overwrite to extract it again, or choose another output path"
                )
            if not same and not overwrite:
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
            # the old one is gone; a store that appears now is a sibling shard's
            overwrite, replace = False, None
            outcome = "replaced"
        else:
            outcome = "created"
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            _create(
                tmp,
                fingerprint(identity),
                identity,
                layers,
                stimuli,
                labels,
                chunk_size,
                attrs or {},
                compression,
                coords or {},
            )
            os.rename(tmp, path)
        except OSError:
            # Another shard renamed its store into place first; use that one if it matches.
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-made store behind
            raise
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


def _compressors(name: str) -> list[Any]:
    """The bytes codecs of a layer's chunks: the compression, then a crc32c checksum (always:
    `verify`, the reader and a rerun find a damaged chunk by it)."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if name == "none":
        return [Crc32cCodec()]
    if name == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    raise StoreError(f"compression must be none, zstd or lz4; got {name!r}")


# A layer's inner chunks (decode units) split its first feature dim into blocks of about this
# many features: an analysis reading a panel of features (a range of channels or neuroids, every
# stimulus) decodes only the inner chunks holding it, ~1 MiB of float32 each at batch 64, while a
# batch is still written as one shard file per layer.
FEATURES_PER_INNER_CHUNK = 4096


def shard_and_inner_chunk(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A layer's shard and inner chunk shapes without the presentation dim. The inner chunk is
    k indices of the first feature dim by the rest whole, k * (the rest's size) about
    FEATURES_PER_INNER_CHUNK (at least 1, at most all). Zarr wants the shard a multiple of the
    inner chunk: k is the largest divisor of the dim not above that target when one is at least
    half of it (ResNet's 512 channels of 28x28: 4, not 5), else the target, and the shard runs
    past the array's edge to the next multiple of k (the last inner chunk is partly padding)."""
    if not shape:
        return (), ()
    first, rest = int(shape[0]), int(np.prod(shape[1:]))
    target = min(max(1, FEATURES_PER_INNER_CHUNK // max(rest, 1)), max(first, 1))
    k = max(d for d in range(1, target + 1) if first % d == 0)
    if 2 * k < target:
        k = target
    return (-(-first // k) * k, *shape[1:]), (k, *shape[1:])


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
    from zarr.codecs import Crc32cCodec

    names = [spec.name for spec in layers]
    coord_names = (*COORDS, CONTENT, *coords)
    n = len(stimuli)
    # every chunk file is written, NaN-only ones too: a missing file is then always damage
    always = {"write_empty_chunks": True}
    whole = {"chunks": (max(n, 1),), "dimension_names": [PRESENTATION]}
    with _quiet_zarr():
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs["bonnerlab"] = {
            "fingerprint": fp,
            "identity": identity,
            "format": FORMAT,
            "store_id": uuid.uuid4().hex,
            "layers": names,
            "n_presentations": n,
            "chunk_size": chunk_size,
            "complete": False,
            "skipped_stimuli": [],
            **attrs,
        }
        stim = group.create_array(
            "stimulus", shape=(n,), dtype=str, compressors=[Crc32cCodec()], **whole
        )
        stim[:] = np.asarray(list(stimuli), dtype=str)
        lab = group.create_array(
            "label", shape=(n,), dtype="int64", fill_value=-1, compressors=[Crc32cCodec()], **whole
        )
        lab[:] = np.asarray(list(labels) if labels is not None else [-1] * n, dtype=np.int64)
        for name, values in coords.items():  # sheet columns: typed coordinates on presentation
            values = np.asarray(values)
            dtype = str if values.dtype.kind in "OUS" else values.dtype
            arr = group.create_array(
                name, shape=(n,), dtype=dtype, compressors=[Crc32cCodec()], **whole
            )
            arr[:] = values.astype(str) if dtype is str else values
        group.create_array(  # filled chunk by chunk, with the activations
            CONTENT,
            shape=(n,),
            dtype=str,
            chunks=(chunk_size,),
            dimension_names=[PRESENTATION],
            compressors=[Crc32cCodec()],
            config=always,
        )
        for spec in layers:
            shard, inner = shard_and_inner_chunk(spec.shape)
            group.create_array(
                spec.name,
                shape=(n, *spec.shape),
                dtype=spec.dtype,
                shards=(chunk_size, *shard),  # one file per batch, as a chunk was
                chunks=(chunk_size, *inner),
                dimension_names=[PRESENTATION, *spec.dims],
                compressors=_compressors(compression),
                fill_value=np.nan,
                attributes={"coordinates": " ".join(coord_names), **spec.attrs},
                config=always,
            )
            (path / DONE_DIR / spec.name).mkdir(parents=True)


def verify(path: str | Path, workers: int = 4) -> dict[str, Any]:
    """Verify the store at `path` (see `bonnerlab.activations.verify`); the report's `problems`
    is empty when it is whole."""
    if not Path(path, "zarr.json").is_file():
        raise StoreError(f"{path} is not an activation store")
    return verify_store(ActivationStore(path, mode="r"), workers)


def finalize(path: str | Path) -> dict[str, Any]:
    """Finalize a store by hand (after all shards ran):
    `python -m bonnerlab.activations finalize PATH`."""
    if not Path(path, "zarr.json").is_file():
        raise StoreError(f"{path} is not an activation store")
    return ActivationStore(path).finalize()
