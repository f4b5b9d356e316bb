"""Reading a store lazily, for analysis: `open_activations(path, layer)` and its helpers.

Nothing is read until it is indexed; nothing here imports torch. Each read checks what it
touches, not the whole store (that is `verify`): a chunk that should exist and does not, or one
that does not decode (its crc32c, a codec error), is a one-line StoreError naming the layer and
chunk, never NaN rows or a codec's traceback.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.activations.store import (
    DONE_DIR,
    PRESENTATION,
    ActivationStore,
    _quiet_zarr,
    _read_meta,
)
from bonnerlab.errors import StoreError


def _meta_or_error(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise StoreError(f"activation store {path} not found")
    meta = _read_meta(path)
    if meta is None:
        raise StoreError(f"{path} is not an activation store")
    return meta


def stored_layers(path: str | Path) -> list[str]:
    """Names of the layers in the store, in extraction order."""
    return list(_meta_or_error(Path(path))["layers"])


def store_info(path: str | Path) -> dict[str, Any]:
    """The store's group attributes: identity, provenance, completeness, skipped stimuli."""
    return _meta_or_error(Path(path))


def open_activations(
    path: str | Path, layer: str, *, allow_incomplete: bool = False, drop_skipped: bool = True
):
    """One layer as a lazy `xarray.DataArray` (presentation, ...) with `stimulus`/`label` coords.

    Nothing is read until you index or call `.values`/`to_numpy`; indexing reads only the chunks
    it touches. Attributes hold the layer's provenance (arch, weights, channels, pooling, ...).
    Refuses an unfinished store unless `allow_incomplete` (unwritten rows read as NaN).
    Stimuli that were skipped as unreadable are dropped unless `drop_skipped=False`.
    """
    import xarray as xr

    path = Path(path)
    meta = _meta_or_error(path)
    if layer not in meta["layers"]:
        import difflib

        close = difflib.get_close_matches(layer, meta["layers"], n=5, cutoff=0.3)
        raise StoreError(
            f"layer {layer!r} is not in {path}; closest: {', '.join(close or meta['layers'][:5])}"
        )
    complete = bool(meta.get("complete"))
    if not complete and not allow_incomplete:
        raise StoreError(
            f"{path} is not finalized (some chunks may be missing); finish the extraction or run "
            f"`python -m bonnerlab.activations finalize {path}`, or pass allow_incomplete=True"
        )
    with _quiet_zarr():
        # chunks=None: xarray's own lazy indexing (no dask); mask_and_scale=False keeps float16.
        # Only this layer: dims are per dataset in xarray, and layers disagree on `channel`.
        others = [name for name in meta["layers"] if name != layer]
        ds = xr.open_zarr(
            str(path),
            chunks=None,
            consolidated=complete,
            zarr_format=3,
            mask_and_scale=False,
            drop_variables=others,
        )
    ds[layer] = _checked(ds[layer].variable, ActivationStore(path, mode="r"), layer, complete)
    da = ds[layer]
    # zarr reads strings as numpy's StringDType, which `.astype(str)` cannot take: plain objects
    da = da.assign_coords(
        {
            name: c.astype(object)
            for name, c in da.coords.items()
            if c.dtype.kind == "T" or name == "stimulus"
        }
    )
    provenance = {k: v for k, v in meta.items() if k not in ("identity", "layers")}
    da.attrs = {**provenance, **da.attrs}
    skipped = meta.get("skipped_stimuli") or []
    if drop_skipped and skipped:
        keep = ~np.isin(da["stimulus"].values.astype(str), np.asarray(skipped, dtype=str))
        da = da.isel({PRESENTATION: np.flatnonzero(keep)})
    return da


def _checked(variable, store: ActivationStore, layer: str, complete: bool):
    """The layer's variable, read through `CheckedChunks` (still lazy)."""
    import xarray as xr
    from xarray.core import indexing

    done = (
        None
        if complete
        else {int(c) for c in os.listdir(store.path / DONE_DIR / layer) if c.isdigit()}
    )
    data = indexing.LazilyIndexedArray(CheckedChunks(store, layer, done))
    return xr.Variable(variable.dims, data, attrs=variable.attrs, encoding=variable.encoding)


try:  # xarray's documented base for lazily indexed backend arrays
    from xarray.backends import BackendArray as _BackendArray
except ImportError:  # pragma: no cover - xarray is a dependency
    _BackendArray = object


class CheckedChunks(_BackendArray):
    """One layer's zarr array for xarray's lazy indexing; each read first checks that the chunks
    it touches exist (when marked done: `done`, None = all) and names the chunk (and, sharded, the
    inner chunk) that fails to decode. A stat (sharded: a read of the shard's index) per touched
    chunk, once: reading stays as fast as zarr's own, and a panel of features (`da[:, a:b]`) decodes
    only the inner chunks holding it."""

    def __init__(self, store: ActivationStore, layer: str, done: set[int] | None):
        self.store, self.layer, self.done = store, layer, done
        self.sound: set[int] = set()  # chunks whose file (and shard index) was found whole
        self.array = store.array(layer)
        self.shape, self.dtype = tuple(self.array.shape), self.array.dtype

    def __getitem__(self, key):
        from xarray.core import indexing

        if isinstance(key, indexing.VectorizedIndexer):
            method = self._vindex
        elif isinstance(key, indexing.OuterIndexer):
            method = self._oindex
        else:
            method = self._getitem
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.VECTORIZED, method
        )

    def _getitem(self, key: tuple):
        return self._read(key, lambda k: self.array[k])

    def _oindex(self, key: tuple):
        return self._read(key, lambda k: self.array.oindex[k])

    def _vindex(self, key: tuple):
        return self._read(key, lambda k: self.array.vindex[k])

    def _chunks(self, rows: Any) -> list[int]:
        n, size = self.shape[0], self.store.chunk_size
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return list(range(start // size, -(-stop // size))) if stop > start else []
            rows = np.arange(start, stop, step)
        picked = np.asarray(rows).reshape(-1) % max(n, 1)
        return np.unique(picked // size).tolist()

    def _read(self, key: tuple, read):
        chunks = self._chunks(key[0] if key else slice(None))
        features = self._features(key[1] if len(key) > 1 else slice(None))
        for chunk in chunks:
            if chunk in self.sound or (self.done is not None and chunk not in self.done):
                continue
            if self.store.check_chunk_file(self.layer, chunk, checksum=False) is None:
                self.sound.add(chunk)  # its file and index once: a Gram reads it once per panel
                continue
            problem = self.store.check_chunk_file(  # only what this read touches
                self.layer, chunk, checksum=False, features=features
            )
            if problem:
                raise StoreError(f"{problem}; rerun the extraction with the same config")
        try:
            return read(key)
        except StoreError:
            raise
        except Exception as e:
            # which one (the error path only): the checksums of the touched (inner) chunks, then
            # each touched chunk decoded alone
            for chunk in chunks:
                problem = self.store.check_chunk_file(self.layer, chunk, features=features)
                if problem:
                    raise StoreError(f"{problem}; rerun the extraction with the same config") from e
            for chunk in chunks:
                self.store.read_chunk(self.layer, chunk)
            raise

    def _features(self, index: Any) -> range | None:
        """The indices of the first feature dim a key's `index` touches, as one range; None when
        the layer has none."""
        if len(self.shape) < 2:
            return None
        n = self.shape[1]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            return range(start, stop) if step == 1 else self._features(np.arange(start, stop, step))
        picked = np.asarray(index).reshape(-1) % max(n, 1)
        return range(int(picked.min()), int(picked.max()) + 1) if picked.size else range(0)


def flatten(da):
    """(presentation, ...) -> (presentation, neuroid), neuroid running over the feature dims in C
    order."""
    feature_dims = [d for d in da.dims if d != PRESENTATION]
    if feature_dims == ["neuroid"]:
        return da
    if not feature_dims:
        raise StoreError("nothing to flatten: the array has only the presentation dimension")
    out = da.stack(neuroid=feature_dims, create_index=False)
    return out.transpose(PRESENTATION, "neuroid")


def select_stimuli(da, stimuli: Sequence[str]):
    """Rows for `stimuli` (relative paths), in the order given; unknown names are an error."""
    names = da["stimulus"].values.astype(str)
    position = {name: i for i, name in enumerate(names)}
    missing = [s for s in stimuli if s not in position]
    if missing:
        raise StoreError(f"{len(missing)} stimuli not in the store, e.g. {missing[0]!r}")
    return da.isel({PRESENTATION: [position[s] for s in stimuli]})


def to_numpy(da) -> np.ndarray:
    """Read the (selected) values into memory as a NumPy array."""
    return np.asarray(da.values)


def export_netcdf(path: str | Path, out: str | Path, layers: Sequence[str] | None = None) -> Path:
    """Write the store's layers (all by default) to one netCDF file for tools that need it.

    netCDF-4 through h5netcdf when h5py is installed, else netCDF-3 through scipy (float16 is
    widened to float32 there: netCDF-3 has no half floats). Loads the layers into memory.
    """
    import importlib.util

    import xarray as xr

    netcdf4 = (
        importlib.util.find_spec("h5py") is not None
        and importlib.util.find_spec("h5netcdf") is not None
    )

    out = Path(out)
    layers = list(layers) if layers is not None else stored_layers(path)
    variables = {}
    for layer in layers:
        da = open_activations(path, layer, drop_skipped=False)
        # netCDF has no nested attributes: keep scalars and lists, JSON-encode the rest.
        # netCDF has no booleans either: store them as 0/1.
        attrs = {
            k: (
                int(v)
                if isinstance(v, bool)
                else v
                if isinstance(v, str | int | float)
                else json.dumps(v, default=str)
            )
            for k, v in da.attrs.items()
            if k != "coordinates"
        }
        # netCDF dims are global: prefix feature dims with the layer so shapes may differ.
        rename = {d: f"{layer}.{d}" for d in da.dims if d != PRESENTATION}
        da = da.load().rename(rename).assign_attrs(attrs)
        if not netcdf4 and da.dtype == np.float16:
            da = da.astype(np.float32, keep_attrs=True)
        variables[layer] = da
    ds = xr.Dataset(variables)
    ds = ds.assign_coords(stimulus=ds["stimulus"].astype(str))
    ds = ds.assign_coords(
        {name: c.astype(np.int8) for name, c in ds.coords.items() if c.dtype == bool}
    )
    ds.attrs = {}
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    if netcdf4:
        ds.to_netcdf(tmp, engine="h5netcdf")
    else:
        ds.to_netcdf(tmp, engine="scipy", format="NETCDF3_64BIT")
    os.replace(tmp, out)
    return out
