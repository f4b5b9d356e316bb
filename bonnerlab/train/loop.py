"""Training as plain functions: `train(cfg) -> dict` (evaluation is bonnerlab.train.evaluate).

`train` reads as its steps: `build` (bonnerlab.train.build), `restore` when resuming, `wrap` for
DDP, then per epoch `train_one_epoch`, `evaluate_model` and `epoch_record`.

They never know how they were started (laptop, torchrun, SLURM): `bonnerlab.distributed`
answers rank/world/device, and a stop request (a signal on the cluster) makes `train` save
`latest.pt` at the next step boundary and return.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bonnerlab import distributed as dist
from bonnerlab import interrupt
from bonnerlab.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from bonnerlab.config import TrainConfig, flat_keys, from_dict, save_yaml, to_dict
from bonnerlab.data.augment import BatchAugment
from bonnerlab.data.loaders import TrainBatches
from bonnerlab.errors import DiskSpaceError, RunDirError, UserError
from bonnerlab.models.cnn import count_parameters
from bonnerlab.runs import (
    Logger,
    RunLock,
    RunPaths,
    default_run_name,
    load_yaml_if_exists,
    truncate_metrics,
    write_git_info,
    write_state,
)
from bonnerlab.seeds import step_seed
from bonnerlab.train.build import (
    EpochState,
    Training,
    build,
    check_deterministic,
    restore,
    scan_files,
    wrap,
)
from bonnerlab.train.evaluate import evaluate_model
from bonnerlab.train.precision import Precision
from bonnerlab.train.trackers import check_trackers, open_trackers

# Config keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "device",
    "run_dir",
    "runs_root",
    "log_every_steps",
    "checkpoint_every_steps",
    "data.root",
    "data.num_workers",
    "data.download",
    "data.eval_batch_size",
    "data.device_cache_gb",
    "compile",
    "compile_fallback",
    "amp_dtype",
    "data.max_image_pixels",
    "log.wandb",
    "log.wandb_project",
    "log.wandb_mode",
    "log.mlflow",
    "log.mlflow_uri",
    "log.mlflow_experiment",
}


# ----------------------------------------------------------------------------- train


class DeviceSums:
    """Loss and correct counts summed on the device, read back only when asked (logging steps,
    checkpoints, epoch end): `loss.item()` every step would make the host wait for the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        n = len(labels)
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += (logits.detach().argmax(1) == labels).sum()
        self.seen += n

    def flush_into(self, state: EpochState) -> None:
        loss_sum, correct = self.sums.tolist()  # the one host sync
        state.loss_sum += loss_sum
        state.correct += int(correct)
        state.seen += self.seen
        self.sums.zero_()
        self.seen = 0


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    cfg: TrainConfig,
    sums: DeviceSums,
) -> torch.Tensor:
    """One optimizer step over this rank's batch, in `optim.accumulate_steps` micro-batches.

    All but the last micro-batch skip DDP's gradient all-reduce (`no_sync`): gradients add up
    locally and cross the network once. Returns the last micro-batch's loss (on the device).
    """
    micro = cfg.optim.accumulate_steps
    optimizer.zero_grad(set_to_none=True)
    for i, (xm, ym) in enumerate(zip(x.chunk(micro), labels.chunk(micro), strict=True)):
        last = i == micro - 1
        skip_sync = (
            model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        )
        with skip_sync:
            with precision.autocast():
                logits = model(xm)
                loss = F.cross_entropy(logits, ym, label_smoothing=cfg.optim.label_smoothing)
            precision.scaler.scale(loss / micro).backward()
        sums.add(logits, ym, loss)
    if cfg.optim.grad_clip > 0:
        precision.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return loss


def train_one_epoch(
    model: nn.Module,
    batches: TrainBatches,
    batch_augment: BatchAugment,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    cfg: TrainConfig,
    state: EpochState,
    logger: Logger,
    save_checkpoint_now: Callable[[], None] | None = None,
    on_step_end: Callable[[EpochState], None] | None = None,
) -> bool:
    """Run the rest of epoch `state.epoch`; returns False when stopped early by a stop request.

    The host reads from the GPU only on logging steps, checkpoint steps and at the epoch's end.
    Under DDP the stop request is agreed on every `log_every_steps` steps (an all-reduce read
    back to the host), so every rank stops at the same step.
    """
    info = dist.info()
    model.train()
    show = cfg.progress and info.is_main and sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(
        total=len(batches),
        initial=state.step,
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        disable=not show,
        leave=False,
        dynamic_ncols=True,
    )
    sums = DeviceSums(info.device)
    for images, labels, step in batches.batches(state.epoch, state.step):
        torch.manual_seed(step_seed(cfg.seed, state.global_step, info.rank))  # dropout masks
        x = batch_augment.augment(images, cfg.seed, state.epoch, step, info.rank, info.world_size)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = train_step(model, x, labels, optimizer, precision, cfg, sums)
        scheduler.step()
        state.step, state.global_step = step + 1, state.global_step + 1
        bar.update(1)
        logging_step = state.global_step % cfg.log_every_steps == 0
        if logging_step:
            loss_value = loss.item()
            logger.scalars(
                {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0]},
                state.global_step,
            )
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if (
            save_checkpoint_now is not None
            and cfg.checkpoint_every_steps
            and state.global_step % cfg.checkpoint_every_steps == 0
            and state.step < len(batches)
        ):
            sums.flush_into(state)
            save_checkpoint_now()
        if on_step_end is not None:
            on_step_end(state)
        if (logging_step or not info.distributed) and state.step < len(batches):
            if dist.any_rank(interrupt.stop_requested()):
                sums.flush_into(state)
                bar.close()
                return False
    sums.flush_into(state)
    bar.close()
    return True


def _resolve_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_dir or str(
        Path(cfg.runs_root) / default_run_name(cfg.model.arch, cfg.data.dataset)
    )
    return Path(dist.broadcast_object(name))


# What the launcher writes into a run folder before the job starts, and the lock: a folder
# holding only these is a run that has not started yet.
_BEFORE_START = {"LOCK", "STATE", "slurm.yaml", "submit.sh", "code", "logs", "git.txt", "git.diff"}


def check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a folder that holds another run (or no run of this toolkit); on resume, refuse a
    config that changes results."""
    paths = RunPaths(run_dir)
    saved = load_yaml_if_exists(paths.config_yaml)
    if saved is None:
        foreign = sorted(
            p.name
            for p in (run_dir.iterdir() if run_dir.exists() else ())
            if p.name not in _BEFORE_START and not p.name.startswith(".LOCK.")
        )
        if foreign and not (cfg.resume and paths.latest.is_file()):
            what = "is not a run folder of bonnerlab (no config.yaml)" if cfg.resume else ""
            raise RunDirError(
                f"run folder {run_dir} {what or 'is not empty'} (it holds "
                f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "choose a new --run_dir"
            )
        return
    if not cfg.resume:
        raise RunDirError(
            f"run folder {run_dir} already holds a run; "
            "pass --resume to continue it or choose a new --run_dir"
        )
    check_same_config(cfg, saved, f"--config_path {paths.config_yaml}", run_dir)


def check_same_config(cfg: TrainConfig, saved: dict[str, Any], fix: str, run_dir: Path) -> None:
    """Resuming must compute what the saved run computed: only RESUMABLE_CHANGES may differ.
    `saved` is config.yaml's content or a checkpoint's own copy (when config.yaml is gone)."""
    # read like any config file: a key an older run's config lacks (added since) is its default,
    # a renamed key its new name
    ours, theirs = flat_keys(to_dict(cfg)), flat_keys(to_dict(from_dict(TrainConfig, saved)))
    changed = sorted(
        k
        for k in ours.keys() | theirs.keys()
        if k not in RESUMABLE_CHANGES and ours.get(k) != theirs.get(k)
    )
    if changed:
        raise RunDirError(
            f"cannot resume {run_dir} with a different config ({', '.join(changed[:4])}); "
            f"use the saved config ({fix}) or a new --run_dir"
        )


def hold_run_folder(run_dir: Path, info: dist.DistInfo) -> RunLock | None:
    """Rank 0 takes the folder's LOCK (one writer per run folder); every rank raises the same
    one line when another process holds it. None on the other ranks."""
    lock = RunLock(run_dir) if info.is_main else None
    outcome: str | UserError = ""
    if lock is not None:
        try:
            outcome = lock.acquire()
        except UserError as e:  # every rank raises it, none waits for a run that never starts
            outcome = e
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, UserError):
        raise outcome
    if outcome:
        dist.print0(f"[bonnerlab] {outcome}")
    return lock


def start_run_folder(run: Training, run_dir: Path, resumed: bool) -> None:
    paths = RunPaths(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(run.cfg, paths.config_yaml)
    write_git_info(run_dir)
    write_state(run_dir, "RUNNING")
    if resumed:
        truncate_metrics(run_dir, run.state.epoch)


def mark_interrupted(run_dir: Path) -> Callable[[], None]:
    """What a stop request does at once, in its signal handler: STATE INTERRUPTED. The save
    follows at the next step boundary; a process killed before then (torchrun SIGKILLs its
    workers 30 s after the SIGTERM it passed on) still leaves a true STATE, and latest.pt of
    the last save to resume from."""

    def mark() -> None:
        with contextlib.suppress(OSError, DiskSpaceError):
            write_state(run_dir, "INTERRUPTED")

    return mark


def epoch_record(
    run: Training, val: dict[str, Any], seconds: float, train_seconds: float, seen_before: int
) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl, averaged over every rank."""
    state, info = run.state, dist.info()
    totals = torch.tensor(
        [state.loss_sum, float(state.correct), float(state.seen)], dtype=torch.float64
    )
    loss_sum, correct, seen = dist.all_reduce_sum(totals).tolist()
    return {
        "epoch": state.epoch + 1,
        "step": state.global_step,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_time_s": round(seconds, 3),
        "train_samples_per_s": round(
            (state.seen - seen_before) * info.world_size / max(train_seconds, 1e-9), 1
        ),
    }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`; returns the final metrics. Resumes when `cfg.resume`."""
    with dist.session(cfg.device) as info:
        return _train(cfg, info)


def _train(cfg: TrainConfig, info: dist.DistInfo) -> dict[str, Any]:
    run_dir = _resolve_run_dir(cfg)
    paths = RunPaths(run_dir)
    # Everything that can fail on bad input happens before the run folder is touched.
    files = scan_files(cfg, run_dir)
    check_trackers(cfg, run_dir)
    run = build(cfg, info, files)
    lock = hold_run_folder(run_dir, info)
    try:
        resume_from = prepare(run, run_dir, info)
    except BaseException:
        run.close()
        if lock is not None:
            lock.release(remove_dir_if_empty=True)  # a refused run leaves no trace
        raise
    state = run.state
    failed, last, logger = False, {}, None
    try:
        logger = Logger(run_dir if info.is_main else None)
        if info.is_main:
            start_run_folder(run, run_dir, resumed=resume_from is not None)
            # after the run folder's records, so trackers log the commit git.txt holds
            logger.trackers = open_trackers(cfg, run_dir)
            if files is not None and not paths.files_json.is_file():
                files.save(paths.files_json)
            interrupt.on_stop(mark_interrupted(run_dir))
        total, trainable = count_parameters(dist.unwrap(run.model))
        where = f"resuming epoch {state.epoch + 1} step {state.step}" if resume_from else "starting"
        dist.print0(f"[bonnerlab] {dist.describe_device(info.device)}")
        dist.print0(
            f"[bonnerlab] {where}: {cfg.model.arch} on {cfg.data.dataset} "
            f"({len(run.splits.train)} train / {len(run.splits.val)} val, "
            f"augment {run.splits.augment}), "
            f"{trainable:,}/{total:,} trainable "
            f"params, {info.world_size} process(es) on {info.device}, run folder {run_dir}"
        )
        last = run_epochs(run, run_dir, logger, lock)
    except BaseException as e:
        failed = True
        if info.is_main:
            interrupt.on_stop(None)
            # Ctrl-C twice: stopped by the user, resumable from latest.pt. STATE is written
            # where it still can be (a full disk may refuse even these few bytes).
            final = "INTERRUPTED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            with contextlib.suppress(OSError, DiskSpaceError):
                write_state(run_dir, final)
        raise
    finally:
        interrupt.on_stop(None)
        # after a failure (a full disk), closing must not bury its one line under its own errors
        with contextlib.suppress(OSError) if failed else contextlib.nullcontext():
            if logger is not None:
                logger.close()
        run.close()
        if lock is not None and (failed or last.get("interrupted")):
            lock.release()
    if last.get("interrupted"):
        return last
    if info.is_main:
        write_state(run_dir, "DONE")
        lock.release()
    dist.barrier()
    result = dict(last) if last else {"epoch": state.epoch}
    result.update(best_val_acc=state.best_val_acc, run_dir=str(run_dir), checkpoint=str(paths.best))
    return result


def prepare(run: Training, run_dir: Path, info: dist.DistInfo) -> Path | None:
    """Check the folder, restore from latest.pt when resuming (its saved config compared with
    this one: config.yaml may be gone), wrap for DDP; returns the checkpoint resumed from."""
    cfg, paths = run.cfg, RunPaths(run_dir)
    check_run_dir(cfg, run_dir)
    resume_from = paths.latest if cfg.resume and paths.latest.exists() else None
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from)
        check_same_config(cfg, checkpoint["config"], f"the config saved in {resume_from}", run_dir)
        restore(run, checkpoint, resume_from)
    check_deterministic(run)
    wrap(run, info)
    return resume_from


def run_epochs(
    run: Training, run_dir: Path, logger: Logger, lock: RunLock | None
) -> dict[str, Any]:
    """Epochs until cfg.epochs or a stop request; the last epoch's record, or the interrupted
    result (`interrupted`: True) after saving latest.pt."""
    cfg, state, info, paths = run.cfg, run.state, dist.info(), RunPaths(run_dir)

    def save(kind: str = "latest") -> None:
        # Every rank calls this at the same step; a rank 0 that cannot save (a full disk) stops
        # them all with its line, instead of leaving the others waiting in the next collective.
        error: DiskSpaceError | None = None
        if info.is_main:
            try:
                save_checkpoint(paths.latest if kind == "latest" else paths.best, run.payload())
            except DiskSpaceError as e:
                error = e
        if dist.any_rank(error is not None):
            raise error or DiskSpaceError(f"rank 0 could not save a checkpoint in {paths.root}")

    def beat(state: EpochState) -> None:  # the LOCK's heartbeat, at logging steps
        if lock is not None and state.global_step % cfg.log_every_steps == 0:
            lock.beat()

    last: dict[str, Any] = {}
    while state.epoch < cfg.epochs:
        start = time.perf_counter()
        seen_before = state.seen
        finished = train_one_epoch(
            run.model,
            run.batches,
            run.batch_augment,
            run.optimizer,
            run.scheduler,
            run.precision,
            cfg,
            state,
            logger,
            save_checkpoint_now=save,
            on_step_end=beat,
        )
        if not finished:
            save()
            return stopped(run, run_dir)
        train_seconds = time.perf_counter() - start
        val = evaluate_model(
            run.model,
            run.val_batches,
            run.batch_augment,
            run.splits.num_classes,
            cfg.channels_last,
            run.precision,
        )
        last = epoch_record(run, val, time.perf_counter() - start, train_seconds, seen_before)
        logger.epoch(last)
        logger.scalars(
            {f"epoch/{k}": v for k, v in last.items() if k not in ("epoch", "step")},
            last["epoch"],
        )
        improved = val["acc"] > state.best_val_acc
        state.best_val_acc = max(state.best_val_acc, val["acc"])
        state.epoch, state.step = state.epoch + 1, 0
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        save()
        if improved:
            save("best")
        if lock is not None:
            lock.beat()
        dist.print0(
            f"[bonnerlab] epoch {last['epoch']}/{cfg.epochs} "
            f"train_loss {last['train_loss']:.4f} "
            f"val_loss {last['val_loss']:.4f} val_acc {last['val_acc']:.4f} "
            f"({last['epoch_time_s']:.1f}s, {last['train_samples_per_s']:.0f} samples/s)"
        )
        # an epoch shorter than log_every_steps never checks inside it: check at its end (the
        # epoch's own all-reduces already made every rank wait here)
        if state.epoch < cfg.epochs and dist.any_rank(interrupt.stop_requested()):
            return stopped(run, run_dir)
    return last


def stopped(run: Training, run_dir: Path) -> dict[str, Any]:
    """latest.pt is saved: STATE INTERRUPTED, and the result that says how to continue."""
    state = run.state
    if dist.info().is_main:
        interrupt.on_stop(None)
        write_state(run_dir, "INTERRUPTED")
    dist.print0(
        f"[bonnerlab] stop requested: saved {RunPaths(run_dir).latest} at epoch "
        f"{state.epoch + 1} step {state.step}"
    )
    return {"interrupted": True, "epoch": state.epoch, "step": state.step, "run_dir": str(run_dir)}
