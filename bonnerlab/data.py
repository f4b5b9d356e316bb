"""Datasets (digits, mnist, imagefolder), the batch loader and batched augmentation.

Every source hands out uint8 images [C, H, W] and integer labels. Small datasets live in memory
as one uint8 tensor and are batched by indexing; image folders are decoded by DataLoader
workers. Augmentation and normalization then run on whole batches on the training device
(`Preprocess`), which is far cheaper than per-sample PIL transforms.

Batches are a pure function of (seed, epoch, step): a resumed run sees exactly the batches
an uninterrupted one would, and N processes each take a contiguous slice of the same global
batch a single process would see.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bonnerlab.config import DataConfig
from bonnerlab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- sources


@dataclass
class InMemorySource:
    """Images held as one uint8 tensor [N, C, H, W]."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


class FolderSource(torch.utils.data.Dataset):
    """Image files decoded on demand (in DataLoader workers) to uint8 [C, size, size]."""

    def __init__(self, root: Path, files: list[Path], labels: list[int], size: int, channels: int):
        self.root, self.files, self.size, self.channels = root, files, size, channels
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.ids = [str(f.relative_to(root)) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image(self.files[index], self.size, self.channels), int(self.labels[index])


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """Decode, convert to grayscale/RGB and resize one image; the error names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


Source = InMemorySource | FolderSource


@dataclass
class Splits:
    train: Source
    val: Source
    test: Source | None
    classes: list[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _subset(source: InMemorySource, idx: np.ndarray) -> InMemorySource:
    t = torch.from_numpy(idx)
    return InMemorySource(source.images[t], source.labels[t], [source.ids[i] for i in idx])


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    return images.expand(-1, channels, -1, -1).contiguous() if channels != images.shape[1] else images


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


def load_digits_source(cfg: DataConfig) -> InMemorySource:
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped with the package)."""
    digits, target = _digits_arrays()
    # values 0..16 -> 0..255, upsampled to image_size like MNIST's 28x28
    images = torch.from_numpy((digits * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    images = _to_channels(_resize_uint8(images, cfg.image_size), cfg.channels)
    labels = torch.from_numpy(target.astype(np.int64))
    return InMemorySource(images, labels, [f"digits/{i:04d}" for i in range(len(labels))])


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
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
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


def load_mnist_source(cfg: DataConfig, train_files: bool) -> InMemorySource:
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
        raise DataError(f"MNIST files in {raw} disagree: {tuple(images.shape)} images, {tuple(labels.shape)} labels")
    images = _to_channels(_resize_uint8(images.unsqueeze(1), cfg.image_size), cfg.channels)
    prefix = "train" if train_files else "test"
    return InMemorySource(images, labels.long(), [f"mnist-{prefix}/{i:05d}" for i in range(len(labels))])


def scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """root/<class>/**/<image> -> files, labels, class names (sorted)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (set --data.root)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(
            f"no images in {root}: expected {root}/<class>/<image>{{{','.join(IMAGE_EXTENSIONS[:3])},...}}"
        )
    return files, labels, classes


def load_splits(cfg: DataConfig) -> Splits:
    """Train/val(/test) splits of the configured dataset; checks the data before any training."""
    if cfg.dataset == "imagefolder":
        root = Path(cfg.root)
        files, labels, classes = scan_image_folder(root)
        if len(classes) < 2:
            raise DataError(f"image folder {root} has {len(classes)} class folder(s); need at least 2")
        tr, va = _split_indices(len(files), cfg.val_fraction, cfg.split_seed)

        def make(idx: np.ndarray) -> FolderSource:
            return FolderSource(root, [files[i] for i in idx], [labels[i] for i in idx], cfg.image_size, cfg.channels)

        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.channels == 3 else ((0.5,), (0.25,))
        return Splits(make(tr), make(va), None, classes, cfg.channels, mean, std)

    if cfg.dataset == "digits":
        full, test = load_digits_source(cfg), None
    else:
        full = load_mnist_source(cfg, train_files=cfg.mnist_files == "train")
        test = load_mnist_source(cfg, train_files=False) if cfg.mnist_files == "train" else None
    tr, va = _split_indices(len(full), cfg.val_fraction, cfg.split_seed)
    train, val = _subset(full, tr), _subset(full, va)
    mean, std = _stats(train.images)
    return Splits(train, val, test, [str(i) for i in range(10)], cfg.channels, mean, std)


# ----------------------------------------------------------------------------- batches


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class TrainBatches:
    """The training batches of one rank: contiguous slices of seeded global batches.

    `batches(epoch, start_step)` yields (uint8 images, labels, step) on `device`, skipping
    `start_step` batches of the epoch without loading them (mid-epoch resume).
    """

    def __init__(
        self,
        source: Source,
        global_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_workers: int = 0,
        max_steps: int = 0,
    ) -> None:
        if global_batch % world_size:
            raise DataError(
                f"data.batch_size {global_batch} must be divisible by the {world_size} processes"
            )
        if len(source) < global_batch:
            raise DataError(
                f"training split has {len(source)} images, fewer than data.batch_size {global_batch}"
            )
        self.source, self.global_batch, self.seed = source, global_batch, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.local_batch = global_batch // world_size
        self.num_workers = num_workers
        steps = len(source) // global_batch  # drop the ragged last batch: equal work per rank
        self.steps_per_epoch = min(steps, max_steps) if max_steps else steps

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _rank_indices(self, epoch: int, start_step: int) -> list[torch.Tensor]:
        perm = epoch_permutation(len(self.source), self.seed, epoch)
        lo = self.rank * self.local_batch
        return [
            perm[s * self.global_batch + lo : s * self.global_batch + lo + self.local_batch]
            for s in range(start_step, self.steps_per_epoch)
        ]

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        index_lists = self._rank_indices(epoch, start_step)
        pin = self.device.type == "cuda"
        if isinstance(self.source, InMemorySource):
            images, labels = self.source.images, self.source.labels
            if pin:  # move the whole (small) dataset once; indexing then happens on the GPU
                images, labels = images.to(self.device), labels.to(self.device)
            for step, idx in enumerate(index_lists, start=start_step):
                idx = idx.to(images.device)
                yield images[idx], labels[idx], step
            return
        loader = torch.utils.data.DataLoader(
            self.source,
            batch_sampler=[idx.tolist() for idx in index_lists],
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=False,
        )
        for step, (x, y) in enumerate(_unwrap_worker_errors(loader), start=start_step):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), step


def _unwrap_worker_errors(loader: torch.utils.data.DataLoader) -> Iterator:
    """A DataError raised in a worker arrives wrapped in the worker's traceback; keep its line."""
    try:
        yield from loader
    except DataError as e:
        message = str(e)
        if "DataError: " in message:
            raise DataError(message.rsplit("DataError: ", 1)[1].strip()) from None
        raise


def eval_batches(
    source: Source, batch_size: int, rank: int, world_size: int, device: torch.device, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example exactly once across ranks (strided shards), in order within a rank."""
    indices = torch.arange(rank, len(source), world_size)
    chunks = list(indices.split(batch_size))
    if isinstance(source, InMemorySource):
        for idx in chunks:
            yield source.images[idx].to(device), source.labels[idx].to(device)
        return
    loader = torch.utils.data.DataLoader(
        source, batch_sampler=[c.tolist() for c in chunks], num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    for x, y in _unwrap_worker_errors(loader):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- preprocessing


class Preprocess:
    """uint8 batch -> normalized float batch, with per-sample random affine/erasing in training.

    torchvision.transforms.v2 draws ONE set of parameters per call, i.e. the same rotation for
    a whole batch; here each image gets its own, drawn from a generator seeded by
    (seed, epoch, step) for the global batch so that results do not depend on world size.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], cfg: DataConfig | None = None):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.cfg = cfg

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float().div_(255) - mean) / std

    def augment(
        self, x: torch.Tensor, seed: int, epoch: int, step: int, rank: int, world_size: int
    ) -> torch.Tensor:
        """Normalize and augment this rank's slice of global batch (epoch, step)."""
        x = self.normalize(x)
        cfg = self.cfg
        if cfg is None or not cfg.augment:
            return x
        b = x.shape[0]
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)
        # Draw for the whole global batch, keep this rank's slice.
        u = torch.rand(b * world_size, 6, generator=g)[rank * b : (rank + 1) * b]
        angle = (u[:, 0] * 2 - 1) * math.radians(cfg.rotation)
        scale = cfg.scale_min + u[:, 1] * (cfg.scale_max - cfg.scale_min)
        shift = (u[:, 2:4] * 2 - 1) * (2 * cfg.translate)  # grid coordinates span [-1, 1]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        ).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Pixels moved in from outside the image get the background value (0 before normalizing).
        background = ((0 - self.mean) / self.std).to(x.device, x.dtype)
        x = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = x + background
        if cfg.erasing > 0:
            x = self._erase(x, u[:, 4:6], g, rank, world_size)
        return x

    def _erase(
        self, x: torch.Tensor, u: torch.Tensor, g: torch.Generator, rank: int, world_size: int
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        v = torch.rand(b * world_size, 4, generator=g)[rank * b : (rank + 1) * b]
        apply = v[:, 0] < self.cfg.erasing
        area = 0.02 + v[:, 1] * 0.18
        aspect = torch.exp((v[:, 2] * 2 - 1) * math.log(3.0))
        eh = (torch.sqrt(area * aspect) * h).clamp(1, h)
        ew = (torch.sqrt(area / aspect) * w).clamp(1, w)
        top = u[:, 0] * (h - eh)
        left = u[:, 1] * (w - ew)
        ys = torch.arange(h).view(1, h, 1)
        xs = torch.arange(w).view(1, 1, w)
        mask = (
            (ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
            & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1))
            & apply.view(-1, 1, 1)
        )
        return x.masked_fill(mask.unsqueeze(1).to(x.device), 0.0)
