"""What a store records about how it was made: its identity (fingerprinted: a change never
reuses a store) and the attributes that explain it without changing it."""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import torch

from bonnerlab.activations.store import LayerSpec
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
    h = hashlib.sha256("\n".join(stimuli.ids).encode())
    for name, values in sorted(stimuli.coords.items()):
        h.update(name.encode())
        h.update("\n".join(map(str, values.tolist())).encode())
    return h.hexdigest()


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
    identity = {
        "arch": source.arch,
        "weights_sha256": source.weights_sha256,
        "preprocessing": pre.to_dict(),
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
    }
    attrs = {
        "arch": source.arch,
        "source": source.source,
        "weights": source.weights,
        "weights_sha256": source.weights_sha256,
        "weights_file_sha256": source.weights_file_sha256,
        "preprocessing": pre.to_dict(),
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
