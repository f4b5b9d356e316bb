"""Extraction and the store's integrity: a changed stimulus is noticed (refused, --update,
--overwrite), a damaged store is repaired to the bit, the preprocessing probe, bad sheets and
decompression bombs as one line before anything is written."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import extract_cfg, flip_in_inner_chunk
from PIL import Image

from bonnerlab import activations
from bonnerlab.activations import store as store_module
from bonnerlab.activations.store import ActivationStore, verify
from bonnerlab.config import ModelConfig
from bonnerlab.errors import StoreError, UserError
from bonnerlab.extract.run import extract

LAYERS = ["features.0", "fc"]


def _png(path: Path, seed: int, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def _folder(root: Path, n: int = 10, seed: int = 0) -> list[str]:
    for i in range(n):
        _png(root / f"img{i:02d}.png", seed * 1000 + i)
    return [f"img{i:02d}.png" for i in range(n)]


def _cfg(stimuli: Path, out: Path, **kw):
    fields = dict(
        model=ModelConfig(arch="mnist_cnn"),
        preprocess="squash",
        image_size=28,
        stimuli=str(stimuli),
        layers=LAYERS,
        batch_size=4,  # 10 images: chunks of rows 0-3, 4-7, 8-9
    )
    return extract_cfg(out, **{**fields, **kw})


def _values(store: Path) -> dict[str, np.ndarray]:
    return {k: activations.open_activations(store, k).values for k in LAYERS}


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_changed_files_refused_then_update_changes_only_their_rows(tmp_path):
    """The issue's scenario: shard 0 of 2, the files replaced (same names), shard 1: the rerun
    names the first changed stimulus; --update recomputes only it, the rest stays bit-identical."""
    root = tmp_path / "stim"
    ids = _folder(root)
    out = tmp_path / "s.zarr"
    assert extract(_cfg(root, out, num_shards=2))["chunks_written"] == 2  # chunks 0, 1
    _png(root / "img01.png", 77)  # chunk 0, written by shard 0 before the change
    _png(root / "img06.png", 78)  # chunk 1
    done = extract(_cfg(root, out, num_shards=2, shard_index=1))
    assert done["complete"]  # shard 1 only sees its own rows, which it extracted itself
    before, old = _files(out), _values(out)

    with pytest.raises(StoreError, match=r"stimulus 'img01.png' changed .*and 1 more.*--update"):
        extract(_cfg(root, out))
    assert _files(out) == before  # nothing written

    result = extract(_cfg(root, out, update=True))
    assert result["changed"] == 2 and result["chunks_written"] == 2 and result["complete"]
    fresh = tmp_path / "fresh.zarr"
    extract(_cfg(root, fresh))
    now, ref = _values(out), _values(fresh)
    changed = np.isin(ids, ["img01.png", "img06.png"])
    for layer in LAYERS:
        np.testing.assert_array_equal(now[layer][changed], ref[layer][changed])
        assert now[layer][~changed].tobytes() == old[layer][~changed].tobytes()  # bit-identical
        assert not np.array_equal(now[layer][changed], old[layer][changed])
    stored = activations.open_activations(out, "fc")["content_hash"].values.tolist()
    on_disk = [hashlib.blake2b((root / i).read_bytes(), digest_size=16).hexdigest() for i in ids]
    assert stored == on_disk
    info, ref_info = activations.store_info(out), activations.store_info(fresh)
    assert info["fingerprint"] == ref_info["fingerprint"]  # the content is in the identity
    assert extract(_cfg(root, out))["chunks_written"] == 0  # unchanged now: nothing to do


def test_changed_files_with_overwrite_start_over(tmp_path):
    root = tmp_path / "stim"
    _folder(root)
    out = tmp_path / "s.zarr"
    extract(_cfg(root, out))
    _png(root / "img09.png", 99)
    result = extract(_cfg(root, out, overwrite=True))
    assert result["outcome"] == "replaced" and result["chunks_written"] == 3
    fresh = tmp_path / "fresh.zarr"
    extract(_cfg(root, fresh))
    for layer in LAYERS:
        assert _values(out)[layer].tobytes() == _values(fresh)[layer].tobytes()


def test_in_memory_dataset_content_hashes(tmp_path):
    cfg = dict(stimuli="digits", split="all", limit=12, layers=["fc"], batch_size=8)
    extract(extract_cfg(tmp_path / "d.zarr", **cfg))
    from bonnerlab.extract.run import load_model, load_preprocess
    from bonnerlab.extract.stimuli import load_stimuli

    full = extract_cfg(tmp_path / "d.zarr", **cfg)
    source = load_model(full)
    images = load_stimuli(full, load_preprocess(full, source).square_size, 1, source.data).images
    expected = []
    for x in images.numpy():
        h = hashlib.blake2b(f"{x.dtype}{x.shape}".encode(), digest_size=16)
        h.update(x.tobytes())
        expected.append(h.hexdigest())
    da = activations.open_activations(tmp_path / "d.zarr", "fc")
    assert da["content_hash"].values.tolist() == expected


@pytest.mark.parametrize(
    "compression,layout", [("zstd", "sharded"), ("none", "sharded"), ("zstd", "unsharded")]
)
def test_rerun_rewrites_exactly_the_damaged_chunks_bit_for_bit(
    tmp_path, monkeypatch, compression, layout
):
    root = tmp_path / "stim"
    _folder(root)
    out = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        if layout == "unsharded":  # a store written before sharding: one chunk per batch
            create = zarr.Group.create_array

            def previous(self, name, *, shards=None, chunks=None, **kwargs):
                return create(self, name, chunks=shards or chunks, **kwargs)

            m.setattr(zarr.Group, "create_array", previous)
        # features.0 is (16, 14, 14): inner chunks of 1024 // 196 ~ 4 channels, not all 16; the
        # rerun below takes the layout from the store, not from this
        m.setattr(store_module, "FEATURES_PER_INNER_CHUNK", 1024)
        extract(_cfg(root, out, compression=compression))
    intact = tmp_path / "intact.zarr"
    shutil.copytree(out, intact)
    store = ActivationStore(out)
    assert (store.inner_chunk_width("features.0") is None) == (layout == "unsharded")
    store.chunk_file("features.0", 1).unlink()
    corrupt = store.chunk_file("fc", 2)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt.write_bytes(bytes(data))
    problems = 2
    if layout == "sharded":
        assert store.inner_chunk_width("features.0") == 4
        flip_in_inner_chunk(store.chunk_file("features.0", 2), 4, 1)
        where = r"layer features.0 chunk 2 \(rows 8-9\), inner chunk 1 \(channel 4-7\)"
        with pytest.raises(StoreError, match=where):
            activations.open_activations(out, "features.0")[8:, 5:6].values.sum()
        for panel in (slice(0, 4), slice(8, 16)):  # the panels around it read
            np.testing.assert_array_equal(
                activations.open_activations(out, "features.0")[8:, panel].values,
                activations.open_activations(intact, "features.0")[8:, panel].values,
            )
        problems = 3

    with pytest.raises(StoreError, match=r"layer features.0 chunk 1 \(rows 4-7\).*missing"):
        activations.open_activations(out, "features.0").values.sum()
    with pytest.raises(StoreError, match=r"layer fc chunk 2 \(rows 8-9\)"):
        activations.open_activations(out, "fc").values.sum()
    assert verify(out)["n_problems"] == problems

    result = extract(_cfg(root, out, compression=compression))
    assert result["repaired"] == 2 and result["chunks_written"] == 2 and result["complete"]
    assert _files(out) == _files(intact)  # every file, metadata included, bit for bit
    assert verify(out)["problems"] == []


def test_preprocessing_probe_notices_changed_arithmetic(tmp_path, monkeypatch):
    """A library upgrade that changes what a transform computes, its recorded steps unchanged."""
    from bonnerlab.models import preprocess

    root = tmp_path / "stim"
    _folder(root, 4)
    out = tmp_path / "s.zarr"
    extract(_cfg(root, out))
    probe = activations.store_info(out)["preprocessing_probe"]
    assert probe["shape"] == [1, 28, 28] and len(probe["sha256"]) == 64
    real = preprocess.Transform.__call__
    monkeypatch.setattr(preprocess.Transform, "__call__", lambda self, img: real(self, img) * 1.001)
    with pytest.raises(UserError, match=r"different config \(preprocessing_probe: "):
        extract(_cfg(root, out))


@pytest.mark.parametrize(
    ("sheet", "message"),
    [
        ("path,stimulus_id\nimg00.png,a\nimg01.png,\n", r"line 3: empty stimulus_id"),
        ("path,stimulus_id\n", r"has a header but no rows"),
        ("path,../x\nimg00.png,1\n", r"column 2 is named '../x', which cannot name"),
        ("path,a/b\nimg00.png,1\n", r"column 2 is named 'a/b'"),
        ("path,,kind\nimg00.png,1,x\n", r"column 2 has no name"),
        ("path,kind,kind\nimg00.png,1,2\n", r"the name 'kind' appears twice"),
    ],
)
def test_bad_sheet_is_one_line_before_anything_is_written(tmp_path, sheet, message):
    _folder(tmp_path, 2)
    (tmp_path / "s.csv").write_text(sheet)
    with pytest.raises(UserError, match=message) as e:
        extract(_cfg(tmp_path / "s.csv", tmp_path / "out.zarr"))
    assert "\n" not in str(e.value)
    assert not [p for p in tmp_path.iterdir() if "zarr" in p.name]  # no store, no .tmp


def test_decompression_bomb_named_and_skipped(tmp_path):
    root = tmp_path / "stim"
    _folder(root, 3)
    _png(root / "img01.png", 5, size=200)  # 40,000 pixels
    with pytest.raises(UserError, match=r"img01.png.*--max_image_pixels.*--skip_bad_images"):
        extract(_cfg(root, tmp_path / "a.zarr", max_image_pixels=10_000))
    result = extract(_cfg(root, tmp_path / "b.zarr", max_image_pixels=10_000, skip_bad_images=True))
    assert result["skipped"] == 1
    assert activations.store_info(tmp_path / "b.zarr")["skipped_stimuli"] == ["img01.png"]
    assert extract(_cfg(root, tmp_path / "c.zarr", max_image_pixels=50_000))["skipped"] == 0
