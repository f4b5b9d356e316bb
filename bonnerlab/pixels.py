"""uint8 pixels -> floats in [0, 1]: the one way every path does it (training's batch
augmentation, evaluation, extraction's transforms, on any device).

Divided by 255 held in a tensor on the pixels' device: CUDA divides by a plain Python number as a
multiplication by its reciprocal, which rounds 126 of the 256 values differently from
torchvision's `to_tensor` on the CPU, so a store or a checkpoint would depend on the device.
"""

from __future__ import annotations

import torch

_DIVISORS: dict[str, torch.Tensor] = {}  # per device: made once, no host-to-device copy per batch


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W] -> float32 in [0, 1], exactly as torchvision's to_tensor computes it."""
    key = str(pixels.device)
    if key not in _DIVISORS:
        _DIVISORS[key] = torch.tensor(255.0, device=pixels.device)
    return pixels.float().div_(_DIVISORS[key])
