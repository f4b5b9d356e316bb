"""Extract layer activations of a trained or pretrained model into an activation store.

`extract(cfg)` runs the model over a set of stimuli and writes the chosen layers, batch by
batch, into the zarr store of `bonnerlab.activations` (one chunk per batch). The parts:

- capture: forward hooks on any `nn.Module` by name (no tracing, so any model works). The hook
  reduces the output at once (channel subset, pooling) and copies it, so an in-place op that
  follows (`ReLU(inplace=True)` after a BatchNorm) cannot change what was captured. After the
  last requested layer fires, its hook raises `_StopForward`: the rest of the network never runs.
- overlap: DataLoader workers decode images while the model computes; a writer thread
  compresses and writes the previous batch. A bounded queue keeps memory flat in the number of
  stimuli.
- resume and shards: the store marks each finished chunk; a restarted job (or shard
  `shard_index` of `num_shards`) only computes its unmarked chunks. Batches are the store's
  chunks, so a redone chunk sees exactly the same inputs and gives the same bits.
"""

from __future__ import annotations

import difflib
import hashlib
import platform
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonnerlab.activations import LayerSpec, open_store, shard_chunks
from bonnerlab.config import ConfigError, DataConfig, ModelConfig, to_dict
from bonnerlab.config import check as _check
from bonnerlab.errors import DataError, UserError

POOLINGS = ("none", "avg", "max", "flatten")
DTYPES = ("float32", "float16")
DATASET_STIMULI = ("digits", "mnist")


@dataclass
class ExtractConfig:
    """Extract layer activations of a model over a set of stimuli into a zarr store."""

    # run folder or checkpoint file from `train`, or latest (the newest run under runs/);
    # empty = build model.arch with model.weights
    checkpoint: str = ""
    # which checkpoint of a run folder: best or latest
    which: str = "best"
    # the model when no checkpoint is given: arch (mnist_cnn or a torchvision name) and weights
    # (none, a torchvision weights name such as DEFAULT, or a local file)
    model: ModelConfig = field(default_factory=ModelConfig)
    # outputs of the model when no checkpoint is given; 0 = 1000 (torchvision) or 10 (mnist_cnn)
    num_classes: int = 0
    # seed of the random initialization when model.weights is none (so a resumed job matches)
    seed: int = 0
    # stimuli: an image folder (searched recursively) or a dataset: digits, mnist
    stimuli: str = "digits"
    # dataset split: digits: all, train, val; mnist: test (10k test files), train, val
    split: str = "val"
    # MNIST folder (torchvision layout); empty = the checkpoint's data.root, else "data"
    data_root: str = ""
    # use only the first N stimuli (0 = all); for quick looks and smoke tests
    limit: int = 0
    # side of the square input images; 0 = the checkpoint's, 28 (mnist_cnn) or 224 (torchvision)
    image_size: int = 0
    # input colour channels (1 or 3); 0 = the checkpoint's, 1 (mnist_cnn) or 3 (torchvision)
    image_channels: int = 0
    # layers by module name, e.g. layer2 layer3 avgpool (see --list_layers)
    layers: list[str] = field(default_factory=lambda: ["features.2"])
    # channels to keep: "LAYER=SPEC" per layer or "SPEC" for all; SPEC like 0-7,12 (empty = all)
    channels: list[str] = field(default_factory=list)
    # pooling over space: "LAYER=MODE" per layer or "MODE" for all; none, avg, max, flatten
    pooling: list[str] = field(default_factory=lambda: ["none"])
    # stimuli per forward pass; also the store's chunk length (keep it when resuming)
    batch_size: int = 64
    # dtype of the stored activations: float32 or float16
    dtype: str = "float32"
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # mixed precision (float16 autocast) when on CUDA
    amp: bool = False
    # DataLoader worker processes that decode image files while the model computes
    num_workers: int = 2
    # output store (a folder ending in .zarr); empty = activations/<arch>-<stimuli>.zarr
    output: str = ""
    # chunk compression: zstd, lz4 or none
    compression: str = "zstd"
    # this task's share of the chunks: shard shard_index of num_shards (a job array)
    shard_index: int = 0
    num_shards: int = 1
    # replace an existing store that was made with a different config or weights
    overwrite: bool = False
    # store NaN for unreadable images and record them (default: stop with an error)
    skip_bad_images: bool = False
    # print each layer name with its output shape for one input, then exit
    list_layers: bool = False
    # show a progress bar over batches
    progress: bool = True

    def __post_init__(self) -> None:
        _check(
            self.which in ("best", "latest"), f"which must be best or latest; got {self.which!r}"
        )
        _check(self.num_classes >= 0, f"num_classes must be >= 0; got {self.num_classes}")
        _check(bool(self.stimuli), "stimuli must be an image folder or one of digits, mnist")
        _check(self.limit >= 0, f"limit must be >= 0; got {self.limit}")
        _check(
            self.image_size == 0 or self.image_size >= 8,
            f"image_size must be 0 or >= 8; got {self.image_size}",
        )
        _check(
            self.image_channels in (0, 1, 3),
            f"image_channels must be 0, 1 or 3; got {self.image_channels}",
        )
        _check(
            self.list_layers or bool(self.layers),
            "layers must name at least one layer (see --list_layers)",
        )
        _check(len(set(self.layers)) == len(self.layers), f"layers has duplicates: {self.layers}")
        _check(self.batch_size > 0, f"batch_size must be > 0; got {self.batch_size}")
        _check(self.dtype in DTYPES, f"dtype must be float32 or float16; got {self.dtype!r}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )
        _check(self.num_workers >= 0, f"num_workers must be >= 0; got {self.num_workers}")
        _check(
            self.compression in ("zstd", "lz4", "none"),
            f"compression must be zstd, lz4 or none; got {self.compression!r}",
        )
        _check(self.num_shards >= 1, f"num_shards must be >= 1; got {self.num_shards}")
        _check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index {self.shard_index} is out of range for num_shards {self.num_shards} (0..{self.num_shards - 1})",
        )
        # Parse now so a bad spec fails before any model is built.
        layer_options(self)


# ============================================================================ per-layer options


def parse_channels(spec: str) -> list[int] | None:
    """ "0-7,12" -> [0, 1, ..., 7, 12]; "" or "all" -> None (every channel)."""
    spec = spec.strip()
    if spec in ("", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(
                f"bad channel spec {spec!r}: use indices and ranges like 0-7,12"
            ) from None
    if any(c < 0 for c in out):
        raise ConfigError(f"bad channel spec {spec!r}: channels are >= 0")
    if len(set(out)) != len(out):
        raise ConfigError(f"channel spec {spec!r} lists a channel twice")
    return out


def _per_layer(entries: list[str], layers: list[str], what: str, default: str) -> dict[str, str]:
    out = dict.fromkeys(layers, default)
    for entry in entries:
        name, sep, value = entry.rpartition("=")
        if not sep:
            out = dict.fromkeys(layers, value)
            continue
        if name not in out:
            raise ConfigError(
                f"{what} entry {entry!r} names {name!r}, which is not in layers {layers}"
            )
        out[name] = value
    return out


def layer_options(cfg: ExtractConfig) -> dict[str, tuple[list[int] | None, str]]:
    """layer -> (channels or None for all, pooling), from the per-layer config entries."""

    # Apply entries for all layers first, then the per-layer ones, whatever order they came in.
    def ordered(entries: list[str]) -> list[str]:
        return [e for e in entries if "=" not in e] + [e for e in entries if "=" in e]

    channels = _per_layer(ordered(cfg.channels), cfg.layers, "channels", "")
    pooling = _per_layer(ordered(cfg.pooling), cfg.layers, "pooling", "none")
    for layer, mode in pooling.items():
        if mode not in POOLINGS:
            raise ConfigError(
                f"pooling for {layer} must be one of {', '.join(POOLINGS)}; got {mode!r}"
            )
    return {layer: (parse_channels(channels[layer]), pooling[layer]) for layer in cfg.layers}


# ============================================================================ model


@dataclass
class ModelInfo:
    model: nn.Module
    arch: str
    weights: str  # torchvision name, local file, checkpoint path or "none"
    weights_sha256: str  # of the parameters and buffers actually loaded
    weights_file_sha256: str | None
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    data: DataConfig | None  # the training data config of a checkpoint


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """sha256 over parameter/buffer names and bytes: identifies the weights whatever their source."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # a view, no copy
    return h.hexdigest()


def load_model(cfg: ExtractConfig) -> ModelInfo:
    """The model in eval mode on CPU, plus what preprocessing it expects."""
    from bonnerlab.models import build_model

    torch.manual_seed(cfg.seed)  # weights "none": the same random network in every task
    if cfg.checkpoint:
        from bonnerlab.checkpoint import find_checkpoint
        from bonnerlab.training import load_trained

        # The training job's own loader: same head, same channels, same error messages.
        latest = cfg.checkpoint == "latest" and not Path("latest").exists()
        path = find_checkpoint("" if latest else cfg.checkpoint, cfg.which)
        model, train_cfg, payload = load_trained(path, torch.device("cpu"))
        pre = payload["preprocess"]
        info = ModelInfo(
            model,
            train_cfg.model.arch,
            str(path),
            "",
            _file_sha256(path),
            int(pre["image_size"]),
            int(pre["channels"]),
            tuple(pre["mean"]),
            tuple(pre["std"]),
            train_cfg.data,
        )
    else:
        from bonnerlab.data import IMAGENET_MEAN, IMAGENET_STD

        mnist = cfg.model.arch == "mnist_cnn"
        channels = cfg.image_channels or (1 if mnist else 3)
        num_classes = cfg.num_classes or (10 if mnist else 1000)
        model = build_model(cfg.model, channels, num_classes)
        weights_file = Path(cfg.model.weights)
        file_sha = (
            _file_sha256(weights_file)
            if cfg.model.weights != "none" and weights_file.is_file()
            else None
        )
        if channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (0.5,), (0.25,)
        info = ModelInfo(
            model,
            cfg.model.arch,
            cfg.model.weights,
            "",
            file_sha,
            28 if mnist else 224,
            channels,
            tuple(mean),
            tuple(std),
            None,
        )
    if cfg.image_size:
        info.image_size = cfg.image_size
    if cfg.image_channels and cfg.image_channels != info.channels:
        raise ConfigError(
            f"image_channels {cfg.image_channels} does not match the model's {info.channels} input channels"
        )
    info.model.eval()
    info.weights_sha256 = state_sha256(info.model)
    return info


def resolve_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """name -> module; an unknown name is an error listing the closest valid names."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in modules or name == "":
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
            hint = ", ".join(close) if close else ", ".join(valid[:8]) + ", ..."
            raise UserError(f"unknown layer {name!r}; closest: {hint} (see --list_layers)")
        out[name] = modules[name]
    return out


# ============================================================================ stimuli


@dataclass
class Stimuli:
    ids: list[str]  # relative paths (image folder) or dataset ids like digits/0042
    labels: list[int]  # -1 where unknown
    root: str
    classes: list[str]
    images: torch.Tensor | None = None  # in-memory datasets: uint8 [N, C, H, W]
    files: list[Path] | None = None  # image folders


def scan_stimuli(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Every image under `root`, recursively, sorted by relative path (the same order in every
    shard). The first folder level gives the label when images sit in class folders."""
    from bonnerlab import data as bdata

    if not root.is_dir():
        raise DataError(f"stimulus folder {root} does not exist")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in bdata.IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(
            f"no images in {root} (looked recursively for {', '.join(bdata.IMAGE_EXTENSIONS[:4])}, ...)"
        )
    classes = sorted(
        {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    )
    index = {c: i for i, c in enumerate(classes)}
    labels = [
        index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1
        for p in files
    ]
    return files, labels, classes


def load_stimuli(cfg: ExtractConfig, info: ModelInfo) -> Stimuli:
    from bonnerlab import data as bdata

    if cfg.stimuli not in DATASET_STIMULI:
        root = Path(cfg.stimuli)
        files, labels, classes = scan_stimuli(root)
        if cfg.limit:
            files, labels = files[: cfg.limit], labels[: cfg.limit]
        ids = [p.relative_to(root).as_posix() for p in files]
        return Stimuli(ids, labels, str(root.resolve()), classes, files=files)

    # Datasets: the same split the training run used (its seed and fraction) when known.
    base = info.data or DataConfig()
    data_cfg = DataConfig(
        **{
            **to_dict(base),
            "dataset": cfg.stimuli,
            "image_size": info.image_size,
            "channels": info.channels,
            "root": cfg.data_root or (base.root if info.data else "data"),
            "download": False,
        }
    )
    splits = {"digits": ("all", "train", "val"), "mnist": ("test", "train", "val")}[cfg.stimuli]
    if cfg.split not in splits:
        raise ConfigError(
            f"split for {cfg.stimuli} must be one of {', '.join(splits)}; got {cfg.split!r}"
        )
    if cfg.stimuli == "digits":
        source = bdata.load_digits_source(data_cfg)
    else:
        source = bdata.load_mnist_source(data_cfg, train_files=cfg.split != "test")
    if cfg.split in ("train", "val"):
        train_idx, val_idx = bdata._split_indices(
            len(source), data_cfg.val_fraction, data_cfg.split_seed
        )
        source = bdata._subset(source, train_idx if cfg.split == "train" else val_idx)
    n = min(len(source), cfg.limit) if cfg.limit else len(source)
    return Stimuli(
        list(source.ids[:n]),
        source.labels[:n].tolist(),
        f"{cfg.stimuli}:{cfg.split}",
        [str(i) for i in range(10)],
        images=source.images[:n],
    )


class _FileImages(torch.utils.data.Dataset):
    """Decodes one file in a worker; returns an error string instead of raising, so the main
    process can name the file in a one-line error (worker exceptions arrive as long tracebacks)."""

    def __init__(self, files: list[Path], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from bonnerlab.data import load_image

        try:
            return load_image(self.files[index], self.size, self.channels), ""
        except DataError as e:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), str(e)


def iter_batches(
    stimuli: Stimuli, chunks: list[range], size: int, channels: int, num_workers: int, pin: bool
) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    """(uint8 batch, positions in the batch that could not be read, their errors) per chunk."""
    if stimuli.images is not None:
        for rows in chunks:
            yield stimuli.images[rows.start : rows.stop], [], []
        return
    assert stimuli.files is not None
    dataset = _FileImages(stimuli.files, size, channels)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[list(rows) for rows in chunks],
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=False,
    )
    for images, errors in loader:
        bad = [i for i, err in enumerate(errors) if err]
        yield images, bad, [errors[i] for i in bad]


# ============================================================================ capture


class _StopForward(Exception):
    """Raised by the last requested layer's hook to skip the rest of the network."""


@dataclass
class LayerPlan:
    name: str
    channels: list[int] | None
    pooling: str
    calls: int = 1  # capture the last call when a module runs more than once per forward
    index: torch.Tensor | None = None

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Channel subset and pooling; may return a view of `out` (no pooling, all channels)."""
        t = out.detach()
        if self.channels is not None:
            if self.index is None or self.index.device != t.device:
                self.index = torch.tensor(self.channels, device=t.device)
            t = t.index_select(1, self.index)
        if self.pooling == "avg":
            t = t.mean(dim=tuple(range(2, t.ndim)))
        elif self.pooling == "max":
            t = t.amax(dim=tuple(range(2, t.ndim)))
        elif self.pooling == "flatten":
            t = t.flatten(1)
        return t


def feature_dims(ndim: int, pooling: str) -> tuple[str, ...]:
    """Names of the feature dims of a layer output with `ndim` dims (batch included)."""
    if pooling == "flatten" or ndim == 2:
        return ("neuroid",)
    if pooling in ("avg", "max"):
        return ("channel",)
    return {
        3: ("channel", "position"),
        4: ("channel", "y", "x"),
        5: ("channel", "t", "y", "x"),
    }.get(ndim, ("channel", *(f"dim_{i}" for i in range(2, ndim))))


class Capture:
    """Forward hooks that reduce and copy the requested layers' outputs; a context manager.

    Each capture is copied straight into a preallocated CPU buffer: the copy happens inside the
    hook, so an in-place op that follows cannot change it, and reusing `slots` fixed buffers
    (instead of allocating per batch) keeps the process's memory flat however many batches run.
    The caller must not reuse a slot while its previous contents are still being written.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        plans: dict[str, LayerPlan],
        dtype: torch.dtype,
        stop_early: bool = True,
        slots: int = 1,
        pin_memory: bool = False,
    ):
        self.modules, self.plans, self.dtype, self.stop_early = modules, plans, dtype, stop_early
        self.n_slots, self.pin_memory = slots, pin_memory
        self.buffers: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles: list[Any] = []
        self.slot = 0

    def _dest(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shape = tuple(t.shape)
        bufs = self.buffers.get(name)
        if bufs is None or bufs[0].shape[0] < shape[0] or bufs[0].shape[1:] != shape[1:]:
            bufs = [
                torch.empty(shape, dtype=self.dtype, pin_memory=self.pin_memory)
                for _ in range(self.n_slots)
            ]
            self.buffers[name] = bufs
        return bufs[self.slot][: shape[0]]

    def _hook(self, name: str):
        plan = self.plans[name]

        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] != plan.calls:
                return
            if not isinstance(out, torch.Tensor):
                raise UserError(
                    f"layer {name} outputs a {type(out).__name__}, not a tensor; pick a submodule"
                )
            t = plan.reduce(out)
            dest = self._dest(name, t)
            # On CUDA the copy is queued on the stream, before any later in-place op on `out`.
            dest.copy_(t, non_blocking=t.device.type == "cuda")
            self.outputs[name] = dest
            if self.stop_early and len(self.outputs) == len(self.plans):
                raise _StopForward

        return hook

    def __enter__(self) -> Capture:
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def run(self, model: nn.Module, x: torch.Tensor, slot: int = 0) -> dict[str, torch.Tensor]:
        """Forward `x`; returns name -> CPU tensor (a view of buffer `slot`)."""
        self.outputs, self.calls, self.slot = {}, {}, slot % self.n_slots
        try:
            model(x)
        except _StopForward:
            pass
        if x.device.type == "cuda":
            torch.cuda.current_stream(x.device).synchronize()  # the queued copies have landed
        missing = [n for n in self.plans if n not in self.outputs]
        if missing:
            raise UserError(f"layers {missing} did not run in the forward pass")
        return self.outputs


def probe(
    model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor
) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (output shape of its last call, number of calls) for one input batch."""
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = (
                tuple(out.shape) if isinstance(out, torch.Tensor) else (type(out).__name__,)
            )

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (shapes[n], calls[n]) for n in shapes}


def list_layer_shapes(cfg: ExtractConfig) -> list[tuple[str, str, tuple[Any, ...], int]]:
    """(name, module type, output shape for one input, calls per forward) for every module."""
    info = load_model(cfg)
    modules = {n: m for n, m in info.model.named_modules() if n}
    x = torch.zeros(1, info.channels, info.image_size, info.image_size)
    seen = probe(info.model, modules, x)
    return [(n, type(m).__name__, *seen[n]) for n, m in modules.items() if n in seen]


# ============================================================================ extract


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "numpy", "zarr", "xarray", "bonnerlab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _resolve_device(requested: str) -> torch.device:
    from bonnerlab.distributed import resolve_device

    return resolve_device(requested, 0)


class _Writer:
    """Writes chunks on a thread while the next batch computes.

    The capture buffers are `slots` fixed slots used round-robin; `acquire()` blocks until the
    slot for the next batch has been written out (the writer releases slots in FIFO order), so at
    most `slots` batches of activations exist at once, however many stimuli there are. Errors on
    the thread surface at the next acquire/close."""

    def __init__(self, store: Any, slots: int):
        self.store = store
        self.queue: queue.Queue[Any] = queue.Queue()
        self.free = threading.Semaphore(slots)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="activation-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write_chunk(*item)
                except BaseException as e:  # reported to the main thread
                    self.error = e
            self.free.release()

    def acquire(self) -> None:
        self.free.acquire()
        if self.error is not None:
            raise self.error

    def put(self, chunk: int, data: dict[str, np.ndarray], skipped: list[str]) -> None:
        self.queue.put((chunk, data, skipped))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _return_large_buffers_to_os(threshold: int = 16 << 20) -> None:
    """Serve allocations >= 16 MB with mmap, so they go back to the OS when freed (glibc only).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which blocks
    below it come from per-thread heaps that rarely shrink. The writer thread's zarr encode
    buffers (about one batch of one layer) would then stay resident on top of the forward pass's
    peak: +10% RSS on ResNet-18 at batch 64. A fixed threshold costs page faults only for
    16-32 MB blocks. Process-wide, so only worth it in a job process; a no-op off glibc.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
    except (OSError, AttributeError):
        pass


def default_output(cfg: ExtractConfig, info: ModelInfo) -> Path:
    stimuli = cfg.stimuli if cfg.stimuli in DATASET_STIMULI else Path(cfg.stimuli).resolve().name
    return Path("activations") / f"{info.arch}-{stimuli}.zarr"


def extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Write the configured layers' activations to the store; returns a summary dict."""
    t_start = time.perf_counter()
    _return_large_buffers_to_os()
    device = _resolve_device(cfg.device)
    info = load_model(cfg)
    model = info.model.to(device)
    modules = resolve_layers(model, cfg.layers)
    options = layer_options(cfg)
    stimuli = load_stimuli(cfg, info)
    dtype = getattr(torch, cfg.dtype)
    amp = cfg.amp and device.type == "cuda"

    # One zero input gives every layer's shape and call count; channel indices are checked here,
    # before anything is written.
    x0 = torch.zeros(1, info.channels, info.image_size, info.image_size, device=device)
    seen = probe(model, modules, x0)
    plans: dict[str, LayerPlan] = {}
    specs: list[LayerSpec] = []
    for name in cfg.layers:
        if name not in seen:
            raise UserError(f"layer {name} did not run in the forward pass")
        shape, calls = seen[name]
        if isinstance(shape[0], str):
            raise UserError(f"layer {name} outputs a {shape[0]}, not a tensor; pick a submodule")
        channels, pooling = options[name]
        if channels is not None and max(channels) >= shape[1]:
            raise UserError(
                f"channel {max(channels)} is out of range for layer {name}, which has {shape[1]} channels (0-{shape[1] - 1})"
            )
        if pooling in ("avg", "max") and len(shape) < 3:
            raise UserError(
                f"pooling {pooling} needs spatial dims but layer {name} outputs {list(shape)}"
            )
        plan = LayerPlan(name, channels, pooling, calls)
        out_shape = tuple(plan.reduce(torch.zeros(shape)).shape[1:])
        plans[name] = plan
        specs.append(
            LayerSpec(
                name,
                feature_dims(len(shape), pooling),
                out_shape,
                cfg.dtype,
                {
                    "layer": name,
                    "module": type(modules[name]).__name__,
                    "output_shape": list(shape[1:]),
                    "channels": channels if channels is not None else "all",
                    "pooling": pooling,
                    "calls_per_forward": calls,
                },
            )
        )

    preprocessing = {
        "image_size": info.image_size,
        "channels": info.channels,
        "mean": list(info.mean),
        "std": list(info.std),
        "resize": "bilinear to image_size x image_size, then /255, then (x - mean) / std",
    }
    identity = {
        "arch": info.arch,
        "weights_sha256": info.weights_sha256,
        "preprocessing": preprocessing,
        "stimuli_sha256": hashlib.sha256("\n".join(stimuli.ids).encode()).hexdigest(),
        "n_stimuli": len(stimuli.ids),
        "layers": {
            s.name: {"channels": s.attrs["channels"], "pooling": s.attrs["pooling"]} for s in specs
        },
        "dtype": cfg.dtype,
        "amp": amp,
        "device_type": device.type,
        "batch_size": cfg.batch_size,
        "compression": cfg.compression,
        "skip_bad_images": cfg.skip_bad_images,
    }
    from bonnerlab.runs import git_commit

    attrs = {
        "arch": info.arch,
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
        "weights_file_sha256": info.weights_file_sha256,
        "preprocessing": preprocessing,
        "stimuli_root": stimuli.root,
        "classes": stimuli.classes,
        "dtype": cfg.dtype,
        "amp": amp,
        "versions": _versions(),
        "git_commit": git_commit(),
        "config": to_dict(cfg),
    }
    output = Path(cfg.output) if cfg.output else default_output(cfg, info)
    output.parent.mkdir(parents=True, exist_ok=True)
    store, outcome = open_store(
        output,
        identity=identity,
        layers=specs,
        stimuli=stimuli.ids,
        labels=stimuli.labels,
        chunk_size=cfg.batch_size,
        attrs=attrs,
        overwrite=cfg.overwrite,
        compression=cfg.compression,
    )
    mine = shard_chunks(store.n_chunks, cfg.shard_index, cfg.num_shards)
    todo = store.missing_chunks(mine)
    rows = [range(store.chunk_slice(c).start, store.chunk_slice(c).stop) for c in todo]
    n_images = sum(len(r) for r in rows)

    from tqdm import tqdm

    from bonnerlab.data import Preprocess

    normalize = Preprocess(info.mean, info.std).normalize
    slots = 2  # one batch computing while the previous one is written
    writer = _Writer(store, slots)
    t0 = time.perf_counter()
    n_skipped = 0
    bar = tqdm(
        total=n_images,
        unit="img",
        disable=not cfg.progress or not todo,
        desc=f"extract {output.name}",
    )
    try:
        with (
            Capture(
                modules, plans, dtype, slots=slots, pin_memory=device.type == "cuda"
            ) as capture,
            torch.inference_mode(),
        ):
            batches = iter_batches(
                stimuli,
                rows,
                info.image_size,
                info.channels,
                cfg.num_workers,
                device.type == "cuda",
            )
            for step, (chunk, r, (images, bad, errors)) in enumerate(
                zip(todo, rows, batches, strict=True)
            ):
                if bad and not cfg.skip_bad_images:
                    raise DataError(f"{errors[0]} (pass --skip_bad_images to store NaN and go on)")
                x = normalize(images.to(device, non_blocking=True))
                writer.acquire()  # the slot this batch fills has been written out
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    outputs = capture.run(model, x, slot=step)
                data = {}
                for name, t in outputs.items():
                    values = t.numpy()  # a view of the slot buffer, no copy
                    if bad:
                        values[bad] = np.nan
                    data[name] = values
                skipped = [stimuli.ids[r.start + i] for i in bad]
                n_skipped += len(skipped)
                writer.put(chunk, data, skipped)
                bar.update(len(r))
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0

    missing = store.missing_chunks()
    finalized = False
    if not missing:
        store.finalize()  # the last shard to finish (or a rerun) consolidates the store
        finalized = True
    return {
        "store": str(output),
        "outcome": outcome,
        "layers": cfg.layers,
        "n_stimuli": len(stimuli.ids),
        "images": n_images,
        "chunks_written": len(todo),
        "skipped": n_skipped,
        "seconds": seconds,
        "images_per_s": n_images / seconds if n_images and seconds > 0 else 0.0,
        "total_seconds": time.perf_counter() - t_start,
        "complete": finalized,
        "chunks_missing": len(missing),
    }
