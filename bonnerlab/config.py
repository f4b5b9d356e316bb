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
    # DataLoader worker processes that decode image folders (in-memory datasets need none)
    num_workers: int = 2
    # random affine augmentation of training batches (none at evaluation)
    augment: bool = True
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
        check(self.num_workers >= 0, f"data.num_workers must be >= 0; got {self.num_workers}")
        check(0 < self.scale_min <= self.scale_max, "data.scale_min must be in (0, data.scale_max]")
        check(0.0 <= self.erasing <= 1.0, f"data.erasing must be in [0, 1]; got {self.erasing}")


@dataclass
class ModelConfig:
    """Which network to build."""

    # mnist_cnn (the from-scratch tutorial model) or any torchvision classifier name, e.g. resnet18
    arch: str = "mnist_cnn"
    # none, a torchvision weights name (e.g. ResNet18_Weights.IMAGENET1K_V1 or DEFAULT), or a local file
    weights: str = "none"
    # train only the new classification head (fine-tuning a pretrained backbone)
    freeze_backbone: bool = False
    # mnist_cnn: channels of the first conv layer (later layers double it)
    width: int = 16
    # mnist_cnn: dropout before the classifier (0 = off)
    dropout: float = 0.0
    # mnist_cnn: batch normalization after each conv (turn off for bit-level DDP comparisons)
    batchnorm: bool = True

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
    # mixed precision (bfloat16, else float16 with loss scaling) when on CUDA
    amp: bool = True
    # channels-last (NHWC) memory format: faster convolutions on CUDA, faster pooling and BatchNorm on CPU
    channels_last: bool = True
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
    # where to write the results; empty = <run folder>/eval-<split>
    output_dir: str = ""

    def __post_init__(self) -> None:
        _check_choice("which", self.which, ("best", "latest"))
        _check_choice("split", self.split, ("val", "test", "train"))
        check(self.batch_size > 0, f"batch_size must be > 0; got {self.batch_size}")


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
        "--config_path", default=None, help="YAML file of config values (command-line flags win)"
    )
    parser.add_arguments(cls, dest="cfg", default=default)
    try:
        namespace = parser.parse_args(argv)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return namespace.cfg


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
