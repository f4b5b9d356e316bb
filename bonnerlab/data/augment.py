"""Batched augmentation and normalization on the training device: one call per batch, each
image with its own random parameters.

torchvision's transforms draw one set of parameters per call (per sample in a DataLoader
worker, on the CPU). Here the whole batch is transformed at once on the device it trains on,
with per-sample parameters drawn from a generator seeded by (seed, epoch, step) for the global
batch, so results depend on neither the world size nor the device, and a resumed run draws
exactly what an uninterrupted one would. Presets (`data.augment`): `digits` (affine + erasing),
`natural` (random-resized crop, flip, colour jitter), `none`; `auto` picks digits or natural by
what the images are (`datasets.augment_preset`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bonnerlab.config import DataConfig
from bonnerlab.data.loaders import to_device
from bonnerlab.pixels import to_unit_float
from bonnerlab.seeds import step_generator


def natural_params(n: int, canvas: int, cfg: DataConfig, g: torch.Generator) -> torch.Tensor:
    """[n, 8] per-sample parameters: crop top, left, height, width (pixels of the canvas), flip
    (0/1), brightness, contrast, saturation factors.

    The crop follows torchvision's RandomResizedCrop.get_params: area uniform in
    [crop_scale, 1] of the canvas, log aspect ratio uniform in [-log r, log r], up to 10 tries
    for a crop that fits, else the whole canvas; position uniform over where it fits.
    """
    tries = 10
    area = (
        canvas
        * canvas
        * (cfg.crop_scale + torch.rand(n, tries, generator=g) * (1 - cfg.crop_scale))
    )
    log_r = math.log(cfg.crop_ratio)
    ratio = torch.exp((torch.rand(n, tries, generator=g) * 2 - 1) * log_r)
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= canvas) & (h > 0) & (h <= canvas)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.tensor(float(canvas)))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.tensor(float(canvas)))
    u = torch.rand(n, 6, generator=g)
    top = torch.floor(u[:, 0] * (canvas - h + 1))
    left = torch.floor(u[:, 1] * (canvas - w + 1))
    flip = (u[:, 2] < cfg.flip).float()
    jitter = 1 + (u[:, 3:6] * 2 - 1) * cfg.color_jitter
    return torch.stack([top, left, h, w, flip, jitter[:, 0], jitter[:, 1], jitter[:, 2]], 1)


def resized_crop_batch(x: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Per-sample crop (top, left, height, width), bilinear resize to size x size and optional
    horizontal flip, as one grid_sample over the batch.

    Sample positions follow F.interpolate(mode="bilinear", align_corners=False, no antialias)
    applied to each crop, clamped inside the crop, so each image equals torchvision's
    `resized_crop(..., antialias=False)` (+ `hflip`) of it. The canvas is only 1.14x the
    output, so no crop is shrunk by more than that: antialiasing would change little.
    """
    b, _, height, width = x.shape
    top, left, h, w, flip = (params[:, k].view(b, 1) for k in range(5))
    k = torch.arange(size, device=x.device, dtype=x.dtype).view(1, size) + 0.5
    ys = top + torch.minimum((k * h / size - 0.5).clamp_min(0), h - 1)
    xs = left + torch.minimum((k * w / size - 0.5).clamp_min(0), w - 1)
    xs = torch.where(flip > 0, xs.flip(1), xs)
    # pixel positions -> grid_sample's [-1, 1] with align_corners=True (pixel centres at +-1)
    gx = (xs / (width - 1) * 2 - 1).view(b, 1, size).expand(b, size, size)
    gy = (ys / (height - 1) * 2 - 1).view(b, size, 1).expand(b, size, size)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def color_jitter_batch(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation scaled per sample (factors [B, 3]) in [0, 1] space,
    in that order, as torchvision's adjust_* functions compute them."""
    b = x.shape[0]
    brightness, contrast, saturation = (factors[:, k].view(b, 1, 1, 1) for k in range(3))
    x = (x * brightness).clamp_(0, 1)
    gray = _grayscale(x)
    x = (
        (x - gray.mean(dim=(1, 2, 3), keepdim=True)) * contrast
        + gray.mean(dim=(1, 2, 3), keepdim=True)
    ).clamp_(0, 1)
    if x.shape[1] == 3:
        gray = _grayscale(x)
        x = ((x - gray) * saturation + gray).clamp_(0, 1)
    return x


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


class BatchAugment:
    """uint8 batch -> normalized float batch, with per-sample random affine/erasing in training.

    torchvision.transforms.v2 draws ONE set of parameters per call, i.e. the same rotation for
    a whole batch; here each image gets its own, drawn from a generator seeded by
    (seed, epoch, step) for the global batch so that results do not depend on world size.
    The draws are made on the CPU (the same numbers on any device, so a CPU checkpoint resumes
    identically on a GPU) and cross to the device in one pinned, non-blocking copy per step;
    constants are cached per device and masks are built there: no host sync.
    """

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], cfg: DataConfig | None = None
    ):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.cfg = cfg
        self._constants: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _on(
        self, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, ...]:
        """(mean, std, background) on `device`: copied once, then reused every step."""
        key = (device, dtype)
        if key not in self._constants:
            background = (0 - self.mean) / self.std  # a black pixel, normalized
            self._constants[key] = tuple(
                to_device(t, device).to(dtype) for t in (self.mean, self.std, background)
            )
        return self._constants[key]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std, _ = self._on(x.device)
        return (to_unit_float(x) - mean) / std

    def augment(
        self, x: torch.Tensor, seed: int, epoch: int, step: int, rank: int, world_size: int
    ) -> torch.Tensor:
        """Normalize and augment this rank's slice of global batch (epoch, step)."""
        cfg = self.cfg
        preset = self.preset(x) if cfg is not None else "none"
        if preset == "natural":
            return self.natural(x, seed, epoch, step, rank, world_size)
        x = self.normalize(x)
        if preset != "digits":
            return x
        b = x.shape[0]
        g = step_generator(seed, epoch, step)
        # Draw for the whole global batch, keep this rank's slice.
        draws = [torch.rand(b * world_size, 6, generator=g)[rank * b : (rank + 1) * b]]
        if cfg.erasing > 0:
            draws.append(torch.rand(b * world_size, 4, generator=g)[rank * b : (rank + 1) * b])
        u = to_device(torch.cat(draws, 1), x.device)  # one copy per step
        angle = (u[:, 0] * 2 - 1) * math.radians(cfg.rotation)
        scale = cfg.scale_min + u[:, 1] * (cfg.scale_max - cfg.scale_min)
        shift = (u[:, 2:4] * 2 - 1) * (2 * cfg.translate)  # grid coordinates span [-1, 1]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Pixels moved in from outside the image get the background value (0 before normalizing).
        background = self._on(x.device, x.dtype)[2]
        x = F.grid_sample(
            x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        x = x + background
        if cfg.erasing > 0:
            x = self._erase(x, u[:, 4:6], u[:, 6:10])
        return x

    def natural(
        self, x: torch.Tensor, seed: int, epoch: int, step: int, rank: int, world_size: int
    ) -> torch.Tensor:
        """The natural-image preset on a batch of uint8 canvases [B, C, S, S]: per-sample
        random-resized crop to `image_size`, horizontal flip, optional colour jitter, erasing;
        then normalization. Parameters are drawn for the global batch on the CPU and cross to
        the device in one copy."""
        cfg = self.cfg
        b = x.shape[0]
        g = step_generator(seed, epoch, step)
        params = natural_params(b * world_size, x.shape[-1], cfg, g)[rank * b : (rank + 1) * b]
        erase = (
            torch.rand(b * world_size, 6, generator=g)[rank * b : (rank + 1) * b]
            if cfg.erasing > 0
            else None
        )
        params = to_device(params if erase is None else torch.cat([params, erase], 1), x.device)
        out = resized_crop_batch(to_unit_float(x), params[:, :5], cfg.image_size)
        if cfg.color_jitter > 0:
            out = color_jitter_batch(out, params[:, 5:8])
        mean, std, _ = self._on(x.device)
        out = (out - mean) / std
        if erase is not None:
            out = self._erase(out, params[:, 8:10], params[:, 10:14])
        return out

    def preset(self, x: torch.Tensor) -> str:
        """The preset of this training batch. `auto` was resolved by `load_splits` from what the
        images are (`Splits.augment`), and the training split decoded for it: image folders to
        canvases larger than `image_size` for natural (its crop runs here), to `image_size` for
        digits. The batch's side therefore carries that decision to every rank and resume."""
        cfg = self.cfg
        if cfg.augment != "auto":
            return cfg.augment
        return "natural" if x.shape[-1] > cfg.image_size else "digits"

    def _erase(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        apply = v[:, 0] < self.cfg.erasing
        area = 0.02 + v[:, 1] * 0.18
        aspect = torch.exp((v[:, 2] * 2 - 1) * math.log(3.0))
        eh = (torch.sqrt(area * aspect) * h).clamp(1, h)
        ew = (torch.sqrt(area / aspect) * w).clamp(1, w)
        top = u[:, 0] * (h - eh)
        left = u[:, 1] * (w - ew)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        mask = (
            (ys >= top.view(-1, 1, 1))
            & (ys < (top + eh).view(-1, 1, 1))
            & (xs >= left.view(-1, 1, 1))
            & (xs < (left + ew).view(-1, 1, 1))
            & apply.view(-1, 1, 1)
        )
        return x.masked_fill(mask.unsqueeze(1), 0.0)
