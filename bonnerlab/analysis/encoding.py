"""Encoding models: cross-validated ridge regression from a layer to many targets, in the dual
form from the layer's Gram (`encode`; the core `kernel_ridge_cv` takes K = X X^T and Y).

Why the dual form: with n stimuli and p features (p >> n for most layers), every quantity ridge
needs is a function of the n x n kernel, so the features are never read again after the Gram
and no p x p (or p x targets) product is ever formed; a ViT-L x 52k-voxel coefficient matrix
(62 GB in the primal form) is never materialised.

The math, per outer fold (training rows T, test rows S, all float64):
- The intercept is unpenalised, so the features are centred with the TRAINING means:
  Kc = H K_TT H (H = I - 11^T/n), the test kernel Kc_ST = K_ST - rowmean(K_ST) - colmean(K_TT)
  + mean(K_TT): exactly Xc_S Xc_T^T with the training means removed from both, and targets
  centred with their training means, which come back as the intercept.
- ONE eigendecomposition Kc = Q diag(l) Q^T (l clipped at 0); for every alpha and every
  target, the dual coefficients c = Q diag(1/(l+alpha)) Q^T yc.
- The alpha is chosen PER TARGET by efficient leave-one-out inside the training fold. The
  hat matrix of ridge with an unpenalised intercept is S = 11^T/n + Kc G^-1 (G = Kc + alpha I),
  so the exact LOO residual of row i is e_i / (1 - S_ii) = c_i / (G^-1_ii - (G^-1 1)_i / n):
  the intercept is refitted without row i (centring the features again without row i would be
  the same model, an unpenalised intercept absorbs it). This is scikit-learn's `_RidgeGCV`
  "gram" mode with fit_intercept=True; the score is the mean squared LOO residual, ties going
  to the earlier alpha in the order given, as RidgeCV(alpha_per_target=True) does.
- The held-out prediction of each target with its own alpha: Kc_ST Q diag(1/(l+alpha_t)) Q^T
  yc_t + mean_T(y_t), all targets in one product.
Scores: Pearson r and R^2 per target over the concatenated held-out predictions (every
stimulus predicted once, by the fold that held it out), and per fold as well.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.analysis.gram import Gram, gpu_may_be_present, layer_gram, versions
from bonnerlab.analysis.targets import (
    PRESENTATION,
    as_targets,
    average_repeats,
    load_targets,
    unknown_ids,
)
from bonnerlab.errors import AnalysisError, ConfigError, UserError

DEFAULT_ALPHAS = tuple(np.logspace(-2, 6, 9).tolist())
# training rows x targets per block: ~32 MB per float64 temporary (a block has about six;
# at 2**24, 128 MB each, they were a quarter of encode's peak at 10,000 targets)
BLOCK_ELEMENTS = 2**22


@dataclass
class RidgeCV:
    """What the core computes: held-out predictions and the alpha each fold chose per target."""

    prediction: np.ndarray  # (n, t): each row predicted by the fold that held it out
    alpha_index: np.ndarray  # (folds, t) int: index into alphas
    loo_mse: np.ndarray  # (folds, t): the chosen alpha's mean squared LOO residual


def check_alphas(alphas: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ridge penalties as a float64 vector: at least one, all finite and > 0 (alpha 0 is an
    unregularised, usually singular, fit in the dual form)."""
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0:
        raise ConfigError("alphas must list at least one ridge penalty")
    bad = a[~(np.isfinite(a) & (a > 0))]
    if bad.size:
        raise ConfigError(f"alphas must be finite and > 0; got {bad[0]:g}")
    return a


def make_folds(
    n: int, cv: int, groups: np.ndarray | None = None, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays: scikit-learn's GroupKFold(cv) over `groups` (no group on
    both sides), else KFold(cv, shuffle=True, random_state=seed). Refuses cv the data cannot
    hold, in one line."""
    from sklearn.model_selection import GroupKFold, KFold

    if not isinstance(cv, int | np.integer) or cv < 2:
        raise ConfigError(f"cv must be an integer >= 2; got {cv!r}")
    if cv > n:
        raise AnalysisError(f"cv {cv} is larger than the {n} stimuli with targets")
    index = np.arange(n)
    if groups is None:
        splits = KFold(n_splits=int(cv), shuffle=True, random_state=seed).split(index)
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise AnalysisError(f"groups has {len(groups)} entries for {n} stimuli")
        n_groups = len(np.unique(groups))
        if cv > n_groups:
            raise AnalysisError(f"cv {cv} is larger than the {n_groups} groups")
        splits = GroupKFold(n_splits=int(cv)).split(index, groups=groups)
    return [(np.asarray(tr), np.asarray(te)) for tr, te in splits]


# ----------------------------------------------------------------------------- the core


def kernel_ridge_cv(
    K: np.ndarray,
    Y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    alphas: Sequence[float] | np.ndarray,
    *,
    device: str = "cpu",
    block: int | None = None,
) -> RidgeCV:
    """Cross-validated ridge with an intercept and a per-target alpha from the kernel
    K = X X^T (raw, uncentred: n x n) and targets Y (n x t); see the module docstring.

    `device` "cpu" runs numpy; "cuda[:k]" (or "auto" with a GPU) runs the same lines in torch,
    float64 on the GPU. Targets go `block` at a time (default: ~128 MB per temporary) so memory
    stays bounded at many targets.
    """
    alphas = check_alphas(alphas)
    K = np.asarray(K, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if K.shape != (len(Y), len(Y)):
        raise AnalysisError(f"kernel {K.shape} and targets {Y.shape} disagree on the stimuli")
    xp, to_device, to_numpy = _backend(device)
    Kd, Yd, ad = to_device(K), to_device(Y), to_device(alphas)
    t = Y.shape[1]
    pred = np.empty_like(Y)
    alpha_index = np.empty((len(folds), t), dtype=np.int64)
    loo_mse = np.empty((len(folds), t))
    for f, (train, test) in enumerate(folds):
        tr, te = to_device(np.asarray(train, np.int64)), to_device(np.asarray(test, np.int64))
        n_tr = len(train)
        step = block or max(1, BLOCK_ELEMENTS // n_tr)
        fold = _fold_setup(xp, Kd, tr, te, ad)
        for a in range(0, t, step):
            cols = slice(a, min(a + step, t))
            p, best, mse = _fold_targets(xp, fold, Yd[:, cols][tr], ad)
            pred[test, cols] = to_numpy(p)
            alpha_index[f, cols] = to_numpy(best)
            loo_mse[f, cols] = to_numpy(mse)
    return RidgeCV(pred, alpha_index, loo_mse)


@dataclass
class _Fold:
    Q: Any  # (n_tr, n_tr) eigenvectors of the centred training kernel
    D: Any  # (n_tr, alphas): 1 / (eigenvalue + alpha)
    d: Any  # (n_tr, alphas): diagonal of I - S, the LOO denominators
    M: Any  # (n_te, n_tr): centred test kernel times Q


def _fold_setup(xp: Any, K: Any, tr: Any, te: Any, alphas: Any) -> _Fold:
    """Everything a fold needs that does not depend on the targets: one eigendecomposition."""
    # in place, one (n_tr, n_tr) at a time: at n = 5,000 each is 128 MB, and the fold's
    # temporaries were the peak of encode
    kc = K[tr[:, None], tr[None, :]]
    col = kc.mean(0)
    total = col.mean()
    kc_te = K[te[:, None], tr[None, :]]
    kc_te -= kc_te.mean(1)[:, None]
    kc_te -= col[None, :]
    kc_te += total
    kc -= col[:, None]
    kc -= col[None, :]
    kc += total
    # eigh reads one triangle (numpy's and torch's: the lower), so kc's round-off asymmetry
    # needs no (kc + kc.T) / 2
    lam, Q = xp.linalg.eigh(kc)
    del kc
    lam = lam.clip(min=0)  # round-off below zero (the constant vector is a 0-eigenvector)
    D = 1.0 / (lam[:, None] + alphas[None, :])
    ones = Q.sum(0)  # Q^T 1
    d = (Q * Q) @ D - (Q @ (D * ones[:, None])) / len(lam)
    return _Fold(Q, D, d, kc_te @ Q)


def _fold_targets(xp: Any, fold: _Fold, y_tr: Any, alphas: Any) -> tuple[Any, Any, Any]:
    """Held-out predictions, chosen alpha index and its LOO MSE for one block of targets."""
    mean = y_tr.mean(0)
    qty = fold.Q.T @ (y_tr - mean[None, :])
    scores = []
    for i in range(len(alphas)):
        c = fold.Q @ (fold.D[:, i : i + 1] * qty)
        scores.append(((c / fold.d[:, i : i + 1]) ** 2).mean(0))
    mse = xp.stack(scores)  # (alphas, targets)
    best = mse.argmin(0)  # the first of equal scores, as RidgeCV's strict `>` update
    pred = fold.M @ (fold.D[:, best] * qty) + mean[None, :]
    return pred, best, xp.amin(mse, 0)


def _backend(device: str):
    """numpy on the CPU; torch (float64) on CUDA, imported only when it may be used."""
    cpu = (np, lambda a: np.asarray(a), lambda a: np.asarray(a))
    if device == "cpu" or (device == "auto" and not gpu_may_be_present()):
        return cpu
    if importlib.util.find_spec("torch") is None:
        if device == "auto":
            return cpu
        raise UserError(f"device {device!r} needs torch, which is not installed; use cpu")
    import torch

    from bonnerlab.distributed import use_device

    dev = use_device(device)
    if dev.type == "cpu":
        return cpu

    def to_device(a: np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(a), device=dev)

    return torch, to_device, lambda a: a.detach().cpu().numpy()


# ----------------------------------------------------------------------------- scores


def _by_columns(score):
    """`score(y, p)` a block of columns at a time: its centred copies stay ~32 MB each, not
    three n x targets temporaries (1.2 GB at 5,000 x 10,000, encode's peak)."""

    @functools.wraps(score)
    def scored(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        step = max(1, BLOCK_ELEMENTS // max(1, len(y)))
        if y.ndim < 2 or y.shape[1] <= step:
            return score(y, p)
        return np.concatenate(
            [score(y[:, a : a + step], p[:, a : a + step]) for a in range(0, y.shape[1], step)]
        )

    return scored


@_by_columns
def pearson(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-column Pearson r (NaN for a constant column)."""
    yc, pc = y - y.mean(0), p - p.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (yc * pc).sum(0) / np.sqrt((yc**2).sum(0) * (pc**2).sum(0))


@_by_columns
def r2_score(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-column R^2 = 1 - SSE / SS about the column's mean (scikit-learn's r2_score)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - ((y - p) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def split_half_reliability(
    y: np.ndarray, stimulus_row: np.ndarray, splits: int = 20, seed: int = 0
) -> np.ndarray:
    """Per target, the Spearman-Brown corrected split-half correlation: the repeats of each
    stimulus (rows of `y` with the same `stimulus_row`, at least 2) split at random into two
    halves, the half means correlated over stimuli, averaged over `splits` splits, then
    rho = 2 r / (1 + r): the reliability of the mean over all repeats (for unequal repeat
    counts, approximately). NaN where fewer than 3 stimuli have two repeats."""
    rows = np.asarray(stimulus_row)
    counts = np.bincount(rows)
    keep = counts[rows] >= 2
    y, rows = y[keep], rows[keep]
    _, rows = np.unique(rows, return_inverse=True)
    m = rows.max() + 1 if len(rows) else 0
    if m < 3:
        return np.full(y.shape[1], np.nan)
    rng = np.random.default_rng(seed)
    counts = np.bincount(rows)
    rs = []
    for _ in range(splits):
        order = np.lexsort((rng.random(len(rows)), rows))  # rows grouped, shuffled within
        start = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank = np.empty(len(rows), np.int64)
        rank[order] = np.arange(len(rows)) - np.repeat(start, counts)
        first = rank < counts[rows] // 2
        halves = []
        for side in (first, ~first):
            s = np.zeros((m, y.shape[1]))
            np.add.at(s, rows[side], y[side])
            halves.append(s / np.bincount(rows[side], minlength=m)[:, None])
        rs.append(pearson(halves[0], halves[1]))
    r = np.mean(rs, axis=0)
    return 2 * r / (1 + r)


# ----------------------------------------------------------------------------- the API


def encode(
    source: str | Path | Gram,
    layer: str | None = None,
    *,
    targets: Any,
    cv: int = 5,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    groups: str | Sequence[Any] | np.ndarray | None = None,
    seed: int = 0,
    device: str = "auto",
    predictions: bool = False,
    memory_gb: float = 1.0,
    cache: bool = True,
    progress: bool = False,
):
    """Cross-validated ridge from a layer (a store and layer, or a Gram) to `targets` (a path for
    `load_targets`, or a DataArray in its layout), as an xarray Dataset.

    Targets are aligned to the store by stimulus id: ids the store lacks are refused (one line,
    before the layer is streamed); store stimuli without targets are left out (counted in the
    attrs). Repeats are averaged before fitting; with repeats, a split-half noise ceiling.
    `groups`: a coordinate name (of the targets, else of the store, e.g. "label") or an array
    with one entry per stimulus of the store in its order; folds never split a group.
    Variables: r, r2 (neuroid; over the concatenated held-out predictions), r_fold, r2_fold,
    alpha (fold, neuroid); with repeats also reliability (Spearman-Brown split-half),
    noise_ceiling = sqrt(reliability) (the r of a perfect model with the repeat mean),
    r_normalized = r / noise_ceiling and r2_normalized = r2 / reliability; `predictions=True`
    adds the held-out predictions (presentation, neuroid).
    """
    alphas = check_alphas(alphas)
    if not isinstance(cv, int | np.integer) or cv < 2:
        raise ConfigError(f"cv must be an integer >= 2; got {cv!r}")
    what = str(targets) if isinstance(targets, str | Path) else "targets"
    da = load_targets(targets) if isinstance(targets, str | Path) else as_targets(targets)
    stimuli, y, counts = average_repeats(da)
    store_ids = _store_stimuli(source, layer)
    where = f"{source}" if not isinstance(source, Gram) else source.attrs.get("store", "the Gram")
    unknown_ids(stimuli, store_ids, what, where)
    group_values = _groups(groups, da, stimuli, source, layer, store_ids)
    folds = make_folds(len(stimuli), int(cv), group_values, seed)  # checks cv before streaming
    gram = (
        source
        if isinstance(source, Gram)
        else _layer_gram(source, layer, device, memory_gb, cache, progress)
    )
    K = gram.select(list(stimuli)).gram
    # the fit needs only K and the results only the Gram's provenance: its own n x n (a copy
    # when targets reorder or drop stimuli) goes now, unless the caller holds it
    attrs, n_features = gram.attrs, gram.n_features
    del gram
    fit = kernel_ridge_cv(K, y, folds, alphas, device=device)
    return _dataset(
        da,
        stimuli,
        y,
        counts,
        fit,
        folds,
        alphas,
        attrs,
        n_features,
        groups,
        cv,
        seed,
        device,
        predictions,
        n_store=len(store_ids),
    )


def _store_stimuli(source: str | Path | Gram, layer: str | None) -> np.ndarray:
    """The source's stimulus ids, without streaming (the store's lazy reader)."""
    if isinstance(source, Gram):
        return np.asarray(source.stimulus).astype(str)
    if layer is None:
        raise ConfigError(f"name the layer of {source} to encode from (layer=...)")
    from bonnerlab.activations import open_activations

    return np.asarray(open_activations(source, layer)["stimulus"].values).astype(str)


def _layer_gram(source, layer, device, memory_gb, cache, progress) -> Gram:
    return layer_gram(
        source, layer, device=device, memory_gb=memory_gb, cache=cache, progress=progress
    )


def _groups(groups, da, stimuli, source, layer, store_ids) -> np.ndarray | None:
    """One group per target stimulus (in `stimuli` order), from a coordinate or an array."""
    if groups is None:
        return None
    if isinstance(groups, str):
        if groups in da.coords and da[groups].dims == (PRESENTATION,):
            first = {}
            for s, g in zip(
                np.asarray(da["stimulus"].values).astype(str),
                np.asarray(da[groups].values),
                strict=True,
            ):
                first.setdefault(s, g)
            return np.asarray([first[s] for s in stimuli])
        coords = _store_coords(source, layer)
        if groups not in coords:
            raise ConfigError(
                f"groups {groups!r} is not a coordinate of the targets or the store "
                f"(store has: {', '.join(sorted(coords)) or 'none'})"
            )
        values = coords[groups]
    else:
        values = np.asarray(groups)
        if len(values) != len(store_ids):
            raise AnalysisError(
                f"groups has {len(values)} entries; give one per stimulus of the store "
                f"({len(store_ids)}), in its order"
            )
    position = {s: i for i, s in enumerate(store_ids.tolist())}
    return np.asarray(values)[[position[s] for s in stimuli]]


def _store_coords(source, layer) -> dict[str, np.ndarray]:
    if isinstance(source, Gram):
        return dict(source.coords)
    from bonnerlab.activations import open_activations

    da = open_activations(source, layer)
    return {
        name: np.asarray(c.values)
        for name, c in da.coords.items()
        if name != "stimulus" and c.dims == (PRESENTATION,)
    }


def _dataset(
    da,
    stimuli,
    y,
    counts,
    fit,
    folds,
    alphas,
    gram_attrs,
    n_features,
    groups,
    cv,
    seed,
    device,
    predictions,
    n_store,
):
    import xarray as xr

    neuroid_coords = {name: c for name, c in da.coords.items() if c.dims == ("neuroid",)}
    fold_ids = np.arange(len(folds))
    pred = fit.prediction
    r_fold = np.stack([pearson(y[te], pred[te]) for _, te in folds])
    r2_fold = np.stack([r2_score(y[te], pred[te]) for _, te in folds])
    per = ("neuroid",)
    per_fold = ("fold", "neuroid")
    data = {
        "r": (per, pearson(y, pred)),
        "r2": (per, r2_score(y, pred)),
        "r_fold": (per_fold, r_fold),
        "r2_fold": (per_fold, r2_fold),
        "alpha": (per_fold, alphas[fit.alpha_index]),
        "loo_mse": (per_fold, fit.loo_mse),
    }
    if (counts >= 2).sum() >= 3:
        row = {s: i for i, s in enumerate(stimuli.tolist())}
        stimulus_row = np.asarray([row[s] for s in np.asarray(da["stimulus"].values).astype(str)])
        rel = split_half_reliability(np.asarray(da.values), stimulus_row, seed=seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            ceiling = np.where(rel > 0, np.sqrt(np.clip(rel, 0, None)), np.nan)
            data["reliability"] = (per, rel)
            data["noise_ceiling"] = (per, ceiling)
            data["r_normalized"] = (per, data["r"][1] / ceiling)
            data["r2_normalized"] = (per, np.where(rel > 0, data["r2"][1] / rel, np.nan))
    coords: dict[str, Any] = {**neuroid_coords, "fold": fold_ids}
    if predictions:
        data["prediction"] = ((PRESENTATION, "neuroid"), pred)
        coords["stimulus"] = (PRESENTATION, stimuli.astype(str))
    how = (
        f"GroupKFold({cv}) by {groups if isinstance(groups, str) else 'the groups given'}"
        if groups is not None
        else f"KFold({cv}, shuffle=True, random_state={seed})"
    )
    attrs = {
        **{k: gram_attrs[k] for k in ("store", "fingerprint", "layer") if k in gram_attrs},
        "n_features": n_features,
        "analysis": "encoding: dual-form ridge, intercept, per-target alpha by efficient LOO",
        "folds": how,
        "cv": int(cv),
        "fold_sizes": [len(te) for _, te in folds],
        "alphas": alphas.tolist(),
        "seed": int(seed),
        "n_stimuli": len(stimuli),
        "stimuli_without_targets": int(n_store - len(stimuli)),
        "repeats_max": int(counts.max()),
        "scores": "r, r2 over the concatenated held-out predictions; r_fold, r2_fold per fold",
        "device": str(device),
        "versions": gram_attrs.get("versions") or versions(),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)
