"""Targets for encoding models (voxels, neurons): read from a file, checked, keyed by stimulus.

One layout for every format, so `encode` never guesses: a DataArray (presentation, neuroid) with
a `stimulus` coordinate (the store's stimulus ids) and a `repeat` coordinate (0, 1, ... per
stimulus). A stimulus shown several times is several rows with the same `stimulus` and distinct
`repeat`s; `encode` fits the mean over repeats and estimates a noise ceiling from them. A
stimulus id on two rows without distinct repeats is refused: a duplicate is a mistake far more
often than a repeat, so repeats are declared, never inferred.

Formats:
- CSV/TSV (`.csv`, `.tsv`, `.txt` tab-separated): a `stimulus_id` column, an optional `repeat`
  column, every other numeric column a target (its header the neuroid name); non-numeric
  columns become presentation coordinates (e.g. a `category` to group folds by).
- `.npy`: (stimulus, neuroid) or (stimulus, neuroid, repeat), with an ids file of one stimulus
  id per line (`ids=`, default the same path with `.txt`: responses.npy -> responses.txt).
- netCDF (`.nc`) or zarr (`.zarr`) through xarray: one DataArray (or a Dataset with one data
  variable, or `variable=`) with dims `presentation` or `stimulus`, `neuroid`, and optionally
  `repeat`; ids from a `stimulus_id` or `stimulus` coordinate (or the `stimulus` dim's index),
  repeats from a `repeat` coordinate on `presentation` or a `repeat` dim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.errors import AnalysisError, DataError

PRESENTATION = "presentation"
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}


def load_targets(path: str | Path, *, ids: str | Path | None = None, variable: str | None = None):
    """The targets in `path` as a DataArray (presentation, neuroid), float64, `stimulus` and
    `repeat` coordinates; refused in one line (DataError) when ids are duplicated without repeats,
    or a target column holds a non-finite value (the column is named)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"targets {path} not found")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        da = _from_table(path, TABLE_SUFFIXES[suffix])
    elif suffix == ".npy":
        da = _from_npy(path, Path(ids) if ids is not None else path.with_suffix(".txt"))
    elif suffix in (".nc", ".zarr"):
        da = _from_xarray(path, variable)
    else:
        raise DataError(
            f"targets {path}: unknown format {suffix or '(no suffix)'}; use .csv/.tsv, .npy "
            "(with an ids file), .nc or .zarr"
        )
    return as_targets(da, str(path))


def as_targets(da: Any, what: str = "targets"):
    """A DataArray in the targets layout checked (a `load_targets` result, or one built in
    memory): float64 values, ids as str, `repeat` filled in, duplicates and non-finite refused."""
    import xarray as xr

    if not isinstance(da, xr.DataArray):
        raise DataError(f"{what}: expected an xarray DataArray or a path, got {type(da).__name__}")
    if PRESENTATION not in da.dims and "stimulus" in da.dims:
        da = _stimulus_dim_to_presentation(da)
    if "repeat" in da.dims:
        da = _stack_repeats(da)
    if da.ndim == 1:
        da = da.expand_dims(neuroid=1, axis=1)
    if da.ndim != 2 or PRESENTATION not in da.dims:
        raise DataError(f"{what}: expected dims (presentation, neuroid), got {da.dims}")
    other = next(d for d in da.dims if d != PRESENTATION)
    da = da.rename({other: "neuroid"}) if other != "neuroid" else da
    da = da.transpose(PRESENTATION, "neuroid")
    if "stimulus" not in da.coords and "stimulus_id" in da.coords:
        da = da.rename({"stimulus_id": "stimulus"})
    if "stimulus" not in da.coords or da["stimulus"].dims != (PRESENTATION,):
        raise DataError(f"{what}: no stimulus ids (a stimulus or stimulus_id coordinate)")
    ids = np.asarray(da["stimulus"].values).astype(str)
    repeat = _repeats(da, ids, what)
    if "neuroid" not in da.coords:
        da = da.assign_coords(neuroid=np.arange(da.sizes["neuroid"]))
    da = da.astype(np.float64).assign_coords(
        stimulus=(PRESENTATION, ids.astype(object)), repeat=(PRESENTATION, repeat)
    )
    check_finite(da.values, da["neuroid"].values, what)
    return da


def check_finite(y: np.ndarray, names: np.ndarray, what: str) -> None:
    """A target with a NaN or inf anywhere is named: a fit would spread it to every score."""
    bad = ~np.isfinite(y).all(axis=0)
    if bad.any():
        first = np.flatnonzero(bad)[0]
        rows = int((~np.isfinite(y[:, first])).sum())
        raise DataError(
            f"{what}: target {names[first]!s} has {rows} non-finite value(s) (NaN or inf)"
            + (f"; {int(bad.sum()) - 1} more target(s) too" if bad.sum() > 1 else "")
        )


def _repeats(da: Any, ids: np.ndarray, what: str) -> np.ndarray:
    """The repeat index of each row: given (then each (stimulus, repeat) must be unique), or 0
    for all (then each stimulus must be unique)."""
    if "repeat" in da.coords:
        repeat = np.asarray(da["repeat"].values)
        keys = [f"{s}\x00{r}" for s, r in zip(ids, repeat, strict=True)]
        kind, hint = "(stimulus_id, repeat) pairs", ""
    else:
        repeat = np.zeros(len(ids), dtype=np.int64)
        keys = list(ids)
        kind, hint = "stimulus ids", " (repeats of a stimulus need a repeat column)"
    unique, counts = np.unique(np.asarray(keys), return_counts=True)
    if (counts > 1).any():
        dup = [k.replace("\x00", " repeat ") for k in unique[counts > 1]]
        raise DataError(
            f"{what}: {len(dup)} {kind} on more than one row, e.g. "
            f"{', '.join(map(repr, dup[:3]))}{hint}"
        )
    return repeat


def _from_table(path: Path, sep: str):
    import pandas as pd
    import xarray as xr

    try:
        frame = pd.read_csv(path, sep=sep)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"targets {path}: unreadable ({str(e).splitlines()[0]})") from None
    if "stimulus_id" not in frame.columns:
        raise DataError(
            f"targets {path}: no stimulus_id column (columns: {', '.join(frame.columns[:5])})"
        )
    keys = {"stimulus_id", "repeat"}
    numeric = [
        c for c in frame.columns if c not in keys and pd.api.types.is_numeric_dtype(frame[c])
    ]
    labels = [c for c in frame.columns if c not in keys and c not in numeric]
    if not numeric:
        raise DataError(f"targets {path}: no numeric target columns")
    coords: dict[str, Any] = {
        "stimulus": (PRESENTATION, frame["stimulus_id"].astype(str).to_numpy()),
        "neuroid": np.asarray(numeric, dtype=str),
    }
    if "repeat" in frame.columns:
        coords["repeat"] = (PRESENTATION, frame["repeat"].to_numpy())
    coords.update({c: (PRESENTATION, frame[c].astype(str).to_numpy()) for c in labels})
    values = frame[numeric].to_numpy(dtype=np.float64)
    return xr.DataArray(values, dims=(PRESENTATION, "neuroid"), coords=coords)


def _from_npy(path: Path, ids_path: Path):
    import xarray as xr

    values = np.load(path, allow_pickle=False)
    if not ids_path.is_file():
        raise DataError(
            f"targets {path}: ids file {ids_path} not found (one stimulus id per line; ids=...)"
        )
    ids = [line.strip() for line in ids_path.read_text().splitlines() if line.strip()]
    if values.ndim not in (2, 3) or len(ids) != values.shape[0]:
        raise DataError(
            f"targets {path}: expected (stimulus, neuroid[, repeat]) with one row per id in "
            f"{ids_path}; got shape {values.shape} and {len(ids)} ids"
        )
    dims = (PRESENTATION, "neuroid", "repeat")[: values.ndim]
    return xr.DataArray(values, dims=dims, coords={"stimulus": (PRESENTATION, ids)})


def _from_xarray(path: Path, variable: str | None):
    import xarray as xr

    try:
        ds = xr.open_zarr(path) if path.suffix.lower() == ".zarr" else xr.open_dataset(path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"targets {path}: unreadable ({str(e).splitlines()[0]})") from None
    with ds:
        names = list(ds.data_vars)
        if variable is None and len(names) != 1:
            raise DataError(
                f"targets {path}: {len(names)} variables ({', '.join(names[:5])}); name one "
                "(variable=...)"
            )
        name = variable or names[0]
        if name not in ds:
            raise DataError(f"targets {path}: no variable {name!r} (has {', '.join(names[:5])})")
        return ds[name].load()


def _stimulus_dim_to_presentation(da: Any):
    """dims (stimulus, ...): the dim's index values are the ids."""
    ids = np.asarray(da["stimulus"].values).astype(str) if "stimulus" in da.coords else None
    if ids is None:
        raise DataError("targets: a stimulus dim without id values")
    da = da.drop_vars("stimulus").rename({"stimulus": PRESENTATION})
    return da.assign_coords(stimulus=(PRESENTATION, ids))


def _stack_repeats(da: Any):
    """(presentation, neuroid, repeat) -> one row per (stimulus, repeat); all-NaN repeat slots
    (fewer repeats for some stimuli) are dropped."""
    n_rep = da.sizes["repeat"]
    ids = np.asarray(da["stimulus"].values).astype(str)
    values = np.moveaxis(da.transpose(PRESENTATION, "repeat", ...).values, 1, 0)  # (rep, n, t)
    rows = values.reshape(n_rep * len(ids), -1)
    stim = np.tile(ids, n_rep)
    rep = np.repeat(np.arange(n_rep), len(ids))
    keep = ~np.isnan(rows).all(axis=1)
    neuroid = next(d for d in da.dims if d not in (PRESENTATION, "repeat"))
    import xarray as xr

    coords: dict[str, Any] = {
        "stimulus": (PRESENTATION, stim[keep]),
        "repeat": (PRESENTATION, rep[keep]),
    }
    if neuroid in da.coords:
        coords["neuroid"] = np.asarray(da[neuroid].values)
    return xr.DataArray(rows[keep], dims=(PRESENTATION, "neuroid"), coords=coords)


def average_repeats(da: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stimuli in order of first appearance, the mean over each one's repeats (m, t), and
    the number of repeats of each."""
    ids = np.asarray(da["stimulus"].values).astype(str)
    stimuli, first, inverse, counts = np.unique(
        ids, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    row = rank[inverse]
    y = np.asarray(da.values, dtype=np.float64)
    means = np.zeros((len(stimuli), y.shape[1]))
    np.add.at(means, row, y)
    means /= counts[order][:, None]
    return stimuli[order], means, counts[order]


def unknown_ids(ids: np.ndarray, stimuli: np.ndarray, what: str, where: str) -> None:
    """Target ids the store lacks: one line naming the first few (before anything is computed)."""
    unknown = sorted(set(ids.tolist()) - set(stimuli.tolist()))
    if unknown:
        raise AnalysisError(
            f"{what}: {len(unknown)} stimulus ids are not in {where}, e.g. "
            f"{', '.join(map(repr, unknown[:3]))}"
        )
