"""Datasets (digits, mnist, imagefolder) and their train/val/test splits.

Every dataset hands out uint8 images [C, H, W] and integer labels. Small datasets live in memory
as one uint8 tensor and are batched by indexing (`bonnerlab.data.loaders`); image folders, found
by `bonnerlab.data.folders`, are decoded by DataLoader workers. Augmentation and normalization
then run on whole batches on the training device (`bonnerlab.data.augment`), which is far
cheaper than per-sample PIL transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bonnerlab.config import DataConfig
from bonnerlab.data.folders import FileList, scan_collection
from bonnerlab.data.images import digit_like, opened_image, to_8bit
from bonnerlab.data.shards import open_shards
from bonnerlab.errors import DataError
from bonnerlab.pixels import to_unit_float

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- sources


@dataclass
class InMemoryDataset:
    """Images held as one uint8 tensor [N, C, H, W]."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# How a worker turns a decoded image into a fixed-shape uint8 tensor (so a batch is one tensor):
#   squash       resize to size x size, ignoring the aspect ratio
#   canvas       shorter side to CANVAS_RATIO x size, centre square: the natural preset's random
#                crop then runs batched on the device, within this canvas
#   center_crop  shorter side to size / EVAL_CROP_FRACTION, centre size x size crop (the
#                resize-256 + crop-224 evaluation transform of ImageNet models)
FITS = ("squash", "canvas", "center_crop")
CANVAS_RATIO = 1.14
EVAL_CROP_FRACTION = 0.875


class FolderDataset(torch.utils.data.Dataset):
    """Image files decoded on demand (in DataLoader workers) to uint8 [C, S, S]."""

    def __init__(
        self,
        root: Path,
        files: list[Path],
        labels: list[int],
        size: int,
        in_channels: int,
        fit: str = "squash",
        crop_fraction: float = EVAL_CROP_FRACTION,
        max_pixels: int = 0,
    ):
        self.root, self.files, self.size, self.in_channels, self.fit = (
            root,
            files,
            size,
            in_channels,
            fit,
        )
        self.crop_fraction = crop_fraction
        self.max_pixels = max_pixels  # the decompression-bomb limit (0: PIL's)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.ids = [str(f.relative_to(root)) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def with_fit(self, fit: str, crop_fraction: float | None = None) -> FolderDataset:
        """The same files, decoded another way (e.g. training canvas vs evaluation crop)."""
        return FolderDataset(
            self.root,
            self.files,
            self.labels.tolist(),
            self.size,
            self.in_channels,
            fit,
            self.crop_fraction if crop_fraction is None else crop_fraction,
            self.max_pixels,
        )

    @property
    def side(self) -> int:
        """Side of the tensors this source yields."""
        return round(self.size * CANVAS_RATIO) if self.fit == "canvas" else self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return (
            load_image(
                self.files[index],
                self.size,
                self.in_channels,
                self.fit,
                self.crop_fraction,
                self.max_pixels,
            ),
            int(self.labels[index]),
        )


def load_image(
    path: Path,
    size: int,
    in_channels: int,
    fit: str = "squash",
    crop_fraction: float = EVAL_CROP_FRACTION,
    max_pixels: int = 0,
) -> torch.Tensor:
    """Decode one image to 8 bits from its own range (`bonnerlab.data.images`: 16-bit and float
    files too), convert to grayscale/RGB and bring it to a fixed square shape (see FITS);
    errors, decompression bombs (over `max_pixels`, else PIL's limit) included, name the file."""
    from PIL import Image

    mode = "L" if in_channels == 1 else "RGB"
    with opened_image(path, path, max_pixels) as img:
        if fit == "squash":
            target = (size, size)
        else:
            short = round(size * CANVAS_RATIO) if fit == "canvas" else round(size / crop_fraction)
            w, h = img.size
            # torchvision's rounding: the long side truncated, the crop offset rounded
            target = (
                (max(short, int(w * short / h)), short)
                if w >= h
                else (short, max(short, int(h * short / w)))
            )
        # JPEG: decode at a reduced scale (1/2, 1/4, 1/8) that still covers the target: a
        # large photo for a 112-pixel input decodes several times faster (other formats: no-op)
        img.draft(mode, target)
        img = to_8bit(img, path)
        if img.mode != mode:
            img = img.convert(mode)
        if img.size != target:
            img = img.resize(target, Image.BILINEAR)
        if fit != "squash":
            side = round(size * CANVAS_RATIO) if fit == "canvas" else size
            left, top = (
                int(round((target[0] - side) / 2.0)),
                int(round((target[1] - side) / 2.0)),
            )
            img = img.crop((left, top, left + side, top + side))
        array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if in_channels == 1 else tensor.permute(2, 0, 1).contiguous()


Dataset = InMemoryDataset | FolderDataset  # one split's images and labels


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_fraction: float = EVAL_CROP_FRACTION
    augment: str = "none"  # the training preset, `auto` resolved (augment_preset)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_published(self, published: Normalization) -> Splits:
        """Fine-tuning pretrained weights: their own mean and std (when they have this many
        in_channels) and evaluation crop share, in place of the defaults."""

        def crop(source: Dataset | None) -> Dataset | None:
            if isinstance(source, FolderDataset):
                return source.with_fit(source.fit, published.crop_fraction)
            return source

        same_channels = len(published.mean) == self.in_channels
        return replace(
            self,
            train=crop(self.train),
            val=crop(self.val),
            test=crop(self.test),
            mean=published.mean if same_channels else self.mean,
            std=published.std if same_channels else self.std,
            crop_fraction=published.crop_fraction,
        )


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _subset(source: InMemoryDataset, idx: np.ndarray) -> InMemoryDataset:
    t = torch.from_numpy(idx)
    return InMemoryDataset(source.images[t], source.labels[t], [source.ids[i] for i in idx])


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = to_unit_float(images)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _to_channels(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    return (
        images.expand(-1, in_channels, -1, -1).contiguous()
        if in_channels != images.shape[1]
        else images
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8], labels) as sklearn.datasets.load_digits returns them.

    Read from the file scikit-learn ships, without importing it: `import sklearn.datasets`
    pulls in scipy.stats and took 1-2 s of every job's start on the digits default.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    locations = spec.submodule_search_locations if spec else None
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is None or not path.is_file():  # a scikit-learn that keeps it elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_source(cfg: DataConfig) -> InMemoryDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped with the package)."""
    digits, target = _digits_arrays()
    # values 0..16 -> 0..255, upsampled to image_size like MNIST's 28x28
    images = torch.from_numpy((digits * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    images = _to_channels(_resize_uint8(images, cfg.image_size), cfg.in_channels)
    labels = torch.from_numpy(target.astype(np.int64))
    return InMemoryDataset(images, labels, [f"digits/{i:04d}" for i in range(len(labels))])


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST's format), gzipped or not: magic, dims, then big-endian uint8 data."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an uint8 IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}"
        )
    return torch.from_numpy(body.reshape(dims).copy())


def _find_mnist_files(raw: Path, kind: str) -> tuple[Path, Path] | None:
    found = []
    for stem in (f"{kind}-images-idx3-ubyte", f"{kind}-labels-idx1-ubyte"):
        candidates = [raw / stem, raw / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def load_mnist_source(cfg: DataConfig, train_files: bool) -> InMemoryDataset:
    """MNIST in torchvision's layout (root/MNIST/raw, .gz or not), downloaded by torchvision when
    missing and allowed. Read directly so a read-only folder of .gz files works as is."""
    root = Path(cfg.root)
    raw = root / "MNIST" / "raw"
    kind = "train" if train_files else "t10k"
    files = _find_mnist_files(raw, kind)
    if files is None and cfg.download:
        from torchvision.datasets import MNIST

        try:
            MNIST(str(root), train=train_files, download=True)
        except Exception as e:  # urllib errors surface as RuntimeError("Error downloading ...")
            raise DataError(
                f"MNIST {kind} files not in {raw} and the download failed (offline?): put "
                f"{kind}-images-idx3-ubyte(.gz) and {kind}-labels-idx1-ubyte(.gz) there, "
                f"e.g. --data.root ../shared/data/mnist"
            ) from e
        files = _find_mnist_files(raw, kind)
    if files is None:
        raise DataError(
            f"MNIST {kind} files not in {raw}: put {kind}-images-idx3-ubyte(.gz) and "
            f"{kind}-labels-idx1-ubyte(.gz) there or allow --data.download"
        )
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"MNIST files in {raw} disagree: {tuple(images.shape)} images, "
            f"{tuple(labels.shape)} labels"
        )
    images = _to_channels(_resize_uint8(images.unsqueeze(1), cfg.image_size), cfg.in_channels)
    prefix = "train" if train_files else "test"
    return InMemoryDataset(
        images, labels.long(), [f"mnist-{prefix}/{i:05d}" for i in range(len(labels))]
    )


def augment_preset(cfg: DataConfig, files: FileList | None = None) -> str:
    """`data.augment` with `auto` resolved by what the images are: digits for digits and mnist
    and for an image folder whose sampled images are mostly single-channel or small
    (`images.digit_like`, from the scan's `looks`); natural for photographs, and for a folder
    scanned before its looks were recorded (what such runs trained with)."""
    if cfg.augment != "auto":
        return cfg.augment
    if cfg.dataset not in ("imagefolder", "shards"):
        return "digits"
    looks = files.looks if files is not None else None
    return "digits" if looks is not None and digit_like(looks) else "natural"


@dataclass(frozen=True)
class Normalization:
    """What pretrained weights were published with: their mean and std, and the evaluation
    crop's share of the resized image (224 of 256: 0.875)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_fraction: float = EVAL_CROP_FRACTION


def load_splits(
    cfg: DataConfig, files: FileList | None = None, published: Normalization | None = None
) -> Splits:
    """Train/val(/test) splits of the configured dataset; checks the data before any training.

    For image folders, `files` is a scan made earlier (the run folder's `files.json`); the
    training split is decoded to the natural preset's canvas when that preset is on, and
    validation and test splits with the evaluation transform (resize + centre crop). With
    `published` (fine-tuning pretrained weights), the weights' own mean, std and crop share.
    """
    if cfg.dataset in ("imagefolder", "shards"):
        root = Path(cfg.root)
        packed = open_shards(root) if cfg.dataset == "shards" else None
        listing = files or (packed.collection() if packed else scan_collection(root))
        train_files, train_labels = listing.splits["train"]
        if "val" in listing.splits:
            tr, va = np.arange(len(train_files)), None
        else:
            tr, va = _split_indices(len(train_files), cfg.val_fraction, cfg.split_seed)
        preset = augment_preset(cfg, listing)
        natural = preset == "natural"
        eval_fit = "center_crop" if natural else "squash"

        def make(names: list[str], labels: list[int], idx: np.ndarray, fit: str) -> FolderDataset:
            chosen = [names[i] for i in idx]
            return FolderDataset(
                root,
                packed.files(chosen) if packed else [root / n for n in chosen],
                [labels[i] for i in idx],
                cfg.image_size,
                cfg.in_channels,
                fit,
                max_pixels=cfg.max_image_pixels,
            )

        train = make(train_files, train_labels, tr, "canvas" if natural else "squash")
        if va is None:
            val_files, val_labels = listing.splits["val"]
            val = make(val_files, val_labels, np.arange(len(val_files)), eval_fit)
        else:
            val = make(train_files, train_labels, va, eval_fit)
        test = None
        if "test" in listing.splits:
            test_files, test_labels = listing.splits["test"]
            test = make(test_files, test_labels, np.arange(len(test_files)), eval_fit)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.in_channels == 3 else ((0.5,), (0.25,))
        splits = Splits(
            train, val, test, listing.classes, cfg.in_channels, mean, std, augment=preset
        )
        return splits.with_published(published) if published is not None else splits

    if cfg.dataset == "digits":
        full, test = load_digits_source(cfg), None
    else:
        full = load_mnist_source(cfg, train_files=cfg.mnist_files == "train")
        test = load_mnist_source(cfg, train_files=False) if cfg.mnist_files == "train" else None
    tr, va = _split_indices(len(full), cfg.val_fraction, cfg.split_seed)
    train, val = _subset(full, tr), _subset(full, va)
    mean, std = _stats(train.images)
    classes = [str(i) for i in range(10)]
    return Splits(
        train, val, test, classes, cfg.in_channels, mean, std, augment=augment_preset(cfg)
    )
