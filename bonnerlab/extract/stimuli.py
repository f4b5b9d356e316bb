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

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonnerlab.config import DATASET_STIMULI, DataConfig, ExtractConfig, to_dict
from bonnerlab.data import sheets
from bonnerlab.data.folders import scan_stimulus_folder
from bonnerlab.errors import ConfigError, DataError
from bonnerlab.models.preprocess import Transform


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
    """A CSV/TSV sheet of stimuli (`bonnerlab.data.sheets`: every check before any image is
    decoded), in the sheet's order."""
    table = sheets.read_sheet(sheet, limit)
    return Stimuli(
        table.ids, table.labels, str(sheet.resolve()), [], files=table.files, coords=table.coords
    )


def load_stimuli(
    cfg: ExtractConfig, image_size: int, in_channels: int, data: DataConfig | None
) -> Stimuli:
    """The configured stimuli; datasets at `image_size` with `in_channels` (in memory)."""
    from bonnerlab.data import datasets as bdata

    if cfg.stimuli not in DATASET_STIMULI:
        path = Path(cfg.stimuli)
        if path.suffix.lower() in sheets.SHEET_SUFFIXES:
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
