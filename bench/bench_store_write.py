"""What a batch write costs in the activation store, sharded (the layout now, written by the store's
own shard writer) vs unsharded (one chunk per batch, the layout before) vs sharded written by
zarr (`array[rows] = values`), measured in one run: CPU time of `write_chunk` for a
ResNet-50-like batch (layer2 (64, 512, 28, 28), layer3 (64, 1024, 14, 14), float32, zstd), and
the peak RSS of each, one fresh process per layout. Prints ratios against unsharded (the machine
may be busy: CPU time, not wall time). `python bench/bench_store_write.py [--batches N]`."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = {"layer2": (512, 28, 28), "layer3": (1024, 14, 14)}
BATCH = 64
LAYOUTS = ("unsharded", "sharded", "sharded-zarr")


def _write(layout: str, batches: int, out: Path) -> dict[str, float]:
    """One store of `batches` batches in `layout`; CPU seconds per batch and the RSS peak."""
    import zarr

    from bonnerlab.activations.store import LayerSpec, open_store

    if layout == "unsharded":  # the previous `_create`: one chunk per batch, no shards
        create = zarr.Group.create_array

        def unsharded(self, name, *, shards=None, chunks=None, **kw):
            return create(self, name, chunks=shards or chunks, **kw)

        zarr.Group.create_array = unsharded
    if layout == "sharded-zarr":  # zarr's own write of a whole shard (what the store avoids)
        from bonnerlab.activations.store import ActivationStore

        def by_zarr(self, layer, chunk, values):
            self.chunk_file(layer, chunk).unlink(missing_ok=True)  # else zarr reads it first
            self.array(layer)[self.chunk_slice(chunk)] = values

        ActivationStore._write_shard = by_zarr
    specs = [LayerSpec(k, ("channel", "y", "x"), v) for k, v in LAYERS.items()]
    store, _ = open_store(
        out,
        identity={"bench": layout},
        layers=specs,
        stimuli=[f"s{i}" for i in range(BATCH * batches)],
        labels=None,
        chunk_size=BATCH,
    )
    rng = np.random.default_rng(0)
    # ReLU outputs: half zeros, like the real thing (zstd's work depends on it)
    data = {
        k: np.maximum(rng.standard_normal((BATCH, *v), np.float32), 0) for k, v in LAYERS.items()
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = []
    for c in range(batches):
        t0 = time.process_time()
        store.write_chunk(c, data)
        cpu.append(time.process_time() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    files = sum(1 for _ in out.rglob("c/*/0/0/0"))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "cpu_s_per_batch": float(np.median(cpu)),
        "rss_added_mb": (peak - before) / 1024,
        "peak_rss_mb": peak / 1024,
        "files": files,
        "store_mb": size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--one", choices=LAYOUTS)
    args = parser.parse_args()
    if args.one:  # a fresh process per layout: each peak RSS its own
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(_write(args.one, args.batches, Path(tmp) / "s.zarr")))
        return
    results = {}
    for _round in range(2):  # alternate, so a busy spell hits both
        for layout in LAYOUTS:
            cmd = [sys.executable, __file__, "--one", layout, "--batches", str(args.batches)]
            run = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            results.setdefault(layout, []).append(run)
    for layout, runs in results.items():
        print(layout, json.dumps(runs))
    best = {k: min(r["cpu_s_per_batch"] for r in v) for k, v in results.items()}
    peak = {k: max(r["peak_rss_mb"] for r in v) for k, v in results.items()}
    for layout in LAYOUTS:
        print(
            f"{layout}: write_chunk CPU {best[layout]:.3f} s/batch "
            f"(x{best[layout] / best['unsharded']:.2f} of unsharded), peak RSS "
            f"{peak[layout]:.0f} MB (x{peak[layout] / peak['unsharded']:.2f})"
        )


if __name__ == "__main__":
    main()
