from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SHARED_MNIST
from PIL import Image

from bonnerlab.config import DataConfig
from bonnerlab.data.augment import BatchAugment
from bonnerlab.data.datasets import load_splits
from bonnerlab.data.loaders import TrainBatches, eval_batches
from bonnerlab.errors import DataError


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_splits(DataConfig()), load_splits(DataConfig())
    assert len(a.train) + len(a.val) == 1797
    assert a.train.ids == b.train.ids
    assert not set(a.train.ids) & set(a.val.ids)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 28, 28)
    assert a.num_classes == 10
    other = load_splits(DataConfig(split_seed=1))
    assert other.val.ids != a.val.ids


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="shared MNIST test files not present")
def test_mnist_from_test_files_splits_8000_2000():
    s = load_splits(
        DataConfig(dataset="mnist", root=str(SHARED_MNIST), mnist_files="test", download=False)
    )
    assert (len(s.train), len(s.val)) == (8000, 2000)
    assert s.test is None
    assert 0.12 < s.mean[0] < 0.14  # MNIST's well-known mean 0.1307


def test_mnist_missing_offline_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="MNIST train files not in .*--data.download"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path), download=False))
    with pytest.raises(DataError, match="download failed"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path), download=True))


def test_same_seed_same_batches_and_ranks_slice_the_global_batch():
    s = load_splits(DataConfig())
    one = TrainBatches(s.train, 64, seed=5, rank=0, world_size=1, device=torch.device("cpu"))
    ranks = [
        TrainBatches(s.train, 64, seed=5, rank=r, world_size=2, device=torch.device("cpu"))
        for r in (0, 1)
    ]
    full = list(one.batches(epoch=1))
    again = list(one.batches(epoch=1))
    assert len(full) == len(again) > 1
    assert all(torch.equal(x[1], y[1]) for x, y in zip(full, again, strict=True))
    halves = [list(r.batches(epoch=1)) for r in ranks]
    for step, (x, _y, _) in enumerate(full):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), x)
    # resume mid-epoch: skipping k batches gives the tail of the same sequence
    tail = list(one.batches(epoch=1, start_step=3))
    assert tail[0][2] == 3 and torch.equal(tail[0][1], full[3][1])
    # a different epoch reshuffles
    assert not torch.equal(list(one.batches(epoch=2))[0][1], full[0][1])


def test_augmentation_is_per_sample_seeded_and_world_size_independent():
    s = load_splits(DataConfig())
    pre = BatchAugment(s.mean, s.std, DataConfig(rotation=30, erasing=0.5))
    x = s.train.images[:8]
    a = pre.augment(x, seed=0, epoch=0, step=0, rank=0, world_size=1)
    b = pre.augment(x, seed=0, epoch=0, step=0, rank=0, world_size=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, pre.normalize(x))
    # each image gets its own transform: the same image twice comes out differently
    same = torch.cat([x[:1], x[:1]])
    out = pre.augment(same, seed=0, epoch=0, step=1, rank=0, world_size=1)
    assert not torch.allclose(out[0], out[1])
    # rank 1 of 2 sees exactly what a single process does for the second half
    half = pre.augment(x[4:], seed=0, epoch=0, step=0, rank=1, world_size=2)
    assert torch.allclose(half, a[4:])
    plain = BatchAugment(s.mean, s.std, DataConfig(augment="none"))
    assert torch.equal(plain.augment(x, 0, 0, 0, 0, 1), plain.normalize(x))


def _write_folder(root, n_per_class=6, size=20, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c / "sub").mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / ("sub" if i % 2 else "") / f"{i}.png")


def test_image_folder_loads_recursively_through_workers(tmp_path):
    _write_folder(tmp_path)
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(tmp_path),
        in_channels=3,
        image_size=16,
        val_fraction=0.25,
        augment="natural",  # 20-pixel images: auto would pick digits
    )
    s = load_splits(cfg)
    assert s.classes == ["cat", "dog"] and len(s.train) + len(s.val) == 12
    batches = TrainBatches(s.train, 4, 0, 0, 1, torch.device("cpu"), num_workers=2)
    x, y, _ = next(batches.batches(0))
    batches.close()
    # the natural preset: training canvases 1.14x the input size,
    # cropped to 16x16 on the device; validation images resized and centre-cropped to 16x16
    assert x.shape == (4, 3, 18, 18) and x.dtype == torch.uint8
    val = list(eval_batches(s.val, 2, 0, 1, torch.device("cpu")))
    assert sum(len(y) for _, y in val) == len(s.val) and val[0][0].shape == (2, 3, 16, 16)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "empty")))
    _write_folder(tmp_path / "bad")
    broken = tmp_path / "bad" / "cat" / "broken.png"
    broken.write_bytes(b"not a png")
    s = load_splits(DataConfig(dataset="imagefolder", root=str(tmp_path / "bad"), val_fraction=0.0))
    index = s.train.files.index(broken)
    with pytest.raises(DataError, match="broken.png"):
        s.train[index]


def test_unreadable_image_in_a_worker_is_one_line_naming_the_file(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "dog" / "zz-broken.png").write_bytes(b"not a png")
    s = load_splits(
        DataConfig(
            dataset="imagefolder",
            root=str(tmp_path),
            in_channels=3,
            image_size=16,
            val_fraction=0.0,
        )
    )
    batches = TrainBatches(s.train, 13, 0, 0, 1, torch.device("cpu"), num_workers=2)
    with pytest.raises(DataError) as e:
        list(batches.batches(0))
    batches.close()
    assert "zz-broken.png" in str(e.value) and "\n" not in str(e.value)
