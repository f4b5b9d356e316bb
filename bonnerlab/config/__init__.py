"""Every job's config dataclass, their checks, YAML and `parse_config`. Imports no torch.

`from bonnerlab.config import TrainConfig` is the import for users; the modules split the same
names by job: core (the machinery), train (train, evaluate), extract (with the layer-name
grammar), analyze, cluster (SLURM and the launcher).
"""

from bonnerlab.config.analyze import (
    RDM_METRICS,
    RSA_METHODS,
    AnalyzeConfig,
    default_output,
    expand_layers,
)
from bonnerlab.config.cluster import (
    CLUSTERS,
    CancelConfig,
    LaunchConfig,
    LogsConfig,
    SlurmConfig,
    StatusConfig,
)
from bonnerlab.config.core import (
    apply_overrides,
    check,
    check_choice,
    from_dict,
    load_config,
    load_yaml,
    parse_config,
    save_yaml,
    to_dict,
)
from bonnerlab.config.extract import (
    DATASET_STIMULI,
    DTYPES,
    POOLINGS,
    PREPROCESS_MODES,
    ExtractConfig,
    LayerOptions,
    default_store_name,
    is_pattern,
    layer_matches,
    layer_options,
    parse_channels,
    parse_reduce,
)
from bonnerlab.config.train import (
    AUGMENTATIONS,
    DATASETS,
    OPTIMIZERS,
    SCHEDULES,
    DataConfig,
    EvaluateConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "AUGMENTATIONS",
    "CLUSTERS",
    "DATASET_STIMULI",
    "DATASETS",
    "DTYPES",
    "OPTIMIZERS",
    "POOLINGS",
    "PREPROCESS_MODES",
    "RDM_METRICS",
    "RSA_METHODS",
    "SCHEDULES",
    "AnalyzeConfig",
    "CancelConfig",
    "DataConfig",
    "LogConfig",
    "EvaluateConfig",
    "ExtractConfig",
    "LaunchConfig",
    "LayerOptions",
    "LogsConfig",
    "ModelConfig",
    "OptimConfig",
    "SlurmConfig",
    "StatusConfig",
    "TrainConfig",
    "apply_overrides",
    "check",
    "check_choice",
    "default_output",
    "default_store_name",
    "expand_layers",
    "from_dict",
    "is_pattern",
    "layer_matches",
    "layer_options",
    "load_config",
    "load_yaml",
    "parse_channels",
    "parse_config",
    "parse_reduce",
    "save_yaml",
    "to_dict",
]
