"""Training (`--data.dataset shards`) and extraction (`--stimuli OUT`) from a packed set equal
the same jobs on the folder or sheet it was packed from (bit for bit on the CPU); extraction's
`--decode gpu` path, run with the CPU as its device, within bounds of the CPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import extract_cfg, photo_crops, run_weights
from PIL import Image

from bonnerlab.activations import open_activations
from bonnerlab.config import ModelConfig
from bonnerlab.data import shards
from bonnerlab.extract.run import extract
from bonnerlab.train.loop import train


def _collection(root, per_class=12):
    photos = iter(photo_crops(per_class * 4, seed=5))
    for split in ("train", "val"):
        for c in ("china", "flower"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(next(photos)).save(root / split / c / f"{i}.jpg", quality=92)
    return root


@pytest.mark.slow
def test_training_from_shards_equals_training_from_the_folder(tmp_path, tiny_train_cfg):
    folder = _collection(tmp_path / "photos")
    shards.pack(folder, tmp_path / "packed", shard_size=10)
    common = {
        "data.in_channels": 3,
        "data.image_size": 32,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "epochs": 1,
    }
    a = train(
        tiny_train_cfg(
            run_dir=str(tmp_path / "folder"),
            **common,
            **{"data.dataset": "imagefolder", "data.root": str(folder)},
        )
    )
    b = train(
        tiny_train_cfg(
            run_dir=str(tmp_path / "shards"),
            **common,
            **{"data.dataset": "shards", "data.root": str(tmp_path / "packed")},
        )
    )
    assert a["val_acc"] == b["val_acc"]
    wa, wb = run_weights(tmp_path / "folder"), run_weights(tmp_path / "shards")
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert (tmp_path / "shards" / "files.json").read_text() == (
        tmp_path / "folder" / "files.json"
    ).read_text()


def test_extraction_from_shards_equals_the_sheet(tmp_path):
    folder = _collection(tmp_path / "photos", per_class=3)
    rows = ["path,stimulus_id,label,size"]
    for i, f in enumerate(sorted(folder.rglob("*.jpg"), reverse=True)):
        rows.append(f"{f.relative_to(tmp_path).as_posix()},s{i:02d},{i % 2},{i * 0.25}")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("\n".join(rows) + "\n")
    shards.pack(sheet, tmp_path / "packed", shard_size=5)
    fields = {
        "model": ModelConfig(arch="resnet18"),
        "image_size": 32,
        "preprocess": "squash",
        "in_channels": 3,
        "layers": ["avgpool"],
        "batch_size": 4,
    }
    extract(extract_cfg(tmp_path / "a.zarr", stimuli=str(sheet), **fields))
    extract(extract_cfg(tmp_path / "b.zarr", stimuli=str(tmp_path / "packed"), **fields))
    a = open_activations(tmp_path / "a.zarr", "avgpool")
    b = open_activations(tmp_path / "b.zarr", "avgpool")
    assert np.array_equal(a.values, b.values)
    assert list(a["stimulus"].values) == list(b["stimulus"].values)
    assert np.array_equal(a["size"].values, b["size"].values)
    assert list(a["label"].values) == list(b["label"].values)


def test_extraction_decode_on_device_is_within_bounds_of_the_cpu_path(tmp_path):
    # --decode gpu's path with the CPU as the device (decode_jpeg on libjpeg-turbo): workers
    # read bytes, the device decodes and runs the workers' uint8 steps; a PNG and an unreadable
    # file go the CPU path and are named as before
    from bonnerlab.extract.stimuli import Stimuli, iter_batches
    from bonnerlab.models.preprocess import resolve_preprocess

    folder = _collection(tmp_path / "photos", per_class=3)
    files = sorted(folder.rglob("*.jpg"))
    Image.open(files[0]).save(folder / "train" / "china" / "p.png")
    (folder / "train" / "china" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    files = [*files, folder / "train" / "china" / "p.png", folder / "train" / "china" / "bad.jpg"]
    stim = Stimuli([f.name for f in files], [0] * len(files), str(folder), [], files=files)
    published = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    pre = resolve_preprocess(published, 3, "center_crop", 32)
    head, _ = pre.split_at_float()
    chunks = [range(0, 7), range(7, len(files))]
    cpu_dev = torch.device("cpu")
    ref = list(iter_batches(stim, chunks, pre.transform(), (3, 32, 32), 0, False, head))
    got = list(iter_batches(stim, chunks, pre.transform(), (3, 32, 32), 0, False, head, 0, cpu_dev))
    for (x, bad, errors, hashes), (x2, bad2, errors2, hashes2) in zip(ref, got, strict=True):
        assert bad == bad2 and errors == errors2 and hashes == hashes2
        diff = (x.int() - x2.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() <= 0.3, (diff.max(), diff.float().mean())
    assert got[-1][1] == [len(files) - 8] and "bad.jpg" in got[-1][2][0]
    png = len(files) - 2 - 7
    assert torch.equal(got[-1][0][png], ref[-1][0][png])  # the CPU path itself


def test_extraction_decode_gpu_needs_cuda(tmp_path):
    from bonnerlab.errors import ConfigError

    cfg = extract_cfg(tmp_path / "x.zarr", stimuli="digits", limit=4, decode="gpu")
    with pytest.raises(ConfigError, match="--decode gpu needs a CUDA device"):
        extract(cfg)
    assert not (tmp_path / "x.zarr").exists()
