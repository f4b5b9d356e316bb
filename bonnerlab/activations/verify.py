"""`verify`: is a store whole? Every chunk present, its checksums (a sharded layer's: its index's
and every inner chunk's) right and decodable, every array as long as the stimuli, ids unique and
in the order the identity recorded, NaN exactly in the rows recorded as skipped. Run by
`python -m bonnerlab.activations verify STORE` and at finalize.

It reads every chunk once (in threads: file reads, checksums and decompression release the GIL);
nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bonnerlab.activations.layout import CONTENT, COORDS, stimuli_digest
from bonnerlab.errors import StoreError

# the store is an `ActivationStore` (store.py imports this module: typed as Any to keep one way)
ActivationStore = Any

MAX_PROBLEMS = 100  # a store damaged everywhere: the first ones say enough


def verify_store(store: ActivationStore, workers: int = 4) -> dict[str, Any]:
    t0 = time.perf_counter()
    problems: list[str] = []
    coord_names = _coord_names(store)
    problems += _lengths(store, coord_names)
    ids, id_problems = _ids(store, coord_names)
    problems += id_problems
    missing = store.missing_chunks()
    if missing:
        problems.append(
            f"{store.path}: {len(missing)} of {store.n_chunks} chunks not written yet "
            f"(first: {missing[:5]})"
        )
    unmarked = set(missing)
    done = [c for c in range(store.n_chunks) if c not in unmarked]
    position = {s: i for i, s in enumerate(ids)} if ids is not None else {}
    jobs = [(layer, chunk) for chunk in done for layer in store.layers]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for found in pool.map(lambda job: _check_chunk(store, *job, position), jobs):
            problems += found
    hashes = store.content_hashes()
    rows_done = sum(store.chunk_slice(c).stop - store.chunk_slice(c).start for c in done)
    return {
        "store": str(store.path),
        "problems": problems[:MAX_PROBLEMS],
        "n_problems": len(problems),
        "n_stimuli": store.n,
        "layers": store.layers,
        "chunks_checked": len(jobs),
        "checksums": "crc32c"
        if all(store.checksummed(layer) for layer in store.layers)
        else "not on every layer (decoded instead)",
        "content_hashes": int(sum(1 for h in hashes if h)) if store.has_content else 0,
        "rows_written": rows_done,
        "seconds": time.perf_counter() - t0,
    }


def _coord_names(store: ActivationStore) -> list[str]:
    attr = store.array(store.layers[0]).attrs.get("coordinates", " ".join(COORDS))
    return [name for name in str(attr).split() if name]


def _lengths(store: ActivationStore, coord_names: Sequence[str]) -> list[str]:
    out = []
    for name in [*store.layers, *coord_names]:
        if name not in store.group:
            if name != CONTENT:  # format-1 stores have no content hashes
                out.append(f"{store.path}: array {name} is missing")
            continue
        array = store.group[name]
        if array.shape[0] != store.n:
            out.append(f"{store.path}: {name} has {array.shape[0]} rows, not {store.n}")
        # a chunk (unsharded) or shard (sharded) per batch
        per_batch = (getattr(array, "shards", None) or array.chunks)[0]
        if name in store.layers and per_batch != store.chunk_size:
            out.append(f"{store.path}: {name} is chunked by {per_batch}, not {store.chunk_size}")
    return out


def _ids(store: ActivationStore, coord_names: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """The stimulus ids and what is wrong with them: duplicates, or ids (or sheet columns) other
    than, or in another order than, the ones the identity was made from."""
    try:
        ids = [str(s) for s in np.asarray(store.group["stimulus"][:]).tolist()]
    except Exception as e:  # a damaged coordinate chunk
        return None, [f"{store.path}: the stimulus ids cannot be read ({type(e).__name__}: {e})"]
    out = []
    seen: dict[str, int] = {}
    for i, s in enumerate(ids):
        if s in seen:
            out.append(f"{store.path}: stimulus id {s!r} appears twice (rows {seen[s]} and {i})")
            break
        seen[s] = i
    recorded = store.identity.get("stimuli_sha256")
    if recorded:
        extra = [c for c in coord_names if c not in (*COORDS, CONTENT) and c in store.group]
        try:
            coords = {c: np.asarray(store.group[c][:]) for c in extra}
        except Exception as e:
            return ids, [*out, f"{store.path}: a stimulus coordinate cannot be read ({e})"]
        if stimuli_digest(ids, coords) != recorded:
            out.append(
                f"{store.path}: the stored stimulus ids or columns are not the ones (in the "
                "order) the store was made from"
            )
    return ids, out


def _check_chunk(
    store: ActivationStore, layer: str, chunk: int, position: dict[str, int]
) -> list[str]:
    found = store.check_chunk_file(layer, chunk)
    if found:
        return [found]
    sl = store.chunk_slice(chunk)
    skipped = store.chunk_skipped(chunk, layer)
    if not store.chunk_file(layer, chunk).is_file():
        return []  # format 1: an all-skipped chunk zarr left unwritten (check_chunk_file said ok)
    try:
        values = store.read_chunk(layer, chunk)
    except StoreError as e:
        return [str(e)]
    rows = sl.stop - sl.start
    if values.shape[0] != rows:
        return [f"{store._where(layer, chunk)}: {values.shape[0]} rows, not {rows}"]
    flat = values.reshape(rows, -1)
    nan_rows = np.isnan(flat).any(axis=1) if flat.shape[1] else np.zeros(rows, bool)
    marked = np.zeros(rows, bool)
    out = []
    for s in skipped:
        i = position.get(s, -1) - sl.start
        if 0 <= i < rows:
            marked[i] = True
        else:
            out.append(
                f"{store._where(layer, chunk)}: skipped stimulus {s!r} is not one of its rows"
            )
    for i in np.flatnonzero(nan_rows & ~marked)[:1]:
        out.append(
            f"{store._where(layer, chunk)}: row {sl.start + i} holds NaN but its stimulus is not "
            "recorded as skipped"
        )
    for i in np.flatnonzero(marked & ~np.isnan(flat).all(axis=1))[:1]:
        out.append(
            f"{store._where(layer, chunk)}: row {sl.start + i} is recorded as skipped but holds "
            "values"
        )
    return out
