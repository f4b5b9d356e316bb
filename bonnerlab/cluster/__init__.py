"""The login-node side: submitting, SLURM commands, sweeps, status and report pages; the
compute-node wrapper. Nothing here imports torch at module level."""
