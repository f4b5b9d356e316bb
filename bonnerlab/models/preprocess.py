"""Preprocessing: each model's published evaluation transform, resolved into explicit steps.

`resolve_preprocess(published, in_channels, mode, ...)` turns what a source publishes (torchvision
`weights.transforms()`, timm's `create_transform`, open_clip's `preprocess`, a Hugging Face image
processor, or our own checkpoints' size/mean/std) into a `PreprocessSpec`: a list of steps with
every parameter spelled out (sizes, interpolation, antialiasing, crop rounding, mean, std). The
spec is recorded in the activation store and is part of its fingerprint, and its `Transform`
(picklable: it runs in DataLoader workers) reproduces the source's own transform of an image:
the steps call the same torchvision functions with the same arguments, so the tensors agree to
float rounding.

Modes: `model` (the published transform), `squash` (resize to image_size x image_size, bilinear,
no crop: the old default), `center_crop` (shorter side to image_size, then the central square).
The same module gives training its evaluation transform when fine-tuning pretrained weights
(`bonnerlab.train.build.published_normalization`, from the transform
`sources.build_model_and_transform` returns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bonnerlab.errors import ConfigError
from bonnerlab.pixels import to_unit_float

# steps that take and give float tensors; every other step works on uint8 pixels
FLOAT_OPS = ("to_tensor", "normalize", "rescale_normalize")
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class PreprocessSpec:
    mode: str
    in_channels: int
    steps: tuple[dict[str, Any], ...]
    origin: str  # what the steps were read from, e.g. "timm create_transform"
    output_size: tuple[int, int] | None = None  # (height, width) of every image, when fixed

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "origin": self.origin,
            "channels": self.in_channels,
            "output_size": list(self.output_size) if self.output_size else None,
            "steps": [dict(s) for s in self.steps],
        }

    def transform(self) -> Transform:
        return Transform(self)

    def split_at_float(self) -> tuple[Transform, Transform] | None:
        """The same transform in two parts: decoding, resizing and cropping, which end in a uint8
        tensor (for the loader's workers), then scaling and normalizing (for the device, over a
        whole batch). Workers then hand over a quarter of the bytes, and the result is the same
        tensor: the float steps see the same uint8 values either way. None when a step that
        needs floats comes before a geometric one (no published transform does that)."""
        first = next((i for i, s in enumerate(self.steps) if s["op"] in FLOAT_OPS), None)
        if first is None or any(s["op"] not in FLOAT_OPS for s in self.steps[first:]):
            return None
        head = list(self.steps[:first])
        if not any(s["op"] == "pil_to_tensor" for s in head):
            head.append({"op": "pil_to_tensor"})
        return (
            Transform(replace(self, steps=tuple(head))),
            Transform(replace(self, steps=tuple(self.steps[first:]))),
        )

    @property
    def square_size(self) -> int:
        """The side at which to hand in square images that are decoded elsewhere (the in-memory
        datasets): the first resize's, so that the crops that follow still apply."""
        first = next((s for s in self.steps if s["op"] == "resize"), None)
        if first is not None and len(first["size"]) == 1:
            return first["size"][0]
        assert self.output_size is not None
        return self.output_size[0]

    @property
    def mean(self) -> list[float]:
        return next(s["mean"] for s in self.steps if "mean" in s)

    @property
    def std(self) -> list[float]:
        return next(s["std"] for s in self.steps if "std" in s)


@dataclass
class Transform:
    """PIL image (or a uint8 tensor [C, H, W] / [B, C, H, W]) -> tensor, step by step: floats for a
    whole spec; uint8 for the workers' part of `PreprocessSpec.split_at_float`."""

    spec: PreprocessSpec
    _consts: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def __call__(self, img: Any) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tvF
        from torchvision.transforms.v2 import functional as tvF2

        for i, step in enumerate(self.spec.steps):
            op = step["op"]
            if op == "convert":
                if isinstance(img, Image.Image):
                    img = img.convert(step["mode"])
            elif op == "pil_to_tensor":
                if isinstance(img, Image.Image):
                    img = tvF.pil_to_tensor(
                        img
                    ).contiguous()  # as transformers: the memory layout picks the resize kernel
            elif op == "resize":
                size = step["size"]
                if isinstance(img, torch.Tensor) and _size_of(img) == _target(img, size):
                    continue  # in-memory datasets arrive at their size already
                # transforms.v2 resizes uint8 tensors with its own kernel (rounds differently
                # from v1's): transformers uses v2, so a "uint8 tensor" step does too
                resize = tvF2.resize if step["input"] == "uint8 tensor" else tvF.resize
                img = resize(
                    img,
                    size,
                    InterpolationMode(step["interpolation"]),
                    max_size=step.get("max_size"),
                    antialias=step["antialias"],
                )
            elif op == "center_crop":
                img = _center_crop(img, step["size"], step["offset"])
            elif op == "to_tensor":
                img = tvF.to_tensor(img) if isinstance(img, Image.Image) else to_unit_float(img)
            elif op in ("normalize", "rescale_normalize"):
                # what tvF.normalize computes (x - mean) / std, with the constants made once per
                # device: a batch on a GPU then needs no host-to-device copy (a sync) per call
                mean, std = self._mean_std(i, img.device)
                img = img.to(torch.float32).sub(mean).div(std)
            else:  # pragma: no cover - specs come from resolve_preprocess
                raise ConfigError(f"unknown preprocessing step {op!r}")
        return img

    def _on(self, key: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`make()` on `device`, made once per device and reused for every batch."""
        if (key, str(device)) not in self._consts:
            self._consts[key, str(device)] = make().to(device)
        return self._consts[key, str(device)]

    def _mean_std(self, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.spec.steps[i]
        # transformers' fused rescale + normalize: (x - mean/scale) / (std/scale), in float32
        inv = 1.0 / step["scale"] if step["op"] == "rescale_normalize" else 1.0

        def make(values: list[float]) -> torch.Tensor:
            t = torch.tensor(values, dtype=torch.float32)
            return (t * inv).view(-1, 1, 1)  # x 1.0 is exact: plain normalize is unchanged

        return (
            self._on(f"mean{i}", device, lambda: make(step["mean"])),
            self._on(f"std{i}", device, lambda: make(step["std"])),
        )


def _size_of(img: Any) -> tuple[int, int]:
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    return img.size[1], img.size[0]


def _target(img: Any, size: int | list[int]) -> tuple[int, int]:
    if isinstance(size, list) and len(size) == 2:
        return size[0], size[1]
    s = size[0] if isinstance(size, list) else size
    h, w = _size_of(img)
    return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)


def _center_crop(img: Any, size: list[int], offset: str) -> Any:
    from torchvision.transforms import functional as tvF

    h, w = _size_of(img)
    ch, cw = size
    if offset == "round" or ch > h or cw > w:
        return tvF.center_crop(img, size)  # torchvision: round((h - ch) / 2), pads when smaller
    # transformers: int((h - ch) / 2), i.e. floor; differs from round by a pixel on odd margins
    return tvF.crop(img, int((h - ch) / 2.0), int((w - cw) / 2.0), ch, cw)


# ----------------------------------------------------------------------------- reading transforms


def _resize_step(
    size: Any,
    interpolation: str,
    antialias: bool = True,
    max_size: int | None = None,
    tensor: bool = False,
) -> dict[str, Any]:
    size = [int(size)] if isinstance(size, int) else [int(v) for v in size]
    return {
        "op": "resize",
        "size": size,
        "interpolation": interpolation,
        "antialias": bool(antialias),
        "max_size": max_size,
        "input": "uint8 tensor" if tensor else "PIL",
    }


def _crop_step(size: Any, offset: str = "round") -> dict[str, Any]:
    size = [int(size), int(size)] if isinstance(size, int) else [int(v) for v in size]
    if len(size) == 1:
        size = size * 2
    return {"op": "center_crop", "size": size, "offset": offset}


def _floats(values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return [float(v) for v in values]


def _torchvision_steps(transform: Any) -> tuple[list[dict[str, Any]], str]:
    """Steps of a torchvision ImageClassification preset or a Compose of standard transforms
    (timm's and open_clip's eval transforms are such Composes)."""
    from torchvision import transforms as T
    from torchvision.transforms._presets import ImageClassification

    if isinstance(transform, ImageClassification):
        return [
            _resize_step(transform.resize_size, transform.interpolation.value, transform.antialias),
            _crop_step(transform.crop_size),
            {"op": "to_tensor"},
            {"op": "normalize", "mean": _floats(transform.mean), "std": _floats(transform.std)},
        ], "torchvision weights.transforms()"
    if not isinstance(transform, T.Compose):
        raise ConfigError(
            f"cannot read the preprocessing {type(transform).__name__}; "
            "pass --preprocess squash or center_crop"
        )
    steps: list[dict[str, Any]] = []
    for t in transform.transforms:
        name = getattr(t, "__name__", type(t).__name__)
        if isinstance(t, T.Resize):
            steps.append(_resize_step(t.size, t.interpolation.value, t.antialias, t.max_size))
        elif isinstance(t, T.CenterCrop):
            steps.append(_crop_step(list(t.size)))
        elif isinstance(t, T.ToTensor) or name == "MaybeToTensor":
            steps.append({"op": "to_tensor"})
        elif isinstance(t, T.Normalize):
            steps.append({"op": "normalize", "mean": _floats(t.mean), "std": _floats(t.std)})
        elif name in ("MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb"):
            continue  # the decode step converts to RGB already
        else:
            raise ConfigError(
                f"cannot read preprocessing step {name} of this model's transform; "
                "pass --preprocess squash or center_crop"
            )
    return steps, "torchvision Compose"


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _hf_steps(processor: Any) -> tuple[list[dict[str, Any]], str]:
    """Steps of a transformers image processor (torchvision backend: uint8 tensors; PIL backend)."""
    tensor = "Pil" not in type(processor).__name__
    resample = _get(processor, "resample")
    interpolation = (
        PIL_RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear"
    )
    if getattr(resample, "value", None) in ("bilinear", "bicubic", "nearest"):
        interpolation = resample.value
    steps: list[dict[str, Any]] = [{"op": "pil_to_tensor"}] if tensor else []
    if _get(processor, "do_resize"):
        size = _get(processor, "size")
        edge, height, width = _get(size, "shortest_edge"), _get(size, "height"), _get(size, "width")
        crop_pct = _get(processor, "crop_pct")
        if (
            edge
            and crop_pct is not None
            and hasattr(processor, "crop_pct")
            and "ConvNext" in type(processor).__name__
        ):
            if edge < 384:  # ConvNeXT: shorter side to edge / crop_pct, then the central square
                steps += [
                    _resize_step(int(edge / crop_pct), interpolation, tensor=tensor),
                    _crop_step(edge, "floor"),
                ]
            else:
                steps.append(_resize_step([edge, edge], interpolation, tensor=tensor))
        elif edge and not _get(size, "longest_edge"):
            steps.append(_resize_step(edge, interpolation, tensor=tensor))
        elif height and width:
            steps.append(_resize_step([height, width], interpolation, tensor=tensor))
        else:
            raise ConfigError(
                f"cannot read the resize size {dict(size) if isinstance(size, dict) else size} "
                f"of {type(processor).__name__}; pass --preprocess squash or center_crop"
            )
    if _get(processor, "do_center_crop"):
        crop = _get(processor, "crop_size")
        steps.append(_crop_step([_get(crop, "height"), _get(crop, "width")], "floor"))
    mean, std = _floats(_get(processor, "image_mean")), _floats(_get(processor, "image_std"))
    scale = float(_get(processor, "rescale_factor") or 1 / 255)
    if tensor and _get(processor, "do_rescale") and _get(processor, "do_normalize"):
        steps.append({"op": "rescale_normalize", "scale": scale, "mean": mean, "std": std})
    else:
        steps.append({"op": "to_tensor"})
        if _get(processor, "do_normalize"):
            steps.append({"op": "normalize", "mean": mean, "std": std})
    return steps, f"transformers {type(processor).__name__}"


def describe(published: Any, in_channels: int) -> tuple[list[dict[str, Any]], str]:
    """The steps of a source's published transform (after decoding to RGB or grayscale)."""
    if isinstance(published, dict):  # mnist_cnn / our checkpoints: squash to size, normalize
        s = int(published["image_size"])
        steps = [
            _resize_step([s, s], "bilinear"),
            {"op": "to_tensor"},
            {
                "op": "normalize",
                "mean": _floats(published["mean"]),
                "std": _floats(published["std"]),
            },
        ]
        return steps, "size, mean and std"
    if hasattr(published, "image_mean") and hasattr(published, "do_resize"):
        return _hf_steps(published)
    return _torchvision_steps(published)


def _output_size(steps: list[dict[str, Any]]) -> tuple[int, int] | None:
    size = None
    for s in steps:
        if s["op"] == "center_crop" or (s["op"] == "resize" and len(s["size"]) == 2):
            size = (s["size"][0], s["size"][1])
        elif s["op"] == "resize":
            size = None  # shorter side only: the other side follows each image's aspect ratio
    return size


def resolve_preprocess(
    published: Any,
    in_channels: int,
    mode: str = "model",
    image_size: int = 0,
    mean: list[float] | tuple[float, ...] = (),
    std: list[float] | tuple[float, ...] = (),
    origin: str = "",
) -> PreprocessSpec:
    """The preprocessing of a model: its published transform (`mode="model"`), or `squash` /
    `center_crop` to its input size; `image_size`, `mean`, `std` override (0/empty = the
    model's)."""
    steps, read_from = describe(published, in_channels)
    origin = f"{origin} ({read_from})" if origin else read_from
    size = _output_size(steps)
    own_norm = next(s for s in steps if s["op"] in ("normalize", "rescale_normalize"))
    if in_channels == 1 and not mean and len(own_norm["mean"]) == 3:
        raise ConfigError(
            "this model's preprocessing is for RGB images; pass --mean and --std for one channel"
        )
    mean = _floats(mean) or own_norm["mean"]
    std = _floats(std) or own_norm["std"]
    if len(mean) not in (1, in_channels) or len(std) not in (1, in_channels):
        raise ConfigError(f"mean and std need 1 or {in_channels} values; got {mean} and {std}")
    if len(mean) != in_channels:
        mean, std = mean * in_channels, std * in_channels
    side = image_size or (size[0] if size else 0)
    convert = {"op": "convert", "mode": "L" if in_channels == 1 else "RGB"}
    if mode == "model":
        if image_size and size:
            # a new input size: scale every resize and crop by the same factor
            factor = image_size / size[0]
            for s in steps:
                if s["op"] in ("resize", "center_crop"):
                    s["size"] = [int(round(v * factor)) for v in s["size"]]
        for s in steps:
            if s["op"] in ("normalize", "rescale_normalize"):
                s["mean"], s["std"] = mean, std
    else:
        if not side:
            raise ConfigError(
                f"--preprocess {mode} needs --image_size: "
                "this model's own input size varies per image"
            )
        resize = [side, side] if mode == "squash" else [side]
        steps = [_resize_step(resize, "bilinear")]
        if mode == "center_crop":
            steps.append(_crop_step(side))
        steps += [{"op": "to_tensor"}, {"op": "normalize", "mean": mean, "std": std}]
        origin = f"bonnerlab {mode}"
    steps = [convert, *steps]
    return PreprocessSpec(mode, in_channels, tuple(steps), origin, _output_size(steps))
