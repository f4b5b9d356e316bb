"""A layer's stimulus x stimulus second moments, streamed from its store: `layer_gram`.

Every similarity analysis and the dual-form encoding model need only the Gram matrix G = X X^T
of a layer's flattened features and its row sums, never the features themselves; G is n x n
where X is n x p, and p (hundreds of thousands of features) is what breaks in-memory tools.

How the stream reads the store: a *panel* is a range of the first feature dim for all stimuli,
as wide as `memory_gb` allows after the Gram itself; its product (BLAS ssyrk on float32, half
the flops of a GEMM) is added into float64 once per panel. Extraction shards each layer along
its features (one file per batch, inner chunks of a few indices of the first feature dim), and
panel edges fall on those inner chunks, so each is decoded once however many panels
(`store_reads` in the attrs). A store written before sharding holds one chunk per batch, all
features: every panel decodes whole rows, and few, wide panels matter. Cost per value besides
the product: the codec's decode (zstd: ~4 ns of CPU, as much as the rest together), a float16
-> float32 conversion (bit arithmetic: numpy's cast branches per value), and the shift's few
vector steps, all in reader threads (`_stream`).
Nothing here imports torch unless the device is CUDA (or `auto` with torch installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from bonnerlab.activations import open_activations, store_info
from bonnerlab.activations.store import ActivationStore
from bonnerlab.errors import AnalysisError, StoreError, UserError
from bonnerlab.runs import atomic_write_bytes

CACHE_FORMAT = 1  # bump when what a cache file holds changes: older files are rebuilt
# reader threads filling a panel (each decodes its own row chunks; numpy and the codecs release
# the GIL): one per core, up to this many
MAX_THREADS = 8
# values of a panel taken through each pass at once (_convert_rows, _shift_rows): 1 MB of
# float32, within a core's L2 (4x fewer numpy calls than 256 KB, and as fast per value)
GROUP_VALUES = 2**18


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
        if len(idx) == len(self.stimulus) and np.array_equal(idx, np.arange(len(idx))):
            return self  # already in that order: no n x n copy (200 MB at n = 5,000)
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
        source = ActivationStore(store, mode="r")
        try:
            gram, sums, p, stats = _stream(
                source, layer, keep, int(meta["chunk_size"]), device, memory_gb, progress
            )
        except _NonFinite as e:
            _name_damage(source, layer)  # a missing chunk reads as NaN: that, if it is one
            raise AnalysisError(
                f"layer {layer!r} of {store} has non-finite activations (inf or NaN) for "
                f"{len(e.rows)} stimuli, e.g. {str(stimulus[e.rows[0]])!r}"
            ) from None
        except (UserError, MemoryError, KeyboardInterrupt):
            raise
        except Exception:  # a codec's error (zstd, crc32c, a truncated file): which chunk
            _name_damage(source, layer)
            raise
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


def _name_damage(source: ActivationStore, layer: str) -> None:
    """Raise the StoreError naming the first damaged chunk of `layer` (missing, checksum, or
    not decodable), if any: only on the error path, so the stream itself reads each chunk
    once."""
    for chunk in range(source.n_chunks):
        problem = source.check_chunk_file(layer, chunk)
        if problem:
            raise StoreError(f"{problem}; rerun the extraction with the same config to rewrite it")
        if not source.checksummed(layer):
            source.read_chunk(layer, chunk)  # raises the StoreError naming it


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


class _NonFinite(Exception):
    """Rows of a panel holding inf or NaN (positions among the kept stimuli): layer_gram names
    them. Raised as soon as a panel shows one, before the rest of the layer is read."""

    def __init__(self, rows: np.ndarray):
        super().__init__(f"{len(rows)} rows with non-finite values")
        self.rows = rows


@dataclass(frozen=True)
class Plan:
    """How one layer is streamed (plan_panels)."""

    step: int  # indices of the first feature dim in one panel
    threads: int  # readers filling a panel at once (and sharing its vector passes)


def feature_chunk(da) -> int:
    """How many indices of the first feature dim one store chunk spans: the whole dim for
    stores chunked by rows only (every read decodes whole rows), fewer when the layer is also
    chunked (or sharded into inner chunks) along its features."""
    chunks = da.encoding.get("chunks") or ()
    return int(chunks[1]) if len(chunks) > 1 else int(da.shape[1])


def threads() -> int:
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


def plan_panels(
    n: int,
    shape: tuple[int, ...],
    itemsize: int,
    chunk: int,
    memory_gb: float,
    feature_chunk: int | None = None,
) -> Plan:
    """Panels as wide as `memory_gb` allows after the float64 Gram and its float32 partial
    (12 n^2 bytes): per index of the first feature dim, the float32 panel (all stimuli) and,
    for each reader thread, one row chunk as stored, its decode scratch and its uint32 scratch.
    Panel edges fall on the store's feature chunks, so a store chunked along features is
    decoded once whatever the number of panels."""
    inner = math.prod(shape[1:])
    p = shape[0] * inner
    span = shape[0] if feature_chunk is None else max(1, min(feature_chunk, shape[0]))
    readers = threads()
    budget = memory_gb * 2**30
    fixed = 12 * n * n
    # zarr holds a row chunk's compressed and decoded bytes while it copies out the selection
    column = inner * (4 * n + readers * chunk * (3 * itemsize + 4))
    step = int(min(shape[0], (budget - fixed) // column))
    if span < shape[0] and step >= span:
        step -= step % span
    if step < 1:
        need = (fixed + column) / 2**30
        raise AnalysisError(
            f"memory_gb={memory_gb} is too small for the Gram of {n} stimuli x {p} features "
            f"(needs at least {need:.2f})"
        )
    return Plan(step, readers)


def _read_block(source: ActivationStore, layer: str, rows: slice, cols: slice) -> np.ndarray:
    """One row chunk of a panel as stored: the store reads the inner chunks of `cols` from the
    shard file itself, or (a layout it does not read itself: a store from before sharding)
    zarr decodes every chunk the rows and `cols` touch."""
    array = source.array(layer)
    shape = (rows.stop - rows.start, cols.stop - cols.start, *array.shape[2:])
    out = getattr(_BLOCKS, "out", None)  # this thread's own, reused: fresh ones page-fault
    if out is None or out.size < math.prod(shape) or out.dtype != array.dtype:
        out = _BLOCKS.out = np.empty(math.prod(shape), dtype=array.dtype)
    block = source.read_features(
        layer, rows.start // source.chunk_size, cols, out[: math.prod(shape)].reshape(shape)
    )
    return np.asarray(array[rows, cols]) if block is None else block


_BLOCKS = threading.local()


def _stream(
    source: ActivationStore,
    layer: str,
    keep: np.ndarray,
    chunk: int,
    device: str,
    memory_gb: float,
    progress: bool,
):
    """The Gram of `layer` (presentation, features...) over the rows `keep`, in panels.

    Each panel (all kept stimuli, a range of features) is filled by `plan.threads` threads
    (zarr's codecs and numpy's loops release the GIL), in two passes (`_fill`): decoded to
    float32, then shifted by its column means into the row sums and v. Then the accumulator
    adds Xs Xs^T. Reading and the product do not overlap: on a machine whose cores BLAS
    already fills, a reader thread beside it only slows both (measured: 2x).

    The shift (X = Xs + 1 c^T, c the panel's column means): float32 products then round
    relative to the features' spread, not their offset (a ReLU layer's mean is as large as its
    spread, and correlation and CKA keep only the spread); it comes back exactly in float64 at
    the end: G = sum Xs Xs^T + v 1^T + 1 v^T + |c|^2, v = Xs c, and X 1 = Xs 1 + sum c.
    """
    array = source.array(layer)
    shape = tuple(int(s) for s in array.shape[1:])
    n, n_all = int(keep.sum()), int(array.shape[0])
    p = math.prod(shape)
    inner = p // shape[0]
    span = int(array.chunks[1]) if len(array.chunks) > 1 else shape[0]
    plan = plan_panels(n, shape, np.dtype(array.dtype).itemsize, chunk, memory_gb, span)
    panels = [slice(a, min(a + plan.step, shape[0])) for a in range(0, shape[0], plan.step)]
    reads = [slice(a, min(a + chunk, n_all)) for a in range(0, n_all, chunk)]
    reads = [r for r in reads if keep[r].any()]  # a chunk of only skipped stimuli: nothing
    # where each read's kept rows go in the panel
    starts = np.concatenate([[0], np.cumsum([int(keep[r].sum()) for r in reads])]).astype(int)
    acc = _accumulator(device, n)
    buffer = np.empty(n * plan.step * inner, dtype=np.float32)
    row_sums, cross = np.zeros(n), np.zeros(n)  # float64: X 1 and v, summed over panels
    shift2 = 0.0  # |c|^2, summed over panels
    bar = _bar(progress, len(panels) * len(reads), layer)
    pool = ThreadPoolExecutor(plan.threads) if plan.threads > 1 else None
    read_s = 0.0
    try:
        for cols in panels:
            width = (cols.stop - cols.start) * inner
            panel = buffer[: n * width].reshape(n, width)  # contiguous, also the narrower last one
            t = time.perf_counter()
            shift, sums, dots = _fill(source, layer, cols, panel, reads, starts, keep, pool, bar)
            read_s += time.perf_counter() - t
            if not (np.isfinite(sums).all() and np.isfinite(dots).all()):
                raise _NonFinite(np.flatnonzero(~(np.isfinite(sums) & np.isfinite(dots))))
            shift64 = shift.astype(np.float64)
            row_sums += sums
            row_sums += shift64.sum()
            cross += dots
            shift2 += float(shift64 @ shift64)
            acc.add(panel, pool)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    del buffer, panel  # before the result: its n x n work needs the room
    gram = acc.result()
    with np.errstate(invalid="ignore", over="ignore"):
        gram += cross[:, None]
        gram += cross[None, :]
        gram += shift2
    # how often each stored chunk was decoded: once per panel for a store chunked by rows only
    touched = sum(-(-c.stop // span) - c.start // span for c in panels)
    stats = {
        "passes": len(panels),
        "store_reads": round(touched / -(-shape[0] // span), 3),
        "read_s": round(read_s, 3),
        "compute_s": round(acc.seconds, 3),
        "device": acc.device,
        "threads": plan.threads,
    }
    return gram, row_sums, p, stats


def _fill(source, layer: str, cols: slice, panel: np.ndarray, reads, starts, keep, pool, bar):
    """Read one panel into `panel` in two passes over it, each split among the pool's threads:
    every row chunk decoded and converted to float32 (`_convert_rows`, with its column sums),
    then shifted by the column means (`_shift_rows`). Returns the shift, row sums and v."""
    n, width = panel.shape
    sums, dots = np.empty(n, np.float32), np.empty(n, np.float32)

    def convert(i: int) -> np.ndarray:
        rows = reads[i]
        block = _read_block(source, layer, rows, cols).reshape(rows.stop - rows.start, -1)
        if not keep[rows].all():
            block = block[keep[rows]]
        colsum = np.zeros(width, np.float64)
        _convert_rows(block, panel[starts[i] : starts[i + 1]], colsum)
        bar.update(1)
        return colsum

    colsum = sum(pool.map(convert, range(len(reads))) if pool else map(convert, range(len(reads))))
    if not np.isfinite(colsum).all():
        raise _NonFinite(np.flatnonzero(~np.isfinite(panel).all(axis=1)))
    shift = (colsum / n).astype(np.float32)
    step = -(-n // (pool._max_workers if pool else 1))
    parts = [slice(a, min(a + step, n)) for a in range(0, n, step)]

    def center(rows: slice) -> None:
        _shift_rows(panel[rows], shift, sums[rows], dots[rows])

    list(pool.map(center, parts) if pool else map(center, parts))
    return shift, sums, dots


def _group(out: np.ndarray) -> int:
    """Rows of `out` (r, w) taken at once: a few, so each vector step of a group reads and
    writes the CPU's cache and memory sees each value once a pass."""
    return max(1, GROUP_VALUES // max(1, out.shape[1]))


def _convert_rows(src: np.ndarray, out: np.ndarray, colsum: np.ndarray) -> None:
    """`src` (r, w) as stored into `out` (r, w) float32, its column sums added to `colsum`."""
    rows = _group(out)
    scratch = np.empty(rows * out.shape[1], np.uint32)
    part = np.zeros(out.shape[1], np.float32)  # float32 within a chunk: only the shift uses it
    for a in range(0, len(out), rows):
        o = out[a : a + rows]
        to_float32(src[a : a + rows], o, scratch[: o.size].reshape(o.shape))
        part += o.sum(axis=0)
    colsum += part


def _shift_rows(out: np.ndarray, shift: np.ndarray, sums: np.ndarray, dots: np.ndarray) -> None:
    """`out` (r, w) minus `shift` in place; each row's sum into `sums` and its dot with `shift`
    into `dots`."""
    rows = _group(out)
    for a in range(0, len(out), rows):
        o = out[a : a + rows]
        np.subtract(o, shift, out=o)
        sums[a : a + rows] = o.sum(axis=1)
        # numpy's loop, not a BLAS GEMV: one between two ssyrk calls slowed the next by half
        # (OpenBLAS, 2 threads); float32, its rounding below the product's
        dots[a : a + rows] = np.einsum("ij,j->i", o, shift)


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


def _accumulator(device: str, n: int):
    """The CPU (numpy/BLAS) accumulator, or the CUDA one when the device resolves to a GPU;
    torch is imported only when it may be used."""
    if device == "cpu" or (device == "auto" and not gpu_may_be_present()):
        return _CpuAccumulator(n)
    if importlib.util.find_spec("torch") is None:
        if device == "auto":
            return _CpuAccumulator(n)
        raise UserError(f"device {device!r} needs torch, which is not installed; use cpu")
    from bonnerlab.distributed import use_device

    resolved = use_device(device)
    if resolved.type == "cpu":
        return _CpuAccumulator(n)
    return _CudaAccumulator(n, resolved)


def gpu_may_be_present() -> bool:
    """False when this Linux machine has no NVIDIA driver loaded: `auto` is then the CPU without
    importing torch (2.5-3 s and 0.45 GB of RSS for nothing; bench/bench_analysis.py)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: only torch can tell
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return Path("/proc/driver/nvidia/version").exists()


class _CpuAccumulator:
    """Each panel's Xs Xs^T through BLAS ssyrk in float32 (upper triangle), into float64."""

    device = "cpu"

    def __init__(self, n: int):
        self.gram = np.zeros((n, n), dtype=np.float64, order="F")
        self.part = np.zeros((n, n), dtype=np.float32, order="F")
        self.seconds = 0.0

    def add(self, panel: np.ndarray, pool: Any = None) -> None:
        from scipy.linalg.blas import ssyrk

        t = time.perf_counter()
        # panel.T is Fortran-ordered (no copy into BLAS); trans=1: panel.T^T panel.T. ssyrk
        # holds the GIL; nothing runs beside it anyway (see _stream)
        self.part = ssyrk(1.0, panel.T, beta=0.0, c=self.part, trans=1, overwrite_c=1)
        # only the upper triangle, in bands of columns (Fortran order: a column's upper part is
        # contiguous), in the pool's threads: the float64 add was 3% of the whole Gram
        n, step = len(self.gram), 256
        bands = [slice(a, min(a + step, n)) for a in range(0, n, step)]

        def add(cols: slice) -> None:
            self.gram[: cols.stop, cols] += self.part[: cols.stop, cols]

        list(pool.map(add, bands) if pool else map(add, bands))
        self.seconds += time.perf_counter() - t

    def result(self) -> np.ndarray:
        """The Gram in place of the accumulator: no n x n temporary (at n = 5,000 each is
        200 MB, and four of them were half the stream's peak)."""
        self.part = None
        g = self.gram.T  # C order; ssyrk filled the Fortran upper triangle: this lower one
        symmetrize_lower(g)
        self.gram = None
        return g


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

    def __init__(self, n: int, device):
        import torch

        self.torch, self.dev = torch, device
        self.device = str(device)
        self.gram = torch.zeros((n, n), dtype=torch.float64, device=device)
        self.part = torch.zeros((n, n), dtype=torch.float32, device=device)
        self.seconds = 0.0

    def add(self, panel: np.ndarray, pool: Any = None) -> None:
        torch = self.torch
        t = time.perf_counter()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            block = torch.from_numpy(panel).to(self.dev)
            torch.mm(block, block.T, out=self.part)
            self.gram += self.part
            if self.dev.type == "cuda":  # (a CPU device runs these lines in the tests)
                torch.cuda.synchronize(self.dev)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        self.seconds += time.perf_counter() - t

    def result(self) -> np.ndarray:
        g = self.gram.cpu().numpy()
        return (g + g.T) / 2
