"""The writer thread: chunks go to the store while the next batch computes."""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from typing import Any

import numpy as np
import torch


def _load_libc(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_libc("malloc_trim")
_MALLOPT = _load_libc("mallopt")
_M_ARENA_MAX = -8  # glibc's malloc.h


def share_one_heap() -> None:
    """Make threads created from now on share the main heap (glibc's `M_ARENA_MAX` = 1; a no-op
    elsewhere). Without it the writer thread and zarr's I/O threads each grow a heap of their own
    from zarr's encode buffers, and the batches' peak RSS crept up batch after batch (ResNet-50 at
    batch 32: +8% over the bare forward pass's after 10 batches, +14% after 32; +3% after 10 with
    one heap). Those threads malloc a few large buffers per chunk, so they rarely wait on the one
    lock (CPU per image within a busy machine's noise; to confirm on an idle one)."""
    if _MALLOPT is not None:
        _MALLOPT(_M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Once per written chunk, on the writer thread: the chunk's capture buffers and zarr's encode
    buffers (a compressed copy of a batch of one layer, and its checksummed copy) are freed into
    heaps glibc rarely shrinks, on top of the forward pass's own peak (+19% peak RSS on ResNet-50
    at batch 32 without it). A fixed mmap threshold (16 MB) kept RSS down too, but made every
    16-32 MB tensor of the forward pass a fresh mmap, zero-filled by the kernel on each batch:
    +32% page faults and +19 ms of system time per image on ResNet-50, +55% and +22 ms on
    ViT-B/16 (bench/bench_extract.py). Trimming once per chunk costs a few page faults, no more."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ChunkWriter:
    """Writes chunks on a thread while the next batch computes.

    The capture buffers are `slots` fixed slots used round-robin; `acquire()` blocks until the
    slot for the next batch has been written out (the writer releases slots in FIFO order), so at
    most `slots` batches of activations exist at once, however many stimuli there are. Errors on
    the thread surface at the next acquire/close (an acquire inside a hook raises out of the
    forward pass)."""

    def __init__(self, store: Any, slots: int):
        self.store = store
        self.queue: queue.Queue[Any] = queue.Queue()
        self.free = threading.Semaphore(slots)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="activation-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # reported to the main thread
                    self.error = e
            # the batch's buffers are freed here (this was their last reference) and given back
            # to the OS, before the next batch's first capture: see Capture
            del item
            release_free_memory()
            self.free.release()

    def _write(
        self,
        chunk: int,
        data: dict[str, np.ndarray],
        skipped: list[str],
        ready: torch.cuda.Event | None,
        bad: list[int],
        content: list[str] | None,
        keep: list[int],
    ) -> None:
        if ready is not None:
            ready.synchronize()  # the device-to-host copies of this batch have landed
        for values in data.values():
            if bad:
                values[bad] = np.nan
        self.store.write_chunk(chunk, data, skipped, content, keep)

    def acquire(self) -> None:
        self.free.acquire()
        if self.error is not None:
            raise self.error

    def put(
        self,
        chunk: int,
        data: dict[str, np.ndarray],
        skipped: list[str],
        ready: torch.cuda.Event | None = None,
        bad: list[int] | None = None,
        content: list[str] | None = None,
        keep: list[int] | None = None,
    ) -> None:
        """Queue a chunk; `ready` (CUDA) is waited for and rows `bad` set to NaN on the thread;
        `content` is its rows' content hashes, `keep` the rows that keep their stored values."""
        self.queue.put((chunk, data, skipped, ready, bad or [], content, keep or []))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
