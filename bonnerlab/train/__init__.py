"""Training: build a run, the loop, evaluation. `from bonnerlab.train import train, evaluate`."""

from bonnerlab.train.evaluate import evaluate
from bonnerlab.train.loop import train

__all__ = ["evaluate", "train"]
