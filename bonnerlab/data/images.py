"""Reading one image file into 8-bit pixels: the one decoder training and extraction share.

`read_image` returns a loaded PIL image in mode `L` (grayscale sources) or `RGB` (everything
else), scaled from the source's own range, so a photograph saved as 8-bit, 16-bit or float gives
the same pixels to within 8-bit rounding:

- `L`, `RGB`: as stored. `1`: 0 / 255. `LA`: the gray channel.
- `I;16`, `I;16B`, `I;16L`, `I;16N` (16-bit PNG/TIFF): v * 255 / 65535, rounded (PIL's own
  `convert` clips at 255 instead, so a 16-bit photograph comes out nearly white).
- `I` (32-bit integers): by the 16-bit range when every value is in [0, 65535] (16-bit files
  some writers store as 32-bit), else by [0, 2**31 - 1]; negative values are refused (they have
  no intensity to map to).
- `F` (32-bit float TIFF): values are intensities in [0, 1]; values up to half an 8-bit step
  outside are clipped (resampling overshoot), anything further out (a float image holding 0-255,
  or NaN) is refused rather than clipped to white.
- Everything else (`P`, `PA`, `RGBA`, `CMYK`, `YCbCr`, `LAB`, `HSV`, ...): PIL's `convert("RGB")`.
  Alpha is dropped, not composited onto a background: transparent pixels keep their stored colour,
  as in torchvision's `ImageFolder` loader (`img.convert("RGB")`), which published weights were
  trained with.

Decompression bombs: an image with more pixels than the limit (`max_pixels`, else PIL's
`Image.MAX_IMAGE_PIXELS`; `None` there means no limit) is refused from its header, before any
decoding. PIL itself only warns between 1x and 2x its limit and raises a
`DecompressionBombError` (not an `OSError`) above; here both are the same one-line `DataError`.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from bonnerlab.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

GRAY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
LIMIT_FLAGS = "--max_image_pixels (training: --data.max_image_pixels)"
# F images: how far outside [0, 1] a value may be and still be clipped (half an 8-bit step)
FLOAT_SLACK = 0.5 / 255

# PIL reads its bomb limit from a module global at open time; it is set to None (our own check
# replaces it) only while this lock is held, for the header parse, never for the decode. Other
# threads calling PIL directly in that window see no limit.
_OPEN_LOCK = threading.Lock()
_SET_ASIDE: list[int | None] = []  # PIL's limit while it is set to None


def _after_fork_in_child() -> None:
    """A DataLoader worker forked while another thread was in the window: a fresh lock (the
    inherited one would stay held) and PIL's own limit back."""
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()
    if _SET_ASIDE:  # PIL is imported then; no import machinery in a fork handler
        sys.modules["PIL.Image"].MAX_IMAGE_PIXELS = _SET_ASIDE.pop()


os.register_at_fork(after_in_child=_after_fork_in_child)


def read_image(
    source: str | Path | bytes | BinaryIO, name: str | Path, max_pixels: int = 0
) -> Image.Image:
    """Open, decode and convert one image to 8-bit `L` or `RGB` (see the module docstring).

    `source` is a path, the file's bytes or a binary file object; `name` is what errors call it.
    `max_pixels` > 0 replaces PIL's decompression-bomb limit for this call. Unreadable files and
    bombs raise a one-line DataError naming `name`.
    """
    with opened_image(source, name, max_pixels) as img:
        return to_8bit(img, name)


@contextmanager
def opened_image(
    source: str | Path | bytes | BinaryIO, name: str | Path, max_pixels: int = 0
) -> Iterator[Image.Image]:
    """An image opened from its header (size and mode known, nothing decoded yet), checked
    against the bomb limit; any error reading it inside the block is a one-line DataError naming
    `name`. For callers that look at the size first, e.g. to `draft` a JPEG to a reduced scale
    before `to_8bit` decodes it."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        # leaving the block closes the file handle only (ImageFile.__exit__); the pixels stay
        with _open_checked(source, name, max_pixels) as img:
            yield img
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # a later frame's check (GIF), with PIL's limit
        raise DataError(f"cannot read image {name}: {e}; raise the limit with {LIMIT_FLAGS}") from e
    except Image.UnidentifiedImageError as e:  # its message names a file object, not the file
        raise DataError(f"cannot read image {name}: not an image format PIL can identify") from e
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        # OSError includes truncated files; PIL's plugins raise the others on malformed data
        raise DataError(f"cannot read image {name}: {_one_line(e)}") from e


def _open_checked(source: str | Path | BinaryIO, name: str | Path, max_pixels: int) -> Image.Image:
    from PIL import Image

    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        limit = max_pixels if max_pixels > 0 else saved  # read here: never another call's None
        _SET_ASIDE.append(saved)
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
            _SET_ASIDE.clear()
    width, height = img.size
    if limit is not None and width * height > limit:
        img.close()
        raise DataError(
            f"cannot read image {name}: {width}x{height} = {width * height:,} pixels is over "
            f"the limit of {limit:,} (a decompression bomb?); if the image is real, raise the "
            f"limit with {LIMIT_FLAGS}"
        )
    return img


def to_8bit(img: Image.Image, name: str | Path = "") -> Image.Image:
    """An image of any mode -> 8-bit `L` or `RGB`, scaled from its own range (decoded here if
    it was not yet)."""
    from PIL import Image

    img.load()
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("1", "LA"):
        return img.convert("L")
    if mode in GRAY_MODES:  # I;16*, I, F
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode, name))
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise DataError(f"cannot read image {name}: mode {mode} is not supported ({e})") from e


def _gray_to_uint8(values: np.ndarray, mode: str, name: str | Path) -> np.ndarray:
    if mode == "F":
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (-FLOAT_SLACK <= low and high <= 1 + FLOAT_SLACK):  # NaN fails both
            raise DataError(
                f"cannot read image {name}: a float image with values in [{low:g}, {high:g}]; "
                "float images are read as intensities in [0, 1]: rescale it, or save it as 8 "
                "or 16 bits"
            )
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    if mode == "I":
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0:
            raise DataError(
                f"cannot read image {name}: a 32-bit integer image with negative values "
                f"(down to {low}); save it as 8 or 16 bits, or as float in [0, 1]"
            )
        if high > 65535:
            return np.rint(values.astype(np.float64) * (255.0 / (2**31 - 1))).astype(np.uint8)
    # 16-bit range: round(v * 255 / 65535) in integers (exact for v = 257 * an 8-bit value)
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- what a collection is

SMALL_SIDE = 64  # images no larger than this on their longer side are digit-like, not photographs
LOOKS_SAMPLE = 64  # headers read to tell digit-like images from photographs


def sample_looks(
    files: Sequence[str | Path | bytes | BinaryIO], root: Path | None = None
) -> dict[str, int]:
    """What a collection's images are, from the headers of up to LOOKS_SAMPLE files spread evenly
    over `files` (paths relative to `root`, or paths, bytes or file objects such as a shard
    set's members; mode and size, nothing is decoded): how many were read, how many of them are
    single-channel, small (longer side <= SMALL_SIDE) or either, and the largest side seen.
    Unreadable files are left out here; reading them for training names them."""
    picks = (
        sorted({round(i) for i in np.linspace(0, len(files) - 1, LOOKS_SAMPLE)}) if files else []
    )
    looks = {"sampled": 0, "single_channel": 0, "small": 0, "either": 0, "largest_side": 0}
    for i in picks:
        item = root / files[i] if root is not None else files[i]  # or bytes, a file object
        try:
            with opened_image(item, f"sample {i}") as img:  # errors are left out, unnamed
                gray, side = img.mode in GRAY_MODES, max(img.size)
        except DataError:
            continue
        looks["sampled"] += 1
        looks["single_channel"] += gray
        looks["small"] += side <= SMALL_SIDE
        looks["either"] += gray or side <= SMALL_SIDE
        looks["largest_side"] = max(looks["largest_side"], side)
    return looks


def digit_like(looks: dict[str, int]) -> bool:
    """Whether most sampled images are single-channel or small: digits, letters, icons, which a
    digits-like augmentation suits (no flips, mild crops), not a photograph's. (A palette image
    counts as colour: its palette is not read from the header.)"""
    return looks.get("either", 0) * 2 > looks.get("sampled", 0) > 0
