"""`model.weights auto` (the default): a spec that names a checkpoint uses its weights, one that
names only an architecture stays random; damaged weights files and checkpoints are one line.

Every checkpoint is a tiny model with random weights, saved the way its library saves one and
loaded with `model.weights` left at its default, as a user would (offline). The reference is the
saved model's own forward pass, so random weights in its place cannot pass.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import extract_cfg, job, sample_photos

from bonnerlab import activations
from bonnerlab.checkpoint import load_checkpoint, save_checkpoint
from bonnerlab.config import ModelConfig
from bonnerlab.errors import CheckpointError, WeightsError
from bonnerlab.models.sources import (
    build_model,
    load_checkpoint_source,
    load_source,
    resolve_weights,
)
from bonnerlab.models.weights import state_sha256


def one_line(error: pytest.ExceptionInfo, *names: object) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    for name in names:
        assert str(name) in text, text
    return text


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- the rule


def test_auto_resolves_from_the_spec_alone():
    for arch, weights in [
        ("mnist_cnn", "none"),
        ("resnet18", "none"),
        ("timm:resnet18", "none"),
        ("timm:resnet18.a1_in1k", "a1_in1k"),  # timm's own spelling of a published checkpoint
        ("timm:local-dir:/models/r18", "DEFAULT"),
        ("timm:hf-hub:timm/resnet18.a1_in1k", "DEFAULT"),
        ("open_clip:ViT-B-32", "none"),
        ("open_clip:ViT-B-32:laion2b_s34b_b79k", "laion2b_s34b_b79k"),
        ("open_clip:ViT-B-32:/models/clip.pt", "/models/clip.pt"),
        ("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "DEFAULT"),
        ("hf:facebook/dinov2-small", "DEFAULT"),
        ("hf:/models/vit", "DEFAULT"),
    ]:
        assert resolve_weights(arch, "auto") == weights, arch
        assert resolve_weights(arch, "AUTO") == weights, arch
        assert resolve_weights(arch, "none") == "none"  # always random
        assert resolve_weights(arch, "/x/w.pth") == "/x/w.pth"  # anything else as given
    assert ModelConfig().weights == "auto"


def architecture_stays_random(arch: str) -> None:
    """A bare architecture name: the seeded random network of `none`, in extraction and in
    training."""
    auto = load_source(ModelConfig(arch=arch), seed=3)
    none = load_source(ModelConfig(arch=arch, weights="none"), seed=3)
    assert auto.weights == "none" and auto.weights_file_sha256 is None, arch
    assert auto.weights_sha256 == none.weights_sha256, arch
    assert same_state(auto.model, none.model), arch
    torch.manual_seed(4)
    trained = build_model(ModelConfig(arch=arch), 3, 5)
    torch.manual_seed(4)
    assert same_state(trained, build_model(ModelConfig(arch=arch, weights="none"), 3, 5)), arch


def test_architecture_names_stay_random_exactly_as_none():
    pytest.importorskip("timm")
    for arch in ["mnist_cnn", "resnet18", "timm:test_vit"]:
        architecture_stays_random(arch)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    china, flower = sample_photos()
    china.save(root / "a_china.png")
    flower.crop((0, 0, 300, 427)).save(root / "b_portrait.png")
    return root


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(5)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    net = transformers.ViTModel(config).eval()
    net.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, net


def test_hf_folder_uses_its_own_weights_and_the_store_records_it(hf_vit, photos, tmp_path):
    import transformers
    from PIL import Image

    folder, net = hf_vit
    loaded = load_source(ModelConfig(arch=f"hf:{folder}"))
    assert loaded.weights == "DEFAULT"
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x).last_hidden_state, net(x).last_hidden_state)
    # training builds from the same table: the backbone under the new head is the saved one
    assert same_state(build_model(ModelConfig(arch=f"hf:{folder}"), 3, 4).backbone, net)
    # extraction: the store holds the saved model's activations and records the weights used
    out = tmp_path / "vit.zarr"
    cfg = extract_cfg(
        out,
        model=ModelConfig(arch=f"hf:{folder}"),
        stimuli=str(photos),
        layers=["output:last_hidden_state"],
        pooling=["cls"],
        batch_size=2,
    )
    from bonnerlab.extract.run import extract

    extract(cfg)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    with torch.inference_mode():
        ref = net(pixel_values=processor(images, return_tensors="pt")["pixel_values"])
    da = activations.open_activations(out, "output:last_hidden_state")
    np.testing.assert_allclose(da.values, ref.last_hidden_state[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert da.attrs["weights"] == "DEFAULT" and da.attrs["weights_sha256"] == state_sha256(net)


def test_hf_clip_folder_runs_the_saved_vision_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = transformers.CLIPConfig(
        text_config={**small, "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    clip = transformers.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "clip")
    loaded = load_source(ModelConfig(arch=f"hf:{tmp_path / 'clip'}"))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ours = loaded.model(x).pooler_output
        theirs = clip.vision_model(pixel_values=x).pooler_output
    assert loaded.weights == "DEFAULT" and torch.equal(ours, theirs)


def test_timm_local_dir_uses_its_own_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    net = timm.create_model("test_vit", num_classes=6).eval()
    timm.models.save_for_hf(net, str(tmp_path / "vit"), safe_serialization=True)
    arch = f"timm:local-dir:{tmp_path / 'vit'}"
    loaded = load_source(ModelConfig(arch=arch))
    x = torch.rand(2, 3, 160, 160)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), net(x))
    assert loaded.weights == "DEFAULT"
    # none: the folder's architecture, random; a tag does not apply to a folder
    random = load_source(ModelConfig(arch=arch, weights="none"))
    assert random.weights_sha256 != loaded.weights_sha256 and random.model.num_classes == 6
    with pytest.raises(WeightsError) as e:
        load_source(ModelConfig(arch=arch, weights="r160_in1k"))
    one_line(e, "brings its own weights")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture registered as a user adds their own config, and a CLIP
    model of it with random weights."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("open_clip")
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (root / "bonnerlab-tiny-clip.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(root / "bonnerlab-tiny-clip.json")
    torch.manual_seed(8)
    clip = open_clip.create_model("bonnerlab-tiny-clip").eval()
    return root, model_cfg, clip


@pytest.mark.slow  # importing open_clip: ~10 s on a busy 2-core machine
def test_open_clip_name_file_and_local_dir_use_their_weights(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    architecture_stays_random("open_clip:bonnerlab-tiny-clip")  # a bare name: random

    root, model_cfg, clip = tiny_clip
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    save_file(clip.state_dict(), str(folder / "open_clip_model.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref = clip.encode_image(x)
        for arch, weights in [
            (f"open_clip:bonnerlab-tiny-clip:{tmp_path / 'clip.pt'}", str(tmp_path / "clip.pt")),
            (f"open_clip:local-dir:{folder}", "DEFAULT"),
        ]:
            loaded = load_source(ModelConfig(arch=arch))
            assert loaded.weights == weights and torch.equal(loaded.model(x), ref), arch
            random = load_source(ModelConfig(arch=arch, weights="none"))
            assert random.weights_sha256 != loaded.weights_sha256, arch
    file_spec = load_source(ModelConfig(arch=f"open_clip:bonnerlab-tiny-clip:{tmp_path}/clip.pt"))
    assert file_spec.weights_file_sha256 is not None  # a file: the store records its sha256 too


# ----------------------------------------------------------------------------- damaged files


def cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_empty_and_cut_short_weights_files_are_one_line(tmp_path):
    from safetensors.torch import save_file

    state = build_model(ModelConfig(weights="none"), 1, 10).state_dict()
    for name in ["w.pth", "w.pt", "w.safetensors"]:
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(WeightsError) as e:
            build_model(ModelConfig(weights=str(tmp_path / name)), 1, 10)
        one_line(e, tmp_path / name, "empty (0 bytes)")
    torch.save(state, tmp_path / "cut.pth")
    save_file(state, str(tmp_path / "cut.safetensors"))
    for name in ["cut.pth", "cut.safetensors"]:
        with pytest.raises(WeightsError) as e:
            load_source(ModelConfig(weights=str(cut(tmp_path / name))))
        one_line(e, f"cannot load weights file {tmp_path / name}")


def test_damaged_checkpoint_folders_are_one_line_naming_the_file(hf_vit, tmp_path):
    import shutil

    timm = pytest.importorskip("timm")
    folder = tmp_path / "vit"
    shutil.copytree(hf_vit[0], folder)
    weights = folder / "model.safetensors"
    cut(weights, 0.9)
    with pytest.raises(WeightsError) as e:
        load_source(ModelConfig(arch=f"hf:{folder}"))
    one_line(e, weights)
    weights.write_bytes(b"")
    with pytest.raises(WeightsError) as e:
        load_source(ModelConfig(arch=f"hf:{folder}"))
    one_line(e, weights, "empty (0 bytes)")
    weights.unlink()  # a config-only folder: auto has no weights to use
    with pytest.raises(WeightsError) as e:
        load_source(ModelConfig(arch=f"hf:{folder}"))
    one_line(e, folder, "holds no weights file", "--model.weights none")
    assert load_source(ModelConfig(arch=f"hf:{folder}", weights="none")).weights == "none"
    timm.models.save_for_hf(timm.create_model("test_vit"), str(tmp_path / "t"))
    cut(tmp_path / "t" / "pytorch_model.bin")
    with pytest.raises(WeightsError) as e:
        load_source(ModelConfig(arch=f"timm:local-dir:{tmp_path / 't'}"))
    one_line(e, tmp_path / "t" / "pytorch_model.bin")


def test_empty_and_cut_short_checkpoints_are_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    best = run / "checkpoints" / "best.pt"
    save_checkpoint(best, {"model": {"w": torch.zeros(1000)}, "config": {}})
    assert load_checkpoint(best)["model"]["w"].shape == (1000,)
    cut(best, 0.6)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_source(str(run), "best")
    one_line(e, best, "corrupt")
    best.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_source(str(run), "best")
    one_line(e, best, "empty (0 bytes)")


@pytest.mark.slow  # a job process
def test_extract_job_with_an_empty_weights_file_is_one_line_before_writing(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    out = tmp_path / "x.zarr"
    run = subprocess.run(
        [*job("extract"), "--model.weights", str(tmp_path / "empty.pth"), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert str(tmp_path / "empty.pth") in run.stderr and "empty (0 bytes)" in run.stderr
    assert not out.exists()
