#!/bin/bash

# Parameters
#SBATCH --account='`touch INJECTED`'
#SBATCH --comment='it'"'"'s; touch INJECTED'
#SBATCH --constraint='a100|h100&touch INJECTED'
#SBATCH --cpus-per-task=1
#SBATCH --error='/lab/runs/o'"'"'brien $(touch INJECTED) `x`/logs/%j_0_log.err'
#SBATCH --exclusive
#SBATCH --job-name='x; touch INJECTED #'
#SBATCH --mail-user='o'"'"'brien@lab.org'
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output='/lab/runs/o'"'"'brien $(touch INJECTED) `x`/logs/%j_0_log.out'
#SBATCH --qos='$(touch INJECTED)'
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=30
#SBATCH --wckey=submitit

# setup
export PYTHONPATH='/lab/runs/o'"'"'brien $(touch INJECTED) `x`/code/0123abcd'${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1
export OMP_NUM_THREADS=1

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output '/lab/runs/o'"'"'brien $(touch INJECTED) `x`/logs/%j_%t_log.out' --error '/lab/runs/o'"'"'brien $(touch INJECTED) `x`/logs/%j_%t_log.err' /lab/venv/bin/python -u -m submitit.core._submit '/lab/runs/o'"'"'brien $(touch INJECTED) `x`/logs'
