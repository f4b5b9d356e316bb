"""Stimuli for extraction: an image folder, a CSV/TSV sheet with metadata, or a dataset split.

- folder: every image under it, recursively, sorted by relative path (the same order in every
  shard); the first folder level gives the label when images sit in class folders.
- sheet (`.csv`/`.tsv`): a `path` column (relative to the sheet), an optional `stimulus_id`
  column (else the path), an optional integer `label`; every other column becomes a typed
  coordinate on `presentation` (int, float, bool or str). Order is the sheet's.
- digits / mnist: the same split the training run used, decoded in memory.

Image files are decoded and preprocessed in DataLoader workers (`iter_batches`), batched. The
worker that reads a file hashes its bytes too (blake2b, 16 bytes) and decodes from the same bytes:
the store records each row's content, so a file replaced under the same name is noticed
(`content_hashes` hashes the rows already written, without decoding, when a run resumes).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonnerlab.config import DATASET_STIMULI, DataConfig, ExtractConfig, to_dict
from bonnerlab.data.folders import scan_stimulus_folder
from bonnerlab.errors import ConfigError, DataError
from bonnerlab.models.preprocess import Transform

SHEET_SUFFIXES = (".csv", ".tsv")
RESERVED = ("stimulus", "presentation", "content_hash")


@dataclass
class Stimuli:
    ids: list[str]  # relative paths (image folder), sheet ids, or dataset ids like digits/0042
    labels: list[int]  # -1 where unknown
    root: str
    classes: list[str]
    images: torch.Tensor | None = None  # in-memory datasets: uint8 [N, C, H, W]
    files: list[Path] | None = None  # image folders and sheets
    coords: dict[str, np.ndarray] = field(default_factory=dict)  # sheet columns, typed


def read_sheet(sheet: Path, limit: int = 0) -> Stimuli:
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
    return Stimuli(ids, labels, str(sheet.resolve()), [], files=files, coords=coords)


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


def load_stimuli(
    cfg: ExtractConfig, image_size: int, in_channels: int, data: DataConfig | None
) -> Stimuli:
    """The configured stimuli; datasets at `image_size` with `in_channels` (in memory)."""
    from bonnerlab.data import datasets as bdata

    if cfg.stimuli not in DATASET_STIMULI:
        path = Path(cfg.stimuli)
        if path.suffix.lower() in SHEET_SUFFIXES:
            return read_sheet(path, cfg.limit)
        files, labels, classes = scan_stimulus_folder(path)
        if cfg.limit:
            files, labels = files[: cfg.limit], labels[: cfg.limit]
        ids = [p.relative_to(path).as_posix() for p in files]
        return Stimuli(ids, labels, str(path.resolve()), classes, files=files)

    # Datasets: the same split the training run used (its seed and fraction) when known.
    base = data or DataConfig()
    data_cfg = DataConfig(
        **{
            **to_dict(base),
            "dataset": cfg.stimuli,
            "image_size": image_size,
            "in_channels": in_channels,
            "root": cfg.data_root or (base.root if data else "data"),
            "download": False,
            "mnist_files": "train",
        }
    )
    splits = {"digits": ("all", "train", "val"), "mnist": ("test", "train", "val")}[cfg.stimuli]
    if cfg.split not in splits:
        raise ConfigError(
            f"split for {cfg.stimuli} must be one of {', '.join(splits)}; got {cfg.split!r}"
        )
    if cfg.split in ("train", "val"):
        both = bdata.load_splits(data_cfg)
        source = both.train if cfg.split == "train" else both.val
    elif cfg.stimuli == "digits":
        source = bdata.load_digits_source(data_cfg)
    else:
        source = bdata.load_mnist_source(data_cfg, train_files=False)
    n = min(len(source), cfg.limit) if cfg.limit else len(source)
    return Stimuli(
        list(source.ids[:n]),
        source.labels[:n].tolist(),
        f"{cfg.stimuli}:{cfg.split}",
        [str(i) for i in range(10)],
        images=source.images[:n],
    )


def bytes_hash(data: bytes) -> str:
    """A stimulus file's content hash: blake2b of its bytes (16 bytes, hex), ~1 GB/s."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def array_hash(image: torch.Tensor) -> str:
    """An in-memory stimulus's content hash: blake2b of its dtype, shape and values."""
    a = image.contiguous().numpy()
    h = hashlib.blake2b(f"{a.dtype}{a.shape}".encode(), digest_size=16)
    h.update(a.tobytes())
    return h.hexdigest()


def file_hash(path: Path) -> str:
    try:
        return bytes_hash(path.read_bytes())
    except OSError:
        return ""  # unreadable: a rerun reads it as unreadable again ("" both times)


def content_hashes(stimuli: Stimuli, rows: Sequence[int], workers: int = 4) -> list[str]:
    """The content hash of each of `rows` now, without decoding: files read in threads (file
    reads and blake2b release the GIL)."""
    if stimuli.images is not None:
        return [array_hash(stimuli.images[i]) for i in rows]
    from concurrent.futures import ThreadPoolExecutor

    assert stimuli.files is not None
    files = stimuli.files
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda i: file_hash(files[i]), rows, chunksize=64))


class FileImages(torch.utils.data.Dataset):
    """Reads, hashes, decodes and preprocesses one file in a worker; returns an error string
    instead of raising, so the main process can name the file in a one-line error (worker
    exceptions arrive as long tracebacks)."""

    def __init__(
        self,
        files: list[Path],
        transform: Transform,
        shape: tuple[int, int, int],
        dtype: torch.dtype = torch.float32,
        max_pixels: int = 0,
    ):
        # dtype: what `transform` returns (uint8 when the device scales and normalizes); an
        # unreadable image's placeholder matches it, so the batch still stacks
        self.files, self.transform, self.shape, self.dtype = files, transform, shape, dtype
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        """(pixels, error or "", content hash)."""
        from bonnerlab.data.images import read_image

        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            return torch.zeros(self.shape, dtype=self.dtype), f"cannot read image {path}: {e}", ""
        digest = bytes_hash(data)
        try:
            x = self.transform(read_image(io.BytesIO(data), path, self.max_pixels))
        except DataError as e:  # unreadable, or a decompression bomb
            return torch.zeros(self.shape, dtype=self.dtype), str(e), digest
        except (OSError, ValueError) as e:  # the transform itself
            return (
                torch.zeros(self.shape, dtype=self.dtype),
                f"cannot read image {path}: {e}",
                digest,
            )
        if tuple(x.shape) != self.shape:
            return (
                torch.zeros(self.shape, dtype=self.dtype),
                (
                    f"image {path} preprocesses to {list(x.shape)}, not {list(self.shape)}: this "
                    "preprocessing keeps each image's aspect ratio; pass --preprocess center_crop"
                ),
                digest,
            )
        return x, "", digest


def iter_batches(
    stimuli: Stimuli,
    chunks: list[range],
    transform: Transform,
    shape: tuple[int, int, int],
    num_workers: int,
    pin: bool,
    worker_transform: Transform | None = None,
    max_pixels: int = 0,
) -> Iterator[tuple[torch.Tensor, list[int], list[str], list[str]]]:
    """(batch, positions that could not be read, their errors, every row's content hash) per
    chunk: preprocessed floats, or with `worker_transform` (the uint8 part of `transform`, see
    PreprocessSpec.split_at_float) the uint8 batch it gives, to be finished on the device."""
    if stimuli.images is not None:  # in memory: transformed here, a batch at a time
        for rows in chunks:
            batch = stimuli.images[rows.start : rows.stop]
            yield (worker_transform or transform)(batch), [], [], [array_hash(x) for x in batch]
        return
    assert stimuli.files is not None
    dtype = torch.float32 if worker_transform is None else torch.uint8
    loader = torch.utils.data.DataLoader(
        FileImages(stimuli.files, worker_transform or transform, shape, dtype, max_pixels),
        batch_sampler=[list(rows) for rows in chunks],
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=False,
    )
    for images, errors, hashes in loader:
        bad = [i for i, err in enumerate(errors) if err]
        yield images, bad, [errors[i] for i in bad], list(hashes)
