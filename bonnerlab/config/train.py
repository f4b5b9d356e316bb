"""The training and evaluation jobs' configs: data, model, optimizer, and the jobs themselves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from bonnerlab.config.core import check, check_checkpoint, check_choice

DATASETS = ("digits", "mnist", "imagefolder", "shards")
AUGMENTATIONS = ("auto", "digits", "natural", "none")
OPTIMIZERS = ("sgd", "adamw", "adadelta")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
DECODES = ("auto", "cpu", "gpu")
WANDB_MODES = ("auto", "online", "offline")


@dataclass
class DataConfig:
    """Which images to train on and how to feed them."""

    # keys of configs saved before a rename (a run's config.yaml, a checkpoint) -> today's name
    renamed_keys: ClassVar[dict[str, str]] = {"channels": "in_channels"}

    # dataset: digits (scikit-learn's handwritten digits, offline default), mnist, imagefolder,
    # shards (a folder `python -m bonnerlab.data pack` wrote from an image folder)
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
    in_channels: int = 1
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
    # auto = by what the images are: digits for digits/mnist and for folders of mostly
    # single-channel or small (<= 64 px) images (a sample of the files' headers), else natural
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
    # image folders: refuse images with more pixels than this (a decompression bomb); PIL's
    # own limit when 0
    max_image_pixels: int = 0
    # image folders: where JPEGs are decoded: cpu (PIL in DataLoader workers), gpu (workers read
    # bytes, nvJPEG decodes batches on the device), auto = gpu on CUDA, else cpu
    decode: str = "auto"

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.mnist_files", self.mnist_files, ("train", "test"))
        check(
            0.0 <= self.val_fraction < 1.0,
            f"data.val_fraction must be in [0, 1); got {self.val_fraction}",
        )
        check(self.image_size >= 8, f"data.image_size must be >= 8; got {self.image_size}")
        check(
            self.in_channels in (1, 3), f"data.in_channels must be 1 or 3; got {self.in_channels}"
        )
        check(self.batch_size > 0, f"data.batch_size must be > 0; got {self.batch_size}")
        check(
            self.eval_batch_size > 0,
            f"data.eval_batch_size must be > 0; got {self.eval_batch_size}",
        )
        check(
            self.num_workers >= -1,
            f"data.num_workers must be >= 0 (or -1 = auto); got {self.num_workers}",
        )
        check(
            self.device_cache_gb >= 0,
            f"data.device_cache_gb must be >= 0; got {self.device_cache_gb}",
        )
        check(0 < self.scale_min <= self.scale_max, "data.scale_min must be in (0, data.scale_max]")
        check(0.0 <= self.erasing <= 1.0, f"data.erasing must be in [0, 1]; got {self.erasing}")
        check(
            self.max_image_pixels >= 0,
            f"data.max_image_pixels must be >= 0 (0 = PIL's limit); got {self.max_image_pixels}",
        )
        check_choice("data.decode", self.decode, DECODES)
        check_choice("data.augment", self.augment, AUGMENTATIONS)
        check(
            0.0 < self.crop_scale <= 1.0,
            f"data.crop_scale must be in (0, 1]; got {self.crop_scale}",
        )
        check(self.crop_ratio >= 1.0, f"data.crop_ratio must be >= 1; got {self.crop_ratio}")
        check(0.0 <= self.flip <= 1.0, f"data.flip must be in [0, 1]; got {self.flip}")
        check(
            0.0 <= self.color_jitter < 1.0,
            f"data.color_jitter must be in [0, 1); got {self.color_jitter}",
        )


@dataclass
class ModelConfig:
    """Which network to build."""

    # mnist_cnn (the from-scratch tutorial model), a torchvision classifier name (resnet18),
    # timm:NAME, open_clip:NAME (the image tower) or hf:REPO_ID_OR_LOCAL_FOLDER (transformers)
    arch: str = "mnist_cnn"
    # auto: the checkpoint model.arch names (an hf: repo or folder, timm:NAME.TAG,
    # open_clip:NAME:TAG or open_clip:NAME:FILE, a hf-hub:/local-dir: name), else seeded random
    # init (a bare torchvision, timm or open_clip name, mnist_cnn); none (seeded random init); a
    # published name (torchvision weights name such as ResNet18_Weights.IMAGENET1K_V1 or DEFAULT;
    # timm pretrained tag or DEFAULT; open_clip tag such as laion2b_s34b_b79k; DEFAULT for hf:
    # the repo's own); or a local .pth/.pt/.safetensors file (a save_pretrained folder for hf:)
    weights: str = "auto"
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
        check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check(self.lr > 0, f"optim.lr must be > 0; got {self.lr}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        check(0.0 < self.warmup_fraction < 1.0, "optim.warmup_fraction must be in (0, 1)")
        check(self.step_epochs > 0, f"optim.step_epochs must be > 0; got {self.step_epochs}")
        check(0.0 < self.gamma <= 1.0, f"optim.gamma must be in (0, 1]; got {self.gamma}")
        check(0.0 <= self.label_smoothing < 1.0, "optim.label_smoothing must be in [0, 1)")
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0; got {self.grad_clip}")
        check(
            self.accumulate_steps >= 1,
            f"optim.accumulate_steps must be >= 1; got {self.accumulate_steps}",
        )


@dataclass
class LogConfig:
    """Experiment trackers beside metrics.jsonl and TensorBoard (the run folder stays the
    source of truth); rank 0 only, one tracker run per run folder across resumes and requeues."""

    # log to Weights & Biases (pip install bonnerlab[wandb])
    wandb: bool = False
    # W&B project; empty = bonnerlab
    wandb_project: str = ""
    # auto (WANDB_MODE when set, else offline when the service does not answer within 0.5 s),
    # online or offline; offline runs stay in <run folder>/wandb/: jobs/sync.py uploads them
    wandb_mode: str = "auto"
    # log to MLflow (pip install bonnerlab[mlflow])
    mlflow: bool = False
    # MLflow tracking URI: a server (http://host:5000) or sqlite:///path/mlflow.db; empty = a
    # SQLite store in the run folder (mlflow.db); a sweep given a sqlite: URI is refused (its
    # tasks would write one SQLite file at once)
    mlflow_uri: str = ""
    # MLflow experiment; empty = the sweep's folder name, else bonnerlab
    mlflow_experiment: str = ""

    def __post_init__(self) -> None:
        check_choice("log.wandb_mode", self.wandb_mode, WANDB_MODES)

    def check_sweep(self, sweep_dir: str) -> None:
        """A sweep's tasks must not share one SQLite file: many writers at once over a shared
        file system lock or corrupt it. Launch checks it before queueing; each task again."""
        check(
            not (self.mlflow and self.mlflow_uri.startswith("sqlite:")),
            f"--log.mlflow_uri {self.mlflow_uri}: the tasks of sweep {sweep_dir} would all write "
            "one SQLite file at once; leave it empty (a store in each task's folder) or give a "
            "tracking server (mlflow server ...; --log.mlflow_uri http://HOST:5000)",
        )


@dataclass
class SyncConfig:
    """jobs/sync.py: upload the W&B offline runs of run or sweep folders from a login node
    (`wandb sync`, several runs at once; a resumed run's parts in order, as one run)."""

    # run or sweep folders: their wandb/ folders and each task's
    paths: list[str] = field(
        default_factory=list,
        metadata={"positional": True, "custom_args": {"metavar": "RUNS_OR_SWEEP", "nargs": "+"}},
    )
    # runs uploaded at once (wandb sync -n)
    parallel: int = 8
    # list the runs that would be uploaded; upload nothing
    dry_run: bool = field(
        default=False, metadata={"custom_args": {"action": "store_true"}, "alias": ["--dry-run"]}
    )

    def __post_init__(self) -> None:
        check(self.parallel >= 1, f"--parallel must be >= 1; got {self.parallel}")


@dataclass
class TrainConfig:
    """Train a classifier; the defaults finish on a laptop CPU in seconds, offline."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
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
    # channels-last (NHWC) memory format: faster convolutions on CUDA, faster pooling and
    # BatchNorm on CPU
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
        check_choice("amp_dtype", self.amp_dtype, ("auto", "bfloat16", "float16"))
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )


@dataclass
class EvaluateConfig:
    """Evaluate a trained checkpoint; accuracy, loss, per-class accuracy, confusion matrix."""

    # run folder or checkpoint file, or newest (the newest run under runs_root)
    checkpoint: str = "newest"
    # where to look for the newest run
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
        check_choice("which", self.which, ("best", "latest"))
        check_checkpoint(self.checkpoint)
        check_choice("split", self.split, ("val", "test", "train"))
        check(self.batch_size > 0, f"batch_size must be > 0; got {self.batch_size}")
        check(
            self.num_workers >= -1,
            f"num_workers must be >= 0 (or -1 = auto); got {self.num_workers}",
        )
