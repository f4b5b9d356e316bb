"""RDM, RSA, CKA and spectrum from a streamed Gram, against the field's own libraries on the same
activations: rsatoolbox, scipy, numpy, and the feature-space formulas."""

from __future__ import annotations

import numpy as np
import pytest
import rsatoolbox
import scipy.stats
from helpers import write_store
from scipy.spatial.distance import pdist, squareform

from bonnerlab import analysis
from bonnerlab.analysis import Gram
from bonnerlab.errors import AnalysisError, ConfigError

N = 40
IDS = [f"s{i:03d}.png" for i in range(N)]


def _layer(seed: int, shape=(5, 3, 4), n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a shared low-rank part makes the layers alike (RSA and CKA well above zero) and an offset
    # makes centering matter
    shared = np.random.default_rng(99).standard_normal((n, 3))
    x = shared @ rng.standard_normal((3, int(np.prod(shape)))) + rng.standard_normal(
        (n, int(np.prod(shape)))
    )
    return (x + 0.5).reshape(n, *shape).astype(np.float32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of one stimulus set: `b` holds its stimuli in another order."""
    root = tmp_path_factory.mktemp("stores")
    x, y = _layer(0), _layer(1, shape=(70,))
    order = np.random.default_rng(2).permutation(N)
    a = write_store(root / "a.zarr", {"conv": x}, IDS, identity={"m": "a"})
    b = write_store(root / "b.zarr", {"fc": y[order]}, np.asarray(IDS)[order], identity={"m": "b"})
    return {"a": (a, "conv"), "b": (b, "fc"), "x": x.reshape(N, -1).astype(np.float64), "y": y}


def _opts():
    return {"device": "cpu", "cache": False}


@pytest.mark.parametrize("metric", ["correlation", "euclidean"])
def test_rdm_equals_rsatoolbox_calc_rdm(stores, metric):
    mine = analysis.rdm(*stores["a"], metric=metric, **_opts())
    ref = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(stores["x"]), method=metric)
    np.testing.assert_allclose(mine.values, ref.get_matrices()[0], rtol=1e-6, atol=1e-12)
    assert mine.dims == ("presentation", "presentation_")
    assert mine["stimulus"].values.tolist() == IDS == mine["stimulus_"].values.tolist()
    assert mine.attrs["metric"] == metric and mine.attrs["layer"] == "conv"
    assert {"store", "fingerprint", "versions", "n_features"} <= set(mine.attrs)


def test_cosine_rdm_equals_scipy_and_streamed_equals_in_memory(stores):
    mine = analysis.rdm(*stores["a"], metric="cosine", **_opts())
    ref = squareform(pdist(stores["x"], "cosine"))
    np.testing.assert_allclose(mine.values, ref, rtol=1e-6, atol=1e-12)
    for metric in analysis.similarity.METRICS:
        streamed = analysis.rdm(*stores["a"], metric=metric, **_opts()).values
        in_memory = analysis.rdm(Gram.from_array(stores["x"], IDS), metric=metric).values
        np.testing.assert_allclose(streamed, in_memory, rtol=1e-6, atol=1e-12)


def test_rsa_equals_rsatoolbox_compare_and_scipy(stores):
    ra = analysis.rdm(*stores["a"], **_opts())
    rb = analysis.rdm(*stores["b"], **_opts())  # other order: aligned by id
    rb_sorted = rb.sortby(rb["stimulus"]).pipe(lambda r: r.sortby(r["stimulus_"]))
    assert rb_sorted["stimulus"].values.tolist() == IDS
    tri = np.triu_indices(N, k=1)
    u, v = ra.values[tri], rb_sorted.values[tri]
    toolbox = {
        m: rsatoolbox.rdm.RDMs(np.stack([ra.values[tri], rb_sorted.values[tri]]))
        for m in ("spearman", "tau-a", "corr")
    }
    for method, theirs, scipy_value in (
        ("spearman", "spearman", scipy.stats.spearmanr(u, v).statistic),
        ("kendall", "tau-a", scipy.stats.kendalltau(u, v).statistic),  # no ties: tau-a == tau-b
        ("pearson", "corr", scipy.stats.pearsonr(u, v).statistic),
    ):
        mine = analysis.rsa(ra, rb, method)
        rdms = toolbox[theirs]
        expected = rsatoolbox.rdm.compare(rdms[0], rdms[1], method=theirs)[0, 0]
        assert float(mine) == pytest.approx(expected, rel=1e-9), method
        assert float(mine) == pytest.approx(scipy_value, rel=1e-9), method
        assert mine.attrs["n_stimuli"] == N and mine.attrs["method"] == method
    # (store, layer) pairs give the same as their RDMs
    pair = analysis.rsa(stores["a"], stores["b"], "spearman", **_opts())
    assert float(pair) == pytest.approx(float(analysis.rsa(ra, rb, "spearman")), rel=1e-12)


def test_tau_a_counts_ties_as_rsatoolbox_does():
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 4, 200).astype(float), rng.integers(0, 4, 200).astype(float)
    rdms = rsatoolbox.rdm.RDMs(np.stack([u, v]))
    expected = rsatoolbox.rdm.compare(rdms[0], rdms[1], method="tau-a")[0, 0]
    assert analysis.similarity._tau_a(u, v) == pytest.approx(expected, rel=1e-9)


def test_rsa_bootstrap_gives_a_ci_around_the_value(stores, tmp_path):
    ra = analysis.rdm(*stores["a"], **_opts())
    rb = analysis.rdm(*stores["b"], **_opts())
    path = tmp_path / "b.nc"
    rb.to_netcdf(path)  # an RDM file is a source too
    out = analysis.rsa(ra, path, "spearman", bootstrap=200, seed=3)
    assert out.attrs["ci_low"] < float(out) < out.attrs["ci_high"] <= 1
    assert out.attrs["bootstrap_std"] > 0 and out.attrs["bootstrap"] == 200
    again = analysis.rsa(ra, rb, "spearman", bootstrap=200, seed=3)
    assert again.attrs["ci_low"] == out.attrs["ci_low"]  # seeded: the same resamples


def _feature_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def _feature_cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space debiased CKA (their notebook's
    `feature_space_linear_cka(debiased=True)`), written from features, not Grams."""
    n = len(x)
    xc, yc = x - x.mean(0), y - y.mean(0)

    def dot(a, b):
        sa, sb = (a**2).sum(1), (b**2).sum(1)
        raw = np.linalg.norm(b.T @ a) ** 2
        return raw - n / (n - 2) * (sa @ sb) + sa.sum() * sb.sum() / ((n - 1) * (n - 2))

    return dot(xc, yc) / np.sqrt(dot(xc, xc) * dot(yc, yc))


def test_cka_equals_the_feature_space_formulas_and_aligns_by_id(stores):
    x = stores["x"]
    y = stores["y"].astype(np.float64)
    mine = analysis.cka(stores["a"], stores["b"], **_opts())  # b's stimuli in another order
    assert float(mine) == pytest.approx(_feature_cka(x, y), rel=1e-6)
    assert 0.1 < float(mine) < 1 and mine.attrs["n_stimuli"] == N
    debiased = analysis.cka(stores["a"], stores["b"], debiased=True, **_opts())
    assert float(debiased) == pytest.approx(_feature_cka_debiased(x, y), rel=1e-6)
    in_memory = analysis.cka(Gram.from_array(x, IDS), Gram.from_array(y, IDS))
    assert float(in_memory) == pytest.approx(float(mine), rel=1e-6)


def test_cka_and_rsa_use_only_the_shared_stimuli_and_refuse_none(stores):
    x, y = stores["x"], stores["y"].astype(np.float64)
    half = Gram.from_array(y[::2], IDS[::2])
    mine = analysis.cka(Gram.from_array(x, IDS), half)
    assert float(mine) == pytest.approx(_feature_cka(x[::2], y[::2]), rel=1e-9)
    other = Gram.from_array(y, [f"other{i}.png" for i in range(N)])
    with pytest.raises(AnalysisError, match="CKA: 0 shared stimuli") as err:
        analysis.cka(Gram.from_array(x, IDS), other)
    assert "\n" not in str(err.value)
    with pytest.raises(AnalysisError, match="RSA: 0 shared stimuli"):
        analysis.rsa(analysis.rdm(Gram.from_array(x, IDS)), analysis.rdm(other))
    with pytest.raises(ConfigError, match="metric must be one of"):
        analysis.rdm(other, metric="mahalanobis")


@pytest.mark.parametrize("p", [12, 200])  # fewer features than stimuli, and more
def test_spectrum_equals_numpy_pca(tmp_path, p):
    rng = np.random.default_rng(p)
    x = (rng.standard_normal((N, p)) * np.arange(1, p + 1) ** -0.6 + 1.0).astype(np.float32)
    path = write_store(tmp_path / "s.zarr", {"fc": x})
    mine = analysis.spectrum(path, "fc", **_opts())
    cov = np.cov(x.astype(np.float64), rowvar=False)
    ref = np.linalg.eigvalsh(cov)[::-1][: min(N - 1, p)]
    np.testing.assert_allclose(mine["eigenvalues"].values, ref, rtol=1e-5, atol=1e-9 * ref[0])
    assert float(mine["effective_dim"]) == pytest.approx(ref.sum() ** 2 / (ref**2).sum(), 1e-5)
    lo, hi = mine.attrs["fit_range"]
    k = np.arange(lo, hi + 1)
    slope = np.polyfit(np.log(k), np.log(ref[lo - 1 : hi]), 1)[0]
    assert float(mine["alpha"]) == pytest.approx(-slope, rel=1e-4)
    streamed_vs_memory = analysis.spectrum(Gram.from_array(x), fit_range=(lo, hi))
    np.testing.assert_allclose(
        streamed_vs_memory["eigenvalues"].values, mine["eigenvalues"].values, rtol=1e-5, atol=1e-9
    )


def test_spectrum_recovers_a_planted_power_law():
    n, alpha = 2000, 1.0
    rng = np.random.default_rng(0)
    scales = np.arange(1, 101) ** (-alpha / 2)  # variances k^-alpha
    x = rng.standard_normal((n, 100)) * scales
    out = analysis.spectrum(Gram.from_array(x), fit_range=(2, 30))
    assert float(out["alpha"]) == pytest.approx(alpha, abs=0.1)
    with pytest.raises(ConfigError, match="fit_range"):
        analysis.spectrum(Gram.from_array(x), fit_range=(5, 500))
