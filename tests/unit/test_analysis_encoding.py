"""Encoding models against the field's own libraries: scikit-learn's Ridge and RidgeCV on the same
folds, brute-force leave-one-out refits, himalaya's KernelRidgeCV; planted-layer targets; the
targets' formats; bad input as one line."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from helpers import write_store
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.metrics import r2_score as sklearn_r2
from sklearn.model_selection import GroupKFold

from bonnerlab.activations import flatten, open_activations
from bonnerlab.analysis import Gram, encode, kernel_ridge_cv, load_targets
from bonnerlab.analysis.encoding import make_folds, pearson, r2_score
from bonnerlab.errors import UserError

ALPHAS = np.logspace(-2, 6, 9)


def _regression(n=90, p=150, t=24, seed=0):
    """Offset features (so the intercept matters) and targets of mixed noise levels, so that
    different targets choose different alphas."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) + 2.0
    signal = x[:, :15] @ rng.standard_normal((15, t)) * 0.3
    y = signal + rng.standard_normal((n, t)) * rng.uniform(0.3, 6.0, t) + 5.0
    return x, y


def _per_fold(x, y, folds, model):
    """`model(train_x, train_y)` fitted per fold: held-out predictions and the fitted models."""
    pred, fitted = np.empty_like(y), []
    for tr, te in folds:
        m = model().fit(x[tr], y[tr])
        pred[te] = np.asarray(m.predict(x[te]))
        fitted.append(m)
    return pred, fitted


# ----------------------------------------------------------------------------- the core


@pytest.mark.parametrize("grouped", [False, True])
def test_a_fixed_alpha_predicts_what_sklearn_ridge_does_on_the_same_folds(grouped):
    x, y = _regression()
    groups = np.arange(len(x)) % 7 if grouped else None
    folds = make_folds(len(x), 5, groups, seed=3)
    for alpha in (1e-2, 10.0, 1e5):
        fit = kernel_ridge_cv(x @ x.T, y, folds, [alpha])
        ref, _ = _per_fold(x, y, folds, lambda a=alpha: Ridge(alpha=a, fit_intercept=True))
        np.testing.assert_allclose(fit.prediction, ref, rtol=0, atol=1e-8)  # measured ~1e-12


def test_per_target_alphas_and_scores_equal_ridgecv_fitted_per_training_fold():
    x, y = _regression()
    folds = make_folds(len(x), 5, seed=0)
    fit = kernel_ridge_cv(x @ x.T, y, folds, ALPHAS)
    ref, models = _per_fold(x, y, folds, lambda: RidgeCV(alphas=ALPHAS, alpha_per_target=True))
    chosen = np.stack([m.alpha_ for m in models])
    np.testing.assert_array_equal(ALPHAS[fit.alpha_index], chosen)
    assert len(np.unique(chosen)) >= 3  # the targets really choose differently
    # RidgeCV's best_score_ is minus the mean squared LOO residual of the chosen alpha
    np.testing.assert_allclose(fit.loo_mse, -np.stack([m.best_score_ for m in models]), rtol=1e-9)
    np.testing.assert_allclose(fit.prediction, ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(pearson(y, fit.prediction), pearson(y, ref), atol=1e-10)


def test_the_efficient_loo_with_an_intercept_equals_refitting_without_each_row():
    """The closed form (c_i / (G^-1_ii - (G^-1 1)_i / n)) against n brute-force Ridge refits,
    each refitting the intercept and the feature means without row i."""
    x, y = _regression(n=40, p=60, t=3, seed=5)
    train, test = np.arange(30), np.arange(30, 40)
    alphas = np.array([0.3, 30.0, 3000.0])
    fit = kernel_ridge_cv(x @ x.T, y, [(train, test)], alphas)
    mse = np.empty((len(alphas), y.shape[1]))
    for a, alpha in enumerate(alphas):
        errors = []
        for i in train:
            rest = train[train != i]
            m = Ridge(alpha=alpha).fit(x[rest], y[rest])
            errors.append(y[i] - m.predict(x[[i]])[0])
        mse[a] = np.mean(np.square(errors), axis=0)
    np.testing.assert_array_equal(fit.alpha_index[0], mse.argmin(0))
    np.testing.assert_allclose(fit.loo_mse[0], mse.min(0), rtol=1e-9)


def test_himalaya_kernel_ridge_cv_agrees_where_comparable():
    """himalaya chooses alphas by an inner K-fold, not LOO: with one alpha the predictions are
    the same; with the grid, the targets for which both chose the same alphas in every fold
    score the same."""
    kr = pytest.importorskip("himalaya.kernel_ridge")
    x, y = _regression(n=100, p=120, t=40, seed=1)
    folds = make_folds(len(x), 4, seed=0)
    for alphas in (np.array([30.0]), ALPHAS):
        fit = kernel_ridge_cv(x @ x.T, y, folds, alphas)
        ref, models = _per_fold(
            x, y, folds, lambda a=alphas: kr.KernelRidgeCV(alphas=a, fit_intercept=True, cv=5)
        )
        same = np.ones(y.shape[1], bool)
        for f, m in enumerate(models):
            same &= np.isclose(np.asarray(m.best_alphas_), alphas[fit.alpha_index[f]])
        assert same.sum() >= 3
        delta = np.abs(pearson(y, fit.prediction) - pearson(y, ref))[same]
        assert delta.max() <= 1e-3  # measured ~1e-14


# ----------------------------------------------------------------------------- from a store


def _planted(tmp_path, n=240, t=20, noise=1.0, seed=0):
    """Three independent layers; targets planted in `mid` with a known theoretical r."""
    rng = np.random.default_rng(seed)
    layers = {
        "low": rng.standard_normal((n, 2, 4, 4)).astype(np.float32),
        "mid": rng.standard_normal((n, 10)).astype(np.float32),
        "high": rng.standard_normal((n, 40)).astype(np.float32),
    }
    w = rng.standard_normal((10, t)) * 0.5
    signal = layers["mid"].astype(np.float64) @ w
    theory = np.sqrt((w**2).sum(0) / ((w**2).sum(0) + noise**2))
    store = write_store(tmp_path / "p.zarr", layers, chunk_size=64)
    ids = [f"s{i:03d}.png" for i in range(n)]
    return store, ids, signal, theory, rng


def _targets(values, ids, **coords):
    return xr.DataArray(
        values,
        dims=("presentation", "neuroid"),
        coords={"stimulus": ("presentation", ids), **coords},
    )


def test_the_planted_layer_wins_with_its_theoretical_r(tmp_path):
    store, ids, signal, theory, rng = _planted(tmp_path)
    y = signal + rng.standard_normal(signal.shape)
    targets = _targets(y, ids)
    scores = {
        layer: encode(store, layer, targets=targets, cv=5, device="cpu")
        for layer in ("low", "mid", "high")
    }
    mean_r = {layer: float(ds["r"].mean()) for layer, ds in scores.items()}
    assert max(mean_r, key=mean_r.get) == "mid"
    assert abs(mean_r["low"]) < 0.15 and abs(mean_r["high"]) < 0.15
    # finite n costs a little (10 weights from 192 rows); the r2 follows the r
    assert abs(mean_r["mid"] - theory.mean()) < 0.03
    assert abs(float(scores["mid"]["r2"].mean()) - (theory**2).mean()) < 0.05

    ds = scores["mid"]
    assert ds["alpha"].dims == ("fold", "neuroid") and ds.sizes["fold"] == 5
    assert ds.attrs["layer"] == "mid" and ds.attrs["fingerprint"] and ds.attrs["n_features"] == 10
    assert ds.attrs["alphas"] == ALPHAS.tolist() and "KFold(5" in ds.attrs["folds"]
    assert "versions" in ds.attrs and "reliability" not in ds  # no repeats, no ceiling
    # the store path is a thin wrapper: the same as the core on the Gram from memory
    x = flatten(open_activations(store, "mid")).values.astype(np.float64)
    fit = kernel_ridge_cv(x @ x.T, y, make_folds(len(y), 5, seed=0), ALPHAS)
    np.testing.assert_allclose(ds["r"].values, pearson(y, fit.prediction), atol=1e-6)


def test_repeats_give_a_spearman_brown_noise_ceiling(tmp_path):
    """Four noisy repeats per stimulus in a CSV: the ceiling matches the theoretical reliability
    of the repeat mean, and the planted layer's normalised r is about 1."""
    store, ids, signal, _, rng = _planted(tmp_path, t=8)
    k, noise = 4, 2.0
    rows = [(s, rep) for rep in range(k) for s in range(len(ids))]
    y = np.stack([signal[s] + noise * rng.standard_normal(signal.shape[1]) for s, _ in rows])
    lines = ["stimulus_id,repeat," + ",".join(f"v{j}" for j in range(y.shape[1]))]
    lines += [
        f"{ids[s]},{rep}," + ",".join(f"{v:.17g}" for v in y[i]) for i, (s, rep) in enumerate(rows)
    ]
    csv = tmp_path / "responses.csv"
    csv.write_text("\n".join(lines) + "\n")
    ds = encode(store, "mid", targets=csv, cv=5, device="cpu")
    var = signal.var(0)
    theory = var / (var + noise**2 / k)
    np.testing.assert_allclose(ds["reliability"].values, theory, atol=0.08)
    assert abs(float(ds["reliability"].mean()) - theory.mean()) < 0.03
    np.testing.assert_allclose(ds["noise_ceiling"].values, np.sqrt(ds["reliability"].values))
    assert abs(float(ds["r_normalized"].mean()) - 1.0) < 0.05
    assert list(ds["neuroid"].values) == [f"v{j}" for j in range(8)]
    assert ds.attrs["repeats_max"] == k and ds.attrs["n_stimuli"] == len(ids)


def test_grouped_folds_never_split_a_group_and_follow_sklearn(tmp_path):
    store, ids, signal, _, rng = _planted(tmp_path, n=60, t=3)
    y = signal + rng.standard_normal(signal.shape)
    labels = np.arange(60) % 3  # write_store's label coordinate
    folds = make_folds(60, 3, labels)
    for (tr, te), (_, rte) in zip(
        folds, GroupKFold(3).split(np.zeros(60), groups=labels), strict=True
    ):
        np.testing.assert_array_equal(te, rte)
        assert not set(labels[tr]) & set(labels[te])
    ds = encode(store, "mid", targets=_targets(y, ids), cv=3, groups="label", device="cpu")
    assert "GroupKFold(3) by label" == ds.attrs["folds"]
    gram = Gram.from_array(np.zeros((60, 2)), ids)
    gram.coords["label"] = labels
    by_array = encode(gram, targets=_targets(y, ids), cv=3, groups=labels, alphas=[1.0])
    by_name = encode(gram, targets=_targets(y, ids), cv=3, groups="label", alphas=[1.0])
    np.testing.assert_array_equal(by_array["r2"].values, by_name["r2"].values)


# ----------------------------------------------------------------------------- targets


@pytest.mark.filterwarnings("ignore:The data type")  # zarr: fixed-width str is not v3 spec
@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # zarr: xarray writes it anyway
def test_every_target_format_loads_to_the_same_layout(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"a/{i}.png" for i in range(6)]
    y = rng.standard_normal((6, 3))
    names = ["v0", "v1", "v2"]
    header = "stimulus_id,category," + ",".join(names)
    rows = [f"{s},c{i % 2}," + ",".join(f"{v:.17g}" for v in y[i]) for i, s in enumerate(ids)]
    (tmp_path / "t.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "t.tsv").write_text("\n".join(r.replace(",", "\t") for r in [header, *rows]))
    np.save(tmp_path / "t.npy", y)
    (tmp_path / "t.txt").write_text("\n".join(ids) + "\n")
    da = _targets(y, ids, neuroid=names)
    da.to_netcdf(tmp_path / "t.nc")
    by_stimulus = xr.DataArray(
        y, dims=("stimulus", "neuroid"), coords={"stimulus": ids, "neuroid": names}
    )
    by_stimulus.to_dataset(name="y").to_zarr(tmp_path / "t.zarr")
    for name in ("t.csv", "t.tsv", "t.npy", "t.nc", "t.zarr"):
        got = load_targets(tmp_path / name)
        assert got.dims == ("presentation", "neuroid"), name
        assert list(got["stimulus"].values) == ids and (got["repeat"].values == 0).all(), name
        np.testing.assert_array_equal(got.values, y, err_msg=name)
    assert list(load_targets(tmp_path / "t.csv")["category"].values) == ["c0", "c1"] * 3

    # repeats: a (stimulus, neuroid, repeat) array is rows with a repeat coordinate
    np.save(tmp_path / "r.npy", np.stack([y, y + 1], axis=2))
    (tmp_path / "r.txt").write_text("\n".join(ids))
    rep = load_targets(tmp_path / "r.npy")
    assert rep.sizes["presentation"] == 12 and sorted(set(rep["repeat"].values)) == [0, 1]
    np.testing.assert_array_equal(rep.values[rep["repeat"].values == 1], y + 1)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1 and isinstance(excinfo.value, UserError)
    return message


def test_bad_input_is_one_line_before_anything_is_streamed(tmp_path):
    store, ids, signal, _, _ = _planted(tmp_path, n=30, t=2)
    gram_dir = tmp_path / "p.zarr.gram"

    def fails(match, **kwargs):
        args = {"targets": _targets(signal, ids), "cv": 3, "device": "cpu", **kwargs}
        with pytest.raises(UserError, match=match) as e:
            encode(store, "mid", **args)
        _one_line(e)
        assert not gram_dir.exists()  # refused before the layer was read

    fails(
        "1 stimulus ids on more than one row, e.g. 's000.png' \\(repeats",
        targets=_targets(signal, [ids[0]] * 3 + ids[3:]),
    )
    fails(
        "2 stimulus ids are not in .*'ghost1.png'",
        targets=_targets(signal, ids[:-2] + ["ghost0.png", "ghost1.png"]),
    )
    fails("cv 31 is larger than the 30 stimuli", cv=31)
    fails("cv 4 is larger than the 3 groups", cv=4, groups="label")
    bad = signal.copy()
    bad[4, 1] = np.nan
    fails("target 1 has 1 non-finite", targets=_targets(bad, ids))
    fails("alphas must be finite and > 0; got 0", alphas=[1.0, 0.0])
    fails("alphas must be finite and > 0; got -1", alphas=[-1.0])
    fails("groups 'nope' is not a coordinate", groups="nope")
    with pytest.raises(UserError, match="layer 'nope' is not in") as e:
        encode(store, "nope", targets=_targets(signal, ids))
    _one_line(e)

    csv = tmp_path / "dup.csv"
    csv.write_text("stimulus_id,repeat,v\na,0,1\na,0,2\nb,0,3\n")
    with pytest.raises(
        UserError, match=r"1 \(stimulus_id, repeat\) pairs on more than one row, e.g. 'a repeat 0'"
    ) as e:
        load_targets(csv)
    _one_line(e)
    csv.write_text("stimulus_id,v,w\na,1,inf\nb,2,3\n")
    with pytest.raises(UserError, match="target w has 1 non-finite") as e:
        load_targets(csv)
    _one_line(e)


def test_the_torch_lines_the_cuda_path_runs_give_the_numpy_results(monkeypatch):
    """The CUDA path is the same code on torch tensors: run it on CPU tensors (float64), so its
    every call is checked here on machines without a GPU."""
    torch = pytest.importorskip("torch")
    from bonnerlab.analysis import encoding

    def to_device(a):
        return torch.as_tensor(np.ascontiguousarray(a))

    x, y = _regression(n=50, p=70, t=9, seed=2)
    folds = make_folds(len(x), 3, seed=0)
    expected = kernel_ridge_cv(x @ x.T, y, folds, ALPHAS, block=4)
    monkeypatch.setattr(encoding, "_backend", lambda device: (torch, to_device, torch.Tensor.numpy))
    got = kernel_ridge_cv(x @ x.T, y, folds, ALPHAS, device="cuda", block=4)
    np.testing.assert_array_equal(got.alpha_index, expected.alpha_index)
    np.testing.assert_allclose(got.prediction, expected.prediction, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.loo_mse, expected.loo_mse, rtol=1e-10)


def test_scores_over_more_targets_than_a_block_equal_scipy_and_sklearn(monkeypatch):
    # pearson and r2 go a block of columns at a time (memory): the blocks' seams change nothing
    from scipy.stats import pearsonr

    import bonnerlab.analysis.encoding as encoding

    monkeypatch.setattr(encoding, "BLOCK_ELEMENTS", 40 * 7)  # 7 columns a block at 40 rows
    rng = np.random.default_rng(3)
    y = rng.standard_normal((40, 30))
    p = y + rng.standard_normal(y.shape)
    p[:, 13] = 1.0  # a constant prediction: NaN r, as pearsonr's undefined one
    r = pearson(y, p)
    expected = [pearsonr(y[:, i], p[:, i])[0] if i != 13 else np.nan for i in range(30)]
    np.testing.assert_allclose(r, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r2_score(y, p), sklearn_r2(y, p, multioutput="raw_values"))
