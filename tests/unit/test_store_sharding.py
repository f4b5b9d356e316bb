"""The store's layers sharded along their features: one shard file per batch per layer, inner
chunks along the first feature dim; damage named down to the inner chunk, panels of features read
around it, all-NaN inner chunks written, and stores written before sharding still whole."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from bonnerlab import activations
from bonnerlab.activations.store import (
    FEATURES_PER_INNER_CHUNK,
    ActivationStore,
    LayerSpec,
    open_store,
    verify,
)
from bonnerlab.errors import StoreError

N, CHUNK = 10, 4  # chunks of rows 0-3, 4-7, 8-9
STIMULI = [f"img{i}.png" for i in range(N)]
# conv: 400 features per channel, so inner chunks of the largest divisor of 24 up to 4096 // 400
# channels; tok: 7 tokens of 1000 (no divisor of 7 near 4): 4 tokens, the shard padded to 8
SPECS = [
    LayerSpec("conv", ("channel", "y", "x"), (24, 20, 20)),
    LayerSpec("tok", ("token", "dim"), (7, 1000)),
    LayerSpec("fc", ("neuroid",), (5,), "float16"),
    LayerSpec("score", (), ()),  # no feature dims: one inner chunk per shard
]


def _values(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal((N, *s.shape)).astype(s.dtype) for s in SPECS}


def _store(path: Path, values: dict[str, np.ndarray], skipped=None, finalize: bool = True):
    store, _ = open_store(
        path, identity={"toy": 1}, layers=SPECS, stimuli=STIMULI, labels=None, chunk_size=CHUNK
    )
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in values.items()}, (skipped or {}).get(c, []))
    if finalize:
        store.finalize()
    return store


def _index(path: Path, n_inner: int) -> np.ndarray:
    """A shard file's index as the zarr v3 sharding spec lays it out (at the end: n (offset,
    nbytes) little-endian uint64 pairs, then their crc32c)."""
    data = path.read_bytes()
    tail = data[-(16 * n_inner + 4) :]
    assert np.uint32(google_crc32c.value(tail[:-4])).tobytes() == tail[-4:]
    return np.frombuffer(tail[:-4], "<u8").reshape(n_inner, 2)


def _flip_in_inner_chunk(path: Path, n_inner: int, j: int) -> None:
    offset, nbytes = (int(v) for v in _index(path, n_inner)[j])
    data = bytearray(path.read_bytes())
    data[offset + nbytes // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_one_shard_file_per_batch_inner_chunks_along_the_first_feature_dim(tmp_path):
    path = tmp_path / "s.zarr"
    values = _values()
    store = _store(path, values)
    k = max(d for d in range(1, FEATURES_PER_INNER_CHUNK // 400 + 1) if 24 % d == 0)
    expected = {  # (shard, inner chunk) without the presentation dim
        "conv": ([24, 20, 20], [k, 20, 20]),
        "tok": ([8, 1000], [4, 1000]),  # 4096 // 1000 = 4: 7 has no divisor near it
        "fc": ([5], [5]),
        "score": ([], []),
    }
    for layer, (shard, inner) in expected.items():
        meta = json.loads((path / layer / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [CHUNK, *shard]
        [codec] = meta["codecs"]
        assert codec["name"] == "sharding_indexed"
        config = codec["configuration"]
        assert config["chunk_shape"] == [CHUNK, *inner]
        assert [c["name"] for c in config["codecs"]] == ["bytes", "zstd", "crc32c"]
        assert [c["name"] for c in config["index_codecs"]] == ["bytes", "crc32c"]
        assert config["index_location"] == "end"
        files = sorted(
            str(p.relative_to(path / layer)) for p in (path / layer / "c").rglob("*") if p.is_file()
        )
        assert files == [f"c/{c}" + "/0" * len(shard) for c in range(3)]
        da = activations.open_activations(path, layer)
        np.testing.assert_array_equal(da.values, values[layer])
        # how an analysis finds a panel's width: the inner chunk along the first feature dim
        assert da.encoding["chunks"] == (CHUNK, *inner)
        assert store.checksummed(layer)
    assert store.inner_chunk_width("conv") == k and store.inner_chunk_width("fc") == 5
    assert verify(path)["checksums"] == "crc32c" and verify(path)["problems"] == []


def test_shard_writer_writes_the_bytes_zarr_writes(tmp_path):
    """The store writes a batch's shard itself (zarr would read the old one first): the same
    bytes as zarr's own `array[rows] = values`, the last chunk's rows and the padded dim too."""
    path = tmp_path / "s.zarr"
    values = _values()
    store = _store(path, values, finalize=False)
    for layer in ("conv", "tok", "fc", "score"):
        for c in range(store.n_chunks):
            mine = store.chunk_file(layer, c).read_bytes()
            store.chunk_file(layer, c).unlink()
            store.array(layer)[store.chunk_slice(c)] = values[layer][store.chunk_slice(c)]
            assert store.chunk_file(layer, c).read_bytes() == mine, (layer, c)


def test_flipped_byte_in_one_inner_chunk_named_and_panels_read_around_it(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    values = _values()
    store = _store(path, values)
    k = store.inner_chunk_width("conv")
    _flip_in_inner_chunk(store.chunk_file("conv", 1), 24 // k, 1)
    where = rf"layer conv chunk 1 \(rows 4-7\), inner chunk 1 \(channel {k}-{2 * k - 1}\)"

    # panels away from it read, and decode only their inner chunks, each once (counted before
    # any failing read: zarr lets a failed read's other decodes finish in the background)
    from zarr.codecs import ZstdCodec

    decoded = []
    original = ZstdCodec._decode_single

    async def counting(self, data, spec):
        decoded.append(spec.shape)
        return await original(self, data, spec)

    monkeypatch.setattr(ZstdCodec, "_decode_single", counting)
    da = activations.open_activations(path, "conv")
    np.testing.assert_array_equal(da[:, :k].values, values["conv"][:, :k])
    assert len(decoded) == store.n_chunks  # one inner chunk per shard
    decoded.clear()
    np.testing.assert_array_equal(da[:, 2 * k :].values, values["conv"][:, 2 * k :])
    assert len(decoded) == store.n_chunks * (24 // k - 2)
    np.testing.assert_array_equal(
        da.isel(presentation=[0, 9]).values, values["conv"][[0, 9]]
    )  # rows of the other chunks, every feature
    monkeypatch.undo()

    report = verify(path)
    assert report["n_problems"] == 1
    assert re.search(where, report["problems"][0])
    assert store.damaged_chunks(range(store.n_chunks)).keys() == {1}
    da = activations.open_activations(path, "conv")
    with pytest.raises(StoreError, match=where) as e:
        _ = da.values
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match=where):
        _ = da[:, k + 1 : k + 2].values


def test_truncated_or_missing_shard_named_and_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    values = _values()
    store = _store(path, values)
    intact = tmp_path / "intact.zarr"
    shutil.copytree(path, intact)
    shard = store.chunk_file("conv", 0)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    store.chunk_file("tok", 2).unlink()

    problems = verify(path)["problems"]
    assert len(problems) == 2
    assert "layer conv chunk 0 (rows 0-3): its shard index" in problems[0]
    assert "layer tok chunk 2 (rows 8-9): its file tok/c/2/0/0 is missing" in problems[1]
    with pytest.raises(StoreError, match=r"layer conv chunk 0 \(rows 0-3\): its shard index"):
        _ = activations.open_activations(path, "conv")[:, :2].values  # the index: any panel
    with pytest.raises(StoreError, match=r"layer tok chunk 2 .* is missing"):
        _ = activations.open_activations(path, "tok").values
    np.testing.assert_array_equal(  # the other chunks still read
        activations.open_activations(path, "conv")[4:].values, values["conv"][4:]
    )

    # what a rerun does: rewrite the damaged chunks. zarr itself would read the old shard first
    # (and fail on the truncated one); the store reads nothing
    from zarr.storage import LocalStore

    read = []
    get = LocalStore.get

    async def logged(self, key, *args, **kwargs):
        read.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", logged)
    damaged = store.damaged_chunks(range(store.n_chunks))
    assert damaged.keys() == {0, 2}
    store.mark_incomplete()
    for c in damaged:
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in values.items()})
    assert not [key for key in read if "/c/" in key]
    store.finalize()
    for layer in ("conv", "tok", "fc", "score"):
        for c in range(store.n_chunks):
            assert (
                store.chunk_file(layer, c).read_bytes()
                == ActivationStore(intact, mode="r").chunk_file(layer, c).read_bytes()
            )
    assert verify(path)["problems"] == []


def test_all_nan_inner_chunks_written_and_a_never_written_one_is_damage(tmp_path):
    path = tmp_path / "s.zarr"
    values = _values()
    for v in values.values():
        v[8:] = np.nan  # chunk 2: both stimuli unreadable
        v[5] = np.nan  # and one of chunk 1
    skipped = {1: ["img5.png"], 2: ["img8.png", "img9.png"]}
    store = _store(path, values, skipped, finalize=False)
    ActivationStore(path).write_chunk(  # through a reopened store, as a rerun writes
        2, {k: v[8:] for k, v in values.items()}, skipped[2]
    )
    assert store.finalize()["skipped"] == 3
    k = store.inner_chunk_width("conv")
    for c in range(store.n_chunks):
        index = _index(store.chunk_file("conv", c), 24 // k)
        assert (index != 2**64 - 1).all()  # every inner chunk written, all-NaN ones too
    da = activations.open_activations(path, "conv", drop_skipped=False)
    np.testing.assert_array_equal(da.values, values["conv"])

    # an inner chunk the index says was never written reads as NaN in zarr: damage here
    shard = store.chunk_file("conv", 1)
    data = bytearray(shard.read_bytes())
    size = 16 * (24 // k) + 4
    index = np.frombuffer(bytes(data[-size:-4]), "<u8").copy().reshape(-1, 2)
    index[0] = 2**64 - 1
    tail = index.astype("<u8").tobytes()
    shard.write_bytes(bytes(data[:-size]) + tail + np.uint32(google_crc32c.value(tail)).tobytes())
    where = rf"layer conv chunk 1 \(rows 4-7\), inner chunk 0 \(channel 0-{k - 1}\): it was never"
    assert re.search(where, verify(path)["problems"][0])
    with pytest.raises(StoreError, match=where):
        _ = activations.open_activations(path, "conv")[:, :1].values


def _unsharded(monkeypatch) -> None:
    """Stores made from here on have the layout before sharding: one chunk per batch per layer
    (what `_create` gave `create_array`: chunks, no shards)."""
    create = zarr.Group.create_array

    def previous(self, name, *, shards=None, chunks=None, **kwargs):
        return create(self, name, chunks=shards or chunks, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", previous)


def test_unsharded_store_reads_verifies_resumes_and_repairs(tmp_path, monkeypatch):
    path = tmp_path / "old.zarr"
    values = _values()
    with monkeypatch.context() as m:
        _unsharded(m)
        store, _ = open_store(
            path, identity={"toy": 1}, layers=SPECS, stimuli=STIMULI, labels=None, chunk_size=4
        )
        for c in (0, 1):  # killed before chunk 2
            sl = store.chunk_slice(c)
            store.write_chunk(c, {k: v[sl] for k, v in values.items()})
    meta = json.loads((path / "conv" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd", "crc32c"]  # no shards
    # resumed by the code of now: the store keeps its own layout
    store, outcome = open_store(
        path, identity={"toy": 1}, layers=SPECS, stimuli=STIMULI, labels=None, chunk_size=4
    )
    assert outcome == "reused" and store.missing_chunks() == [2]
    for v in values.values():
        v[8:] = np.nan  # chunk 2: both stimuli unreadable (zarr skipped such a chunk written
        # through a reopened store before `write_empty_chunks` was set when opening)
    store.write_chunk(2, {k: v[8:] for k, v in values.items()}, ["img8.png", "img9.png"])
    assert store.chunk_file("conv", 2).is_file()
    store.finalize()
    assert json.loads((path / "conv" / "zarr.json").read_text())["codecs"] == meta["codecs"]
    assert store.inner_chunk_width("conv") is None and store.checksummed("conv")
    for layer in values:
        np.testing.assert_array_equal(
            activations.open_activations(path, layer, drop_skipped=False).values, values[layer]
        )
    np.testing.assert_array_equal(
        activations.open_activations(path, "conv")[:, 3:5].values, values["conv"][:8, 3:5]
    )
    assert verify(path)["problems"] == [] and verify(path)["checksums"] == "crc32c"

    intact = store.chunk_file("conv", 1).read_bytes()
    data = bytearray(intact)
    data[len(data) // 2] ^= 0x01
    store.chunk_file("conv", 1).write_bytes(bytes(data))
    problem = r"layer conv chunk 1 \(rows 4-7\): its checksum does not match"
    assert re.search(problem, verify(path)["problems"][0])
    with pytest.raises(StoreError, match=problem):
        _ = activations.open_activations(path, "conv")[:, :1].values  # one chunk = one decode unit
    assert store.damaged_chunks(range(3)).keys() == {1}
    store.write_chunk(1, {k: v[4:8] for k, v in values.items()})
    assert store.chunk_file("conv", 1).read_bytes() == intact
    store.finalize()
    assert verify(path)["problems"] == []


@pytest.mark.parametrize("compression", ["zstd", "none", "lz4"])
def test_read_features_equals_zarr_and_names_a_damaged_inner_chunk(tmp_path, compression):
    """The store's own shard reader (what the Gram reads panels with) against zarr's read of
    the same rows and features, for every compression, a padded shard (tok: 7 of 8 tokens) and
    the last, short chunk; a flipped inner chunk is a StoreError naming it, while features
    outside it still read."""
    path = tmp_path / "r.zarr"
    values = _values()
    store, _ = open_store(
        path, identity={"toy": 1}, layers=SPECS, stimuli=STIMULI, labels=None,
        chunk_size=CHUNK, compression=compression,
    )  # fmt: skip
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in values.items()})
    store.finalize()
    store = ActivationStore(path, mode="r")
    for layer, stop in (("conv", 24), ("tok", 7), ("fc", 5)):
        for chunk in range(store.n_chunks):
            rows = store.chunk_slice(chunk)
            for cols in (slice(0, stop), slice(1, stop - 1), slice(stop - 1, stop)):
                got = store.read_features(layer, chunk, cols)
                want = np.asarray(store.array(layer)[rows, cols])
                assert got.dtype == want.dtype and got.shape == want.shape, (layer, chunk, cols)
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(got, values[layer][rows, cols])
    assert store.read_features("score", 0, slice(0, 1)) is None  # no feature dim: zarr reads it
    k = store.inner_chunk_width("conv")
    _flip_in_inner_chunk(store.chunk_file("conv", 1), 24 // k, 1)
    with pytest.raises(StoreError, match=rf"layer conv chunk 1 .*inner chunk 1 \(channel {k}-"):
        store.read_features("conv", 1, slice(0, 2 * k))
    np.testing.assert_array_equal(  # the inner chunks around it
        store.read_features("conv", 1, slice(2 * k, 24)), values["conv"][4:8, 2 * k :]
    )
