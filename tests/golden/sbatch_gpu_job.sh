#!/bin/bash

# Parameters
#SBATCH --account=lab
#SBATCH --cpus-per-task=1
#SBATCH --error=/lab/runs/x/logs/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=2
#SBATCH --job-name=bonnerlab-train
#SBATCH --mem=7680MB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output=/lab/runs/x/logs/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=20
#SBATCH --wckey=submitit

# setup
export PYTHONPATH=/lab/runs/x/code${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1
export OMP_NUM_THREADS=1
module load cuda

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /lab/runs/x/logs/%j_%t_log.out --error /lab/runs/x/logs/%j_%t_log.err /lab/venv/bin/python -u -m submitit.core._submit /lab/runs/x/logs
