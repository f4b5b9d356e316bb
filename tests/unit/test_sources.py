"""Model sources over real photographs: activations equal each library's own API on its own
transform.

Every model has random weights saved locally and loaded from the file or folder, as a user would
(offline). The photographs are scikit-learn's two samples (427x640) plus a portrait and a small
crop of them, so resizing and cropping really run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import extract_cfg, job, sample_photos
from PIL import Image

from bonnerlab import activations
from bonnerlab.config import ExtractConfig, ModelConfig
from bonnerlab.errors import ConfigError, DataError, UserError, WeightsError
from bonnerlab.extract.run import extract, load_model, load_preprocess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    china, flower = sample_photos()
    china.save(root / "a_china.png")
    flower.save(root / "b_flower.png")
    china.crop((100, 0, 401, 427)).save(root / "c_portrait.png")  # 301 x 427
    flower.resize((200, 133), Image.BICUBIC).save(root / "d_small.png")
    return root


def files(photos: Path) -> list[Path]:
    return sorted(photos.glob("*.png"))


def reference_batch(photos: Path, transform) -> torch.Tensor:
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in files(photos)])


def cfg(photos: Path, out: Path, arch: str, weights: str, layers: list[str], **kw) -> ExtractConfig:
    fields = dict(
        model=ModelConfig(arch=arch, weights=weights),
        stimuli=str(photos),
        layers=layers,
        batch_size=3,
    )
    return extract_cfg(out, **{**fields, **kw})


def assert_store(out: Path, expected: dict[str, torch.Tensor]) -> None:
    for layer, ref in expected.items():
        got = activations.open_activations(out, layer).values
        np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=layer)


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_resnet_local_file_published_transform(photos, tmp_path):
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(1)
    net = torchvision.models.resnet18().eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "r.zarr"
    c = cfg(
        photos,
        out,
        "resnet18",
        str(tmp_path / "r18.pth"),
        ["layer2", "avgpool", "fc"],
        num_workers=2,
    )
    result = extract(c)
    assert result["complete"] and result["images"] == 4 and result["chunks_written"] == 2
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()  # resize 256, crop 224
    x = reference_batch(photos, transform)
    np.testing.assert_allclose(
        load_preprocess(c, load_model(c)).transform()(Image.open(files(photos)[2]).convert("RGB")),
        x[2],
        atol=1e-5,
    )
    with torch.inference_mode():
        ref = create_feature_extractor(net, ["layer2", "avgpool", "fc"])(x)
    assert_store(out, ref)
    da = activations.open_activations(out, "layer2")
    assert da.shape == (4, 128, 28, 28)
    steps = da.attrs["preprocessing"]["steps"]
    assert steps[1] == {
        "op": "resize",
        "size": [256],
        "interpolation": "bilinear",
        "antialias": True,
        "max_size": None,
        "input": "PIL",
    }
    assert steps[2] == {"op": "center_crop", "size": [224, 224], "offset": "round"}


def test_preprocessing_is_part_of_the_fingerprint(photos, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "m.zarr"
    extract(cfg(photos, out, "mnist_cnn", "none", ["fc"], image_size=32, preprocess="squash"))
    with pytest.raises(UserError, match="different config.*preprocessing"):
        extract(
            cfg(photos, out, "mnist_cnn", "none", ["fc"], image_size=32, preprocess="center_crop")
        )


# ----------------------------------------------------------------------------- timm


def test_timm_vit_tokens_patterns_and_embedding(photos, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(2)
    net = timm.create_model("vit_tiny_patch16_224").eval()
    save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    out = tmp_path / "v.zarr"
    c = cfg(
        photos,
        out,
        "timm:vit_tiny_patch16_224",
        str(tmp_path / "vit.safetensors"),
        ["patch_embed.proj", "blocks.1*", "norm", "output"],
        pooling=["norm=cls"],
    )
    result = extract(c)
    # `blocks.1*` stays within one dotted part: blocks.1, blocks.10, blocks.11 (not blocks.1.attn)
    assert result["layers"] == [
        "patch_embed.proj",
        "blocks.1",
        "blocks.10",
        "blocks.11",
        "norm",
        "output",
    ]
    data_cfg = timm.data.resolve_data_config(model=net)
    x = reference_batch(photos, timm.data.create_transform(**data_cfg))
    with torch.inference_mode():
        spatial_prefix = net.forward_intermediates(
            x,
            indices=[1, 10, 11],
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        blocks = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in spatial_prefix]
        ref = {
            "patch_embed.proj": net.patch_embed.proj(x),
            "blocks.1": blocks[0],
            "blocks.10": blocks[1],
            "blocks.11": blocks[2],
            "norm": net.forward_head(net.forward_features(x), pre_logits=True),
            "output": net(x),
        }
    assert_store(out, ref)
    da = activations.open_activations(out, "blocks.10")
    assert da.dims == ("presentation", "token", "neuroid") and da.shape == (4, 197, 192)
    assert activations.open_activations(out, "norm").dims == ("presentation", "neuroid")
    assert da.attrs["layers_requested"] == ["patch_embed.proj", "blocks.1*", "norm", "output"]


def test_timm_errors(tmp_path, photos):
    pytest.importorskip("timm")
    with pytest.raises(
        WeightsError,
        match=r"unknown timm model 'vit_tiny_patch16_22'; did you mean vit_tiny_patch16_224",
    ):
        load_model(cfg(photos, tmp_path / "x.zarr", "timm:vit_tiny_patch16_22", "none", ["norm"]))
    with pytest.raises(
        WeightsError, match="unknown timm pretrained tag 'nope' for resnet18; published: "
    ):
        load_model(cfg(photos, tmp_path / "x.zarr", "timm:resnet18", "nope", ["fc"]))
    import timm

    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(
        WeightsError, match="do not fit model.arch timm:vit_tiny_patch16_224: missing"
    ):
        load_model(
            cfg(
                photos,
                tmp_path / "x.zarr",
                "timm:vit_tiny_patch16_224",
                str(tmp_path / "r18.pt"),
                ["norm"],
            )
        )


def test_missing_optional_package_names_the_extra(monkeypatch, photos, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(
        UserError, match=r"needs the open_clip package: pip install 'bonnerlab\[clip\]'"
    ):
        load_model(cfg(photos, tmp_path / "x.zarr", "open_clip:ViT-S-32", "none", ["conv1"]))
    with pytest.raises(ConfigError, match="unknown model source 'tf' in model.arch 'tf:resnet'"):
        load_model(cfg(photos, tmp_path / "x.zarr", "tf:resnet", "none", ["conv1"]))


# ----------------------------------------------------------------------------- open_clip


def test_open_clip_image_tower(photos, tmp_path):
    open_clip = pytest.importorskip("open_clip")

    torch.manual_seed(3)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    clip.eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")  # the whole CLIP model, as published
    out = tmp_path / "c.zarr"
    c = cfg(
        photos,
        out,
        "open_clip:ViT-S-32",
        str(tmp_path / "clip.pt"),
        ["conv1", "transformer.resblocks.3", "output"],
        pooling=["conv1=avg"],
    )
    extract(c)
    x = reference_batch(photos, preprocess)
    with torch.inference_mode():
        inter = clip.visual.forward_intermediates(
            x, indices=[3], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        block = torch.cat(
            [inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], dim=1
        )
        ref = {
            "conv1": clip.visual.conv1(x).mean(dim=(2, 3)),
            "transformer.resblocks.3": block,
            "output": clip.encode_image(x),
        }
    assert_store(out, ref)


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(4)
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128
    )
    transformers.ViTModel(config).eval().save_pretrained(folder)
    transformers.ViTImageProcessor().save_pretrained(folder)
    return folder


def test_hf_vit_hidden_states_elements_and_pooling(photos, tmp_path, hf_vit):
    import transformers

    out = tmp_path / "h.zarr"
    c = cfg(
        photos,
        out,
        f"hf:{hf_vit}",
        str(hf_vit),
        [
            "embeddings.patch_embeddings.projection",
            "layers.*",
            "layers.1.attention:0",
            "output:last_hidden_state",
            "output:pooler_output",
        ],
        pooling=["output:last_hidden_state=cls", "layers.*=mean"],
    )
    extract(c)
    model = transformers.AutoModel.from_pretrained(hf_vit).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf_vit)
    images = [Image.open(p).convert("RGB") for p in files(photos)]
    x = processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        o = model(pixel_values=x, output_hidden_states=True)
        attention = {}
        handle = model.layers[1].attention.register_forward_hook(
            lambda m, i, out: attention.update(o=out[0])
        )
        model(pixel_values=x)
        handle.remove()
    ref = {
        "embeddings.patch_embeddings.projection": model.embeddings.patch_embeddings.projection(x),
        **{f"layers.{i}": o.hidden_states[i + 1].mean(dim=1) for i in range(3)},
        "layers.1.attention:0": attention["o"],
        "output:last_hidden_state": o.last_hidden_state[:, 0],
        "output:pooler_output": o.pooler_output,
    }
    assert_store(out, ref)
    assert activations.open_activations(out, "layers.1.attention:0").dims == (
        "presentation",
        "token",
        "neuroid",
    )


def test_hf_convnext_maps(photos, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "convnext"
    torch.manual_seed(5)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    transformers.ConvNextModel(config).eval().save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}).save_pretrained(folder)
    out = tmp_path / "cn.zarr"
    extract(
        cfg(photos, out, f"hf:{folder}", "DEFAULT", ["encoder.stages.1", "output:pooler_output"])
    )
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    x = processor([Image.open(p).convert("RGB") for p in files(photos)], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.inference_mode():
        o = model(pixel_values=x, output_hidden_states=True)
    assert_store(
        out, {"encoder.stages.1": o.hidden_states[2], "output:pooler_output": o.pooler_output}
    )
    assert activations.open_activations(out, "encoder.stages.1").dims == (
        "presentation",
        "channel",
        "y",
        "x",
    )


def test_bad_elements_and_patterns_fail_before_writing(photos, tmp_path, hf_vit):
    out = tmp_path / "bad.zarr"
    for layers, message in [
        (
            ["layers.1.attention:5"],
            r"layer layers.1.attention:5: the output is a sequence of 2; use an index 0..1",
        ),
        (
            ["output:logits"],
            r"the output has no element 'logits'; keys: last_hidden_state, pooler_output",
        ),
        (["layers.1.attention"], r"outputs a list, not a tensor; pick an element"),
        (["blocks.*"], r"layer pattern 'blocks.\*' matches no module"),
        (["output:pooler_output"], r"pooling cls needs token outputs"),
    ]:
        with pytest.raises(UserError, match=message):
            extract(
                cfg(
                    photos,
                    out,
                    f"hf:{hf_vit}",
                    str(hf_vit),
                    layers,
                    pooling=["cls"] if "pooler" in layers[0] else ["none"],
                )
            )
        assert not out.exists()
    with pytest.raises(
        ConfigError, match="reduce entry 'fc=srp:8' names 'fc', which is not in layers"
    ):
        cfg(photos, out, f"hf:{hf_vit}", "none", ["pooler"], reduce=["fc=srp:8"])
    with pytest.raises(ConfigError, match="bad reduce spec 'pca:8'"):
        cfg(photos, out, f"hf:{hf_vit}", "none", ["pooler"], reduce=["pca:8"])


# ----------------------------------------------------------------------------- training heads


def test_build_model_new_heads_and_freeze(hf_vit):
    pytest.importorskip("timm")
    from bonnerlab.models.sources import build_model

    for arch, channels in [("timm:resnet18", 1), (f"hf:{hf_vit}", 3)]:
        model = build_model(ModelConfig(arch=arch, freeze_backbone=True), channels, 5).eval()
        assert model(
            torch.zeros(2, channels, 64, 64) if "timm" in arch else torch.zeros(2, 3, 224, 224)
        ).shape == (2, 5)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith(("fc.", "head.")) for n in trainable), trainable


def test_sheet_bad_input(photos, tmp_path):
    out = tmp_path / "s.zarr"
    bad = {
        "nopath.csv": ("file,x\na_china.png,1\n", "has no `path` column"),
        "missing.csv": ("path\na_china.png\nzzz.png\n", r"line 3: image .*zzz.png not found"),
        "dup.tsv": (
            "path\tstimulus_id\na_china.png\ts1\nb_flower.png\ts1\n",
            "duplicate stimulus id 's1' \\(lines 2 and 3\\)",
        ),
    }
    for name, (text, message) in bad.items():
        (photos.parent / name).write_text(
            text.replace("a_china", f"{photos.name}/a_china").replace(
                "b_flower", f"{photos.name}/b_flower"
            )
        )
        with pytest.raises(DataError, match=message):
            extract(
                cfg(
                    photos.parent / name,
                    out,
                    "mnist_cnn",
                    "none",
                    ["fc"],
                    preprocess="squash",
                    image_size=28,
                )
            )
        assert not out.exists()


def test_offline_download_is_one_line_naming_the_fix(tmp_path):
    import os
    import subprocess

    pytest.importorskip("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    run = subprocess.run(
        [
            *job("extract"),
            "--model.arch",
            "hf:facebook/dinov2-small",  # model.weights auto: the repo's own
            "--layers",
            "output",
            "--output",
            str(tmp_path / "x.zarr"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "cannot load hf:facebook/dinov2-small" in run.stderr and "login node" in run.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_digits_through_a_published_transform(tmp_path):
    """In-memory datasets are handed in at the first resize size, then cropped like files."""
    out = tmp_path / "d.zarr"
    c = ExtractConfig(
        model=ModelConfig(arch="resnet18"),
        stimuli="digits",
        split="all",
        limit=4,
        layers=["layer4"],
        batch_size=4,
        num_workers=0,
        device="cpu",
        output=str(out),
        progress=False,
    )
    extract(c)
    from bonnerlab.config import DataConfig
    from bonnerlab.data.datasets import load_digits_source

    images = load_digits_source(DataConfig(image_size=256, in_channels=3)).images[:4]
    x = load_preprocess(c, load_model(c)).transform()(images)
    assert x.shape == (4, 3, 224, 224)
    torch.testing.assert_close(
        x,
        (
            images[:, :, 16:240, 16:240].float() / 255
            - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        )
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1),
    )
    model = load_model(c).model
    with torch.inference_mode():
        ref = model.layer4(
            model.layer3(
                model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
            )
        )
    assert_store(out, {"layer4": ref})
