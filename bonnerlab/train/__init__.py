"""Training: build a run, the loop, evaluation."""
