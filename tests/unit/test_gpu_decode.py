"""GPU JPEG decoding (bonnerlab/data/gpu_decode.py): workers read bytes, batches decode with
torchvision's decode_jpeg. On the CPU (libjpeg-turbo) the path is measured against today's PIL
path (`load_image`) and bounded; non-JPEG files and undecodable JPEGs take the CPU path per file.
The CUDA tests (nvJPEG) skip without a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import photo_crops, sample_photos
from PIL import Image

from bonnerlab.data import shards
from bonnerlab.data.datasets import FolderDataset
from bonnerlab.data.gpu_decode import (
    EncodedImages,
    collate_encoded,
    decode_batch,
    fit_geometry,
    use_gpu_decode,
)
from bonnerlab.data.loaders import _FolderLoader
from bonnerlab.errors import ConfigError, DataError

CPU = torch.device("cpu")
FITS = ["squash", "canvas", "center_crop"]
# measured on 200 of the photograph crops below (40-160 px), every fit: where no JPEG draft
# applies (96 px and up) at most 1 level apart, mean 0.13; where PIL decodes at 1/2-1/4 scale
# in the DCT domain and the device emulates it by a box average (32-64 px), mean <= 0.36 and
# <= 0.03% of the values over 8 levels apart (max 31, at sharp edges)
BOUNDS = {  # size -> (max, mean, share of values over 8 levels apart)
    32: (40, 0.5, 1e-3),
    96: (1, 0.2, 0.0),
}
MAX_LEVELS, MEAN_LEVELS = BOUNDS[32][:2]


def assert_close(x: torch.Tensor, ref: torch.Tensor, size: int = 32) -> None:
    most, mean, share = BOUNDS[size]
    diff = (x.int() - ref.int()).abs()
    measured = (int(diff.max()), float(diff.float().mean()), float((diff > 8).float().mean()))
    assert measured[0] <= most and measured[1] <= mean and measured[2] <= share, measured


def write_jpegs(root: Path, n: int = 12) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, crop in enumerate(photo_crops(n, seed=3)):
        files.append(root / f"{i:02d}.jpg")
        Image.fromarray(crop).save(files[-1], quality=90)
    return files


def decode_all(ds: FolderDataset, device: torch.device = CPU) -> torch.Tensor:
    enc = EncodedImages(ds)
    x, y = decode_batch(collate_encoded([enc[i] for i in range(len(ds))]), ds, device)
    assert torch.equal(y.cpu(), ds.labels)
    return x


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("size", [32, 96])
def test_cpu_decode_jpeg_is_within_bounds_of_the_pil_path(tmp_path, fit, size):
    files = write_jpegs(tmp_path / "a")
    ds = FolderDataset(tmp_path, files, list(range(len(files))), size, 3, fit)
    ref = torch.stack([ds[i][0] for i in range(len(ds))])
    x = decode_all(ds)
    assert x.shape == ref.shape and x.dtype == torch.uint8
    assert_close(x, ref, size)


def test_geometry_is_load_images(tmp_path):
    # the crop box and sizes the decoded tensors come out at equal the PIL path's for odd shapes
    for w, h in ((157, 40), (41, 160), (100, 100), (99, 101)):
        for fit in FITS:
            (tw, th), box = fit_geometry(w, h, 37, fit, 0.875)
            path = tmp_path / f"{w}x{h}.png"
            Image.new("RGB", (w, h)).save(path)
            side = FolderDataset(tmp_path, [path], [0], 37, 3, fit)[0][0].shape[-1]
            assert (box[2] - box[0] if box else tw) == side


def test_non_jpeg_and_undecodable_files_take_the_cpu_path(tmp_path):
    files = write_jpegs(tmp_path / "a", n=3)
    png, cmyk, gray = tmp_path / "a" / "p.png", tmp_path / "a" / "c.jpg", tmp_path / "a" / "g.jpg"
    Image.open(files[0]).save(png)
    Image.open(files[1]).convert("CMYK").save(cmyk)
    Image.open(files[2]).convert("L").save(gray)
    all_files = [*files, png, cmyk, gray]
    ds = FolderDataset(tmp_path, all_files, list(range(6)), 48, 3, "center_crop")
    enc = EncodedImages(ds)
    on_device = [enc[i][0].ndim == 1 for i in range(len(ds))]
    assert on_device == [True, True, True, False, False, True]  # PNG and CMYK: decoded in workers
    x = decode_all(ds)
    for i in (3, 4):  # the CPU path itself: exactly load_image's tensor
        assert torch.equal(x[i], ds[i][0])
    assert (x[5].int() - ds[5][0].int()).abs().max() <= MAX_LEVELS  # gray JPEG as RGB
    # a JPEG whose header parses but whose data stops half-way: decode_jpeg refuses it, so the
    # batch call fails, the good file decodes alone and the bad one goes the CPU path, where
    # PIL refuses it too: one line naming it
    buffer = io.BytesIO()
    sample_photos()[0].save(buffer, format="JPEG", quality=90)  # 427 x 640: tables are ~1%
    bad = tmp_path / "a" / "bad.jpg"
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    ds_bad = FolderDataset(tmp_path, [files[1], bad], [0, 1], 48, 3, "squash")
    items = [EncodedImages(ds_bad)[i] for i in range(2)]
    assert [item[0].ndim for item in items] == [1, 1]  # both headers pass: bytes
    with pytest.raises(DataError, match=r"cannot read image .*bad.jpg") as e:
        decode_batch(collate_encoded(items), ds_bad, CPU)
    assert "\n" not in str(e.value)
    good, _ = decode_batch(collate_encoded(items[:1]), ds_bad, CPU)
    assert_close(good[0], ds_bad[0][0])


def test_shards_decode_the_same_bytes(tmp_path):
    write_jpegs(tmp_path / "set" / "a", n=4)
    write_jpegs(tmp_path / "set" / "b", n=4)
    shards.pack(tmp_path / "set", tmp_path / "out", shard_size=3)
    s = shards.open_shards(tmp_path / "out")
    names, labels = s.collection().splits["train"]
    folder = FolderDataset(tmp_path / "set", [tmp_path / "set" / n for n in names], labels, 40, 3)
    packed = FolderDataset(tmp_path / "out", s.files(names), labels, 40, 3)
    assert torch.equal(decode_all(folder), decode_all(packed))


def test_loader_with_byte_reading_workers(tmp_path):
    files = write_jpegs(tmp_path / "a", n=8)
    ds = FolderDataset(tmp_path, files, list(range(8)), 40, 3, "canvas")
    batches = [[0, 5, 2], [7, 1, 3]]
    loaders = [_FolderLoader(ds, 2, CPU, gpu_decode=flag) for flag in (False, True)]
    try:
        (a, b) = [list(loader.batches(batches)) for loader in loaders]
    finally:
        for loader in loaders:
            loader.close()
    for (x, y), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(y, y2) and x.shape == x2.shape
        assert_close(x2, x)


def test_decode_setting():
    assert use_gpu_decode("auto", CPU) is False and use_gpu_decode("cpu", CPU) is False
    assert use_gpu_decode("auto", torch.device("cuda")) is True
    assert use_gpu_decode("cpu", torch.device("cuda")) is False
    with pytest.raises(ConfigError, match="data.decode gpu needs a CUDA device"):
        use_gpu_decode("gpu", CPU)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("fit", FITS)
def test_nvjpeg_is_within_bounds_of_the_cpu_paths(tmp_path, fit):
    files = write_jpegs(tmp_path / "a")
    ds = FolderDataset(tmp_path, files, list(range(len(files))), 64, 3, fit)
    gpu = decode_all(ds, torch.device("cuda")).cpu()
    cpu = decode_all(ds)
    pil = torch.stack([ds[i][0] for i in range(len(ds))])
    for ref in (cpu, pil):  # nvJPEG's IDCT differs from libjpeg-turbo's by a level or two
        assert_close(gpu, ref, 32)


@cuda
def test_cuda_fallback_for_a_cmyk_jpeg(tmp_path):
    files = write_jpegs(tmp_path / "a", n=2)
    Image.open(files[1]).convert("CMYK").save(files[1])
    ds = FolderDataset(tmp_path, files, [0, 1], 48, 3, "squash")
    x = decode_all(ds, torch.device("cuda"))
    assert x.device.type == "cuda" and torch.equal(x[1].cpu(), ds[1][0])


def test_named_bytes_errors_name_the_member():
    member = shards.NamedBytes(b"not an image", "OUT/shard-000000.tar:a/x.jpg")
    ds = FolderDataset(Path("OUT"), [Path("OUT/a/x.jpg")], [0], 32, 3)
    ds.files = [member]
    with pytest.raises(DataError, match=r"OUT/shard-000000.tar:a/x.jpg"):
        ds[0]
    assert isinstance(member, io.BytesIO)
