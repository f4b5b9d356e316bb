"""A layer's Gram streamed from its store: equal to the in-memory product however many passes,
cached beside the store by its fingerprint, bounded in memory, one line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import repo_env, write_store

from bonnerlab.analysis import Gram, gram, layer_gram
from bonnerlab.errors import AnalysisError, StoreError

N = 30


def _features(seed: int = 0, shape=(6, 2, 5), dtype=np.float32) -> np.ndarray:
    # a mean offset, as ReLU layers have: centering must cope with it
    return (np.random.default_rng(seed).standard_normal((N, *shape)) + 0.7).astype(dtype)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to float32 precision: each entry within 1e-6 of the largest (a product's rounding
    scales with the vectors' norms, not with the entry)."""
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def _memory_for(panel_indices: int, shape=(6, 2, 5), chunk: int = 8, n: int = N) -> float:
    """The smallest memory_gb (to 256 bytes) whose panel holds `panel_indices` of the first
    feature dim."""
    for size in range(256, 2**20, 256):
        try:
            if gram.plan_panels(n, shape, 4, chunk, size / 2**30).step == panel_indices:
                return size / 2**30
        except AnalysisError:
            continue
    raise AssertionError(f"no memory_gb gives panels of {panel_indices}")


@pytest.mark.parametrize("panel", [1, 4, 6])  # 6, 2 and 1 passes over the store
def test_streamed_gram_equals_the_in_memory_one(tmp_path, panel):
    x = _features()
    x[5] = np.nan  # a stimulus the extraction could not read: its row is NaN and dropped
    ids = [f"s{i:03d}.png" for i in range(N)]
    path = write_store(tmp_path / "a.zarr", {"conv": x}, ids, skipped={0: [ids[5]]})
    g = layer_gram(path, "conv", device="cpu", memory_gb=_memory_for(panel, n=N - 1), cache=False)
    assert g.attrs["passes"] == -(-6 // panel)
    keep = np.arange(N) != 5
    ref = Gram.from_array(x[keep], np.asarray(ids)[keep])
    assert g.stimulus.tolist() == ref.stimulus.tolist() and g.n_features == 60
    assert g.gram.dtype == np.float64
    _close(g.gram, ref.gram)
    _close(g.sums, ref.sums)
    _close(g.centered(), ref.centered())
    assert g.coords["label"].tolist() == [i % 3 for i in range(N) if i != 5]
    assert g.attrs["layer"] == "conv" and len(g.attrs["fingerprint"]) == 64


def test_float16_layers_stream_in_float32(tmp_path):
    x = _features(dtype=np.float16)
    path = write_store(tmp_path / "h.zarr", {"fc": x.reshape(N, -1)})
    g = layer_gram(path, "fc", device="cpu", cache=False)
    _close(g.gram, Gram.from_array(x.astype(np.float64)).gram)


def test_float16_to_float32_is_numpy_s_cast_bit_for_bit_for_every_half():
    """All 65,536 halves (signed, subnormal, inf, NaN), and the no-sign-bit block a ReLU layer
    makes, through the bit arithmetic the stream uses instead of numpy's branching cast."""
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    relu = every[:0x7C00]  # 0 up to the largest finite half, no sign bit
    for values, cols in ((every, 256), (finite, 8), (relu, 31)):
        x = values.reshape(-1, cols)
        for src in (x, np.asarray(np.hstack([x, x]))[:, ::2]):  # contiguous and strided
            out = np.empty(src.shape, np.float32)
            gram.to_float32(src, out, np.empty(src.shape, np.uint32))
            expected = src.astype(np.float32)
            np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


def _chunk_features(path, layer: str, span: int) -> None:
    """Rewrite `layer` sharded as zarr allows: one shard per row chunk (as written), inner
    chunks of `span` indices of the first feature dim, so reading a panel decodes its own."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr on the store's .done folder, consolidated metadata
        group = zarr.open_group(str(path), mode="r+")
        old = group[layer]
        data, attrs, shard = old[:], dict(old.attrs), old.chunks
        names, fill = old.metadata.dimension_names, old.fill_value
        del group[layer]
        new = group.create_array(
            layer,
            shape=data.shape,
            dtype=data.dtype,
            shards=shard,
            chunks=(shard[0], span, *shard[2:]),
            compressors=old.compressors,
            attributes=attrs,
            dimension_names=names,
            fill_value=fill,
        )
        new[:] = data
        zarr.consolidate_metadata(str(path))


def test_a_store_chunked_along_features_is_decoded_once_however_many_panels(tmp_path):
    x = _features()
    path = write_store(tmp_path / "f.zarr", {"conv": x})
    _chunk_features(path, "conv", span=2)
    g = layer_gram(path, "conv", device="cpu", memory_gb=_memory_for(4), cache=False)
    # panels fall on the chunks (4 of 6 indices: 2 chunks, then 1), each chunk read once
    assert g.attrs["passes"] == 2 and g.attrs["store_reads"] == 1.0
    _close(g.gram, Gram.from_array(x).gram)
    rows = layer_gram(write_store(tmp_path / "r.zarr", {"conv": x}), "conv", device="cpu",
                      memory_gb=_memory_for(4), cache=False)  # fmt: skip
    assert rows.attrs["passes"] == 2 and rows.attrs["store_reads"] == 2.0  # whole rows twice


def test_select_aligns_by_id_and_names_unknown_ones():
    g = Gram.from_array(_features(), [f"s{i}" for i in range(N)])
    sub = g.select(["s3", "s1"])
    np.testing.assert_array_equal(sub.gram, g.gram[np.ix_([3, 1], [3, 1])])
    assert sub.stimulus.tolist() == ["s3", "s1"]
    with pytest.raises(AnalysisError, match=r"2 stimuli not in .* 'x', 'y'"):
        g.select(["s1", "x", "y"])


def test_the_cache_is_reused_and_a_changed_store_rebuilds_it(tmp_path, monkeypatch):
    reads = []
    real = gram._read_block
    monkeypatch.setattr(gram, "_read_block", lambda *a: reads.append(1) or real(*a))
    x, y = _features(0), _features(1)
    path = write_store(tmp_path / "a.zarr", {"conv": x}, identity={"weights": "a"})

    first = layer_gram(path, "conv", device="cpu")
    assert first.attrs["cache"] == "written" and reads
    cache_file = gram.cache_path(path, "conv")
    assert cache_file.is_file() and not list(cache_file.parent.glob(".*tmp"))  # atomic write

    reads.clear()
    again = layer_gram(path, "conv", device="cpu")
    assert not reads and again.attrs["cache"] == "reused"  # no layer read at all
    np.testing.assert_array_equal(again.gram, first.gram)

    # the same path, another identity (re-extracted with other weights): never the old cache
    write_store(path, {"conv": y}, identity={"weights": "b"}, overwrite=True)
    rebuilt = layer_gram(path, "conv", device="cpu")
    assert reads and rebuilt.attrs["cache"] == "written"
    _close(rebuilt.gram, Gram.from_array(y).gram)
    assert rebuilt.attrs["fingerprint"] != first.attrs["fingerprint"]

    cache_file.write_bytes(b"not an npz")  # a damaged cache is rebuilt too, not an error
    assert layer_gram(path, "conv", device="cpu").attrs["cache"] == "written"


def test_bad_input_is_one_line(tmp_path):
    x = _features()
    path = write_store(tmp_path / "a.zarr", {"conv": x})
    with pytest.raises(StoreError, match="layer 'fc' is not in") as err:
        layer_gram(path, "fc", device="cpu")
    assert "\n" not in str(err.value)
    partial = write_store(tmp_path / "p.zarr", {"conv": x}, finalize=False)
    with pytest.raises(StoreError, match="not finalized"):
        layer_gram(partial, "conv", device="cpu")
    with pytest.raises(AnalysisError, match="memory_gb=1e-05 is too small"):
        layer_gram(path, "conv", device="cpu", memory_gb=1e-5, cache=False)
    x[3, 0, 0, 0] = np.inf  # a float16 overflow, say
    bad = write_store(tmp_path / "inf.zarr", {"conv": x})
    with pytest.raises(AnalysisError, match="non-finite activations .* 's003.png'"):
        layer_gram(bad, "conv", device="cpu", cache=False)


PEAK = """
import json, re, sys
import numpy as np
import scipy.linalg.blas
from bonnerlab.activations import open_activations
from bonnerlab.analysis import layer_gram

def status(field):  # kB; VmHWM is this process's own peak (ru_maxrss keeps the parent's at exec)
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\\s+(\\d+)", f.read()).group(1))

# zarr's and xarray's imports, threads and codecs (a first read) are not the stream's memory
open_activations(sys.argv[1], "big")[:1, :1].values
before = status("VmRSS")
g = layer_gram(sys.argv[1], "big", device="cpu", memory_gb=0.02, cache=False)
grew_mb = (status("VmHWM") - before) / 1024
np.save(sys.argv[2], g.gram)
print(json.dumps({"grew_mb": grew_mb, "passes": g.attrs["passes"]}))
"""


@pytest.mark.slow  # ~10 s of CPU: 8 passes over an 80 MB layer
def test_a_layer_larger_than_the_memory_limit_is_still_analysed(tmp_path):
    """The limit is the memory the stream may add to the process (`memory_gb` 20 MB, measured as
    the peak RSS over what imports and a first read hold): under it goes not the layer (160 MB as
    float32, what an in-memory analysis holds), not even its stored float16 (80 MB)."""
    n, shape = 200, (2000, 100)
    x = np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32).astype(np.float16)
    path = write_store(tmp_path / "big.zarr", {"big": x}, chunk_size=8)
    x64 = x.reshape(n, -1).astype(np.float64)
    del x
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(path), str(tmp_path / "gram.npy")],
        env=repo_env(OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    stored_mb = x64.size * 2 / 2**20
    assert result["passes"] >= 4, result
    # the panel, the Gram, a block for BLAS and zarr's read buffers (~44 MB of the 80 here)
    assert result["grew_mb"] < 0.7 * stored_mb, (result, stored_mb)
    _close(np.load(tmp_path / "gram.npy")[::20], x64[::20] @ x64.T)  # every 20th row


def test_the_torch_lines_the_cuda_path_runs_give_the_numpy_results(tmp_path, monkeypatch):
    """The CUDA accumulator's torch calls on a CPU device (no GPU here): the same Gram as
    numpy's path and the in-memory product, with the same shift bookkeeping around it."""
    torch = pytest.importorskip("torch")
    x = _features(3)
    path = write_store(tmp_path / "t.zarr", {"conv": x})
    cpu = layer_gram(path, "conv", device="cpu", memory_gb=_memory_for(4), cache=False)
    monkeypatch.setattr(
        gram, "_accumulator", lambda device, n: gram._CudaAccumulator(n, torch.device("cpu"))
    )
    via_torch = layer_gram(path, "conv", device="cuda", memory_gb=_memory_for(4), cache=False)
    assert via_torch.attrs["passes"] == 2 and via_torch.attrs["device"] == "cpu"
    _close(via_torch.gram, cpu.gram)
    _close(via_torch.gram, Gram.from_array(x).gram)
    np.testing.assert_allclose(via_torch.sums, cpu.sums, rtol=1e-6)
