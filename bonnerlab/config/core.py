"""Job configs: one dataclass per job, nested per component, with laptop defaults.

Every field carries a comment that simple-parsing turns into `--help` text. Flags are the dotted
field paths (`--optim.lr 0.01`), the same keys a `--config_path run.yaml` file uses.
Precedence: dataclass defaults < YAML file < command line. Unknown keys are errors.
This module knows nothing of torch or SLURM so it imports in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bonnerlab.errors import ConfigError

DATASETS = ("digits", "mnist", "imagefolder")
AUGMENTATIONS = ("auto", "digits", "natural", "none")
OPTIMIZERS = ("sgd", "adamw", "adadelta")
SCHEDULES = ("onecycle", "cosine", "step", "constant")


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition: the one-line check every config uses."""
    if not condition:
        raise ConfigError(message)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class DataConfig:
    """Which images to train on and how to feed them."""

    # dataset: digits (scikit-learn's handwritten digits, offline default), mnist, imagefolder
    dataset: str = "digits"
    # folder with the data: MNIST's torchvision layout (root/MNIST/raw) or root/<class>/*.png
    root: str = "data"
    # MNIST files to train from: train (60k) or test (10k, the files in ../shared/data/mnist)
    mnist_files: str = "train"
    # download MNIST into root when its files are missing (needs internet)
    download: bool = True
    # share of the training files held out for validation, carved with split_seed
    val_fraction: float = 0.2
    # seed of the train/validation split (fixed so every run sees the same held-out images)
    split_seed: int = 0
    # images are resized to image_size x image_size
    image_size: int = 28
    # colour channels given to the model: 1 (grayscale) or 3 (RGB); digits and mnist are grayscale
    channels: int = 1
    # global batch size, split evenly over all processes
    batch_size: int = 128
    # batch size for evaluation
    eval_batch_size: int = 1000
    # DataLoader worker processes that decode image folders (in-memory datasets need none);
    # -1 = from the CPUs this task was given (SLURM_CPUS_PER_TASK, else its CPU affinity)
    num_workers: int = -1
    # an in-memory dataset (digits, mnist) is copied to the GPU once when it fits in this many
    # GiB; a larger one stays in pinned host memory and is copied batch by batch
    device_cache_gb: float = 4.0
    # augmentation of training batches, per sample on the training device (none at evaluation):
    # digits (random affine), natural (random-resized crop, flip, colour jitter), none;
    # auto = digits for digits/mnist, natural for image folders
    augment: str = "auto"
    # natural: smallest crop, as a fraction of the image's area (largest: the whole image)
    crop_scale: float = 0.08
    # natural: largest crop aspect ratio (smallest: its inverse)
    crop_ratio: float = 4 / 3
    # natural: probability of a horizontal flip
    flip: float = 0.5
    # natural: brightness, contrast and saturation each scaled by a factor in [1 - x, 1 + x]
    color_jitter: float = 0.0
    # largest rotation, in degrees
    rotation: float = 10.0
    # largest translation, as a fraction of the image size
    translate: float = 0.1
    # smallest and largest zoom factor
    scale_min: float = 0.9
    scale_max: float = 1.1
    # probability of erasing a random rectangle of each training image (0 = off)
    erasing: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, DATASETS)
        _check_choice("data.mnist_files", self.mnist_files, ("train", "test"))
        check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1); got {self.val_fraction}")
        check(self.image_size >= 8, f"data.image_size must be >= 8; got {self.image_size}")
        check(self.channels in (1, 3), f"data.channels must be 1 or 3; got {self.channels}")
        check(self.batch_size > 0, f"data.batch_size must be > 0; got {self.batch_size}")
        check(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0; got {self.eval_batch_size}")
        check(self.num_workers >= -1, f"data.num_workers must be >= 0 (or -1 = auto); got {self.num_workers}")
        check(self.device_cache_gb >= 0, f"data.device_cache_gb must be >= 0; got {self.device_cache_gb}")
        check(0 < self.scale_min <= self.scale_max, "data.scale_min must be in (0, data.scale_max]")
        check(0.0 <= self.erasing <= 1.0, f"data.erasing must be in [0, 1]; got {self.erasing}")
        _check_choice("data.augment", self.augment, AUGMENTATIONS)
        check(0.0 < self.crop_scale <= 1.0, f"data.crop_scale must be in (0, 1]; got {self.crop_scale}")
        check(self.crop_ratio >= 1.0, f"data.crop_ratio must be >= 1; got {self.crop_ratio}")
        check(0.0 <= self.flip <= 1.0, f"data.flip must be in [0, 1]; got {self.flip}")
        check(0.0 <= self.color_jitter < 1.0, f"data.color_jitter must be in [0, 1); got {self.color_jitter}")


@dataclass
class ModelConfig:
    """Which network to build."""

    # mnist_cnn (the from-scratch tutorial model), a torchvision classifier name (resnet18),
    # timm:NAME, open_clip:NAME (the image tower) or hf:REPO_ID_OR_LOCAL_FOLDER (transformers)
    arch: str = "mnist_cnn"
    # none (seeded random init), a published name (torchvision weights name such as
    # ResNet18_Weights.IMAGENET1K_V1 or DEFAULT; timm pretrained tag or DEFAULT; open_clip tag such
    # as laion2b_s34b_b79k; DEFAULT for hf: the repo's own), or a local .pth/.pt/.safetensors
    # file (a save_pretrained folder for hf:)
    weights: str = "none"
    # train only the new classification head (fine-tuning a pretrained backbone)
    freeze_backbone: bool = False
    # mnist_cnn: channels of the first conv layer (later layers double it)
    width: int = 16
    # mnist_cnn: dropout before the classifier (0 = off)
    dropout: float = 0.0
    # mnist_cnn: batch normalization after each conv (turn off for bit-level DDP comparisons)
    batchnorm: bool = True
    # under DDP, BatchNorm statistics over the global batch (SyncBatchNorm) instead of per rank
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        check(bool(self.arch), "model.arch must not be empty")
        check(self.width > 0, f"model.width must be > 0; got {self.width}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1); got {self.dropout}")


@dataclass
class OptimConfig:
    """How to optimize."""

    # sgd, adamw or adadelta
    optimizer: str = "adamw"
    # peak learning rate
    lr: float = 0.02
    # decoupled weight decay (adamw) or L2 penalty (sgd, adadelta)
    weight_decay: float = 0.0005
    # sgd momentum
    momentum: float = 0.9
    # learning-rate schedule: onecycle, cosine, step (x gamma every step_epochs), constant
    schedule: str = "onecycle"
    # onecycle: share of the steps spent warming up
    warmup_fraction: float = 0.25
    # step schedule: epochs between decays
    step_epochs: int = 1
    # step schedule: decay factor
    gamma: float = 0.7
    # label smoothing of the cross-entropy loss (0 = off)
    label_smoothing: float = 0.0
    # clip gradients to this global norm (0 = off)
    grad_clip: float = 0.0
    # split each rank's batch into this many micro-batches, one optimizer step per batch
    # (gradient accumulation: a global batch larger than memory)
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        check(self.lr > 0, f"optim.lr must be > 0; got {self.lr}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        check(0.0 < self.warmup_fraction < 1.0, "optim.warmup_fraction must be in (0, 1)")
        check(self.step_epochs > 0, f"optim.step_epochs must be > 0; got {self.step_epochs}")
        check(0.0 < self.gamma <= 1.0, f"optim.gamma must be in (0, 1]; got {self.gamma}")
        check(0.0 <= self.label_smoothing < 1.0, "optim.label_smoothing must be in [0, 1)")
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0; got {self.grad_clip}")
        check(self.accumulate_steps >= 1, f"optim.accumulate_steps must be >= 1; got {self.accumulate_steps}")


@dataclass
class TrainConfig:
    """Train a classifier; the defaults finish on a laptop CPU in seconds, offline."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # passes over the training split
    epochs: int = 5
    # seed of initialization, shuffling, augmentation and dropout
    seed: int = 0
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # mixed precision when on CUDA
    amp: bool = True
    # AMP's dtype: auto = bfloat16 where the GPU has it natively (float32's range, no loss
    # scaling), else float16; float16 (with loss scaling) can be faster, e.g. ResNets on H200 1.3x
    amp_dtype: str = "auto"
    # bfloat16 autocast on a CPU that runs it natively (AVX512-BF16, AMX; float32 elsewhere):
    # about 2x a ResNet step there (bench/bench_natural.py); off by default: it changes results
    amp_cpu: bool = False
    # channels-last (NHWC) memory format: faster convolutions on CUDA, faster pooling and BatchNorm on CPU
    channels_last: bool = True
    # bit-reproducible CUDA runs: deterministic kernels only (an op without one is an error),
    # no TF32, no cuDNN autotuning; slower. CPU runs are reproducible without it.
    deterministic: bool = False
    # torch.compile the model (needs a working compiler: a C++ toolchain on CPU, Triton on GPU)
    compile: bool = False
    # with compile: train uncompiled (with a warning) when compiling fails, instead of stopping
    compile_fallback: bool = False
    # run folder; empty = <runs_root>/<date>-<time>-<arch>-<dataset>
    run_dir: str = ""
    # parent of automatically named run folders
    runs_root: str = "runs"
    # continue from <run_dir>/checkpoints/latest.pt when it exists (else start fresh)
    resume: bool = False
    # also save latest.pt every this many steps (0 = at the end of each epoch only)
    checkpoint_every_steps: int = 0
    # stop each epoch after this many steps (0 = the whole split); for smoke tests
    max_steps_per_epoch: int = 0
    # write per-step TensorBoard scalars every this many steps
    log_every_steps: int = 10
    # show a progress bar (rank 0, at a terminal)
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.epochs > 0, f"epochs must be > 0; got {self.epochs}")
        check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0")
        check(self.max_steps_per_epoch >= 0, "max_steps_per_epoch must be >= 0")
        check(self.log_every_steps > 0, "log_every_steps must be > 0")
        _check_choice("amp_dtype", self.amp_dtype, ("auto", "bfloat16", "float16"))
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )


@dataclass
class EvaluateConfig:
    """Evaluate a trained checkpoint; accuracy, loss, per-class accuracy, confusion matrix."""

    # run folder or checkpoint file; empty = the newest run under runs_root (its best.pt)
    checkpoint: str = ""
    # where to look for the newest run when checkpoint is empty
    runs_root: str = "runs"
    # which checkpoint of a run folder: best or latest
    which: str = "best"
    # split to evaluate: val (held out from training), test (MNIST test files) or train
    split: str = "val"
    # data folder; empty = the one the model was trained with
    data_root: str = ""
    # batch size for evaluation
    batch_size: int = 1000
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # DataLoader workers decoding image folders; -1 = from the CPUs this task was given
    num_workers: int = -1
    # where to write the results; empty = <run folder>/eval-<split>
    output_dir: str = ""

    def __post_init__(self) -> None:
        _check_choice("which", self.which, ("best", "latest"))
        _check_choice("split", self.split, ("val", "test", "train"))
        check(self.batch_size > 0, f"batch_size must be > 0; got {self.batch_size}")
        check(self.num_workers >= -1, f"num_workers must be >= 0 (or -1 = auto); got {self.num_workers}")


# ----------------------------------------------------------------------------- dict <-> dataclass

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) that YAML and JSON can hold."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; convert only where no information is lost."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build `cls` from a nested dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config key {dotted}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {dotted}")
    node[parts[-1]] = value


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """A new config with dotted keys replaced (`{"optim.lr": 0.01}`), validated like a YAML file."""
    tree = to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return from_dict(type(cfg), tree)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from bonnerlab.runs import atomic_write_text  # runs imports config; keep the cycle lazy

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, load_yaml(path))


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` into `cls`: defaults < `--config_path` YAML < dotted command-line flags."""
    import simple_parsing

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_path", default=None)
    known, _ = pre.parse_known_args(argv)
    default = load_config(cls, known.config_path) if known.config_path else cls()

    parser = simple_parsing.ArgumentParser(
        prog=prog,
        description=cls.__doc__,
        nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
        argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
        add_config_path_arg=False,
    )
    parser.add_argument(
        "--config_path",
        default=None,
        metavar="PATH",  # argparse would show the default: `--config_path None`
        help="YAML file of config values (command-line flags win)",
    )
    parser.add_arguments(cls, dest="cfg", default=default)
    try:
        namespace = parser.parse_args(argv)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return namespace.cfg


# ----------------------------------------------------------------------------- extraction

POOLINGS = ("none", "avg", "max", "flatten", "cls", "mean")
PREPROCESS_MODES = ("model", "squash", "center_crop")
DTYPES = ("auto", "float32", "float16")
DATASET_STIMULI = ("digits", "mnist")


@dataclass
class ExtractConfig:
    """Extract layer activations of a model over a set of stimuli into a zarr store."""

    # run folder or checkpoint file from `train`, or latest (the newest run under runs/);
    # empty = build model.arch with model.weights
    checkpoint: str = ""
    # which checkpoint of a run folder: best or latest
    which: str = "best"
    # the model when no checkpoint is given: arch is NAME (torchvision, mnist_cnn), timm:NAME,
    # open_clip:NAME (the image tower) or hf:REPO_ID_OR_FOLDER; weights is none (seeded random),
    # a published name (torchvision weights name, timm/open_clip pretrained tag, DEFAULT), or a
    # local .pth/.pt/.safetensors file (a save_pretrained folder for hf:)
    model: ModelConfig = field(default_factory=ModelConfig)
    # outputs of the model when no checkpoint is given; 0 = 1000 (torchvision) or 10 (mnist_cnn)
    num_classes: int = 0
    # seed of the random initialization when model.weights is none (so a resumed job matches)
    seed: int = 0
    # stimuli: an image folder (searched recursively), a sheet (.csv/.tsv with a `path` column,
    # relative to the sheet, an optional `stimulus_id`, other columns become coordinates), or a
    # dataset: digits, mnist
    stimuli: str = "digits"
    # dataset split: digits: all, train, val; mnist: test (10k test files), train, val
    split: str = "val"
    # MNIST folder (torchvision layout); empty = the checkpoint's data.root, else "data"
    data_root: str = ""
    # use only the first N stimuli (0 = all); for quick looks and smoke tests
    limit: int = 0
    # preprocessing: model (the transform the weights were published with: resize, crop,
    # normalize), squash (resize to image_size x image_size, no crop), center_crop (shorter side
    # to image_size, then the central square)
    preprocess: str = "model"
    # side of the model's input; 0 = the preprocessing's own (a checkpoint's, 28 for mnist_cnn)
    image_size: int = 0
    # normalization mean and std per channel; empty = the preprocessing's own
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # input colour channels (1 or 3); 0 = the checkpoint's, 1 (mnist_cnn) or 3 (other models)
    image_channels: int = 0
    # layers by module name, NAME:INDEX or NAME:KEY for an element of a tuple/dict output
    # (blocks.3.attn:0, vision_model:last_hidden_state), `output` for the model's own output, and
    # patterns where * stays within one dotted part (blocks.*); see --list_layers
    layers: list[str] = field(default_factory=lambda: ["features.2"])
    # channels to keep: "LAYER=SPEC" per layer or "SPEC" for all; SPEC like 0-7,12 (empty = all);
    # for token outputs (batch, token, dim) the channels are the last dim
    channels: list[str] = field(default_factory=list)
    # pooling: "LAYER=MODE" per layer or "MODE" for all; none, avg, max (over space, or over
    # tokens), flatten, cls (the first token), mean (over tokens)
    pooling: list[str] = field(default_factory=lambda: ["none"])
    # random projection per layer: "LAYER=srp:K" or "srp:K" for all: a seeded sparse random
    # projection of the layer's features to K dims, applied on the device before writing
    reduce: list[str] = field(default_factory=list)
    # stimuli per forward pass; also the store's chunk length (keep it when resuming)
    batch_size: int = 64
    # dtype of the stored activations: float32, float16, or auto = float16 when AMP computes in
    # float16 (nothing to lose), else float32 (bfloat16 values can exceed float16's range, 65504)
    dtype: str = "auto"
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # mixed precision on CUDA: bfloat16 autocast where the GPU has it natively (float32's range:
    # no overflow), else float16
    amp: bool = False
    # TF32 matmuls and convolutions on Ampere and newer GPUs: faster, but activations differ by
    # ~1e-3 relative from float32; recorded in the store's identity
    tf32: bool = False
    # DataLoader worker processes that decode and preprocess image files while the model computes;
    # -1 = from the CPUs this task was given (SLURM_CPUS_PER_TASK, else its CPU affinity)
    num_workers: int = -1
    # output store (a folder ending in .zarr); empty = activations/<model>-<stimuli>.zarr
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
    # print each layer's bytes per stimulus and the store's total size, then exit
    plan: bool = False
    # show a progress bar over batches
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("which", self.which, ("best", "latest"))
        check(self.num_classes >= 0, f"num_classes must be >= 0; got {self.num_classes}")
        check(bool(self.stimuli), "stimuli must be an image folder, a .csv/.tsv sheet or one of digits, mnist")
        check(self.limit >= 0, f"limit must be >= 0; got {self.limit}")
        _check_choice("preprocess", self.preprocess, PREPROCESS_MODES)
        check(
            self.image_size == 0 or self.image_size >= 8,
            f"image_size must be 0 or >= 8; got {self.image_size}",
        )
        check(len(self.mean) == len(self.std), f"mean and std must have the same length; got {self.mean} and {self.std}")
        check(all(s > 0 for s in self.std), f"std must be > 0; got {self.std}")
        check(self.image_channels in (0, 1, 3), f"image_channels must be 0, 1 or 3; got {self.image_channels}")
        check(self.list_layers or bool(self.layers), "layers must name at least one layer (see --list_layers)")
        check(len(set(self.layers)) == len(self.layers), f"layers has duplicates: {self.layers}")
        check(self.batch_size > 0, f"batch_size must be > 0; got {self.batch_size}")
        _check_choice("dtype", self.dtype, DTYPES)
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )
        check(self.num_workers >= -1, f"num_workers must be >= 0 (or -1 = auto); got {self.num_workers}")
        _check_choice("compression", self.compression, ("zstd", "lz4", "none"))
        check(self.num_shards >= 1, f"num_shards must be >= 1; got {self.num_shards}")
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index {self.shard_index} is out of range for num_shards {self.num_shards} (0..{self.num_shards - 1})",
        )
        # Parse now so a bad spec fails before any model is built.
        layer_options(self, self.layers)


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
            raise ConfigError(f"bad channel spec {spec!r}: use indices and ranges like 0-7,12") from None
    if any(c < 0 for c in out):
        raise ConfigError(f"bad channel spec {spec!r}: channels are >= 0")
    if len(set(out)) != len(out):
        raise ConfigError(f"channel spec {spec!r} lists a channel twice")
    return out


def parse_reduce(spec: str) -> int | None:
    """ "srp:4096" -> 4096 (output dims of a sparse random projection); "" or "none" -> None."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    method, _, k = spec.partition(":")
    if method != "srp" or not k.isdigit() or int(k) < 1:
        raise ConfigError(f"bad reduce spec {spec!r}: use srp:K with K >= 1, e.g. srp:4096")
    return int(k)


def _per_layer(entries: list[str], layers: list[str], configured: list[str], what: str, default: str) -> dict[str, str]:
    """Entries "VALUE" (every layer) then "NAME=VALUE"; NAME is a configured layer (a pattern
    applies to each layer it expanded to) or one expanded name."""
    out = dict.fromkeys(layers, default)
    # Entries for all layers first, then the per-layer ones, whatever order they came in.
    for entry in [e for e in entries if "=" not in e] + [e for e in entries if "=" in e]:
        name, sep, value = entry.rpartition("=")
        if not sep:
            out = dict.fromkeys(layers, value)
            continue
        targets = [n for n in layers if n == name] or (
            [n for n in layers if layer_matches(name, n)] if name in configured else []
        )
        if not targets:
            if layers == configured and any(is_pattern(c) and layer_matches(c, name) for c in configured):
                continue  # a layer a pattern will expand to; checked again after the expansion
            raise ConfigError(f"{what} entry {entry!r} names {name!r}, which is not in layers {configured}")
        for n in targets:
            out[n] = value
    return out


def layer_matches(pattern: str, name: str) -> bool:
    """`blocks.*` matches blocks.0 but not blocks.0.attn (* stays within one dotted part; ** crosses)."""
    import re

    module, sep, element = pattern.partition(":")
    regex = "".join(
        ".*" if part == "**" else "[^.]*" if part == "*" else "[^.]" if part == "?" else re.escape(part)
        for part in re.split(r"(\*\*|\*|\?)", module)
    )
    name_module, name_sep, name_element = name.partition(":")
    return re.fullmatch(regex, name_module) is not None and (sep, element) == (name_sep, name_element)


def is_pattern(layer: str) -> bool:
    return any(c in layer.partition(":")[0] for c in "*?")


@dataclass
class LayerOptions:
    channels: list[int] | None
    pooling: str
    reduce: int | None  # output dims of the random projection, or None


def layer_options(cfg: ExtractConfig, layers: list[str]) -> dict[str, LayerOptions]:
    """layer -> its options, for the configured layers or their expansion."""
    channels = _per_layer(cfg.channels, layers, cfg.layers, "channels", "")
    pooling = _per_layer(cfg.pooling, layers, cfg.layers, "pooling", "none")
    reduce = _per_layer(cfg.reduce, layers, cfg.layers, "reduce", "")
    for layer, mode in pooling.items():
        _check_choice(f"pooling for {layer}", mode, POOLINGS)
    return {
        n: LayerOptions(parse_channels(channels[n]), pooling[n], parse_reduce(reduce[n])) for n in layers
    }


def default_store_name(cfg: ExtractConfig) -> str:
    """activations/<model>-<stimuli>.zarr, from the config alone: a plain extract and every shard
    of `launch.py --shards N extract` name the same store."""
    import re

    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        # runs/<run>/checkpoints/best.pt -> <run>; runs/<run> -> <run>
        model = path.parent.parent.name if path.suffix == ".pt" and path.parent.name == "checkpoints" else path.name
    else:
        source, sep, name = cfg.model.arch.partition(":")
        if sep and source == "hf" and name.startswith(("/", ".", "~")):
            name = Path(name.rstrip("/")).name  # a local folder: its name, not its whole path
        model = f"{source}-{name}" if sep else source
    if cfg.stimuli in DATASET_STIMULI:
        stimuli = cfg.stimuli
    else:
        path = Path(cfg.stimuli).resolve()
        stimuli = path.stem if path.suffix.lower() in (".csv", ".tsv") else path.name
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{model}-{stimuli}").strip("-")
    return str(Path("activations") / f"{safe}.zarr")


# ----------------------------------------------------------------------------- SLURM and the launcher

CLUSTERS = ("slurm", "local", "debug")


@dataclass
class SlurmConfig:
    """Where and how a job runs: the sbatch request, built into a submitit executor."""

    # slurm (sbatch through submitit), local (a subprocess on this machine) or debug (in-process,
    # breakpoints work); local and debug run the very same job function
    cluster: str = "slurm"
    # SLURM partition; empty = the cluster's default partition
    partition: str = ""
    # number of nodes
    nodes: int = 1
    # GPUs per node (0 = CPU-only job)
    gpus_per_node: int = 0
    # processes per node; 0 = one per GPU (DDP), or 1 without GPUs
    tasks_per_node: int = 0
    # CPU cores per process (also sets OMP_NUM_THREADS and torch's thread count)
    cpus_per_task: int = 1
    # memory per node in GB (0 = the partition's default)
    mem_gb: float = 0.0
    # time limit in minutes; a job that reaches it saves, requeues and resumes
    time_minutes: int = 30
    # account to charge (sbatch --account); empty = your default
    account: str = ""
    # quality of service (sbatch --qos); empty = the default
    qos: str = ""
    # node features required (sbatch --constraint), e.g. "a100|h100"
    constraint: str = ""
    # e-mail address for job notifications
    mail_user: str = ""
    # when to e-mail: BEGIN, END, FAIL, ALL (comma-separated)
    mail_type: str = ""
    # job name shown by squeue; empty = bonnerlab-<job>
    job_name: str = ""
    # shell lines run before the job starts (e.g. "module load cuda")
    setup: list[str] = field(default_factory=list)
    # extra sbatch options, {"exclusive": true, "reservation": "lab"}; on the command line
    # --additional_parameters key=value (repeatable)
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # most tasks of a job array that run at the same time
    array_parallelism: int = 64
    # most requeues (time limits and preemptions) before the job is failed
    max_requeues: int = 3
    # seconds before the time limit when SLURM sends SIGUSR2 so the job can save and requeue
    signal_delay_s: int = 90

    def __post_init__(self) -> None:
        _check_choice("cluster", self.cluster, CLUSTERS)
        for name in ("nodes", "cpus_per_task", "time_minutes", "array_parallelism"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "mem_gb", "max_requeues", "signal_delay_s"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node:
            # DDP runs one process per GPU; anything else leaves GPUs idle or shares one GPU
            check(
                self.tasks_per_node == self.gpus_per_node,
                f"tasks_per_node ({self.tasks_per_node}) must equal gpus_per_node ({self.gpus_per_node}): "
                "one process per GPU (leave tasks_per_node at 0 to get that)",
            )
        check(
            self.cluster != "debug" or self.ntasks == 1,
            "cluster debug runs in this process: it cannot run several tasks; use --cluster local",
        )

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def ntasks(self) -> int:
        return self.ntasks_per_node * self.nodes


@dataclass
class LaunchConfig:
    """jobs/launch.py's own options (the SLURM request is SlurmConfig, the job's its own config)."""

    # block until the job (or every sweep task) ends; print the results
    wait: bool = False
    # write and print the sbatch script (and a sweep's table of points); submit nothing
    dry_run: bool = False
    # KEY=V1,V2: sweep a job config key; several --sweep flags form a grid
    sweep: list[str] = field(default_factory=list)
    # KEY=V1,V2: values paired across --zip flags (equal lengths); times the --sweep grid
    zip: list[str] = field(default_factory=list)
    # YAML file of the points: `grid:` and `zip:` sections (or a plain mapping = a grid)
    sweep_file: str = ""
    # sweep folder (default <runs_root>/sweep-<date>-<time>-<job>)
    sweep_dir: str = ""
    # resubmit the retryable tasks of --sweep_dir (preempted, node failure, time limit, out of memory);
    # --sweep_dir may also be a single run folder
    resume: bool = False
    # with --resume: also resubmit tasks that failed with an error in the job, or were cancelled
    retry_failed: bool = False
    # with --resume: most resubmissions of one task
    max_retries: int = 3
    # with --resume: out-of-memory tasks ask for this many times the memory they had
    retry_mem_factor: float = 2.0
    # run only this task of the sweep (e.g. with --cluster local, to try one point first); -1 = all
    task: int = -1
    # extract: split the stimuli over N array tasks that write one store
    shards: int = 0
    # extra sbatch option KEY=VALUE, e.g. exclusive=true or reservation=lab (repeatable)
    additional_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.max_retries >= 0, f"max_retries must be >= 0; got {self.max_retries}")
        check(self.retry_mem_factor >= 1, f"retry_mem_factor must be >= 1; got {self.retry_mem_factor}")
        check(self.task >= -1, f"task must be >= 0 (or -1 = all); got {self.task}")
        check(self.shards >= 0, f"shards must be >= 1; got {self.shards}")
        check(not self.retry_failed or self.resume, "--retry_failed goes with --resume")
