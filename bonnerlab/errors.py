"""Errors a user can fix: the job scripts print them as one line and exit with status 2."""


class UserError(Exception):
    """Bad input (config, data, weights, checkpoint, run folder): the message says what to do."""


class ConfigError(UserError):
    """Unknown key, wrong type or bad value in a config."""


class DataError(UserError):
    """Missing or unreadable data."""


class WeightsError(UserError):
    """Model weights that cannot be found, downloaded or loaded."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or from another architecture."""


class RunDirError(UserError):
    """A run folder that already holds a different run."""


class FolderInUseError(RunDirError):
    """The run folder's LOCK belongs to another live (or unknown) process: its STATE and files
    are that process's to write."""


class ClusterError(UserError):
    """A job SLURM would refuse or could not run, or a folder that holds no job: nothing was
    queued."""


class StoreError(UserError):
    """An activation store that is missing, incomplete or made with another config."""


class DiskSpaceError(UserError):
    """Not enough free space for an output (an activation store)."""


class AnalysisError(UserError):
    """An analysis the inputs cannot support: no shared stimuli, too few of them, non-finite
    activations, or a memory limit below what the Gram itself needs."""
