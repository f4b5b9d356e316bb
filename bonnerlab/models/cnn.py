"""The from-scratch `mnist_cnn` and the parts that give any backbone a new head.

Building a model of any source (torchvision, timm, open_clip, transformers) and loading its
weights is `bonnerlab.models.sources`.
"""

from __future__ import annotations

import torch
from torch import nn

from bonnerlab.errors import WeightsError


class MnistCNN(nn.Module):
    """A small convolutional network for 28x28 digits, written out to show the parts.

    Three conv blocks halve the resolution (28 -> 14 -> 7 -> 3) while doubling the channels,
    so each block costs about the same; pooling to a fixed 3x3 grid then makes the classifier
    independent of the input size while keeping where on the image a feature was found.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        dropout: float = 0.0,
        batchnorm: bool = True,
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


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer: `fc` (ResNet), `classifier.N` (VGG, EfficientNet), `heads.head`
    (ViT)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"{type(model).__name__} has no Linear classifier head to replace")
    return linears[-1]


def adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Make the first conv accept `in_channels` inputs, keeping pretrained filters useful.

    For grayscale the RGB filters are summed: a gray image x fed as (x, x, x) gives the same
    response, so pretrained features carry over (the trick timm uses).
    """
    name, conv = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    set_module(model, name, new)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
