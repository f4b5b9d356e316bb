"""Stimulus sheets: a CSV/TSV file naming images and their metadata, read and checked before
any image is decoded. Extraction shows them in the sheet's order (`bonnerlab.extract.stimuli`);
`python -m bonnerlab.data pack` packs them into shards with their columns.

A `path` column (relative to the sheet), an optional `stimulus_id` column (else the path), an
optional integer `label`; every other column becomes a typed coordinate (int, float, bool or str).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonnerlab.errors import DataError

SHEET_SUFFIXES = (".csv", ".tsv")
RESERVED = ("stimulus", "presentation", "content_hash")  # the store's own names


@dataclass
class Sheet:
    ids: list[str]
    labels: list[int]  # -1 where the sheet has no label column
    files: list[Path]  # resolved, each checked to exist
    coords: dict[str, np.ndarray] = field(default_factory=dict)  # the other columns, typed


def read_sheet(sheet: Path, limit: int = 0) -> Sheet:
    """A CSV/TSV sheet of stimuli; every check before any image is decoded."""
    import pandas as pd

    if not sheet.is_file():
        raise DataError(f"stimulus sheet {sheet} does not exist")
    try:
        # strings stay strings (ids like 007 keep their zeros); numbers and booleans are inferred
        table = pd.read_csv(
            sheet,
            sep="\t" if sheet.suffix.lower() == ".tsv" else ",",
            dtype={"path": str, "stimulus_id": str},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read stimulus sheet {sheet}: {str(e).splitlines()[0]}") from e
    if "path" not in table.columns:
        raise DataError(
            f"stimulus sheet {sheet} has no `path` column "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    check_column_names(sheet, _header(sheet))
    if limit:
        table = table.iloc[:limit]
    if table.empty:
        raise DataError(f"stimulus sheet {sheet} has a header but no rows: no stimuli to extract")
    for column, what in (("path", "path"), ("stimulus_id", "stimulus_id")):
        if column in table.columns:
            blank = table[column].isna() | (table[column].astype(str).str.strip() == "")
            if blank.any():
                row = int(np.flatnonzero(blank.to_numpy())[0]) + 2  # 1-based, after the header
                raise DataError(f"stimulus sheet {sheet} line {row}: empty {what}")
    files = [(sheet.parent / p).resolve() for p in table["path"]]
    for line, path in enumerate(files, start=2):
        if not path.is_file():
            raise DataError(f"stimulus sheet {sheet} line {line}: image {path} not found")
    ids = (
        list(table["stimulus_id"].astype(str))
        if "stimulus_id" in table.columns
        else list(table["path"])
    )
    seen: dict[str, int] = {}
    for line, sid in enumerate(ids, start=2):
        if sid in seen:
            raise DataError(
                f"stimulus sheet {sheet}: duplicate stimulus id {sid!r} "
                f"(lines {seen[sid]} and {line})"
            )
        seen[sid] = line
    labels = [-1] * len(ids)
    if "label" in table.columns:
        if not pd.api.types.is_integer_dtype(table["label"]):
            raise DataError(f"stimulus sheet {sheet}: the label column must hold integers")
        labels = table["label"].astype(int).tolist()
    coords: dict[str, np.ndarray] = {}
    for column in table.columns:
        if column in ("path", "stimulus_id", "label"):
            continue
        if column in RESERVED:
            raise DataError(
                f"stimulus sheet {sheet}: column name {column!r} is reserved; rename it"
            )
        values = table[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            coords[str(column)] = values.to_numpy()
        else:
            coords[str(column)] = values.fillna("").astype(str).to_numpy(dtype=str)
    return Sheet(ids, labels, files, coords)


def _header(sheet: Path) -> list[str]:
    """The sheet's column names as written (pandas renames empty and repeated ones)."""
    with sheet.open(newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f, delimiter="\t" if sheet.suffix.lower() == ".tsv" else ","), [])


def check_column_names(sheet: Path, names: Sequence[str]) -> None:
    """Every column becomes an array of the store, named after it: a one-line error for a name
    that cannot be one (empty, a path, zarr's reserved `__` prefix) or that appears twice."""
    seen: set[str] = set()
    for i, name in enumerate(names, start=1):
        where = f"stimulus sheet {sheet}: column {i}"
        if not name.strip():
            raise DataError(f"{where} has no name; name it or delete the column")
        if "/" in name or "\\" in name or name.strip() in (".", "..") or name.startswith("__"):
            raise DataError(
                f"{where} is named {name!r}, which cannot name a coordinate (no '/', '\\', "
                "'.', '..' or leading '__'); rename it"
            )
        if name in seen:
            raise DataError(f"{where}: the name {name!r} appears twice; rename one")
        seen.add(name)
