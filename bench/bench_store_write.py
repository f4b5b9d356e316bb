"""What a batch write costs in the activation store: sharded (the layout now, written by the
store's own shard writer) vs unsharded (one chunk per batch, the layout before) vs sharded
written by zarr (`array[rows] = values`, what the store avoids). CPU time of `write_chunk` for a
ResNet-50-like batch (layer2 (64, 512, 28, 28), layer3 (64, 1024, 14, 14), float32, zstd), the
three layouts written in turn, batch by batch, in one process (a busy spell hits all three); then
the peak RSS of writing, one fresh process per layout. Prints ratios against unsharded (the
machine may be busy: CPU time, not wall time). `python bench/bench_store_write.py [--batches N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

LAYERS = {"layer2": (512, 28, 28), "layer3": (1024, 14, 14)}
BATCH = 64
LAYOUTS = ("unsharded", "sharded", "sharded-zarr")


def _by_zarr(self, layer: str, chunk: int, values: np.ndarray) -> None:
    self.chunk_file(layer, chunk).unlink(missing_ok=True)  # else zarr reads the old shard first
    self.array(layer)[self.chunk_slice(chunk)] = values


def _store(layout: str, path: Path, batches: int):
    import zarr

    from bonnerlab.activations.store import LayerSpec, open_store

    create = zarr.Group.create_array

    def unsharded(self, name, *, shards=None, chunks=None, **kw):
        return create(self, name, chunks=shards or chunks, **kw)  # the previous `_create`

    with contextlib.ExitStack() as stack:
        if layout == "unsharded":
            zarr.Group.create_array = unsharded
            stack.callback(setattr, zarr.Group, "create_array", create)
        store, _ = open_store(
            path,
            identity={"bench": layout},
            layers=[LayerSpec(k, ("channel", "y", "x"), v) for k, v in LAYERS.items()],
            stimuli=[f"s{i}" for i in range(BATCH * batches)],
            labels=None,
            chunk_size=BATCH,
        )
    if layout == "sharded-zarr":
        store._write_shard = types.MethodType(_by_zarr, store)
    return store


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for k, v in LAYERS.items():  # in place: no temporaries to raise the RSS peak before writing
        out[k] = rng.standard_normal((BATCH, *v), np.float32)
        np.maximum(out[k], 0, out=out[k])  # ReLU outputs: half zeros (zstd's work depends on it)
    return out


def _status_mb(field: str) -> float:
    """VmHWM (peak RSS) or VmRSS of this process, in MB, from /proc (ru_maxrss would carry the
    parent's RSS from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_rss(layout: str, batches: int) -> tuple[float, float]:
    """MB of peak RSS of a process writing `batches` batches in `layout`, and how much of it
    the writes added over the RSS before them (the batch in memory, the imports)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(layout, Path(tmp) / "s.zarr", batches)
        data = _batch()
        before = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
        for c in range(batches):
            store.write_chunk(c, data)
        peak = _status_mb("VmHWM")
    return peak, peak - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rss", choices=LAYOUTS)
    args = parser.parse_args()
    if args.rss:
        print(json.dumps(_peak_rss(args.rss, args.batches)))
        return
    data = _batch()
    cpu: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    wall: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {k: _store(k, Path(tmp) / f"{k}.zarr", args.batches) for k in LAYOUTS}
        for c in range(args.batches):
            for layout, store in stores.items():
                t0, w0 = time.process_time(), time.perf_counter()
                store.write_chunk(c, data)
                cpu[layout].append(time.process_time() - t0)
                wall[layout].append(time.perf_counter() - w0)
    rss = {}
    for layout in LAYOUTS:
        cmd = [sys.executable, __file__, "--rss", layout, "--batches", str(args.batches)]
        rss[layout] = json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)
    base, base_wall = np.median(cpu["unsharded"]), np.median(wall["unsharded"])
    for layout in LAYOUTS:
        median, median_wall = np.median(cpu[layout]), np.median(wall[layout])
        print(
            f"{layout}: write_chunk CPU {median:.3f} s/batch (median of {args.batches}; "
            f"x{median / base:.2f} of unsharded), wall {median_wall:.3f} s "
            f"(x{median_wall / base_wall:.2f}; inner chunks encode on zarr's threads), "
            f"peak RSS {rss[layout][0]:.0f} MB, {rss[layout][1]:.0f} MB of it added by the "
            f"writes (x{rss[layout][1] / max(rss['unsharded'][1], 1):.2f})"
        )


if __name__ == "__main__":
    main()
