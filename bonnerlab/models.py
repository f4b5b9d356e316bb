"""Models: the from-scratch `mnist_cnn`, and any torchvision classifier with a new head.

Weights for torchvision models come from a torchvision weights name (downloaded once into
TORCH_HOME, so later runs and offline nodes use the cache) or from a local file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bonnerlab.config import ModelConfig
from bonnerlab.errors import WeightsError


class MnistCNN(nn.Module):
    """A small convolutional network for 28x28 digits, written out to show the parts.

    Three conv blocks halve the resolution (28 -> 14 -> 7 -> 3) while doubling the channels,
    so each block costs about the same; pooling to a fixed 3x3 grid then makes the classifier
    independent of the input size while keeping where on the image a feature was found.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
        dropout: float = 0.0, batchnorm: bool = True,
    ) -> None:
        super().__init__()  # registers the submodules assigned below as parameters' owners

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                # 3x3 convolution; padding=1 keeps the height and width. No bias when a
                # BatchNorm follows: its shift makes the bias redundant.
                nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=not batchnorm),
                # BatchNorm keeps activations in a range where a large learning rate is safe.
                nn.BatchNorm2d(cout) if batchnorm else nn.Identity(),
                nn.ReLU(inplace=True),  # the non-linearity; in place saves a copy
                nn.MaxPool2d(2),  # halve height and width: keep the strongest response
            )

        self.features = nn.Sequential(
            block(in_channels, width),  # 28x28 -> 14x14, `width` feature maps
            block(width, 2 * width),  # 14x14 -> 7x7
            block(2 * width, 4 * width),  # 7x7 -> 3x3
        )
        # Average each feature map over a 3x3 grid: any input size gives 3x3, and unlike a single
        # global average it keeps coarse position (top stroke vs bottom stroke tells 7 from 1).
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.dropout = nn.Dropout(dropout)  # randomly zero features while training
        self.fc = nn.Linear(4 * width * 9, num_classes)  # one score (logit) per class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [B, C, H, W] -> [B, 4*width, 3, 3] for 28x28 inputs
        x = torch.flatten(self.pool(x), 1)  # -> [B, 4*width*9]
        return self.fc(self.dropout(x))  # -> [B, num_classes]; softmax lives in the loss


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer: `fc` (ResNet), `classifier.N` (VGG, EfficientNet), `heads.head` (ViT)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"{type(model).__name__} has no Linear classifier head to replace")
    return linears[-1]


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Make the first conv accept `in_channels` inputs, keeping pretrained filters useful.

    For grayscale the RGB filters are summed: a gray image x fed as (x, x, x) gives the same
    response, so pretrained features carry over (the trick timm uses).
    """
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_module(model, name, new)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot load weights file {path}: {str(e).splitlines()[0]}") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a bonnerlab checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict")
    return obj


def _torchvision_weights(arch: str, name: str):
    from torchvision.models import get_model_weights, get_weight

    try:
        if name.upper() == "DEFAULT":
            return get_model_weights(arch).DEFAULT
        return get_weight(name if "." in name else f"{get_model_weights(arch).__name__}.{name}")
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(
            f"unknown weights {name!r} for {arch}: use none, DEFAULT, a name like "
            f"{get_model_weights(arch).__name__}.IMAGENET1K_V1, or a local file path"
        ) from e


def _download_state_dict(weights) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, HTTPError, socket errors: offline
        raise WeightsError(
            f"cannot download {weights} ({type(e).__name__}: offline?); download it on a machine "
            f"with internet into TORCH_HOME, or pass a local file with --model.weights /path/to/weights.pth"
        ) from e


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The configured network, with `num_classes` outputs and `in_channels` inputs."""
    if cfg.arch == "mnist_cnn":
        model: nn.Module = MnistCNN(in_channels, num_classes, cfg.width, cfg.dropout, cfg.batchnorm)
        if cfg.weights != "none":
            _load_matching(model, _read_weights_file(_existing_file(cfg.weights)), cfg)
        return model

    # Not at the top: torchvision.models imports torch._dynamo (1-2 s of every job's start).
    from torchvision import models as tvm

    available = set(tvm.list_models(module=tvm))
    if cfg.arch not in available:
        import difflib

        close = difflib.get_close_matches(cfg.arch, sorted(available | {"mnist_cnn"}), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise WeightsError(f"unknown model.arch {cfg.arch!r}{hint}")

    model = tvm.get_model(cfg.arch, weights=None)
    state = None
    if cfg.weights != "none":
        path = Path(cfg.weights)
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or path.exists():
            state = _read_weights_file(_existing_file(cfg.weights))
        else:
            state = _download_state_dict(_torchvision_weights(cfg.arch, cfg.weights))
    # Pretrained files match the original 1000-class head; our own checkpoints match the new
    # head. Load into whichever shape fits.
    if state is not None and _fits(model, state):
        model.load_state_dict(state)
        state = None
    head_name, head = classifier_head(model)
    if head.out_features != num_classes:
        _set_module(model, head_name, nn.Linear(head.in_features, num_classes))
    _adapt_input_channels(model, in_channels)
    if state is not None:
        _load_matching(model, state, cfg)
    if cfg.freeze_backbone:
        head_name, _ = classifier_head(model)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head_name + ".")
    return model


def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} not found")
    return p


def _fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    if not _fits(model, state):
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        shape = [k for k in own if k in state and own[k].shape != state[k].shape]
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra
                  else f"shape differs at {shape[:2]}")
        raise WeightsError(f"weights {cfg.weights} do not fit model.arch {cfg.arch}: {detail}")
    model.load_state_dict(state)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
