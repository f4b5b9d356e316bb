"""Stimuli for extraction: an image folder, a CSV/TSV sheet with metadata, or a dataset split.

- folder: every image under it, recursively, sorted by relative path (the same order in every
  shard); the first folder level gives the label when images sit in class folders.
- sheet (`.csv`/`.tsv`): a `path` column (relative to the sheet), an optional `stimulus_id`
  column (else the path), an optional integer `label`; every other column becomes a typed
  coordinate on `presentation` (int, float, bool or str). Order is the sheet's.
- digits / mnist: the same split the training run used, decoded in memory.

Image files are decoded and preprocessed in DataLoader workers (`iter_batches`), batched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonnerlab.config import DATASET_STIMULI, DataConfig, ExtractConfig, to_dict
from bonnerlab.data.folders import scan_stimulus_folder
from bonnerlab.errors import ConfigError, DataError
from bonnerlab.models.preprocess import Transform

SHEET_SUFFIXES = (".csv", ".tsv")
RESERVED = ("stimulus", "presentation")


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
    if limit:
        table = table.iloc[:limit]
    if table["path"].isna().any():
        row = int(np.flatnonzero(table["path"].isna())[0]) + 2  # 1-based, after the header
        raise DataError(f"stimulus sheet {sheet} line {row}: empty path")
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


class FileImages(torch.utils.data.Dataset):
    """Decodes and preprocesses one file in a worker; returns an error string instead of raising,
    so the main process can name the file in a one-line error (worker exceptions arrive as long
    tracebacks)."""

    def __init__(
        self,
        files: list[Path],
        transform: Transform,
        shape: tuple[int, int, int],
        dtype: torch.dtype = torch.float32,
    ):
        # dtype: what `transform` returns (uint8 when the device scales and normalizes); an
        # unreadable image's placeholder matches it, so the batch still stacks
        self.files, self.transform, self.shape, self.dtype = files, transform, shape, dtype

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                x = self.transform(img)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return torch.zeros(self.shape, dtype=self.dtype), f"cannot read image {path}: {e}"
        if tuple(x.shape) != self.shape:
            return torch.zeros(self.shape, dtype=self.dtype), (
                f"image {path} preprocesses to {list(x.shape)}, not {list(self.shape)}: this "
                "preprocessing keeps each image's aspect ratio; pass --preprocess center_crop"
            )
        return x, ""


def iter_batches(
    stimuli: Stimuli,
    chunks: list[range],
    transform: Transform,
    shape: tuple[int, int, int],
    num_workers: int,
    pin: bool,
    worker_transform: Transform | None = None,
) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    """(batch, positions that could not be read, their errors) per chunk: preprocessed floats,
    or with `worker_transform` (the uint8 part of `transform`, see PreprocessSpec.split_at_float)
    the uint8 batch it gives, to be finished on the device."""
    if stimuli.images is not None:  # in memory: transformed here, a batch at a time
        for rows in chunks:
            yield (worker_transform or transform)(stimuli.images[rows.start : rows.stop]), [], []
        return
    assert stimuli.files is not None
    dtype = torch.float32 if worker_transform is None else torch.uint8
    loader = torch.utils.data.DataLoader(
        FileImages(stimuli.files, worker_transform or transform, shape, dtype),
        batch_sampler=[list(rows) for rows in chunks],
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=False,
    )
    for images, errors in loader:
        bad = [i for i, err in enumerate(errors) if err]
        yield images, bad, [errors[i] for i in bad]
