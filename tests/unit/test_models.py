from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from bonnerlab.config import ModelConfig
from bonnerlab.errors import WeightsError
from bonnerlab.models.cnn import classifier_head
from bonnerlab.models.sources import build_model


def test_mnist_cnn_shapes():
    model = build_model(ModelConfig(width=8), in_channels=1, num_classes=10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.zeros(2, 1, 40, 40)).shape == (2, 10)  # global pooling: any input size


def test_torchvision_backbone_gray_input_new_head():
    model = build_model(ModelConfig(arch="resnet18"), in_channels=1, num_classes=7)
    assert model.conv1.in_channels == 1
    assert model.fc.out_features == 7
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_fine_tune_from_local_weights_file(tmp_path):
    torch.manual_seed(0)
    pretrained = resnet18()  # stands in for ImageNet weights (1000-class head, RGB)
    path = tmp_path / "resnet18-pretrained.pth"
    torch.save(pretrained.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", weights=str(path), freeze_backbone=True), 3, 5)
    assert torch.equal(model.layer3[0].conv1.weight, pretrained.layer3[0].conv1.weight)
    assert model.fc.out_features == 5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    # grayscale: RGB filters summed, so a gray image gives the pretrained response
    gray = build_model(ModelConfig(arch="resnet18", weights=str(path)), 1, 5)
    x = torch.rand(1, 1, 32, 32)
    pretrained.eval(), gray.eval()
    feats = torch.nn.Sequential(*list(pretrained.children())[:-1])
    ours = torch.nn.Sequential(*list(gray.children())[:-1])
    assert torch.allclose(feats(x.expand(-1, 3, -1, -1)), ours(x), atol=1e-5)


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="unknown model.arch 'resnet181'; did you mean resnet18"):
        build_model(ModelConfig(arch="resnet181"), 1, 10)
    with pytest.raises(WeightsError, match="weights file .* not found"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "missing.pth")), 3, 10)
    torch.save(build_model(ModelConfig(), 1, 10).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(WeightsError, match="do not fit model.arch resnet18"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "cnn.pth")), 3, 10)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot load weights file"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "junk.pth")), 3, 10)
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET1K_V9'"):
        build_model(ModelConfig(arch="resnet18", weights="IMAGENET1K_V9"), 3, 10)


def test_weights_download_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: must try the network
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WeightsError) as e:
        build_model(ModelConfig(arch="resnet18", weights="DEFAULT"), 3, 10)
    assert "\n" not in str(e.value) and "--model.weights" in str(e.value)


def test_classifier_head_found_for_common_families():
    from torchvision.models import get_model

    assert classifier_head(get_model("vgg11"))[0] == "classifier.6"
    assert classifier_head(get_model("mobilenet_v3_small"))[0] == "classifier.3"
