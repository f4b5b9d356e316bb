"""Image collections as labs keep them (train/val/test folders, a scan cached per run) and the
natural-image augmentation batched on the device, checked against torchvision per sample."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from helpers import assert_same_weights, photo_crops, run_weights, stop_at_check
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from bonnerlab.config import DataConfig, EvaluateConfig
from bonnerlab.data.augment import (
    BatchAugment,
    color_jitter_batch,
    natural_params,
    resized_crop_batch,
)
from bonnerlab.data.datasets import load_splits
from bonnerlab.data.folders import scan_collection
from bonnerlab.errors import DataError
from bonnerlab.runs import RunPaths, read_metrics
from bonnerlab.train.evaluate import evaluate
from bonnerlab.train.loop import train

_photos = photo_crops  # crops of the two real photographs scikit-learn ships


def _collection(root, splits=("train", "val"), per_class=12, classes=("china", "flower")):
    photos = iter(_photos(per_class * len(classes) * len(splits)))
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(next(photos)).save(root / split / c / f"{i}.jpg", quality=92)
    return root


def test_train_val_test_folders_are_used_as_given(tmp_path):
    _collection(tmp_path, splits=("train", "val", "test"), per_class=4)
    s = load_splits(
        DataConfig(
            dataset="imagefolder",
            root=str(tmp_path),
            in_channels=3,
            image_size=32,
            val_fraction=0.5,
        )
    )  # ignored: there is a val/ folder
    assert s.classes == ["china", "flower"]
    assert len(s.train) == len(s.val) == len(s.test) == 8
    assert all(str(f.relative_to(tmp_path)).startswith("val/") for f in s.val.files)
    assert s.test.ids[0] == "test/china/0.jpg"
    assert s.train.fit == "canvas" and s.val.fit == s.test.fit == "center_crop"
    assert s.val[0][0].shape == (3, 32, 32) and s.train[0][0].shape == (3, 36, 36)


def test_collection_errors(tmp_path):
    _collection(tmp_path / "a", per_class=1)
    (tmp_path / "a" / "val" / "zebra").mkdir()
    with pytest.raises(
        DataError, match=r"val has class folder\(s\) zebra .* every class must have training"
    ):
        scan_collection(tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    Image.fromarray(_photos(1)[0]).save(tmp_path / "b" / "train" / "loose.jpg")
    with pytest.raises(DataError, match=r"train has no class folders"):
        scan_collection(tmp_path / "b")


def test_scan_is_one_walk_without_stat_per_file(tmp_path, monkeypatch):
    _collection(tmp_path, per_class=3)
    (tmp_path / "train" / "china" / "deeper").mkdir()
    Image.fromarray(_photos(1)[0]).save(tmp_path / "train" / "china" / "deeper" / "x.png")
    (tmp_path / "train" / "china" / "notes.txt").write_text("not an image")
    import os
    from pathlib import Path

    def no_stat(*_a, **_k):
        raise AssertionError("a stat per file")

    monkeypatch.setattr(Path, "is_file", no_stat)
    monkeypatch.setattr(os.path, "isfile", no_stat)
    listing = scan_collection(tmp_path)
    files, labels = listing.splits["train"]
    assert files[:4] == [
        "train/china/0.jpg",
        "train/china/1.jpg",
        "train/china/2.jpg",
        "train/china/deeper/x.png",
    ]
    assert labels == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_run_keeps_its_file_list_and_evaluates_the_test_folder(tmp_path, tiny_train_cfg):
    root = _collection(tmp_path / "photos", splits=("train", "val", "test"), per_class=16)
    overrides = {
        "data.dataset": "imagefolder",
        "data.root": str(root),
        "data.in_channels": 3,
        "data.image_size": 32,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "epochs": 2,
    }
    cfg = tiny_train_cfg(run_dir=str(tmp_path / "run"), **overrides)
    with stop_at_check(5):  # 4 steps per epoch: epoch 2, step 2
        assert train(cfg)["interrupted"]
    listing = json.loads((tmp_path / "run" / "files.json").read_text())
    assert len(listing["splits"]["train"][0]) == 32 and listing["classes"] == ["china", "flower"]
    # images added to the folder after the run started do not change the resumed run
    Image.fromarray(_photos(1, seed=9)[0]).save(root / "train" / "china" / "late.jpg")
    resumed = train(replace(cfg, resume=True))
    assert json.loads((tmp_path / "run" / "files.json").read_text()) == listing
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert resumed["val_acc"] == read_metrics(tmp_path / "run")[-1]["val_acc"]
    ev = evaluate(
        EvaluateConfig(checkpoint=str(tmp_path / "run"), split="test", device="cpu", num_workers=0)
    )
    assert (
        ev["count"] == 32
        and (RunPaths(tmp_path / "run").root / "eval-test" / "metrics.json").exists()
    )


@pytest.mark.slow
def test_resumed_natural_run_equals_uninterrupted(tmp_path, tiny_train_cfg):
    root = _collection(tmp_path / "photos", splits=("train",), per_class=16)
    overrides = {
        "data.dataset": "imagefolder",
        "data.root": str(root),
        "data.in_channels": 3,
        "data.image_size": 24,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.val_fraction": 0.25,
        "data.color_jitter": 0.3,
        "data.erasing": 0.5,
        "epochs": 2,
    }
    train(tiny_train_cfg(run_dir=str(tmp_path / "ref"), **overrides))
    cfg = tiny_train_cfg(run_dir=str(tmp_path / "split"), **overrides)
    with stop_at_check(4):
        assert train(cfg)["interrupted"]
    train(replace(cfg, resume=True))
    assert_same_weights(run_weights(tmp_path / "ref"), run_weights(tmp_path / "split"))


def _canvases(n=6, side=40):
    photos = _photos(n, seed=3)
    return (
        torch.stack(
            [
                TF.center_crop(TF.resize(torch.from_numpy(p.copy()).permute(2, 0, 1), side), side)
                for p in photos
            ]
        ).float()
        / 255
    )


def test_batched_crop_and_flip_equal_torchvision_per_sample():
    x = _canvases()
    # (top, left, height, width, flip): shrinking, enlarging, edges, the whole canvas, thin crops
    params = torch.tensor(
        [
            [0, 0, 40, 40, 0],
            [3, 5, 20, 30, 1],
            [20, 0, 20, 11, 0],
            [0, 29, 40, 11, 1],
            [10, 10, 7, 9, 0],
            [39, 39, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    out = resized_crop_batch(x, params, 32)
    for k in range(len(x)):
        top, left, h, w, flip = (int(v) for v in params[k])
        expected = TF.resized_crop(x[k], top, left, h, w, [32, 32], antialias=False)
        if flip:
            expected = TF.horizontal_flip(expected)
        assert (out[k] - expected).abs().max() <= 1e-4, k


def test_batched_color_jitter_equals_torchvision_per_sample():
    x = _canvases()
    factors = torch.tensor(
        [
            [1.0, 1.0, 1.0],
            [1.3, 0.7, 1.2],
            [0.6, 1.4, 0.5],
            [1.1, 1.0, 0.0],
            [0.9, 0.8, 1.3],
            [1.2, 1.2, 1.2],
        ]
    )
    out = color_jitter_batch(x.clone(), factors)
    for k in range(len(x)):
        b, c, s = factors[k].tolist()
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[k], b), c), s)
        assert (out[k] - expected).abs().max() <= 1e-5, k


def test_natural_parameters_are_uniform_within_their_ranges():
    cfg = DataConfig(
        augment="natural", crop_scale=0.08, crop_ratio=4 / 3, flip=0.5, color_jitter=0.4
    )
    n, canvas = 20000, 128
    p = natural_params(n, canvas, cfg, torch.Generator().manual_seed(0))
    top, left, h, w, flip = (p[:, k] for k in range(5))
    area = h * w / canvas**2
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert area.quantile(0.1) < 0.25 and area.quantile(0.9) > 0.8  # spread over the whole range
    ratio = w / h
    assert ratio.min() >= 0.7 and ratio.max() <= 1.45  # 3/4..4/3, up to rounding of small crops
    assert abs(torch.log(ratio).mean().item()) < 0.01  # symmetric in log space
    assert ((top >= 0) & (top + h <= canvas) & (left >= 0) & (left + w <= canvas)).all()
    # position uniform over where the crop fits: mean relative offset 1/2, variance 1/12
    room = canvas - w + 1  # left is uniform on 0..room-1
    rel = ((left + 0.5) / room)[room >= 20]
    assert abs(rel.mean().item() - 0.5) < 0.01 and abs(rel.var().item() - 1 / 12) < 0.005
    assert abs(flip.mean().item() - 0.5) < 0.015  # 20,000 draws: 4 standard deviations
    jitter = p[:, 5:8]
    assert jitter.min() >= 0.6 and jitter.max() <= 1.4
    assert (jitter.mean(0) - 1).abs().max() < 0.01
    assert abs(jitter[:, 0].var().item() - 0.8**2 / 12) < 0.003


def test_natural_batches_do_not_depend_on_world_size():
    cfg = DataConfig(
        dataset="imagefolder",
        in_channels=3,
        image_size=24,
        augment="natural",
        color_jitter=0.2,
        erasing=0.5,
    )
    pre = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), cfg)
    x = (_canvases(8, side=27) * 255).round().to(torch.uint8)
    whole = pre.augment(x, seed=1, epoch=2, step=3, rank=0, world_size=1)
    halves = [
        pre.augment(x[r * 4 : (r + 1) * 4], seed=1, epoch=2, step=3, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert whole.shape == (8, 3, 24, 24)
    assert torch.equal(whole, torch.cat(halves))
    other_step = pre.augment(x, seed=1, epoch=2, step=4, rank=0, world_size=1)
    assert not torch.equal(whole, other_step)
    assert math.isfinite(whole.abs().max().item())


def test_fine_tuning_uses_the_weights_own_normalization_and_crop(tmp_path, monkeypatch):
    """timm's ViT-Tiny is published with mean = std = 0.5 and a 0.9 evaluation crop; `build`
    reads them from the same single load that builds the model (the weights file is read once)."""
    import timm

    from bonnerlab import distributed as dist
    from bonnerlab.config import TrainConfig, apply_overrides
    from bonnerlab.models import sources
    from bonnerlab.train.build import build

    weights = tmp_path / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), weights)
    root = _collection(tmp_path / "photos", splits=("train", "val"), per_class=2)
    cfg = apply_overrides(
        TrainConfig(),
        {
            "model.arch": "timm:vit_tiny_patch16_224",
            "model.weights": str(weights),
            "device": "cpu",
            "data.dataset": "imagefolder",
            "data.root": str(root),
            "data.in_channels": 3,
            "data.image_size": 224,
            "data.num_workers": 0,
            "data.batch_size": 2,
            "run_dir": str(tmp_path / "run"),
        },
    )
    reads = []
    real_read = sources.read_state_dict
    monkeypatch.setattr(
        sources, "read_state_dict", lambda path: reads.append(path) or real_read(path)
    )
    run = build(cfg, dist.DistInfo())
    run.close()
    assert reads == [str(weights)]
    s = run.splits
    assert s.mean == s.std == (0.5, 0.5, 0.5)
    assert s.crop_fraction == pytest.approx(0.9, abs=0.005)
    assert s.val.crop_fraction == s.crop_fraction and s.train.crop_fraction == s.crop_fraction
    photo = Image.open(s.val.files[0]).convert("RGB")
    expected = TF.center_crop(TF.resize(TF.pil_to_tensor(photo), round(224 / s.crop_fraction)), 224)
    assert (
        s.val[0][0].float() - expected.float()
    ).abs().max() <= 2  # PIL vs tensor resize rounding
    # without pretrained weights (none, or auto for a bare architecture name): nothing
    # published, ImageNet statistics and the 0.875 crop
    for weights in ("none", "auto"):
        plain = build(apply_overrides(cfg, {"model.weights": weights}), dist.DistInfo())
        plain.close()
        assert plain.splits.mean == (0.485, 0.456, 0.406)
        assert plain.splits.val.crop_fraction == 0.875
