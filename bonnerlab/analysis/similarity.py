"""Similarity analyses from a layer's Gram: `rdm`, `rsa`, `cka`, `spectrum`.

Each takes a store path and layer (streamed once through `layer_gram`, then cached), a
`(store, layer)` pair, or a `Gram`; results are xarray objects with the stimulus coordinates and
provenance attributes (store, fingerprint, layer, metric, versions), all netCDF-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.analysis.gram import Gram, layer_gram, versions
from bonnerlab.errors import AnalysisError, ConfigError

METRICS = ("correlation", "euclidean", "cosine")
METHODS = ("spearman", "kendall", "pearson")
PRESENTATION = "presentation"

Source = str | Path | tuple[str | Path, str] | Gram


def as_gram(source: Source, layer: str | None = None, **options: Any) -> Gram:
    """A Gram from a store path and layer, a (store, layer) pair, or a Gram as it is; `options`
    go to `layer_gram` (device, memory_gb, cache, progress)."""
    if isinstance(source, Gram):
        return source
    if isinstance(source, tuple):
        source, layer = source
    if layer is None:
        raise ConfigError(f"name the layer of {source} to analyse (layer=...)")
    return layer_gram(source, layer, **options)


def _provenance(g: Gram, **extra: Any) -> dict[str, Any]:
    keep = ("store", "fingerprint", "layer", "n_features")
    return {
        **{k: g.attrs[k] for k in keep if k in g.attrs},
        "n_features": g.n_features,
        **extra,
        "versions": g.attrs.get("versions") or versions(),
    }


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


# ----------------------------------------------------------------------------- RDM


def rdm(source: Source, layer: str | None = None, metric: str = "correlation", **options: Any):
    """The stimulus x stimulus dissimilarity matrix, as rsatoolbox defines its metrics:
    `correlation` 1 - Pearson r between the stimuli's feature vectors (each centered over its
    own features: the row sums give the means); `euclidean` the squared Euclidean distance per
    feature (rsatoolbox's `calc_rdm(method="euclidean")`); `cosine` 1 - cosine similarity.
    Returns a DataArray (presentation, presentation_) with `stimulus`/`stimulus_` coords."""
    import xarray as xr

    _choice(metric, METRICS, "metric")
    g = as_gram(source, layer, **options)
    p = g.n_features
    # one n x n array worked in place (at n = 5,000 each is 200 MB, beside the Gram's own)
    if metric == "correlation":
        d = np.multiply.outer(g.sums, g.sums / -p)
        d += g.gram
    else:
        d = g.gram.copy()
    sq = np.diag(d).copy()
    if metric == "euclidean":
        d *= -2.0
        d += sq[:, None]
        d += sq[None, :]
        d /= p
        np.maximum(d, 0.0, out=d)  # cancellation leaves tiny negatives for near-equal stimuli
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.sqrt(sq)
            d *= inv[:, None]
            d *= inv[None, :]
        np.subtract(1.0, d, out=d)
    np.fill_diagonal(d, 0.0)
    coords = {"stimulus": (PRESENTATION, g.stimulus), "stimulus_": (f"{PRESENTATION}_", g.stimulus)}
    for name, values in g.coords.items():
        coords[name] = (PRESENTATION, values)
        coords[f"{name}_"] = (f"{PRESENTATION}_", values)
    return xr.DataArray(
        d,
        dims=(PRESENTATION, f"{PRESENTATION}_"),
        coords=coords,
        name="rdm",
        attrs=_provenance(g, metric=metric),
    )


# ----------------------------------------------------------------------------- RSA


def _as_rdm(value: Any, metric: str, **options: Any):
    import xarray as xr

    if isinstance(value, xr.DataArray):
        return value
    if isinstance(value, str | Path) and Path(value).suffix in (".nc", ".netcdf"):
        return xr.load_dataarray(value)
    return rdm(value, metric=metric, **options)


def _upper(d: np.ndarray) -> np.ndarray:
    return d[np.triu_indices(len(d), k=1)]


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def _tau_a(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-a (ties count neither way; rsatoolbox's choice for RDMs, Nili et al. 2014)
    in O(m log m): scipy's tau-b times its tie correction gives (concordant - discordant)."""
    from scipy.stats import kendalltau

    m = len(x)
    pairs = m * (m - 1) / 2

    def tied(v: np.ndarray) -> float:
        counts = np.unique(v, return_counts=True)[1].astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    tau_b = kendalltau(x, y).statistic
    if not np.isfinite(tau_b):
        return float("nan")
    return float(tau_b * np.sqrt((pairs - tied(x)) * (pairs - tied(y))) / pairs)


def _compare(x: np.ndarray, y: np.ndarray, method: str) -> float:
    if method == "pearson":
        return _pearson(x, y)
    if method == "spearman":
        return _pearson(_ranks(x), _ranks(y))
    return _tau_a(x, y)


def shared_stimuli(a: np.ndarray, b: np.ndarray, what: str) -> list[str]:
    """The stimuli in both, in `a`'s order; none shared is one line naming a few of each."""
    in_b = set(b.tolist())
    shared = [s for s in a.tolist() if s in in_b]
    if len(shared) < 3:
        raise AnalysisError(
            f"{what}: {len(shared)} shared stimuli (need at least 3); first of one: "
            f"{', '.join(map(repr, a[:2].tolist()))}, of the other: "
            f"{', '.join(map(repr, b[:2].tolist()))}"
        )
    return shared


def rsa(
    a: Any,
    b: Any,
    method: str = "spearman",
    *,
    bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    metric: str = "correlation",
    **options: Any,
):
    """How alike two RDMs are: `spearman`, `kendall` (tau-a) or `pearson` over their upper
    triangles, on the stimuli both hold (aligned by id, any order). `a`/`b`: an RDM, an RDM file
    (.nc), or a source for `rdm` with `metric`. `bootstrap` resamples stimuli (pairs of a
    stimulus with its own copy are left out, as rsatoolbox does) for a percentile CI.
    Returns a scalar DataArray; attrs hold the CI, the bootstrap's std and provenance."""
    import xarray as xr

    _choice(method, METHODS, "method")
    ra, rb = _as_rdm(a, metric, **options), _as_rdm(b, metric, **options)
    ids_a, ids_b = ra["stimulus"].values.astype(str), rb["stimulus"].values.astype(str)
    shared = shared_stimuli(ids_a, ids_b, "RSA")
    da = _aligned(ra, ids_a, shared)
    db = _aligned(rb, ids_b, shared)
    value = _compare(_upper(da), _upper(db), method)
    attrs: dict[str, Any] = {
        "method": method,
        "n_stimuli": len(shared),
        **{f"a_{k}": v for k, v in ra.attrs.items() if k in ("store", "layer", "metric")},
        **{f"b_{k}": v for k, v in rb.attrs.items() if k in ("store", "layer", "metric")},
        "versions": versions(),
    }
    if bootstrap:
        samples = _bootstrap(da, db, method, bootstrap, seed)
        lo, hi = np.nanquantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
        attrs.update(
            bootstrap=bootstrap,
            ci=ci,
            ci_low=float(lo),
            ci_high=float(hi),
            bootstrap_std=float(np.nanstd(samples, ddof=1)),
            seed=seed,
        )
    return xr.DataArray(value, name="rsa", attrs=attrs)


def _aligned(r, ids: np.ndarray, shared: list[str]) -> np.ndarray:
    position = {s: i for i, s in enumerate(ids.tolist())}
    idx = np.asarray([position[s] for s in shared])
    return np.asarray(r.values, dtype=np.float64)[np.ix_(idx, idx)]


def _bootstrap(da: np.ndarray, db: np.ndarray, method: str, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(da)
    iu = np.triu_indices(n, k=1)
    out = np.empty(n_boot)
    for k in range(n_boot):
        idx = np.sort(rng.integers(0, n, n))
        i, j = idx[iu[0]], idx[iu[1]]
        distinct = i != j
        out[k] = _compare(da[i[distinct], j[distinct]], db[i[distinct], j[distinct]], method)
    return out


# ----------------------------------------------------------------------------- CKA


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the paper's names)
    """Song et al. (2012)'s unbiased HSIC: the kernels with zeroed diagonals."""
    n = len(k)
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ks, ls = k.sum(axis=0), l.sum(axis=0)
    trace = float((k * l).sum())
    return (trace + ks.sum() * ls.sum() / ((n - 1) * (n - 2)) - 2 * (ks @ ls) / (n - 2)) / (
        n * (n - 3)
    )


def cka(a: Source, b: Source, debiased: bool = False, **options: Any):
    """Linear CKA (Kornblith et al. 2019) between two layers over the stimuli both hold (aligned
    by id): <Kc, Lc>_F / (||Kc||_F ||Lc||_F) with Kc, Lc the centered Grams, which equals the
    feature-space ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) without forming p x p
    products. `debiased` uses the unbiased HSIC estimator (needs 4 stimuli or more)."""
    import xarray as xr

    ga, gb = as_gram(a, **options), as_gram(b, **options)
    shared = shared_stimuli(ga.stimulus, gb.stimulus, "CKA")
    ga, gb = ga.select(shared), gb.select(shared)
    k, l = ga.centered(), gb.centered()  # noqa: E741
    if debiased:
        if len(shared) < 4:
            raise AnalysisError(f"debiased CKA needs at least 4 shared stimuli; {len(shared)}")
        value = _hsic_unbiased(k, l) / np.sqrt(_hsic_unbiased(k, k) * _hsic_unbiased(l, l))
    else:
        value = float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))
    attrs = {
        "debiased": int(debiased),
        "n_stimuli": len(shared),
        **{f"a_{key}": v for key, v in _provenance(ga).items() if key != "versions"},
        **{f"b_{key}": v for key, v in _provenance(gb).items() if key != "versions"},
        "versions": versions(),
    }
    return xr.DataArray(float(value), name="cka", attrs=attrs)


# ----------------------------------------------------------------------------- spectrum


def spectrum(
    source: Source,
    layer: str | None = None,
    fit_range: tuple[int, int] | None = None,
    **options: Any,
):
    """PCA of a layer from its centered Gram: eigenvalues of Xc Xc^T / (n - 1) are the nonzero
    eigenvalues of the feature covariance (min(n - 1, p) of them). Also the effective
    dimensionality (participation ratio (sum l)^2 / sum l^2) and the power-law exponent alpha
    (l_k ~ k^-alpha) fitted by least squares on log-log over ranks `fit_range` (1-based,
    inclusive; default: 1 to half the nonzero eigenvalues, since the tail bends down with
    finite samples). Returns a Dataset: eigenvalues (component), effective_dim, alpha."""
    import xarray as xr

    g = as_gram(source, layer, **options)
    n = g.n
    if n < 2:
        raise AnalysisError(f"a spectrum needs at least 2 stimuli; {n}")
    eig = np.linalg.eigvalsh(g.centered() / (n - 1))[::-1]
    eig = np.clip(eig[: min(n - 1, g.n_features)], 0.0, None)
    positive = int((eig > eig[0] * 1e-12).sum()) if eig[0] > 0 else 0
    lo, hi = fit_range or (1, max(2, positive // 2))
    if not 1 <= lo < hi <= positive:
        raise ConfigError(
            f"fit_range ({lo}, {hi}) must lie within ranks 1..{positive} (nonzero eigenvalues)"
        )
    ranks = np.arange(lo, hi + 1)
    slope = np.polyfit(np.log(ranks), np.log(eig[lo - 1 : hi]), 1)[0]
    effective = float(eig.sum() ** 2 / (eig**2).sum()) if positive else 0.0
    attrs = _provenance(g, fit_range=[lo, hi], n_stimuli=n)
    return xr.Dataset(
        {
            "eigenvalues": ("component", eig),
            "effective_dim": ((), effective),
            "alpha": ((), float(-slope)),
        },
        coords={"component": np.arange(1, len(eig) + 1)},
        attrs=attrs,
    )
