"""The activation store on its own: no models, toy arrays, values asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from bonnerlab import activations
from bonnerlab.activations.store import ActivationStore, LayerSpec, open_store, shard_chunks
from bonnerlab.errors import StoreError

N, CHUNK = 10, 4


def _specs() -> list[LayerSpec]:
    return [
        LayerSpec("conv1", ("channel", "y", "x"), (3, 4, 4), "float32", {"pooling": "none"}),
        LayerSpec("fc", ("neuroid",), (5,), "float16"),
    ]


def _full() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv1": rng.standard_normal((N, 3, 4, 4)).astype(np.float32),
        "fc": rng.standard_normal((N, 5)).astype(np.float16),
    }


STIMULI = [f"cls{i % 2}/img{i}.png" for i in range(N)]


def _make(path: Path, identity: dict | None = None, overwrite: bool = False):
    return open_store(
        path,
        identity=identity or {"weights": "a"},
        layers=_specs(),
        stimuli=STIMULI,
        labels=[i % 2 for i in range(N)],
        chunk_size=CHUNK,
        attrs={"arch": "toy"},
        overwrite=overwrite,
    )


def _fill(store: ActivationStore, chunks=None, skipped=None) -> None:
    """Write `chunks` of `_full()`; a skipped stimulus's rows are NaN, as the extraction writes."""
    full = _full()
    for name in (skipped or {}).values():
        for v in full.values():
            v[[STIMULI.index(s) for s in name]] = np.nan
    for c in range(store.n_chunks) if chunks is None else chunks:
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in full.items()}, (skipped or {}).get(c, []))


def test_roundtrip_lazy_read_flatten_select(tmp_path):
    path = tmp_path / "s.zarr"
    store, outcome = _make(path)
    assert outcome == "created" and store.n_chunks == 3 and store.missing_chunks() == [0, 1, 2]
    _fill(store)
    assert store.finalize()["chunks"] == 3
    assert activations.stored_layers(path) == ["conv1", "fc"]

    da = activations.open_activations(path, "conv1")
    assert da.dims == ("presentation", "channel", "y", "x")
    assert list(da["stimulus"].values) == STIMULI
    assert da["label"].values.tolist() == [i % 2 for i in range(N)]
    assert da.attrs["arch"] == "toy" and da.attrs["pooling"] == "none" and da.attrs["complete"]
    # lazy: xarray keeps a backend array until values are asked for
    assert not isinstance(da.variable._data, np.ndarray)
    np.testing.assert_array_equal(activations.to_numpy(da), _full()["conv1"])

    flat = activations.flatten(da)
    assert flat.dims == ("presentation", "neuroid") and flat.shape == (N, 48)
    np.testing.assert_array_equal(flat.values, _full()["conv1"].reshape(N, -1))

    sel = activations.select_stimuli(da, ["cls1/img3.png", "cls0/img0.png"])
    np.testing.assert_array_equal(sel.values, _full()["conv1"][[3, 0]])
    with pytest.raises(StoreError, match="not in the store"):
        activations.select_stimuli(da, ["nope.png"])

    fc = activations.open_activations(path, "fc")
    assert fc.dtype == np.float16
    np.testing.assert_array_equal(fc.values, _full()["fc"])


def test_unfinished_store_is_refused_until_finalized(tmp_path):
    path = tmp_path / "s.zarr"
    store, _ = _make(path)
    _fill(store, chunks=[0, 2])
    assert store.missing_chunks() == [1]
    with pytest.raises(StoreError, match="1 of 3 chunks not written"):
        store.finalize()
    with pytest.raises(StoreError, match="not finalized"):
        activations.open_activations(path, "conv1")
    partial = activations.open_activations(path, "conv1", allow_incomplete=True).values
    assert np.isnan(partial[4:8]).all()  # the unwritten chunk reads as the NaN fill value
    np.testing.assert_array_equal(partial[:4], _full()["conv1"][:4])


def test_reuse_refuse_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    store, _ = _make(path)
    _fill(store)
    store.finalize()
    before = (path / "zarr.json").read_bytes()

    again, outcome = _make(path)
    assert outcome == "reused" and again.missing_chunks() == []

    with pytest.raises(StoreError, match=r"different config \(weights: .*--overwrite"):
        _make(path, identity={"weights": "b"})
    assert (path / "zarr.json").read_bytes() == before  # nothing touched

    fresh, outcome = _make(path, identity={"weights": "b"}, overwrite=True)
    assert outcome == "replaced" and fresh.missing_chunks() == [0, 1, 2]
    assert not list(tmp_path.glob("s.zarr.old-*"))


def test_never_touches_a_folder_that_is_not_a_store(tmp_path):
    path = tmp_path / "mydata"
    path.mkdir()
    (path / "precious.txt").write_text("keep")
    with pytest.raises(StoreError, match="not an activation store"):
        _make(path, overwrite=True)
    assert (path / "precious.txt").read_text() == "keep"


def test_shard_ranges_are_disjoint_and_cover_all_chunks():
    for n_chunks in (1, 7, 10):
        for shards in (1, 2, 3, 8):
            ranges = [shard_chunks(n_chunks, i, shards) for i in range(shards)]
            assert [c for r in ranges for c in r] == list(range(n_chunks))
    with pytest.raises(StoreError, match="out of range"):
        shard_chunks(10, 2, 2)


def test_concurrent_creation_gives_one_store(tmp_path):
    """Shards starting at once race to create the store: one rename wins, all use it."""
    path = tmp_path / "s.zarr"
    results: list[str] = []
    errors: list[BaseException] = []

    def shard(i: int) -> None:
        try:
            store, outcome = _make(path)
            results.append(outcome)
            _fill(store, chunks=shard_chunks(store.n_chunks, i, 3))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == ["created", "reused", "reused"]  # exactly one store was made
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))
    activations.finalize(path)
    np.testing.assert_array_equal(
        activations.open_activations(path, "conv1").values, _full()["conv1"]
    )


def test_skipped_stimuli_are_recorded_and_dropped(tmp_path):
    path = tmp_path / "s.zarr"
    store, _ = _make(path)
    _fill(store, skipped={1: ["cls1/img5.png"]})
    store.finalize()
    assert activations.store_info(path)["skipped_stimuli"] == ["cls1/img5.png"]
    da = activations.open_activations(path, "conv1")
    assert da.sizes["presentation"] == N - 1 and "cls1/img5.png" not in list(da["stimulus"].values)
    assert (
        activations.open_activations(path, "conv1", drop_skipped=False).sizes["presentation"] == N
    )


def test_unknown_layer_lists_closest(tmp_path):
    path = tmp_path / "s.zarr"
    store, _ = _make(path)
    _fill(store)
    store.finalize()
    with pytest.raises(StoreError, match="closest: conv1"):
        activations.open_activations(path, "conv")
    with pytest.raises(StoreError, match="not found"):
        activations.open_activations(tmp_path / "missing.zarr", "conv1")


def test_export_netcdf(tmp_path):
    import xarray as xr

    path = tmp_path / "s.zarr"
    store, _ = _make(path)
    _fill(store)
    store.finalize()
    out = activations.export_netcdf(path, tmp_path / "s.nc")
    ds = xr.open_dataset(out)
    try:
        np.testing.assert_array_equal(ds["conv1"].values, _full()["conv1"])
        np.testing.assert_array_equal(ds["fc"].values, _full()["fc"].astype(np.float32))
        assert list(ds["stimulus"].values.astype(str)) == STIMULI
        assert ds["conv1"].dims == ("presentation", "conv1.channel", "conv1.y", "conv1.x")
        assert json.loads(ds["conv1"].attrs["skipped_stimuli"]) == []
    finally:
        ds.close()


def test_finalize_by_hand_cli(tmp_path):
    path = tmp_path / "s.zarr"
    store, _ = _make(path)
    _fill(store, chunks=[0, 1])
    cmd = [sys.executable, "-m", "bonnerlab.activations", "finalize", str(path)]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stderr.count("\n") == 1
    _fill(store, chunks=[2])
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["chunks"] == 3
    assert activations.store_info(path)["complete"] is True


def test_restart_clears_half_written_chunk_files_of_its_own_chunks(tmp_path):
    store, _ = _make(tmp_path / "s.zarr")
    _fill(store, chunks=[0])
    # what zarr's LocalStore leaves when killed between writing its temp file and the rename
    mine = tmp_path / "s.zarr" / "conv1" / "c" / "1" / "0" / "0" / "0.3f2a.partial"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(b"half")
    sibling = tmp_path / "s.zarr" / "fc" / "c" / "2" / "0.9b1c.partial"  # another shard's chunk
    sibling.parent.mkdir(parents=True, exist_ok=True)
    sibling.write_bytes(b"in flight")
    assert store.clear_partial_writes(store.missing_chunks([1])) == 1
    assert not mine.exists() and sibling.exists()
    _fill(store, chunks=[1])
    assert list((tmp_path / "s.zarr").rglob("*.partial")) == [sibling]
