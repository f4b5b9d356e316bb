"""A zarr v3 shard file as the activation store writes and reads it (`store`): the index at its
end (one little-endian uint64 (offset, nbytes) pair per inner chunk, 2**64-1 for one never
written, then a crc32c), each inner chunk ending in its own crc32c, and the inner chunks'
decoders. Nothing here imports torch; zarr only to recognise a layer's codecs."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EMPTY = 2**64 - 1  # a shard index entry for an inner chunk never written
DAMAGED = "checksum does not match (damaged file)"


def as_array(data: np.ndarray, out: np.ndarray) -> np.ndarray:
    return data


def through(codec: Any) -> Any:
    """A numcodecs codec's decode into `out` (a uint8 buffer of the decoded size; it releases
    the GIL)."""
    return lambda data, out: np.frombuffer(codec.decode(data, out=out), dtype=np.uint8)


_THREAD = threading.local()


def thread_buffer(name: str, nbytes: int) -> np.ndarray:
    """A uint8 buffer of `nbytes` of the calling thread's own, grown as needed and reused."""
    buf = getattr(_THREAD, name, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        setattr(_THREAD, name, buf)
    return buf[:nbytes]


def crc_ok(data: bytes | np.ndarray) -> bool:
    """Whether `data` (bytes, or a uint8 array: google_crc32c takes no memoryview) ends in the
    crc32c of the rest (zarr's crc32c codec: little-endian)."""
    import google_crc32c

    return len(data) >= 4 and np.uint32(google_crc32c.value(data[:-4])).tobytes() == bytes(
        data[-4:]
    )


def read_index(index_bytes: bytes, file_size: int, size: int) -> np.ndarray | None:
    """A shard's index from its last `size` bytes (`index_bytes`, of a file of `file_size`): one
    (offset, nbytes) row per inner chunk in C order; None if it is truncated or its crc32c does
    not match."""
    if file_size < size or len(index_bytes) != size or not crc_ok(index_bytes):
        return None
    return np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(-1, 2)


def entry_problem(entry: np.ndarray, data_end: int) -> str | None:
    """What is wrong with one index entry (offset, nbytes) of a shard whose inner chunks end
    before `data_end` (the index's start), or None."""
    offset, nbytes = int(entry[0]), int(entry[1])
    if offset == EMPTY and nbytes == EMPTY:
        # the store writes every inner chunk (write_empty_chunks), all-NaN ones too
        return "it was never written (damaged file)"
    if nbytes < 4 or offset + nbytes > data_end:
        return "it lies outside the file (damaged index)"
    return None


def tail(path: Path, n: int) -> tuple[bytes, int]:
    """The last `n` bytes of a file (all of it if shorter) and its size: a shard's index."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - n))
        return f.read(), size


def inner_per_shard(array: Any) -> list[int]:
    """How many inner chunks a sharded array's shard holds along each dim."""
    return [-(-s // c) for s, c in zip(array.shards, array.chunks, strict=True)]


def ends_in_crc(codecs: Sequence[Any]) -> bool:
    return bool(codecs) and type(codecs[-1]).__name__ == "Crc32cCodec"


def sharding_codec(array: Any) -> Any:
    """A layer's sharding codec (its only array-to-bytes codec), or None if unsharded."""
    from zarr.codecs import ShardingCodec

    codecs = array.metadata.codecs
    return codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
