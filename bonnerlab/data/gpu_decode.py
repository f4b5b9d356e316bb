"""JPEG decoding on the GPU: DataLoader workers only read file bytes, the device decodes batches.

On an H200 the CPU decoder is the wall (ResNet-50 extraction from JPEG files at 859 images/s
with 16 cores, the GPU mostly idle). With `--data.decode gpu` (or `auto` on CUDA) the workers of
an image folder or shard set read each file's bytes and parse its header only (PIL: format,
mode, size, so decompression bombs are still refused before anything is decoded); the main
process hands each batch of JPEGs to nvJPEG in one call (`torchvision.io.decode_jpeg` on a
list, `device="cuda"`) and resizes and crops them there, with `load_image`'s geometry.

Files that are not 8-bit grayscale or YCbCr JPEGs (PNG, CMYK JPEG, ...) are decoded by the CPU
path in the worker, as before; a JPEG the device fails to decode falls back to the CPU path on
its own, so a bad file costs its own decode, not the batch's. The pixels are not PIL's bit for
bit (another IDCT; PIL's DCT-domain draft at 1/2-1/4 scale emulated by a box average; torch's
antialiased bilinear in place of PIL's): on photographs, at most 1 level apart (mean 0.13) where
no draft applies, and mean <= 0.36 levels with <= 0.03% of values over 8 apart where it does
(`tests/unit/test_gpu_decode.py`, on the CPU, where `decode_jpeg` runs libjpeg-turbo).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bonnerlab.data.datasets import CANVAS_RATIO, FolderDataset, load_image
from bonnerlab.data.images import opened_image
from bonnerlab.data.shards import NamedBytes
from bonnerlab.errors import ConfigError, DataError

JPEG_START = b"\xff\xd8\xff"  # SOI marker + the first segment's marker byte


def use_gpu_decode(decode: str, device: torch.device) -> bool:
    """`data.decode` resolved: auto = on CUDA; gpu without a CUDA device is a config error."""
    if decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.decode gpu needs a CUDA device; this run uses {device}")
    return device.type == "cuda" and decode in ("auto", "gpu")


def fit_geometry(
    width: int, height: int, size: int, fit: str, crop_fraction: float
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """`load_image`'s geometry: the (width, height) to resize to, then the crop box (left, top,
    right, bottom), None for `squash`."""
    if fit == "squash":
        return (size, size), None
    short = round(size * CANVAS_RATIO) if fit == "canvas" else round(size / crop_fraction)
    # torchvision's rounding: the long side truncated, the crop offset rounded
    target = (
        (max(short, int(width * short / height)), short)
        if width >= height
        else (short, max(short, int(height * short / width)))
    )
    side = round(size * CANVAS_RATIO) if fit == "canvas" else size
    left = int(round((target[0] - side) / 2.0))
    top = int(round((target[1] - side) / 2.0))
    return target, (left, top, left + side, top + side)


def read_bytes(source: FolderDataset, index: int) -> tuple[bytes, str]:
    """Image `index` of a folder or shard split as its file's bytes, with the name errors use."""
    files: Any = source.files
    if hasattr(files, "read_bytes"):  # a shard set (bonnerlab.data.shards.ShardFiles)
        return files.read_bytes(index)
    path = Path(files[index])
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror}") from e


def decodable_on_device(data: bytes, name: str, in_channels: int, max_pixels: int = 0) -> bool:
    """Whether nvJPEG can take this file: an 8-bit JPEG in gray or YCbCr (PIL reads `L`/`RGB`)
    within the bomb limit, from its header alone. Anything else goes the CPU path, which also
    gives its errors (a bomb is refused there from the header, by the same check)."""
    if not data.startswith(JPEG_START):
        return False
    try:
        with opened_image(data, name, max_pixels) as img:
            return img.format == "JPEG" and img.mode in ("L", "RGB") and in_channels in (1, 3)
    except DataError:
        return False


class EncodedImages(torch.utils.data.Dataset):
    """A folder or shard split whose workers read bytes: item i is (the JPEG's bytes as a 1-D
    uint8 tensor, label, name) or, for a file the device cannot take, (`load_image`'s uint8
    [C, S, S], label, name), decoded here from the bytes already read."""

    def __init__(self, source: FolderDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        s = self.source
        data, name = read_bytes(s, index)
        label = int(s.labels[index])
        max_pixels = getattr(s, "max_pixels", 0)
        if decodable_on_device(data, name, s.in_channels, max_pixels):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, name
        return cpu_decode(s, data, name), label, name


def cpu_decode(source: FolderDataset, data: bytes, name: str) -> torch.Tensor:
    """The CPU path on bytes already read: `load_image`, as the folder's own items."""
    extra = {"max_pixels": source.max_pixels} if getattr(source, "max_pixels", 0) else {}
    return load_image(
        NamedBytes(data, name),
        source.size,
        source.in_channels,
        source.fit,
        source.crop_fraction,
        **extra,
    )


Packed = tuple[torch.Tensor, list[int], torch.Tensor, list[bool]]


def pack_tensors(tensors: list[torch.Tensor]) -> Packed:
    """A batch of JPEG bytes (1-D) and decoded images as two tensors, in the worker: a worker
    hands each tensor over through its own shared-memory file, and 256 per batch times the
    batches in flight would exhaust the file-descriptor limit."""
    encoded = [x.ndim == 1 for x in tensors]
    data = [x for x in tensors if x.ndim == 1]
    rest = [x for x in tensors if x.ndim != 1]
    flat = torch.cat(data) if data else torch.empty(0, dtype=torch.uint8)
    return flat, [len(x) for x in data], torch.stack(rest) if rest else flat[:0], encoded


def unpack_tensors(packed: Packed) -> list[torch.Tensor]:
    """`pack_tensors` undone: the items in their order (the bytes as views of one tensor)."""
    flat, lengths, rest, encoded = packed
    data = iter(torch.split(flat, lengths) if lengths else ())
    others = iter(rest)
    return [next(data) if e else next(others) for e in encoded]


def collate_encoded(
    items: list[tuple[torch.Tensor, int, str]],
) -> tuple[Packed, torch.Tensor, list[str]]:
    """An `EncodedImages` batch: its tensors packed, labels, names."""
    images, labels, names = zip(*items, strict=True)
    return pack_tensors(list(images)), torch.tensor(labels, dtype=torch.long), list(names)


def draft_scale(width: int, height: int, target: tuple[int, int]) -> int:
    """The reduction PIL's JPEG `draft` picks for `target` (1, 2, 4 or 8): the largest that still
    covers it (Pillow's JpegImageFile.draft)."""
    scale = min(width // target[0], height // target[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s) if scale >= 1 else 1


def resize_on_device(
    image: torch.Tensor, size: int, fit: str, crop_fraction: float
) -> torch.Tensor:
    """A decoded JPEG, uint8 [C, H, W] -> uint8 [C, S, S] with `load_image`'s geometry: PIL's
    draft (the DCT-domain 1/2, 1/4, 1/8 reduction) as a box average of the same factor, then
    antialiased bilinear (PIL's filter, which torch's antialias follows), rounded, then the
    crop."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    (tw, th), box = fit_geometry(width, height, size, fit, crop_fraction)
    if (tw, th) != (width, height):
        x = image.unsqueeze(0).float()
        scale = draft_scale(width, height, (tw, th))
        if scale > 1:
            x = F.avg_pool2d(x, scale, ceil_mode=True)
        if tuple(x.shape[-2:]) != (th, tw):
            x = F.interpolate(
                x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True
            )
        image = x.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)
    if box is not None:
        left, top, right, bottom = box
        image = image[:, top:bottom, left:right]
    return image


def decode_jpegs(
    data: list[torch.Tensor], in_channels: int, device: torch.device
) -> list[torch.Tensor | None]:
    """JPEG bytes (uint8 CPU tensors) -> uint8 [C, H, W] on `device`, in one `decode_jpeg` call;
    when that fails (one bad file fails the call), each alone: None for a file the device
    cannot decode, for its caller's CPU path. Training and extraction both decode through it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    mode = ImageReadMode.GRAY if in_channels == 1 else ImageReadMode.RGB
    try:
        return list(decode_jpeg(data, mode=mode, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for one in data:
        try:
            out.append(decode_jpeg(one, mode=mode, device=device))
        except RuntimeError:
            out.append(None)
    return out


def decode_batch(
    batch: tuple[Packed, torch.Tensor, list[str]], source: FolderDataset, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One `EncodedImages` batch -> (uint8 [B, C, S, S], labels) on `device`: the JPEGs decoded
    and resized there; a file the device refuses, and every non-JPEG, by the CPU path."""
    packed, labels, names = batch
    items = unpack_tensors(packed)
    out = decode_on_device(
        items,
        source.in_channels,
        device,
        lambda x: resize_on_device(x, source.size, source.fit, source.crop_fraction),
        lambda i: cpu_decode(source, items[i].numpy().tobytes(), names[i]),
    )
    return torch.stack(out), labels.to(device, non_blocking=True)


def decode_on_device(
    items: list[torch.Tensor],
    in_channels: int,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor],
    cpu_path: Callable[[int], torch.Tensor],
) -> list[torch.Tensor]:
    """A batch from byte-reading workers, each item a JPEG's bytes (1-D uint8) or an image the
    worker decoded itself (a file the device cannot take): the bytes decoded on `device` in one
    call and `transform`ed there one by one, the rest moved there; `cpu_path(i)` gives item i
    when the device refuses it. Extraction's `--decode gpu` (the transform is the uint8 part of
    the published preprocessing, which runs on tensors on any device)."""
    todo = [i for i, x in enumerate(items) if x.ndim == 1]
    out = [x if x.ndim == 1 else x.to(device, non_blocking=True) for x in items]
    for i, x in zip(todo, decode_jpegs([items[i] for i in todo], in_channels, device), strict=True):
        out[i] = transform(x) if x is not None else cpu_path(i).to(device, non_blocking=True)
    return out
