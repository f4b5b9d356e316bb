"""Capture, preprocessing and stimulus sheets: random projection, --plan, disk check, patterns,
typed sheet coordinates, the preprocessed input against each source's own transform, and one
default store name for a plain and a sharded extraction."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import extract_cfg, job, job_module, sample_photos
from PIL import Image

from bonnerlab import activations
from bonnerlab.config import (
    ExtractConfig,
    ModelConfig,
    default_store_name,
    layer_matches,
)
from bonnerlab.errors import ConfigError, DiskSpaceError
from bonnerlab.extract.capture import SparseProjection
from bonnerlab.extract.run import (
    check_disk_space,
    extract,
    load_model,
    load_preprocess,
)
from bonnerlab.seeds import projection_seed


def digits(out: Path, **kw) -> ExtractConfig:
    fields = dict(
        model=ModelConfig(arch="mnist_cnn"),
        stimuli="digits",
        split="all",
        limit=32,
        layers=["features.1", "fc"],
        batch_size=8,
    )
    return extract_cfg(out, **{**fields, **kw})


# ----------------------------------------------------------------------------- random projection


@pytest.mark.slow
def test_srp_matches_dense_projection_and_is_seeded(tmp_path):
    full, red = tmp_path / "full.zarr", tmp_path / "srp.zarr"
    extract(digits(full))
    extract(digits(red, reduce=["features.1=srp:64"]))
    x = activations.open_activations(full, "features.1").values.reshape(32, -1)  # (32, 16*7*7)
    y = activations.open_activations(red, "features.1")
    assert y.dims == ("presentation", "neuroid") and y.shape == (32, 64)
    assert y.attrs["reduce"] == {
        "method": "srp",
        "k": 64,
        "seed": projection_seed(0, "features.1"),
        "in_features": x.shape[1],
        "density": 1 / np.sqrt(x.shape[1]),
    }
    p = SparseProjection(x.shape[1], 64, projection_seed(0, "features.1")).build(
        torch.device("cpu")
    )
    dense = p.matrix.to_dense().numpy()
    np.testing.assert_allclose(y.values, x @ dense.T, rtol=1e-4, atol=1e-4)
    # Very sparse: about 1/sqrt(d) of the entries, each +-sqrt(sqrt(d) / k)
    nonzero = dense[dense != 0]
    assert abs(nonzero.size / dense.size - 1 / np.sqrt(x.shape[1])) < 0.01
    np.testing.assert_allclose(np.abs(nonzero), np.sqrt(np.sqrt(x.shape[1]) / 64), rtol=1e-6)
    # fc is untouched; another seed gives another projection
    np.testing.assert_array_equal(
        activations.open_activations(red, "fc").values,
        activations.open_activations(full, "fc").values,
    )
    other = SparseProjection(x.shape[1], 64, projection_seed(1, "features.1")).build(
        torch.device("cpu")
    )
    assert not torch.equal(other.matrix.to_dense(), p.matrix.to_dense())


def test_srp_two_shards_equal_one_job(tmp_path):
    one = extract(digits(tmp_path / "one.zarr", reduce=["srp:32"]))
    s0 = extract(digits(tmp_path / "two.zarr", reduce=["srp:32"], num_shards=2))
    s1 = extract(digits(tmp_path / "two.zarr", reduce=["srp:32"], num_shards=2, shard_index=1))
    assert one["complete"] and not s0["complete"] and s1["complete"]
    for layer in ("features.1", "fc"):
        a = activations.open_activations(tmp_path / "one.zarr", layer).values
        assert a.shape == (32, 32)
        assert (
            a.tobytes()
            == activations.open_activations(tmp_path / "two.zarr", layer).values.tobytes()
        )


# ----------------------------------------------------------------------------- plan and disk


def test_plan_figures_equal_the_store_and_write_nothing(tmp_path):
    import zarr

    out = tmp_path / "p.zarr"
    kw = dict(
        layers=["features.*", "fc"],
        pooling=["features.0=avg"],
        reduce=["features.2=srp:10"],
        dtype="float16",
    )
    plan = extract(digits(out, plan=True, **kw))
    assert not out.exists()
    assert plan["layers"] == ["features.0", "features.1", "features.2", "fc"]
    assert plan["bytes_per_stimulus"] == {
        "features.0": 16 * 2,
        "features.1": 32 * 7 * 7 * 2,
        "features.2": 10 * 2,
        "fc": 10 * 2,
    }
    extract(digits(out, **kw))
    group = zarr.open_group(str(out), mode="r")
    for layer, per in plan["bytes_per_stimulus"].items():
        arr = group[layer]
        assert int(np.prod(arr.shape[1:])) * arr.dtype.itemsize == per
        assert arr.shape[0] == 32
    assert plan["total_bytes"] == 32 * sum(plan["bytes_per_stimulus"].values())


def test_too_little_disk_space_is_one_line(tmp_path):
    with pytest.raises(
        DiskSpaceError,
        match=r"needs up to 1000000000.00 GB but .* GB free; choose another --output",
    ):
        check_disk_space(tmp_path / "new" / "x.zarr", 10**18)
    check_disk_space(tmp_path / "new" / "x.zarr", 1)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- layer names


def test_patterns_stay_within_one_dotted_part():
    assert layer_matches("blocks.*", "blocks.3") and not layer_matches("blocks.*", "blocks.3.attn")
    assert layer_matches("blocks.**", "blocks.3.attn")
    assert layer_matches("encoder.layer.*:0", "encoder.layer.5:0")
    assert not layer_matches("encoder.layer.*:0", "encoder.layer.5")
    assert not layer_matches("blocks.?", "blocks.10") and layer_matches("blocks.?", "blocks.1")


@pytest.mark.slow
def test_list_layers_shows_elements(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "vit"
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    job_module("extract").main(["--model.arch", f"hf:{folder}", "--list_layers"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "(0: [1, 17, 32], 1: NoneType)" in lines["layers.0.attention"]
    assert "{last_hidden_state: [1, 17, 32], pooler_output: [1, 32]}" in lines["output"]


# ----------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    china, flower = sample_photos()
    return [china, flower.crop((50, 0, 351, 427)), flower.resize((97, 61), Image.BICUBIC)]


ARCHS = [
    "resnet18",
    "vit_b_16",
    "timm:resnet18",
    "timm:vit_tiny_patch16_224",
    "open_clip:ViT-S-32",
    "open_clip:RN50",
]
HF_KINDS = ["vit", "dinov2", "convnext", "clip"]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the device half of the split on a GPU"
)


def source_and_spec(arch):
    if ":" in arch:
        pytest.importorskip({"timm": "timm", "open_clip": "open_clip"}[arch.split(":")[0]])
    cfg = ExtractConfig(model=ModelConfig(arch=arch), layers=["x"], stimuli="digits")
    source = load_model(cfg)
    return source, load_preprocess(cfg, source)


@pytest.mark.parametrize("arch", ARCHS)
def test_preprocessed_input_equals_the_source_transform(arch, photos):
    source, spec = source_and_spec(arch)
    transform = spec.transform()
    for image in photos:
        expected = source.published_transform(image)
        assert transform(image).shape == expected.shape == (3, 224, 224)
        torch.testing.assert_close(transform(image), expected, rtol=0, atol=1e-5)
    assert_split_equals_whole(spec, photos)


def assert_split_equals_whole(spec, photos, device="cpu"):
    """Workers' uint8 part, then the device's float part over the batch: the very same tensor
    (on a GPU, what extraction there computes: still the CPU's bits)."""
    in_workers, on_device = spec.split_at_float()
    parts = [in_workers(image) for image in photos]
    assert all(p.dtype == torch.uint8 for p in parts)
    batch = torch.stack(parts)
    whole = torch.stack([spec.transform()(image) for image in photos])
    assert torch.equal(on_device(batch.to(device)).cpu(), whole)


@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_split_on_cuda_equals_the_cpu_transform(arch, photos):
    assert_split_equals_whole(source_and_spec(arch)[1], photos, device="cuda")


def hf_source_and_spec(kind, folder):
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config, processor = {
        "vit": (
            transformers.ViTConfig(**small, intermediate_size=64),
            transformers.ViTImageProcessor(),
        ),
        "dinov2": (
            transformers.Dinov2Config(**small),
            transformers.BitImageProcessor(
                size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}
            ),
        ),
        "convnext": (
            transformers.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]),
            transformers.ConvNextImageProcessor(size={"shortest_edge": 224}),
        ),
        "clip": (
            transformers.CLIPVisionConfig(**small, intermediate_size=64),
            transformers.CLIPImageProcessor(),
        ),
    }[kind]
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    cfg = ExtractConfig(model=ModelConfig(arch=f"hf:{folder}"), layers=["x"], stimuli="digits")
    source = load_model(cfg)
    return source, load_preprocess(cfg, source)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_preprocessed_input_equals_the_hf_image_processor(kind, photos, tmp_path):
    source, spec = hf_source_and_spec(kind, tmp_path)
    transform = spec.transform()
    for image in photos:
        expected = source.published_transform(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(transform(image), expected, rtol=0, atol=1e-5)
    assert_split_equals_whole(spec, photos)


@needs_cuda
@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_split_on_cuda_equals_the_cpu_transform(kind, photos, tmp_path):
    assert_split_equals_whole(hf_source_and_spec(kind, tmp_path)[1], photos, device="cuda")


def test_squash_center_crop_and_overrides(photos):
    from torchvision.transforms import functional as F

    cfg = ExtractConfig(
        model=ModelConfig(arch="resnet18"),
        layers=["x"],
        stimuli="digits",
        preprocess="center_crop",
        image_size=96,
        mean=[0.5],
        std=[0.25],
    )
    spec = load_preprocess(cfg, load_model(cfg))
    image = photos[0]
    expected = F.normalize(
        F.to_tensor(F.center_crop(F.resize(image, 96), 96)), [0.5] * 3, [0.25] * 3
    )
    torch.testing.assert_close(spec.transform()(image), expected, rtol=0, atol=0)
    squash = load_preprocess(
        ExtractConfig(model=ModelConfig(arch="resnet18"), layers=["x"], preprocess="squash"),
        load_model(cfg),
    )
    assert squash.output_size == (224, 224) and squash.mean == [0.485, 0.456, 0.406]
    assert squash.steps[1]["size"] == [224, 224] and squash.steps[1]["interpolation"] == "bilinear"
    with pytest.raises(ConfigError, match="mean and std must have the same length"):
        ExtractConfig(mean=[0.5], std=[])


# ----------------------------------------------------------------------------- sheets


def test_sheet_order_ids_and_typed_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for name in ("b.png", "a.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
            tmp_path / "img" / name
        )
    sheet = tmp_path / "stimuli.csv"
    sheet.write_text(
        "path,stimulus_id,category,size,contrast,animate,label\n"
        "img/b.png,s2,dog,3,0.5,True,1\n"
        "img/a.png,s10,cat,1,0.25,False,0\n"
        "img/c.png,s1,cat,2,1.0,True,0\n"
    )
    out = tmp_path / "s.zarr"
    extract(
        ExtractConfig(
            model=ModelConfig(arch="mnist_cnn"),
            stimuli=str(sheet),
            layers=["fc"],
            preprocess="squash",
            image_size=28,
            batch_size=2,
            num_workers=0,
            device="cpu",
            output=str(out),
            progress=False,
        )
    )
    da = activations.open_activations(out, "fc")
    assert list(da["stimulus"].values) == ["s2", "s10", "s1"]  # the sheet's order
    assert da["label"].values.tolist() == [1, 0, 0]
    assert da["size"].dtype.kind == "i" and da["size"].values.tolist() == [3, 1, 2]
    assert da["contrast"].dtype.kind == "f" and da["contrast"].values.tolist() == [0.5, 0.25, 1.0]
    assert da["animate"].dtype == bool and da["animate"].values.tolist() == [True, False, True]
    assert [str(v) for v in da["category"].values] == ["dog", "cat", "cat"]
    # a coordinate selects like any other: the two cats
    assert da.where(da["category"] == "cat", drop=True).shape[0] == 2


# ----------------------------------------------------------------------------- one store name


@pytest.mark.slow
def test_plain_and_sharded_extract_name_the_same_store(tmp_path, monkeypatch):
    args = [
        "--model.arch",
        "mnist_cnn",
        "--stimuli",
        "digits",
        "--split",
        "all",
        "--limit",
        "16",
        "--layers",
        "fc",
        "--device",
        "cpu",
        "--progress",
        "false",
    ]
    launched = subprocess.run(
        [
            *job("launch"),
            "--dry-run",
            "--shards",
            "2",
            "--sweep_dir",
            str(tmp_path / "s"),
            "extract",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr
    line = next(ln for ln in launched.stdout.splitlines() if ln.startswith("dry run: 2 shards of "))
    sharded = line.removeprefix("dry run: 2 shards of ").split(";")[0]
    monkeypatch.chdir(tmp_path)
    result = job_module("extract").main(args)
    assert (
        str(Path(result["store"]).resolve())
        == sharded
        == str(tmp_path / "activations" / "mnist_cnn-digits.zarr")
    )
    cfg = ExtractConfig(
        model=ModelConfig(arch="hf:/data/models/dinov2-small/"), stimuli="/x/sheet.csv"
    )
    assert default_store_name(cfg) == "activations/hf-dinov2-small-sheet.zarr"


def test_grayscale_input_needs_its_own_normalization():
    base = dict(model=ModelConfig(arch="resnet18"), layers=["x"], in_channels=1)
    with pytest.raises(ConfigError, match="preprocessing is for RGB images; pass --mean and --std"):
        load_preprocess(ExtractConfig(**base), load_model(ExtractConfig(**base)))
    cfg = ExtractConfig(**base, mean=[0.5], std=[0.25])
    spec = load_preprocess(cfg, load_model(cfg))
    assert (
        spec.steps[0] == {"op": "convert", "mode": "L"}
        and spec.mean == [0.5]
        and spec.in_channels == 1
    )
