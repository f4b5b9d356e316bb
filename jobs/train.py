"""Train a classifier.

    python jobs/train.py                                   # CPU, offline: mnist_cnn on digits
    python jobs/train.py --data.dataset mnist --data.root ../shared/data/mnist \
        --data.mnist_files test
    python jobs/train.py --model.arch resnet18 --model.weights DEFAULT --data.dataset imagefolder \
        --data.root /data/stimuli --data.in_channels 3 --data.image_size 224 --model.freeze_backbone
    torchrun --nproc_per_node 2 jobs/train.py --device cpu  # DDP (gloo on CPU, NCCL on GPUs)
    python jobs/launch.py --partition gpu --gpus_per_node 1 train --optim.lr 0.01   # SLURM
    python jobs/train.py --config_path runs/<run>/config.yaml --run_dir runs/again   # reproduce

SIGTERM or SIGUSR2 (preemption, a hand-written sbatch script's --signal, torchrun passing on its
own SIGTERM) and Ctrl-C save latest.pt at the next step and exit with STATE INTERRUPTED (Ctrl-C
twice aborts at once); `--resume` continues exactly. One process writes a run folder at a time:
a second one is refused with one line naming the holder (its LOCK).
"""

from __future__ import annotations

from _cli import print_result, run_job

from bonnerlab.config import TrainConfig, parse_config


def main(argv: list[str]) -> dict:
    cfg = parse_config(TrainConfig, argv, prog="jobs/train.py")
    from bonnerlab.train.loop import train

    result = train(cfg)
    print_result(result)
    return result


if __name__ == "__main__":
    run_job(main, save_on_signals=True)
