"""What a training run is made of, built from its config: data, model, optimizer, schedule,
precision, augmentation and the counters a checkpoint saves (`Training`); restoring it from a
checkpoint; wrapping it for DDP and torch.compile.

`bonnerlab.train.loop` runs the loop over what `build` returns; benchmarks and `make gpu-check`
build the same objects to time the product's own step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bonnerlab import distributed as dist
from bonnerlab.checkpoint import rng_state, set_rng_state
from bonnerlab.config import OptimConfig, TrainConfig, to_dict
from bonnerlab.data.augment import BatchAugment
from bonnerlab.data.datasets import Normalization, Splits, load_splits
from bonnerlab.data.folders import FileList, scan_collection
from bonnerlab.data.loaders import EvalBatches, TrainBatches, place_in_memory
from bonnerlab.data.shards import open_shards
from bonnerlab.errors import CheckpointError, ConfigError, UserError
from bonnerlab.models.sources import build_model_and_transform, resolve_weights
from bonnerlab.runs import RunPaths
from bonnerlab.train.precision import Precision


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Decay weights only: decaying biases and norm scales hurts and saves nothing.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused kernels, on CUDA and on the CPU: one pass over the parameters per step instead of
    # one per term (ResNet-18 on a CPU: SGD 17 -> 6 ms, AdamW 35 -> 9 ms per step); on CUDA
    # float16's GradScaler also hands them its found-inf flag on the device instead of reading
    # it back to the host every step.
    device_types = {p.device.type for p in params}
    fused = {"fused": True} if len(device_types) == 1 and device_types <= {"cuda", "cpu"} else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused
        )
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, **fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step, so a mid-epoch resume restores it exactly."""
    total = steps_per_epoch * epochs
    if cfg.schedule == "onecycle" and total >= 2:
        # at least one warm-up step: OneCycleLR divides by the warm-up's length (a 4-step smoke
        # run at warmup_fraction 0.25 would divide by zero)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=max(cfg.warmup_fraction, 1.01 / total),
            cycle_momentum=cfg.optimizer == "sgd",
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@dataclass
class EpochState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    step: int = 0  # next step within that epoch
    global_step: int = 0
    best_val_acc: float = -1.0
    loss_sum: float = 0.0  # running sums of the epoch in progress, so a mid-epoch resume
    correct: int = 0  # reports the same epoch averages as an uninterrupted run
    seen: int = 0


@dataclass
class Training:
    """Everything `train` builds, in one place: what a checkpoint saves and restores."""

    cfg: TrainConfig
    splits: Splits
    model: nn.Module  # DDP-wrapped (and compiled) when asked; `dist.unwrap` gives the module
    batches: TrainBatches
    val_batches: EvalBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    batch_augment: BatchAugment
    state: EpochState

    def close(self) -> None:
        """Stop the loaders' persistent workers."""
        self.batches.close()
        self.val_batches.close()

    def payload(self) -> dict[str, Any]:
        cfg, splits = self.cfg, self.splits
        return {
            "model": dist.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "state": dict(vars(self.state)),
            "rng": rng_state(),
            "config": to_dict(cfg),
            "arch": cfg.model.arch,
            "classes": list(splits.classes),
            "preprocess": {
                "mean": list(splits.mean),
                "std": list(splits.std),
                "image_size": cfg.data.image_size,
                "channels": splits.in_channels,
                "crop_fraction": splits.crop_fraction,
            },
        }


def scan_files(cfg: TrainConfig, run_dir: Path) -> FileList | None:
    """An image folder's file list: the run folder's own when resuming, else one scan on rank 0
    shared with the other ranks (a million-image tree is walked once per run)."""
    if cfg.data.dataset not in ("imagefolder", "shards"):
        return None
    cached = RunPaths(run_dir).files_json
    if cfg.resume and cached.is_file():
        return FileList.load(cached)
    found: FileList | UserError | None = None
    if dist.info().is_main:
        try:
            found = (
                open_shards(cfg.data.root, map_now=False).collection()
                if cfg.data.dataset == "shards"
                else scan_collection(Path(cfg.data.root))
            )
        except UserError as e:  # every rank raises it, none waits for a list that never comes
            found = e
    found = dist.broadcast_object(found)
    if isinstance(found, UserError):
        raise found
    return found


def published_normalization(
    cfg: TrainConfig, transform: Any, published_by: str
) -> Normalization | None:
    """Fine-tuning pretrained weights on an image folder: the mean, std and evaluation crop the
    weights were published with (`transform`, as `build_model_and_transform` returns it, read
    by bonnerlab.models.preprocess)."""
    if (
        cfg.data.dataset not in ("imagefolder", "shards")
        or resolve_weights(cfg.model.arch, cfg.model.weights) == "none"
        or cfg.data.in_channels != 3
    ):
        return None
    from bonnerlab.models.preprocess import resolve_preprocess

    spec = resolve_preprocess(transform, 3, "model", 0, (), (), published_by)
    resize = next((st for st in spec.steps if st["op"] == "resize" and len(st["size"]) == 1), None)
    crop = spec.output_size[0] if spec.output_size else None
    fraction = crop / resize["size"][0] if resize and crop else 1.0
    return Normalization(tuple(spec.mean), tuple(spec.std), min(fraction, 1.0))


def build(cfg: TrainConfig, info: dist.DistInfo, files: FileList | None = None) -> Training:
    """Data, model, optimizer and the rest, on this rank's device; fails on bad input before
    anything is written. The model is not yet wrapped for DDP (see `wrap`)."""
    torch.manual_seed(cfg.seed)
    dist.configure_backends(info.device, deterministic=cfg.deterministic)
    splits = load_splits(cfg.data, files)
    micro = cfg.optim.accumulate_steps
    if (cfg.data.batch_size // info.world_size) % micro:
        raise ConfigError(
            f"optim.accumulate_steps {micro} must divide the per-process batch "
            f"{cfg.data.batch_size // info.world_size} (data.batch_size / processes)"
        )
    # One load gives the model and the transform its weights were published with.
    model, transform, published_by = build_model_and_transform(
        cfg.model, splits.in_channels, splits.num_classes
    )
    published = published_normalization(cfg, transform, published_by)
    if published is not None:
        splits = splits.with_published(published)
    cache = cfg.data.device_cache_gb * 2**30
    train_split = place_in_memory(splits.train, info.device, cache)
    val_split = place_in_memory(splits.val, info.device, cache)
    model = model.to(info.device)
    if cfg.channels_last:  # NHWC: faster convs on tensor cores, and 3-9x faster pooling/BN on CPU
        model = model.to(memory_format=torch.channels_last)
    batches = TrainBatches(
        train_split,
        cfg.data.batch_size,
        cfg.seed,
        info.rank,
        info.world_size,
        info.device,
        cfg.data.num_workers,
        cfg.max_steps_per_epoch,
        cfg.data.decode,
    )
    val_batches = EvalBatches(
        val_split,
        cfg.data.eval_batch_size,
        info.rank,
        info.world_size,
        info.device,
        cfg.data.num_workers,
        cfg.data.decode,
    )
    optimizer = build_optimizer(model, cfg.optim)
    return Training(
        cfg,
        splits,
        model,
        batches,
        val_batches,
        optimizer,
        build_scheduler(optimizer, cfg.optim, len(batches), cfg.epochs),
        Precision.resolve(info.device, cfg.amp, cfg.amp_dtype, cfg.amp_cpu),
        BatchAugment(splits.mean, splits.std, cfg.data),
        EpochState(),
    )


def restore(run: Training, checkpoint: dict[str, Any], path: Path) -> None:
    """Continue exactly where `checkpoint` stopped: weights, optimizer, schedule, RNG, counters."""
    try:
        run.model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} does not fit model.arch {run.cfg.model.arch}: {str(e).splitlines()[0]}"
        ) from e
    # The saved param groups carry the implementation flags of the device that saved them; use
    # this device's, before loading: torch places the `step` counters by them (on the GPU for
    # fused kernels), so a CPU checkpoint resumes with fused AdamW on a GPU and back.
    saved = checkpoint["optimizer"]
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in run.optimizer.param_groups]
    groups = [{**group, **own} for group, own in zip(saved["param_groups"], flags, strict=True)]
    run.optimizer.load_state_dict({**saved, "param_groups": groups})
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.precision.load_scaler_state(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    run.state = EpochState(**checkpoint["state"])


def wrap(run: Training, info: dist.DistInfo) -> None:
    """DDP (with SyncBatchNorm when asked) and torch.compile, after weights are restored."""
    cfg = run.cfg
    if cfg.model.sync_batchnorm and not info.distributed:
        warnings.warn("model.sync_batchnorm has no effect in a single process", stacklevel=2)
    run.model = dist.wrap_model(run.model, sync_batchnorm=cfg.model.sync_batchnorm)
    if cfg.compile:
        run.model = compile_model(run.model, info.device, cfg.compile_fallback)


def compile_model(model: nn.Module, device: torch.device, fallback: bool) -> nn.Module:
    """`torch.compile`, after proving the compiler works here (a C++ toolchain on CPU, Triton on
    GPU): a broken toolchain is one line before training, not a traceback at the first step."""
    try:
        probe = torch.compile(lambda t: t * 2 + 1)
        probe(torch.ones(8, device=device))
    except Exception as e:  # inductor raises many kinds (BackendCompilerFailed, CalledProcessError)
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        if not fallback:
            raise UserError(
                f"--compile: torch.compile does not work here ({reason}); drop --compile, "
                "or pass --compile_fallback to train uncompiled"
            ) from e
        warnings.warn(
            f"torch.compile does not work here ({reason}); training uncompiled", stacklevel=2
        )
        return model
    return torch.compile(model)


def check_deterministic(run: Training) -> None:
    """Under `deterministic`, run one forward/backward on a copy of the model: an op with no
    deterministic kernel fails now, named in one line, not hours into the run."""
    if not run.cfg.deterministic:
        return
    import copy

    images, labels, _ = next(iter(run.batches.batches(0, 0)))
    model = copy.deepcopy(dist.unwrap(run.model))
    try:
        with torch.random.fork_rng(devices=[dist.info().device] if images.is_cuda else []):
            x = run.batch_augment.augment(images[:2], run.cfg.seed, 0, 0, 0, 1)
            with run.precision.autocast():
                loss = F.cross_entropy(model(x), labels[:2])
            loss.backward()
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        # "put_ does not have a deterministic implementation, but you set ...": keep the op's part
        op = str(e).strip().splitlines()[0].split(", but you set")[0]
        raise UserError(f"--deterministic: {op}; drop --deterministic or change the model") from e
