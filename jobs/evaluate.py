"""Evaluate a trained checkpoint: accuracy, loss, per-class accuracy, confusion matrix.

python jobs/evaluate.py                                # newest run under runs/, its best.pt
python jobs/evaluate.py --checkpoint runs/<run> --split val
python jobs/evaluate.py --checkpoint runs/<run>/checkpoints/latest.pt --device cuda
python jobs/launch.py --partition gpu evaluate --checkpoint runs/<run>   # SLURM
"""

from __future__ import annotations

from _cli import run_job

from bonnerlab.config import EvaluateConfig, parse_config


def main(argv: list[str]) -> dict:
    cfg = parse_config(EvaluateConfig, argv, prog="jobs/evaluate.py")
    from bonnerlab.train.evaluate import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    run_job(main)
