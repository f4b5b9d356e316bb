"""A layer's stimulus x stimulus second moments, streamed from its store: `layer_gram`.

Every similarity analysis and the dual-form encoding model need only the Gram matrix G = X X^T
of a layer's flattened features and its row sums, never the features themselves; G is n x n
where X is n x p, and p (hundreds of thousands of features) is what breaks in-memory tools.

How the stream reads the store: a *panel* is a range of the first feature dim for all stimuli,
as wide as `memory_gb` allows after the Gram itself; its product goes into a float32
accumulator (BLAS syrk on float32 blocks of the panel, half the flops of a GEMM), added into
float64 once per panel. Extraction chunks layers along `presentation` only (one chunk per
batch, all features), so every panel decodes whole row chunks: the decode cost is one full read
per panel, and few, wide panels matter (`store_reads` in the attrs). A store chunked (or
sharded) along features too is read chunk-aligned, each chunk decoded once however many
panels. Cost per value besides the product: one float16 -> float32 conversion (bit
arithmetic: numpy's cast branches per value) and a few vector passes (row sums, the shift).
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
# float32 columns handed to BLAS at once: ssyrk runs as fast from ~512 columns as from 8k
# (n = 5,000, OpenBLAS), so a small block leaves the memory to wider panels (fewer passes)
SUB_BLOCK_BYTES = 32 * 2**20
MIN_SUB_COLS = 512
READ_CHUNKS = 4  # row chunks per store read: zarr decodes them in parallel (1.4x on 2 cores)


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
        c = g - row[:, None]  # then in place: one n x n array, not three
        c -= row[None, :]
        c += g.mean()
        return c

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
    """Rows of a panel: the store decodes every chunk the rows and `cols` touch (zarr decodes
    the chunks of one read in parallel threads), we keep `cols`."""
    return np.asarray(da[rows, cols].values)


@dataclass(frozen=True)
class Plan:
    """How one layer is streamed (plan_panels)."""

    step: int  # indices of the first feature dim in one panel
    sub_cols: int  # float32 columns handed to BLAS in one call
    read_chunks: int  # row chunks per store read


def feature_chunk(da) -> int:
    """How many indices of the first feature dim one store chunk spans: the whole dim for
    stores chunked by rows only (every read decodes whole rows), fewer when the layer is also
    chunked (or sharded into inner chunks) along its features."""
    chunks = da.encoding.get("chunks") or ()
    return int(chunks[1]) if len(chunks) > 1 else int(da.shape[1])


def plan_panels(
    n: int,
    shape: tuple[int, ...],
    itemsize: int,
    chunk: int,
    memory_gb: float,
    feature_chunk: int | None = None,
) -> Plan:
    """Panels as wide as `memory_gb` allows after the float64 Gram and its float32 partial
    (12 n^2 bytes), the float32 block BLAS gets and its conversion scratch, and the store's
    decoded and compressed row chunks; panel edges fall on the store's feature chunks, so a
    store chunked along features is decoded once whatever the number of panels."""
    inner = math.prod(shape[1:])
    p = shape[0] * inner
    span = shape[0] if feature_chunk is None else max(1, min(feature_chunk, shape[0]))
    budget = memory_gb * 2**30
    sub = min(SUB_BLOCK_BYTES, budget / 16)
    sub_cols = int(min(p, max(MIN_SUB_COLS, sub // (4 * max(n, 1)))))
    convert = 2 * 4 * n * sub_cols  # the float32 block and its uint32 scratch
    # zarr's decoded chunks and their compressed bytes: an eighth of the budget, at least one
    # chunk (grows smoothly, so wider budgets never give narrower panels)
    chunk_bytes = 1.5 * chunk * span * inner * itemsize
    read = min(READ_CHUNKS * chunk_bytes, max(chunk_bytes, budget / 8))
    read_chunks = int(read // chunk_bytes)
    fixed = 12 * n * n + convert + read
    # one index of the first feature dim: in the panel for all stimuli, and in the selection a
    # read returns (up to READ_CHUNKS row chunks) before it is copied in
    column = (n + READ_CHUNKS * chunk) * inner * itemsize
    step = int(min(shape[0], (budget - fixed) // column))
    if span < shape[0] and step >= span:
        step -= step % span
    if step < 1:
        need = (fixed + column) / 2**30
        raise AnalysisError(
            f"memory_gb={memory_gb} is too small for the Gram of {n} stimuli x {p} features "
            f"(needs at least {need:.2f})"
        )
    return Plan(step, sub_cols, read_chunks)


def _stream(da, keep: np.ndarray, chunk: int, device: str, memory_gb: float, progress: bool):
    shape = tuple(int(s) for s in da.shape[1:])
    n, n_all = int(keep.sum()), da.shape[0]
    p = math.prod(shape)
    inner = p // shape[0]
    span = feature_chunk(da)
    plan = plan_panels(n, shape, np.dtype(da.dtype).itemsize, chunk, memory_gb, span)
    panels = [slice(a, min(a + plan.step, shape[0])) for a in range(0, shape[0], plan.step)]
    rows_per_read = chunk * plan.read_chunks
    reads = [slice(r, min(r + rows_per_read, n_all)) for r in range(0, n_all, rows_per_read)]
    acc = _accumulator(device, n, plan.sub_cols)
    buffer = np.empty(n * plan.step * inner, dtype=da.dtype)
    every_row = bool(keep.all())
    bar = _bar(progress, len(panels) * len(reads), da.name)
    read_s = 0.0
    for cols in panels:
        width = (cols.stop - cols.start) * inner
        panel = buffer[: n * width].reshape(n, width)  # contiguous, also the narrower last one
        t = time.perf_counter()
        row = 0
        for rows in reads:
            block = _read_block(da, rows, cols).reshape(rows.stop - rows.start, width)
            if not every_row:
                block = block[keep[rows]]
            panel[row : row + len(block)] = block
            row += len(block)
            bar.update(1)
        read_s += time.perf_counter() - t
        acc.add(panel)
    bar.close()
    del buffer, panel  # before the result: its n x n work needs the room
    gram, sums = acc.result()
    # how often each stored chunk was decoded: once per panel for a store chunked by rows only
    touched = sum(-(-c.stop // span) - c.start // span for c in panels)
    stats = {
        "passes": len(panels),
        "store_reads": round(touched / -(-shape[0] // span), 3),
        "read_s": round(read_s, 3),
        "compute_s": round(acc.seconds, 3),
        "device": acc.device,
    }
    return gram, sums, p, stats


def to_float32(src: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """`src` (n, w) as float32 in `out` (n, w, contiguous); float16 by bit arithmetic.

    numpy's float16 cast is a scalar loop that branches on each value's exponent: 6-8 ns a
    value on a ReLU layer (half zeros, so the branch is a coin toss), as slow as the BLAS
    product itself at n = 2,000. Here the half's exponent and mantissa go to a float32's
    places, times 2^112 (the exponent biases' difference): exact for normal and subnormal
    halves alike, a few vector passes. A block with no sign bit and no inf/NaN (a ReLU layer)
    needs two; others also move the sign. Inf and NaN (exponent 31) would come out finite,
    so a block holding any is cast by numpy (it is refused after the stream anyway).
    """
    if src.dtype != np.float16:
        np.copyto(out, src, casting="same_kind")
        return out
    half = src.view(np.uint16)
    bits = out.view(np.uint32)
    if half.max(initial=0) < 0x7C00:  # no sign bit, no exponent of 31
        np.left_shift(half, 13, out=bits, dtype=np.uint32)
    else:
        np.left_shift(half, 16, out=bits, dtype=np.uint32)  # the sign at bit 31
        np.right_shift(bits, 3, out=scratch)
        np.bitwise_and(scratch, 0x0FFFE000, out=scratch)
        if scratch.max(initial=0) >= 0x0F800000:  # an exponent of 31: inf or NaN
            np.copyto(out, src)
            return out
        np.bitwise_and(bits, 0x80000000, out=bits)
        np.bitwise_or(bits, scratch, out=bits)
    np.multiply(out, np.float32(2.0**112), out=out)
    return out


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
        self.block = np.empty(n * sub_cols, dtype=np.float32)  # to_float32's, reused
        self.scratch = np.empty(n * sub_cols, dtype=np.uint32)

    def add(self, panel: np.ndarray) -> None:
        from scipy.linalg.blas import ssyrk

        t = time.perf_counter()
        with np.errstate(invalid="ignore", over="ignore"):  # inf rows: caught by layer_gram
            self._add(panel, ssyrk)
        self.gram += self.part
        self.seconds += time.perf_counter() - t

    def _add(self, panel: np.ndarray, ssyrk) -> None:
        n = len(panel)
        for i, cols in enumerate(_sub_blocks(panel.shape[1], self.sub_cols)):
            size = n * (cols.stop - cols.start)
            block = to_float32(
                panel[:, cols],
                self.block[:size].reshape(n, -1),
                self.scratch[:size].reshape(n, -1),
            )
            self.sums += block.sum(axis=1)  # before the shift: an inf row stays the only one
            # float32 sums (the shift only has to be near the mean: any shift is restored
            # exactly), 5x faster than a float64 mean. numpy's loops, not BLAS GEMVs: a GEMV
            # between two ssyrk calls slowed the next ssyrk by half (OpenBLAS, 2 threads)
            shift = block.sum(axis=0)
            shift /= n
            block -= shift
            shift64 = shift.astype(np.float64)
            # float32: |Xs||c| rounding, below the product's
            self.cross += np.einsum("ij,j->i", block, shift)
            self.shift2 += float(shift64 @ shift64)
            # block.T is Fortran-ordered (no copy into BLAS); trans=1: block.T^T block.T.
            # beta=0 on the first block resets the accumulator without a separate pass over it.
            self.part = ssyrk(1.0, block.T, beta=float(i > 0), c=self.part, trans=1, overwrite_c=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The Gram in place of the accumulator: no n x n temporary (at n = 5,000 each is
        200 MB, and four of them were half the stream's peak)."""
        self.part = None
        g = self.gram.T  # C order; ssyrk filled the Fortran upper triangle: this lower one
        symmetrize_lower(g)
        with np.errstate(invalid="ignore", over="ignore"):
            g += self.cross[:, None]
            g += self.cross[None, :]
            g += self.shift2
        self.gram = None
        return g, self.sums


def symmetrize_lower(g: np.ndarray, rows: int = 512) -> None:
    """Copy the lower triangle of square `g` onto its upper one in place, a band of rows at a
    time (np.triu/tril would each allocate another n x n)."""
    n = len(g)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        block = g[a:b, a:b]
        upper = np.triu_indices(b - a, 1)
        block[upper] = block.T[upper]
        g[a:b, b:] = g[b:, a:b].T


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
