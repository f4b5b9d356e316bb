"""Every seed the library derives from a run's one `seed`, in one place.

Each mixes the run's seed with what must make draws differ (the epoch, the step, the rank, a
layer's name) by multiplying by primes, so no two purposes collide on the same stream and a
resumed or re-sharded run draws exactly what an uninterrupted one would. Changing a formula here
changes results (shuffles, augmentations, dropout masks, projections): don't, without a reason.
"""

from __future__ import annotations

import zlib

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle of epoch `epoch`: the same order on every rank."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator of global batch (epoch, step): the same draws on every rank and device."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)


def step_seed(seed: int, global_step: int, rank: int) -> int:
    """The global RNG's seed for training step `global_step` on `rank` (dropout masks)."""
    return (seed * 1_000_003 + global_step) * 1_009 + rank


def projection_seed(seed: int, layer: str) -> int:
    """Per-layer seed: two layers of the same width get different projections."""
    return seed * 1_000_003 + zlib.crc32(layer.encode())
