"""Image sets packed as shards (bonnerlab/data/shards.py): the same items, ids, labels and sheet
coordinates as the folder or sheet they were packed from; equal, exact slices over ranks and
workers; one file opened per shard; truncated, stale and corrupt shards as one line."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import photo_crops, repo_env
from PIL import Image

from bonnerlab.data import shards
from bonnerlab.data.datasets import FolderDataset
from bonnerlab.data.folders import scan_collection, scan_stimulus_folder
from bonnerlab.data.loaders import TrainBatches
from bonnerlab.data.sheets import read_sheet
from bonnerlab.errors import DataError

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def write_collection(root: Path, n_per_class: int = 6) -> Path:
    """Photograph crops in class folders: JPEGs, one PNG, one in a nested folder."""
    crops = iter(photo_crops(3 * n_per_class + 2, seed=1))
    for c in ("cat", "dog", "eel"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(next(crops)).save(root / c / f"{i:02d}.jpg", quality=90)
    Image.fromarray(next(crops)).save(root / "dog" / "extra.png")
    (root / "eel" / "deep").mkdir()
    Image.fromarray(next(crops)).convert("L").save(root / "eel" / "deep" / "gray.jpg")
    return root


@pytest.fixture
def packed(tmp_path) -> tuple[Path, Path]:
    folder = write_collection(tmp_path / "set")
    out = tmp_path / "shards"
    shards.pack(folder, out, shard_size=5)
    return folder, out


def folder_split(folder: Path, names: list[str], labels: list[int], fit: str) -> FolderDataset:
    return FolderDataset(folder, [folder / n for n in names], labels, 32, 3, fit)


def shard_split(out: Path, names: list[str], labels: list[int], fit: str) -> FolderDataset:
    # the integration in datasets.load_splits: a FolderDataset over the set's ShardFiles
    return FolderDataset(out, shards.open_shards(out).files(names), labels, 32, 3, fit)


@pytest.mark.parametrize("fit", ["squash", "canvas", "center_crop"])
def test_items_equal_the_folders(packed, fit):
    folder, out = packed
    listing = shards.open_shards(out).collection()
    assert listing == scan_collection(folder)  # training's view, as the scanner finds it
    names, labels = listing.splits["train"]
    a, b = folder_split(folder, names, labels, fit), shard_split(out, names, labels, fit)
    assert b.ids == a.ids == names
    for i in range(len(a)):
        (x, y), (x2, y2) = a[i], b[i]
        assert torch.equal(x, x2) and y == y2, names[i]
    again = b.with_fit("center_crop", 0.9)  # fine-tuning's published crop keeps the shards
    assert torch.equal(again[3][0], a.with_fit("center_crop", 0.9)[3][0])


def test_pack_keeps_order_bytes_hashes_and_webdataset_layout(packed):
    import hashlib

    folder, out = packed
    files, labels, classes = scan_stimulus_folder(folder)
    s = shards.open_shards(out)
    assert s.ids == [f.relative_to(folder).as_posix() for f in files]
    assert s.labels == labels and s.classes == classes
    index = json.loads((out / "index.json").read_text())
    assert [sh["nsamples"] for sh in index["shardlist"]] == [5, 5, 5, 5]
    for i, f in enumerate(files):
        data = f.read_bytes()
        assert s.reader.read(i) == data
        assert s.sha256[i] == hashlib.sha256(data).hexdigest()
    # WebDataset's layout, read by the tarfile module: key.ext members, grouped per image
    with tarfile.open(out / "shard-000001.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("00000005.json").read())
    assert names[:3] == ["00000005.cls", "00000005.jpg", "00000005.json"]
    assert meta == {"id": s.ids[5], "label": labels[5], "class": classes[labels[5]]}


def test_wids_reads_the_same_samples(packed, tmp_path):
    wids = pytest.importorskip("wids")
    folder, out = packed
    s = shards.open_shards(out)
    ds = wids.ShardListDataset(
        str(out / "index.json"), cache_dir=str(tmp_path / "cache"), transformations=[lambda x: x]
    )
    assert len(ds) == len(s.ids)
    for i in (0, 7, len(s.ids) - 1):
        sample = ds[i]
        ext = "." + s.reader.ext[i]
        assert sample[ext].read() == (folder / s.ids[i]).read_bytes()
        assert json.loads(sample[".json"].read())["id"] == s.ids[i]


def test_a_sheet_keeps_its_order_ids_and_typed_columns(tmp_path):
    folder = write_collection(tmp_path / "set", n_per_class=2)
    rows = ["path,stimulus_id,label,size,kind,flag"]
    for i, f in enumerate(reversed(sorted(folder.rglob("*.jpg")))):
        rows.append(f"{f.relative_to(tmp_path).as_posix()},s{i:03d},{i % 2},{i * 0.5},k{i},{i < 2}")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("\n".join(rows) + "\n")
    shards.pack(sheet, tmp_path / "out", shard_size=3)
    got, ref = shards.shard_stimuli(tmp_path / "out"), read_sheet(sheet)
    assert got.ids == ref.ids and got.labels == ref.labels
    assert got.coords.keys() == ref.coords.keys()
    for k, v in ref.coords.items():
        assert got.coords[k].dtype == v.dtype and np.array_equal(got.coords[k], v), k
    for i, f in enumerate(ref.files):
        assert got.files[i].read() == f.read_bytes()
    assert "shard-000000.tar:s000" in str(got.files[0])  # errors name the image in its shard
    with pytest.raises(DataError, match="no class folders"):
        shards.open_shards(tmp_path / "out").collection()  # not a training set


def test_extraction_view_equals_the_folders(packed):
    folder, out = packed
    got = shards.shard_stimuli(out, limit=7)
    files, labels, classes = scan_stimulus_folder(folder)
    assert got.ids == [f.relative_to(folder).as_posix() for f in files[:7]]
    assert got.labels == labels[:7] and got.classes == classes and len(got.files) == 7


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_get_equal_exact_slices_and_resume_mid_epoch(tmp_path, workers):
    # one shard for 2 ranks x 2 workers: nothing waits for a shard another worker holds
    folder = write_collection(tmp_path / "set", n_per_class=4)
    out = tmp_path / "one-shard"
    shards.pack(folder, out, shard_size=1000)
    names, labels = scan_collection(folder).splits["train"]
    ref = TrainBatches(folder_split(folder, names, labels, "squash"), 4, 3, 0, 1, CPU)
    whole = [(x, y) for x, y, _ in ref.batches(epoch=1)]
    ref.close()
    per_rank = []
    for rank in range(2):
        b = TrainBatches(shard_split(out, names, labels, "squash"), 4, 3, rank, 2, CPU, workers)
        per_rank.append([(x, y, step) for x, y, step in b.batches(epoch=1)])
        resumed = [(x, step) for x, _, step in b.batches(epoch=1, start_step=2)]
        b.close()
        assert [s for _, s in resumed] == list(range(2, len(whole)))
        assert all(torch.equal(x, per_rank[rank][s][0]) for x, s in resumed)
    assert len(per_rank[0]) == len(per_rank[1]) == len(whole) == len(names) // 4
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([per_rank[0][step][0], per_rank[1][step][0]]), x)
        assert torch.equal(torch.cat([per_rank[0][step][1], per_rank[1][step][1]]), y)


def count_opens(under: Path, fn) -> int:
    """Files under `under` opened while `fn` runs, counted by Python's audit hook (every open(),
    os.open and PIL's own open go through it)."""
    opened: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and isinstance(args[0], str | Path):
            if str(args[0]).startswith(str(under)):
                opened.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one stops counting after fn
    try:
        fn()
    finally:
        active[0] = False
    return len(opened)


def test_one_file_opened_per_shard(packed):
    folder, out = packed
    names, labels = scan_collection(folder).splits["train"]

    def read_all(make) -> None:
        split = make()
        for i in range(len(split)):
            split[i]

    n_shards = len(list(out.glob("*.tar")))
    folder_opens = count_opens(
        folder, lambda: read_all(lambda: folder_split(folder, names, labels, "squash"))
    )
    shard_opens = count_opens(
        out, lambda: read_all(lambda: shard_split(out, names, labels, "squash"))
    )
    assert folder_opens >= len(names)  # the reference: a file per image
    assert shard_opens == n_shards + 1  # each shard once, and the index


def test_truncated_stale_missing_and_corrupt_shards_are_one_line(packed, tmp_path):
    folder, out = packed
    shard = out / "shard-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"shard .*shard-000002.tar is truncated") as e:
        shards.open_shards(out)
    assert "\n" not in str(e.value)
    shard.write_bytes(data + b"\0" * 512)
    with pytest.raises(DataError, match="shard-000002.tar is stale"):
        shards.open_shards(out)
    # the same size, other members: a shard from another packing (its header names another key)
    first = data.index(b"00000010.jpg")
    shard.write_bytes(data[:first] + b"00000099.jpg" + data[first + 12 :])
    s = shards.open_shards(out)
    with pytest.raises(DataError, match=r"shard-000002.tar is stale: .*'00000099.jpg'"):
        s.reader.read(10)
    shard.write_bytes(data)
    member = shards.open_shards(out).reader
    start = int(member.offset[11]) + 100
    shard.write_bytes(data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1 :])
    with pytest.raises(DataError, match=r"shard-000002.tar: image .* does not match its sha256"):
        shards.verify(out)
    shard.unlink()
    with pytest.raises(DataError, match="shard .*shard-000002.tar is missing"):
        shards.open_shards(out)
    with pytest.raises(DataError, match="holds no index.json"):
        shards.open_shards(folder)


def test_pack_refuses_before_writing(packed, tmp_path):
    folder, out = packed
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        shards.pack(folder, out)
    with pytest.raises(DataError, match="inside the set it packs"):
        shards.pack(folder, folder / "shards")
    with pytest.raises(DataError, match="does not exist"):
        shards.pack(tmp_path / "nope", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    shards.pack(folder, out, shard_size=100, overwrite=True)
    assert len(list(out.glob("*.tar"))) == 1 and shards.verify(out)["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folders left


def test_cli_packs_and_refuses_in_one_line(tmp_path):
    folder = write_collection(tmp_path / "set", n_per_class=2)
    cmd = [sys.executable, "-m", "bonnerlab.data", "pack", str(folder), str(tmp_path / "o")]
    out = subprocess.run(
        [*cmd, "--shard_size", "4"], env=repo_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["images"] == 8 and summary["shards"] == 2
    again = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
