"""A store's integrity on its own (no models): content hashes folded into the identity at
finalize, damage named by the reader and by `verify`, format-1 stores still read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonnerlab import activations
from bonnerlab.activations.store import (
    ActivationStore,
    LayerSpec,
    _quiet_zarr,
    fingerprint,
    open_store,
    verify,
)
from bonnerlab.errors import StoreError

N, CHUNK = 10, 4
STIMULI = [f"img{i}.png" for i in range(N)]
HASHES = [hashlib.blake2b(s.encode(), digest_size=16).hexdigest() for s in STIMULI]


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "conv": rng.standard_normal((N, 2, 3, 3)).astype(np.float32),
        "fc": rng.standard_normal((N, 5)).astype(np.float16),
    }


def _store(path: Path, compression: str = "zstd", hashes=HASHES, finalize: bool = True):
    specs = [
        LayerSpec("conv", ("channel", "y", "x"), (2, 3, 3), "float32"),
        LayerSpec("fc", ("neuroid",), (5,), "float16"),
    ]
    store, _ = open_store(
        path,
        identity={"model": "toy"},
        layers=specs,
        stimuli=STIMULI,
        labels=None,
        chunk_size=CHUNK,
        compression=compression,
    )
    values = _values()
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in values.items()}, content=hashes[sl])
    if finalize:
        store.finalize()
    return store


def _damage(store: ActivationStore, layer: str, chunk: int, how: str) -> None:
    path = store.chunk_file(layer, chunk)
    if how == "delete":
        path.unlink()
    else:  # one flipped bit in the middle of the file
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def test_content_hashes_stored_and_folded_into_the_fingerprint(tmp_path):
    store = _store(tmp_path / "s.zarr")
    info = activations.store_info(tmp_path / "s.zarr")
    da = activations.open_activations(tmp_path / "s.zarr", "conv")
    assert da["content_hash"].values.astype(str).tolist() == HASHES  # a coordinate per row
    content = hashlib.sha256("\n".join(HASHES).encode()).hexdigest()
    assert info["identity"] == {"model": "toy", "content_sha256": content}
    assert info["fingerprint"] == fingerprint(info["identity"]) == store.fingerprint
    # the same config reuses the store (content is checked row by row by the run, not here)
    again, outcome = open_store(
        tmp_path / "s.zarr",
        identity={"model": "toy"},
        layers=[LayerSpec("conv", ("channel", "y", "x"), (2, 3, 3)), LayerSpec("fc", ("n",), (5,))],
        stimuli=STIMULI,
        labels=None,
        chunk_size=CHUNK,
    )
    assert outcome == "reused"
    # other content, same config: another fingerprint (a Gram cache keyed by it is not reused)
    other = _store(tmp_path / "t.zarr", hashes=HASHES[::-1])
    assert other.fingerprint != store.fingerprint


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("how", ["delete", "corrupt"])
def test_damaged_chunk_named_by_reader_verify_and_cli(tmp_path, compression, how):
    path = tmp_path / "s.zarr"
    store = _store(path, compression)
    assert verify(path)["problems"] == [] and verify(path)["checksums"] == "crc32c"
    _damage(store, "conv", 1, how)

    da = activations.open_activations(path, "conv")  # lazy: opening reads no chunk
    np.testing.assert_array_equal(da.isel(presentation=slice(0, 4)).values, _values()["conv"][:4])
    with pytest.raises(StoreError, match=r"layer conv chunk 1 \(rows 4-7\)") as e:
        activations.to_numpy(da)
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match=r"layer conv chunk 1"):
        activations.to_numpy(da.isel(presentation=[9, 5]))  # fancy indexing too
    np.testing.assert_array_equal(activations.open_activations(path, "fc").values, _values()["fc"])

    report = verify(path)
    assert report["n_problems"] == 1 and "layer conv chunk 1" in report["problems"][0]
    assert store.damaged_chunks(range(store.n_chunks)).keys() == {1}
    cmd = [sys.executable, "-m", "bonnerlab.activations", "verify", str(path)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("error: ") and "layer conv chunk 1" in run.stderr
    assert json.loads(run.stdout)["n_problems"] == 1


def test_verify_checks_nan_rows_ids_and_lengths(tmp_path):
    path = tmp_path / "s.zarr"
    store = _store(path, finalize=False)
    values = _values()
    values["fc"][6] = np.nan  # NaN in a row that no marker records as skipped
    sl = store.chunk_slice(1)
    store.write_chunk(1, {k: v[sl] for k, v in values.items()}, content=HASHES[sl])
    with pytest.raises(StoreError, match=r"layer fc chunk 1 .*row 6 holds NaN but its stimulus"):
        store.finalize()
    assert not activations.store_info(path)["complete"]
    # recorded as skipped: then it must be NaN in every layer
    store.write_chunk(1, {k: v[sl] for k, v in values.items()}, ["img6.png"], HASHES[sl])
    with pytest.raises(StoreError, match=r"layer conv chunk 1 .*row 6 is recorded as skipped but"):
        store.finalize()
    values["conv"][6] = np.nan
    store.write_chunk(1, {k: v[sl] for k, v in values.items()}, ["img6.png"], HASHES[sl])
    assert store.finalize()["skipped"] == 1

    dup = tmp_path / "dup.zarr"
    store, _ = open_store(
        dup,
        identity={},
        layers=[LayerSpec("fc", ("neuroid",), (5,), "float16")],
        stimuli=["a", "b", "a"],
        labels=None,
        chunk_size=4,
    )
    store.write_chunk(0, {"fc": _values()["fc"][:3]})
    with pytest.raises(StoreError, match=r"stimulus id 'a' appears twice \(rows 0 and 2\)"):
        store.finalize()


def test_verify_1000_stimuli_seconds(tmp_path):
    """The figure for the closing note: verify on a 1,000-stimulus store (two layers)."""
    rng = np.random.default_rng(0)
    layers = {
        "conv": rng.standard_normal((1000, 64, 8, 8)).astype(np.float16),
        "fc": rng.standard_normal((1000, 512)).astype(np.float32),
    }
    specs = [
        LayerSpec("conv", ("channel", "y", "x"), (64, 8, 8), "float16"),
        LayerSpec("fc", ("neuroid",), (512,)),
    ]
    store, _ = open_store(
        tmp_path / "k.zarr",
        identity={},
        layers=specs,
        stimuli=[f"s{i}" for i in range(1000)],
        labels=None,
        chunk_size=64,
    )
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        store.write_chunk(c, {k: v[sl] for k, v in layers.items()})
    report = verify(tmp_path / "k.zarr")
    assert report["problems"] == [] and report["chunks_checked"] == 2 * 16
    print(f"verify: 1,000 stimuli, 2 layers, 16 chunks each: {report['seconds']:.2f} s")


def _format1_store(path: Path) -> dict[str, np.ndarray]:
    """A store as bonnerlab wrote it before format 2 (no content hashes, no checksums, an
    all-NaN chunk left unwritten by zarr), made with zarr directly."""
    import zarr
    from zarr.codecs import ZstdCodec

    values = _values()
    values["fc"][8:] = np.nan  # chunk 2 (rows 8-9): both stimuli unreadable
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs["bonnerlab"] = {
        "fingerprint": fingerprint({"model": "toy"}),
        "identity": {"model": "toy"},
        "layers": ["fc"],
        "n_presentations": N,
        "chunk_size": CHUNK,
        "complete": True,
        "skipped_stimuli": ["img8.png", "img9.png"],
    }
    dims = {"dimension_names": ["presentation"], "chunks": (N,)}
    group.create_array("stimulus", shape=(N,), dtype=str, **dims)[:] = np.asarray(STIMULI)
    group.create_array("label", shape=(N,), dtype="int64", fill_value=-1, **dims)[:] = -1
    fc = group.create_array(
        "fc",
        shape=(N, 5),
        dtype="float16",
        chunks=(CHUNK, 5),
        dimension_names=["presentation", "neuroid"],
        compressors=ZstdCodec(level=1),
        fill_value=np.nan,
        attributes={"coordinates": "stimulus label"},
    )
    fc[:] = values["fc"]
    for c in range(3):
        (path / ".done" / "fc").mkdir(parents=True, exist_ok=True)
        skipped = ["img8.png", "img9.png"] if c == 2 else []
        (path / ".done" / "fc" / str(c)).write_text(
            json.dumps({"skipped": skipped}) if skipped else ""
        )
    with _quiet_zarr():
        zarr.consolidate_metadata(str(path), zarr_format=3)
    assert not (path / "fc" / "c" / "2").exists()  # zarr 3 skipped the all-NaN chunk
    return values


def test_format1_store_reads_verifies_and_resume_is_refused(tmp_path):
    path = tmp_path / "old.zarr"
    values = _format1_store(path)
    da = activations.open_activations(path, "fc", drop_skipped=False)
    np.testing.assert_array_equal(da.values, values["fc"])
    assert "content_hash" not in da.coords
    report = verify(path)
    assert report["problems"] == [] and report["checksums"].startswith("not on every")

    def reopen(**kw):
        return open_store(
            path,
            identity={"model": "toy"},
            layers=[LayerSpec("fc", ("neuroid",), (5,), "float16")],
            stimuli=STIMULI,
            labels=None,
            chunk_size=CHUNK,
            **kw,
        )

    with pytest.raises(StoreError, match=r"older bonnerlab .*--overwrite to extract it again"):
        reopen()
    np.testing.assert_array_equal(activations.open_activations(path, "fc").values, values["fc"][:8])
    store, outcome = reopen(overwrite=True)
    assert outcome == "replaced" and store.format == 2 and store.has_content
