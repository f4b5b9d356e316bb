"""A layer's stimulus x stimulus second moments, streamed from its store: `layer_gram`.

Every similarity analysis and the dual-form encoding model need only the Gram matrix G = X X^T
of a layer's flattened features and its row sums, never the features themselves; G is n x n
where X is n x p, and p (hundreds of thousands of features) is what breaks in-memory tools.

How the stream reads the store: layers are chunked along `presentation` only (one chunk per
extraction batch, all features), so any read decompresses whole row chunks. A *pass* therefore
reads every row chunk once and keeps a *panel* of features (a range of the first feature dim)
for all stimuli, as wide as `memory_gb` allows after the Gram itself; the panel's product goes
into a float32 accumulator (BLAS syrk, half the flops of a GEMM), added into float64 once per
panel. Few, wide panels mean few passes, and the decode cost is `passes` x one full read.
Nothing here imports torch unless the device is CUDA (or `auto` with torch installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from bonnerlab.activations import open_activations, store_info
from bonnerlab.errors import AnalysisError, UserError
from bonnerlab.runs import atomic_write_bytes

CACHE_FORMAT = 1  # bump when what a cache file holds changes: older files are rebuilt
SUB_BLOCK_BYTES = 32 * 2**20  # float32 columns handed to BLAS at once (past ~1k columns, as fast)


@dataclass
class Gram:
    """The second moments of one layer over its stimuli (features flattened, uncentered)."""

    gram: np.ndarray  # (n, n) float64: X X^T
    sums: np.ndarray  # (n,) float64: X 1, each stimulus's feature sum
    n_features: int  # p
    stimulus: np.ndarray  # (n,) str, in the store's order (skipped stimuli dropped)
    coords: dict[str, np.ndarray] = field(default_factory=dict)  # label, sheet columns
    attrs: dict[str, Any] = field(default_factory=dict)  # provenance (flat: netCDF-safe)

    @classmethod
    def from_array(cls, x: np.ndarray, stimulus: Sequence[str] | None = None, **attrs: Any) -> Gram:
        """The Gram of features in memory (n, ...), in float64: analyses of arrays, and the
        reference the streamed path is tested against."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        ids = np.asarray(
            [str(i) for i in range(len(x))] if stimulus is None else stimulus, dtype=str
        )
        return cls(x @ x.T, x.sum(axis=1), x.shape[1], ids, {}, dict(attrs))

    @property
    def n(self) -> int:
        return len(self.stimulus)

    def centered(self) -> np.ndarray:
        """H G H = Xc Xc^T with every feature centered over the stimuli (CKA, PCA, ridge)."""
        g = self.gram
        row = g.mean(axis=1)
        return g - row[:, None] - row[None, :] + g.mean()

    def select(self, stimuli: Sequence[str]) -> Gram:
        """The rows and columns of `stimuli`, in that order (aligning two sources by id)."""
        position = {s: i for i, s in enumerate(self.stimulus.tolist())}
        missing = [s for s in stimuli if s not in position]
        if missing:
            raise AnalysisError(
                f"{len(missing)} stimuli not in {self.attrs.get('layer', 'the Gram')} of "
                f"{self.attrs.get('store', 'memory')}, e.g. {', '.join(map(repr, missing[:3]))}"
            )
        idx = np.fromiter((position[s] for s in stimuli), dtype=np.intp, count=len(stimuli))
        return replace(
            self,
            gram=self.gram[np.ix_(idx, idx)],
            sums=self.sums[idx],
            stimulus=self.stimulus[idx],
            coords={k: v[idx] for k, v in self.coords.items()},
        )


def versions() -> str:
    """The versions that decide an analysis's numbers, as one netCDF-safe string."""
    out = []
    for name in ("bonnerlab", "numpy", "scipy", "zarr", "xarray"):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def cache_path(store: str | Path, layer: str) -> Path:
    """Where the Gram of `layer` is cached: `<store>.gram/<layer>.npz`, beside the store (the
    store itself stays as extraction wrote it, so `verify` still holds)."""
    store = Path(store)
    return store.with_name(f"{store.name}.gram") / f"{quote(layer, safe='')}.npz"


def layer_gram(
    store: str | Path,
    layer: str,
    *,
    device: str = "auto",
    memory_gb: float = 1.0,
    cache: bool = True,
    progress: bool = False,
) -> Gram:
    """The Gram of `layer` in `store`, streamed in about `memory_gb` of memory, or its cache.

    The cache is reused only when it was made from a store of the same fingerprint (same
    identity: model, weights, stimuli and their content); any other is rebuilt and replaced.
    A layer not in the store or a store not finalized is refused (StoreError, one line).
    """
    da = open_activations(store, layer, drop_skipped=False)  # checks the layer and completeness
    meta = store_info(store)
    keep = ~np.isin(
        da["stimulus"].values.astype(str), np.asarray(meta.get("skipped_stimuli") or [], str)
    )
    stimulus = da["stimulus"].values.astype(str)[keep]
    coords = {
        name: np.asarray(c.values)[keep]
        for name, c in da.coords.items()
        if name != "stimulus" and c.dims == ("presentation",)
    }
    attrs = {
        "store": str(Path(store)),
        "fingerprint": meta["fingerprint"],
        "layer": layer,
        "dtype": str(da.dtype),
        "versions": versions(),
    }
    path = cache_path(store, layer)
    cached = _load_cache(path, meta["fingerprint"], layer) if cache else None
    if cached is not None and np.array_equal(cached["stimulus"], stimulus):
        gram, sums, p = cached["gram"], cached["sums"], int(cached["n_features"])
        attrs["cache"] = "reused"
    else:
        gram, sums, p, stats = _stream(
            da, keep, int(meta["chunk_size"]), device, memory_gb, progress
        )
        attrs.update(stats, cache="written" if cache else "off")
        if cache:
            _save_cache(path, meta["fingerprint"], layer, gram, sums, p, stimulus)
    attrs["n_features"] = p
    bad = ~np.isfinite(sums)  # the rows with inf or NaN (the Gram spreads them to all)
    if not bad.any() and not np.isfinite(gram).all():
        bad[:] = True
    if bad.any():
        raise AnalysisError(
            f"layer {layer!r} of {store} has non-finite activations (inf or NaN) for "
            f"{int(bad.sum())} stimuli, e.g. {str(stimulus[np.flatnonzero(bad)[0]])!r}"
        )
    return Gram(gram, sums, p, stimulus, coords, attrs)


# ----------------------------------------------------------------------------- the cache


def _load_cache(path: Path, fingerprint: str, layer: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta != {"format": CACHE_FORMAT, "fingerprint": fingerprint, "layer": layer}:
                return None  # another store (or an older format) made it: rebuild
            return {k: f[k] for k in ("gram", "sums", "n_features", "stimulus")}
    except (OSError, ValueError, KeyError):
        return None  # unreadable: rebuilt and replaced like a stale one


def _save_cache(path, fingerprint, layer, gram, sums, p, stimulus) -> None:
    buf = io.BytesIO()
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "layer": layer}
    np.savez(
        buf,
        meta=np.asarray(json.dumps(meta)),
        gram=gram,
        sums=sums,
        n_features=np.asarray(p),
        stimulus=stimulus,
    )
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- the stream


def _read_block(da, rows: slice, cols: slice) -> np.ndarray:
    """One row chunk of a panel: the store decodes the whole chunk, we keep `cols`."""
    return np.asarray(da[rows, cols].values)


def plan_panels(n: int, shape: tuple[int, ...], itemsize: int, chunk: int, memory_gb: float):
    """How many indices of the first feature dim one panel holds, within `memory_gb` after the
    float64 Gram, its float32 accumulator, one float32 sub-block and one decoded row chunk; and
    how many columns a sub-block (the float32 copy BLAS gets) holds."""
    inner = math.prod(shape[1:])
    p = shape[0] * inner
    sub = int(min(SUB_BLOCK_BYTES, memory_gb * 2**30 / 8, 4 * n * p))
    sub_cols = max(256, sub // (4 * max(n, 1)))
    fixed = 12 * n * n + sub + 2 * chunk * p * itemsize
    room = memory_gb * 2**30 - fixed
    if room < n * inner * itemsize:
        need = (fixed + n * inner * itemsize) / 2**30
        raise AnalysisError(
            f"memory_gb={memory_gb} is too small for the Gram of {n} stimuli x {p} features "
            f"(needs at least {need:.2f})"
        )
    return max(1, min(shape[0], int(room // (n * inner * itemsize)))), sub_cols


def _stream(da, keep: np.ndarray, chunk: int, device: str, memory_gb: float, progress: bool):
    shape = tuple(int(s) for s in da.shape[1:])
    n, n_all = int(keep.sum()), da.shape[0]
    p = math.prod(shape)
    itemsize = np.dtype(da.dtype).itemsize
    step, sub_cols = plan_panels(n, shape, itemsize, chunk, memory_gb)
    inner = p // shape[0]
    panels = [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
    chunks = [slice(r, min(r + chunk, n_all)) for r in range(0, n_all, chunk)]
    acc = _accumulator(device, n, sub_cols)
    panel = np.empty((n, step * inner), dtype=da.dtype)
    bar = _bar(progress, len(panels) * len(chunks), da.name)
    read_s = 0.0
    for cols in panels:
        width = (cols.stop - cols.start) * inner
        t = time.perf_counter()
        row = 0
        for rows in chunks:
            block = _read_block(da, rows, cols).reshape(rows.stop - rows.start, width)
            block = block[keep[rows]]
            panel[row : row + len(block), :width] = block
            row += len(block)
            bar.update(1)
        read_s += time.perf_counter() - t
        acc.add(panel[:, :width])
    bar.close()
    gram, sums = acc.result()
    stats = {
        "passes": len(panels),
        "read_s": round(read_s, 3),
        "compute_s": round(acc.seconds, 3),
        "device": acc.device,
    }
    return gram, sums, p, stats


def _bar(progress: bool, total: int, name: str):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"gram {name}", unit="chunk")


class _NoBar:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _accumulator(device: str, n: int, sub_cols: int):
    """The CPU (numpy/BLAS) accumulator, or the CUDA one when the device resolves to a GPU;
    torch is imported only when it may be used."""
    if device == "cpu" or (device == "auto" and not gpu_may_be_present()):
        return _CpuAccumulator(n, sub_cols)
    if importlib.util.find_spec("torch") is None:
        if device == "auto":
            return _CpuAccumulator(n, sub_cols)
        raise UserError(f"device {device!r} needs torch, which is not installed; use cpu")
    from bonnerlab.distributed import use_device

    resolved = use_device(device)
    if resolved.type == "cpu":
        return _CpuAccumulator(n, sub_cols)
    return _CudaAccumulator(n, sub_cols, resolved)


def gpu_may_be_present() -> bool:
    """False when this Linux machine has no NVIDIA driver loaded: `auto` is then the CPU without
    importing torch (2.5-3 s and 0.45 GB of RSS for nothing; bench/bench_analysis.py)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: only torch can tell
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return Path("/proc/driver/nvidia/version").exists()


def _sub_blocks(width: int, step: int):
    return [slice(a, min(a + step, width)) for a in range(0, width, step)]


class _CpuAccumulator:
    """Each panel's X X^T through BLAS ssyrk in float32 (upper triangle), then into float64.

    Every sub-block is first shifted by its features' means (X = Xs + 1 c^T): float32 then
    rounds relative to the spread of the features, not to their offset (a ReLU layer's mean
    is as large as its spread, and correlation and CKA keep only the spread). The shift comes
    back exactly in float64 at the end: G = sum Xs Xs^T + v 1^T + 1 v^T + |c|^2, v = Xs c.
    """

    device = "cpu"

    def __init__(self, n: int, sub_cols: int):
        self.sub_cols = sub_cols
        self.gram = np.zeros((n, n), dtype=np.float64, order="F")
        self.part = np.zeros((n, n), dtype=np.float32, order="F")
        self.sums = np.zeros(n, dtype=np.float64)
        self.cross = np.zeros(n, dtype=np.float64)  # v = sum over blocks of Xs c
        self.shift2 = 0.0  # sum over blocks of |c|^2
        self.seconds = 0.0

    def add(self, panel: np.ndarray) -> None:
        from scipy.linalg.blas import ssyrk

        t = time.perf_counter()
        with np.errstate(invalid="ignore", over="ignore"):  # inf rows: caught by layer_gram
            self._add(panel, ssyrk)
        self.gram += self.part
        self.seconds += time.perf_counter() - t

    def _add(self, panel: np.ndarray, ssyrk) -> None:
        for i, cols in enumerate(_sub_blocks(panel.shape[1], self.sub_cols)):
            block = np.ascontiguousarray(panel[:, cols], dtype=np.float32)
            self.sums += block.sum(axis=1)  # before the shift: an inf row stays the only one
            shift = block.mean(axis=0, dtype=np.float64).astype(np.float32)
            block -= shift
            shift64 = shift.astype(np.float64)
            self.cross += block @ shift  # float32 GEMV: |Xs||c| rounding, below the product's
            self.shift2 += float(shift64 @ shift64)
            # block.T is Fortran-ordered (no copy into BLAS); trans=1: block.T^T block.T.
            # beta=0 on the first block resets the accumulator without a separate pass over it.
            self.part = ssyrk(1.0, block.T, beta=float(i > 0), c=self.part, trans=1, overwrite_c=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        upper = np.triu(self.gram)
        with np.errstate(invalid="ignore", over="ignore"):
            g = upper + np.triu(upper, 1).T
            g += self.cross[:, None] + self.cross[None, :] + self.shift2
        return np.ascontiguousarray(g), self.sums


class _CudaAccumulator:
    """The same on a GPU: float32 matmul with TF32 off (TF32 keeps 10 mantissa bits, a 1e-3
    error in every RDM entry), each panel's product added into a float64 Gram on the device."""

    def __init__(self, n: int, sub_cols: int, device):
        import torch

        self.sub_cols = sub_cols
        self.torch, self.dev = torch, device
        self.device = str(device)
        self.gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.part = torch.zeros((n, n), dtype=torch.float32, device=device)
        self.sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.cross = torch.zeros(n, dtype=torch.float64, device=device)
        self.shift2 = torch.zeros((), dtype=torch.float64, device=device)
        self.seconds = 0.0

    def add(self, panel: np.ndarray) -> None:
        torch = self.torch
        t = time.perf_counter()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            self.part.zero_()
            for cols in _sub_blocks(panel.shape[1], self.sub_cols):
                host = torch.from_numpy(np.ascontiguousarray(panel[:, cols]))
                block = host.to(self.dev, non_blocking=True).float()
                self.sums += block.sum(dim=1, dtype=torch.float64)
                shift = block.mean(dim=0, dtype=torch.float64).float()  # as on the CPU
                block -= shift
                self.cross += block.double() @ shift.double()
                self.shift2 += shift.double() @ shift.double()
                self.part.addmm_(block, block.T)
            self.gram += self.part.double()
            torch.cuda.synchronize(self.dev)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        self.seconds += time.perf_counter() - t

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        g = self.gram.cpu().numpy()
        cross = self.cross.cpu().numpy()
        g = (g + g.T) / 2 + cross[:, None] + cross[None, :] + float(self.shift2)
        return g, self.sums.cpu().numpy()
