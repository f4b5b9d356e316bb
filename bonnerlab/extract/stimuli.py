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
from typing import Any

import numpy as np
import torch

from bonnerlab.config import DATASET_STIMULI, DataConfig, ExtractConfig, to_dict
from bonnerlab.data import sheets
from bonnerlab.data.folders import scan_stimulus_folder
from bonnerlab.data.gpu_decode import decodable_on_device
from bonnerlab.data.shards import is_shard_set, shard_stimuli
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
        if is_shard_set(path):  # packed: the set's order, ids, labels and sheet columns
            s = shard_stimuli(path, cfg.limit)
            return Stimuli(s.ids, s.labels, s.root, s.classes, files=s.files, coords=s.coords)
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
        encoded: bool = False,
    ):
        # dtype: what `transform` returns (uint8 when the device scales and normalizes); an
        # unreadable image's placeholder matches it, so the batch still stacks
        self.files, self.transform, self.shape, self.dtype = files, transform, shape, dtype
        self.max_pixels = max_pixels
        # encoded (--decode gpu): a JPEG the device can decode is returned as its bytes (1-D)
        self.encoded = encoded

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
        if self.encoded and decodable_on_device(data, str(path), self.shape[0], self.max_pixels):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), "", digest
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
                shape_error(path, x, self.shape),
                digest,
            )
        return x, "", digest


def shape_error(path: Any, x: torch.Tensor, shape: tuple[int, int, int]) -> str:
    return (
        f"image {path} preprocesses to {list(x.shape)}, not {list(shape)}: this "
        "preprocessing keeps each image's aspect ratio; pass --preprocess center_crop"
    )


def _as_lists(items: list[tuple[torch.Tensor, str, str]]) -> tuple[Any, list, list]:
    """--decode gpu batches: JPEG bytes differ in length; packed into two tensors (one
    shared-memory file each, not one per image) to cross from the worker."""
    from bonnerlab.data.gpu_decode import pack_tensors

    images, errors, hashes = zip(*items, strict=True)
    return pack_tensors(list(images)), list(errors), list(hashes)


def finish_encoded(
    packed: Any,
    errors: list[str],
    paths: list[Any],
    transform: Transform,
    shape: tuple[int, int, int],
    device: torch.device,
    max_pixels: int,
) -> torch.Tensor:
    """A --decode gpu batch on `device`: JPEG bytes decoded there (nvJPEG) and put through the
    workers' part of the preprocessing there; a file the device refuses decoded here by the
    CPU path; `errors` filled in for files neither can read, as the workers' are."""
    from bonnerlab.data.gpu_decode import decode_on_device, unpack_tensors
    from bonnerlab.data.images import read_image

    images = unpack_tensors(packed)

    def cpu_path(i: int) -> torch.Tensor:
        try:
            data = images[i].numpy().tobytes()
            return transform(read_image(io.BytesIO(data), paths[i], max_pixels))
        except DataError as e:
            errors[i] = str(e)
            return torch.zeros(shape, dtype=torch.uint8)

    out = decode_on_device(images, shape[0], device, transform, cpu_path)
    for i, x in enumerate(out):
        if tuple(x.shape) != shape:
            errors[i] = errors[i] or shape_error(paths[i], x, shape)
            out[i] = torch.zeros(shape, dtype=torch.uint8, device=device)
    return torch.stack(out)


def iter_batches(
    stimuli: Stimuli,
    chunks: list[range],
    transform: Transform,
    shape: tuple[int, int, int],
    num_workers: int,
    pin: bool,
    worker_transform: Transform | None = None,
    max_pixels: int = 0,
    decode_on: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, list[int], list[str], list[str]]]:
    """(batch, positions that could not be read, their errors, every row's content hash) per
    chunk: preprocessed floats, or with `worker_transform` (the uint8 part of `transform`, see
    PreprocessSpec.split_at_float) the uint8 batch it gives, to be finished on the device. With
    `decode_on` as well (--decode gpu), workers read bytes and JPEGs are decoded and take
    `worker_transform` on that device (`finish_encoded`)."""
    if stimuli.images is not None:  # in memory: transformed here, a batch at a time
        for rows in chunks:
            batch = stimuli.images[rows.start : rows.stop]
            yield (worker_transform or transform)(batch), [], [], [array_hash(x) for x in batch]
        return
    assert stimuli.files is not None
    dtype = torch.float32 if worker_transform is None else torch.uint8
    encoded = decode_on is not None and worker_transform is not None
    files = stimuli.files
    loader = torch.utils.data.DataLoader(
        FileImages(files, worker_transform or transform, shape, dtype, max_pixels, encoded),
        batch_sampler=[list(rows) for rows in chunks],
        num_workers=num_workers,
        pin_memory=pin and not encoded,
        persistent_workers=False,
        collate_fn=_as_lists if encoded else None,
    )
    for rows, (images, errors, hashes) in zip(chunks, loader, strict=True):
        if encoded:
            assert worker_transform is not None and decode_on is not None
            # what errors call each image: its path, or (a shard set) its id
            paths = [files[i] if isinstance(files, list) else stimuli.ids[i] for i in rows]
            images = finish_encoded(
                images, errors, paths, worker_transform, shape, decode_on, max_pixels
            )
        bad = [i for i, err in enumerate(errors) if err]
        yield images, bad, [errors[i] for i in bad], list(hashes)
