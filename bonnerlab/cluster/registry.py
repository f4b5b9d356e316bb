"""The jobs the launcher can run: one `JobSpec` each, with lazy "module:name" paths.

The launcher and the status pages import this on the login node: it names the config classes
and job functions as strings, so importing it (and `bonnerlab.config`) loads no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobSpec:
    """A job the launcher can run, and everything that differs between kinds of jobs.

    The config class and function are lazy "module:name" paths (the launcher imports no torch).
    """

    config: str
    function: str
    # config field that holds the run folder (set by the launcher), or None: the launcher's folder
    run_dir_field: str | None = None
    # config field that means "continue from the run folder's latest checkpoint"
    resume_field: str | None = None
    # overrides for a job that runs unattended (no progress bar in the log files)
    unattended: dict[str, Any] = field(default_factory=dict)
    # config fields naming inputs that must exist before queueing (empty values are skipped)
    input_fields: tuple[str, ...] = ()
    # metric the status table ranks tasks by, and whether larger is better
    metric: str = "val_acc"
    mode: str = "max"

    def load_config_class(self) -> type:
        return _import(self.config)

    def load_function(self) -> Any:
        return _import(self.function)


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# Adding a job to the launcher is one entry here.
JOBS: dict[str, JobSpec] = {
    "train": JobSpec(
        "bonnerlab.config:TrainConfig",
        "bonnerlab.train.loop:train",
        "run_dir",
        "resume",
        unattended={"progress": False},
    ),
    "evaluate": JobSpec(
        "bonnerlab.config:EvaluateConfig",
        "bonnerlab.train.evaluate:evaluate",
        "output_dir",
        input_fields=("checkpoint",),
    ),
    "extract": JobSpec(
        "bonnerlab.config:ExtractConfig",
        "bonnerlab.extract.run:extract",
        input_fields=("checkpoint",),
    ),
    # the launcher sends it as one array task per layer (jobs/launch.py launch_layers)
    "analyze": JobSpec(
        "bonnerlab.config:AnalyzeConfig",
        "bonnerlab.analysis.run:analyze",
        unattended={"progress": False},
        input_fields=("store", "encode", "rsa", "cka"),
    ),
}
