"""What a store records about how it was made: its identity (fingerprinted: a change never
reuses a store) and the attributes that explain it without changing it."""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import torch

from bonnerlab.activations.store import LayerSpec, stimuli_digest
from bonnerlab.config import ExtractConfig, to_dict
from bonnerlab.extract.stimuli import Stimuli
from bonnerlab.models.preprocess import PreprocessSpec
from bonnerlab.models.sources import LoadedModel
from bonnerlab.runs import git_commit
from bonnerlab.train.precision import Precision


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "torchvision",
        "numpy",
        "zarr",
        "xarray",
        "timm",
        "open_clip_torch",
        "transformers",
        "bonnerlab",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def stimuli_sha256(stimuli: Stimuli) -> str:
    return stimuli_digest(stimuli.ids, stimuli.coords)


def probe_image(stimuli: Stimuli) -> Any:
    """A fixed input in the form the stimuli reach the transform: a non-square RGB photograph-like
    PIL image (gradients, edges, fine texture: resampling, cropping and rounding all show), or a
    uint8 tensor shaped like one in-memory image."""
    import numpy as np

    h, w = (*stimuli.images.shape[-2:],) if stimuli.images is not None else (83, 131)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [(x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), ((x // 3 + y // 5) % 2) * 255],
        axis=-1,
    )
    rgb = rgb ^ ((x * 7 + y * 13) % 32)[..., None]  # fine texture: antialiasing shows
    rgb = rgb.astype(np.uint8)
    if stimuli.images is None:
        from PIL import Image

        return Image.fromarray(rgb)
    c = stimuli.images.shape[1]
    pixels = rgb if c == 3 else rgb[..., :1]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def preprocessing_probe(pre: PreprocessSpec, stimuli: Stimuli) -> dict[str, Any]:
    """The transform's output on `probe_image`: its sha256 changes when a library upgrade
    changes the transform's arithmetic, though the recorded steps stay the same."""
    out = pre.transform()(probe_image(stimuli)).to(torch.float32).contiguous()
    return {
        "sha256": hashlib.sha256(out.numpy().tobytes()).hexdigest(),
        "shape": list(out.shape),
        "mean": round(float(out.mean()), 6),
        "std": round(float(out.std()), 6),
    }


def provenance(
    cfg: ExtractConfig,
    source: LoadedModel,
    pre: PreprocessSpec,
    stimuli: Stimuli,
    specs: list[LayerSpec],
    device: torch.device,
    precision: Precision,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, attrs): the identity is fingerprinted (a change never reuses a store); the
    attrs add what explains the store without changing it."""
    probe = preprocessing_probe(pre, stimuli)
    identity = {
        "arch": source.arch,
        "weights_sha256": source.weights_sha256,
        "preprocessing": pre.to_dict(),
        "preprocessing_probe": probe["sha256"],
        "stimuli_sha256": stimuli_sha256(stimuli),
        "n_stimuli": len(stimuli.ids),
        "layers": {
            s.name: {k: s.attrs[k] for k in ("channels", "pooling", "reduce")} for s in specs
        },
        "dtype": cfg.dtype,
        "amp": precision.enabled,
        "amp_dtype": precision.dtype_name,
        "tf32": cfg.tf32 and device.type == "cuda",
        "device_type": device.type,
        "batch_size": cfg.batch_size,
        "compression": cfg.compression,
        "skip_bad_images": cfg.skip_bad_images,
        # nvJPEG's pixels differ from PIL's by a level or two: a store of either is its own
        **({"decode": "gpu"} if cfg.decode == "gpu" else {}),
    }
    attrs = {
        "arch": source.arch,
        "source": source.source,
        "weights": source.weights,
        "weights_sha256": source.weights_sha256,
        "weights_file_sha256": source.weights_file_sha256,
        "preprocessing": pre.to_dict(),
        "preprocessing_probe": probe,
        "layers_requested": list(cfg.layers),  # before pattern expansion
        "stimuli_root": stimuli.root,
        "classes": stimuli.classes,
        "dtype": cfg.dtype,
        "amp": precision.enabled,
        "versions": versions(),
        "git_commit": git_commit(),
        "config": to_dict(cfg),
    }
    return identity, attrs
