"""Evaluation: `evaluate_model` (the metrics of a model over batches, across ranks; training
calls it every epoch) and `evaluate(cfg)`, the job that scores a saved checkpoint on a split."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonnerlab import distributed as dist
from bonnerlab.checkpoint import find_checkpoint
from bonnerlab.config import EvaluateConfig, to_dict
from bonnerlab.data.augment import BatchAugment
from bonnerlab.data.datasets import EVAL_CROP_FRACTION, FolderDataset, Normalization, load_splits
from bonnerlab.data.folders import FileList
from bonnerlab.data.loaders import EvalBatches, place_in_memory
from bonnerlab.errors import UserError
from bonnerlab.models.sources import load_trained
from bonnerlab.runs import RunPaths, atomic_write_text, save_figure
from bonnerlab.train.precision import Precision


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: EvalBatches,
    batch_augment: BatchAugment,
    num_classes: int,
    channels_last: bool = False,
    precision: Precision | None = None,
) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix over `batches`, across all ranks.

    Runs the unwrapped model: a DDP forward is a collective (buffer broadcast), and ranks
    holding different numbers of evaluation batches would wait on each other forever.
    """
    model = dist.unwrap(model)
    device = dist.info().device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    autocast = precision.autocast() if precision else contextlib.nullcontext()
    with autocast:
        for images, labels in batches:
            x = batch_augment.normalize(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            # index_add_, not bincount: bincount on CUDA reads min/max back to the host
            cells = labels * num_classes + logits.argmax(1)
            confusion.index_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))
    confusion = dist.all_reduce_sum(confusion)
    loss_sum = dist.all_reduce_sum(loss_sum)
    model.train(was_training)
    matrix = (
        confusion.view(num_classes, num_classes).cpu().numpy().astype(np.int64)
    )  # rows: true class
    total = max(int(matrix.sum()), 1)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    return {
        "loss": float(loss_sum.item()) / total,
        "acc": float(matrix.diagonal().sum()) / total,
        "per_class_acc": [float(v) for v in per_class],
        "count": int(matrix.sum()),
        "confusion": matrix,
    }


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate a checkpoint on a split; writes metrics.json and the confusion matrix."""
    with dist.session(cfg.device) as info:
        return _evaluate(cfg, info)


def _evaluate(cfg: EvaluateConfig, info: dist.DistInfo) -> dict[str, Any]:
    path = find_checkpoint(cfg.checkpoint, cfg.which, cfg.runs_root)
    model, train_cfg, payload = load_trained(path, info.device)
    data_cfg = train_cfg.data
    if cfg.data_root:
        data_cfg = type(data_cfg)(**{**to_dict(data_cfg), "root": cfg.data_root})
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(cfg.output_dir) if cfg.output_dir else RunPaths(run_dir).eval_dir(cfg.split)
    check_output_dir(out)
    listing = RunPaths(run_dir).files_json  # the exact files the run was trained and validated on
    pre = payload["preprocess"]
    published = Normalization(
        tuple(pre["mean"]), tuple(pre["std"]), pre.get("crop_fraction", EVAL_CROP_FRACTION)
    )
    splits = load_splits(
        data_cfg,
        FileList.load(listing) if listing.is_file() and not cfg.data_root else None,
        published,
    )
    source = {"train": splits.train, "val": splits.val, "test": splits.test}[cfg.split]
    if source is None:
        raise UserError(
            "no test split: it exists for mnist trained from its train files and for "
            "image folders with a test/ folder beside train/; use --split val"
        )
    if isinstance(source, FolderDataset) and source.fit == "canvas":
        source = source.with_fit("center_crop")  # training canvases -> the evaluation transform
    batches = EvalBatches(
        place_in_memory(source, info.device, data_cfg.device_cache_gb * 2**30),
        cfg.batch_size,
        info.rank,
        info.world_size,
        info.device,
        cfg.num_workers,
        data_cfg.decode,
    )
    dist.print0(f"[bonnerlab] {dist.describe_device(info.device)}")
    precision = Precision.resolve(
        info.device, train_cfg.amp, train_cfg.amp_dtype, train_cfg.amp_cpu
    )
    try:
        result = evaluate_model(
            model,
            batches,
            BatchAugment(tuple(pre["mean"]), tuple(pre["std"])),
            len(payload["classes"]),
            precision=precision,
        )
    finally:
        batches.close()
    confusion = result.pop("confusion")
    summary = {"checkpoint": str(path), "split": cfg.split, "classes": payload["classes"], **result}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        header = "true\\pred," + ",".join(payload["classes"])
        rows = [
            f"{c}," + ",".join(str(v) for v in row)
            for c, row in zip(payload["classes"], confusion, strict=True)
        ]
        atomic_write_text(out / "confusion_matrix.csv", "\n".join([header, *rows]) + "\n")
        _plot_confusion(confusion, payload["classes"], out / "confusion_matrix.png")
        dist.print0(
            f"[bonnerlab] {cfg.split}: acc {result['acc']:.4f} loss {result['loss']:.4f} "
            f"on {result['count']} images; results in {out}"
        )
    summary["confusion"] = confusion.tolist()
    summary["output_dir"] = str(out)
    return summary


OUTPUTS = ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png")


def check_output_dir(out: Path) -> None:
    """Refuse, before anything is computed, an output folder whose files of these names were
    not written by an earlier evaluation (its metrics.json names a checkpoint and a split):
    `--output_dir` pointed at a folder of the user's own must not lose their files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if not present:
        return
    try:
        earlier = json.loads((out / "metrics.json").read_text())
        ours = isinstance(earlier, dict) and {"checkpoint", "split", "acc"} <= earlier.keys()
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(
            f"--output_dir {out} already holds {', '.join(present)}, not written by evaluate; "
            "choose another folder (nothing was overwritten)"
        )


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * n, 1 + 0.45 * n))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(n), classes)
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    save_figure(fig, path)
