"""Experiment trackers (Weights & Biases, MLflow) as thin, optional outputs of a training run.

The run folder stays the source of truth (metrics.jsonl, TensorBoard events); a tracker gets what
TensorBoard gets, from rank 0 only. Off unless `--log.wandb` / `--log.mlflow`.
"""

from __future__ import annotations

from pathlib import Path

from bonnerlab.config import TrainConfig
from bonnerlab.runs import Sink


def open_trackers(cfg: TrainConfig, run_dir: Path) -> Sink | None:
    """The trackers `cfg.log` asks for, or None (nothing imported) when it asks for none."""
    if not (cfg.log.wandb or cfg.log.mlflow):
        return None
    raise NotImplementedError("experiment trackers are not built yet")
