"""The analysis job: `analyze(cfg)` runs the asked analyses on each layer of a store and writes
an analysis folder (jobs/analyze.py parses; the launcher sends one array task per layer).

    analysis/<name>/
      results.nc      one xarray Dataset over every layer analysed so far (a `layer` dim)
      summary.json    one record per layer (effective dim, RSA, CKA, encoding r), the config
      rdm-<layer>.png, spectra.png, encoding.png, similarity.png
      report.html     self-contained: the table and every PNG inlined
      layers/         one .nc and .json per layer: what each task of an array wrote

Every input is checked before any layer is streamed. Each layer's Gram is read once (and
cached beside the store, so a rerun reads no features); every analysis of the layer comes from
it. A task writes its own layer's part, then rebuilds the folder's files from all the parts
present, under a lock, so the tasks of a per-layer array fill one folder.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from bonnerlab.activations import store_info
from bonnerlab.config import AnalyzeConfig, default_output, expand_layers, to_dict
from bonnerlab.errors import ConfigError, StoreError
from bonnerlab.runs import atomic_write_text, save_figure

# fields that change how a result is computed, not which layers: parts made with other values
# are stale (a rerun with another metric) and are dropped when the folder is rebuilt
NOT_IN_KEY = ("layers", "device", "memory_gb", "cache", "progress", "output")


@dataclass
class Inputs:
    """What the checks found, so the per-layer loop only computes."""

    layers: list[str]
    fingerprint: str
    n_stimuli: int
    rsa_other: dict[str, Any]  # layer -> what rsa compares it with
    cka_other: dict[str, Any]  # layer -> (store, layer)
    targets: Any  # the loaded targets, or None


def analyze(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Check everything, then per layer: its Gram, then each asked analysis; returns the
    summary (also written to summary.json)."""
    t0 = time.perf_counter()
    inputs = check_inputs(cfg)
    out = Path(default_output(cfg))
    parts = out / "layers"
    parts.mkdir(parents=True, exist_ok=True)
    key = config_key(cfg, inputs.fingerprint)
    for layer in _progress(inputs.layers, cfg.progress and len(inputs.layers) > 1):
        ds, record = analyze_layer(cfg, inputs, layer)
        ds.attrs["config_key"] = key
        record["config_key"] = key
        _atomic_netcdf(ds, parts / f"{_safe(layer)}.nc")
        atomic_write_text(parts / f"{_safe(layer)}.json", json.dumps(record, indent=2))
    with _locked(out / ".lock"):
        summary = rebuild(out, cfg, key)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# ----------------------------------------------------------------------------- checks


def _store_meta(path: str, what: str) -> dict[str, Any]:
    info = store_info(path)  # a missing path or a non-store: one StoreError line
    if not info.get("complete"):
        raise StoreError(
            f"{what} {path} is not complete (an extraction still running, or unfinalized: "
            f"python -m bonnerlab.activations finalize {path})"
        )
    return info


def _other_layer(path: str, layer: str, given: str, flag: str) -> tuple[str, str]:
    """The (store, layer) a layer is compared with: `given`, else the same name."""
    other = given or layer
    stored = list(_store_meta(path, f"--{flag} store")["layers"])
    if other not in stored:
        raise StoreError(
            f"--{flag} store {path} has no layer {other!r}"
            + ("" if given else f" (the name of the layer analysed; pick one: --{flag}_layer)")
            + f"; it holds: {', '.join(stored[:8])}"
        )
    return path, other


def _is_store(path: str) -> bool:
    return (Path(path) / "zarr.json").is_file()


def check_inputs(cfg: AnalyzeConfig) -> Inputs:
    """Every one-line refusal before any layer is streamed."""
    info = _store_meta(cfg.store, "store")
    layers = expand_layers(cfg.layers, list(info["layers"]), cfg.store)
    n = len(info.get("stimuli", [])) or _n_stimuli(cfg.store, layers[0])
    rsa_other: dict[str, Any] = {}
    if cfg.rsa:
        if _is_store(cfg.rsa):
            rsa_other = {la: _other_layer(cfg.rsa, la, cfg.rsa_layer, "rsa") for la in layers}
        elif Path(cfg.rsa).is_file():
            rsa_other = dict.fromkeys(layers, cfg.rsa)
        else:
            raise ConfigError(f"rsa {cfg.rsa}: neither an activation store nor an RDM file")
    cka_other: dict[str, Any] = {}
    if cfg.cka:
        if not _is_store(cfg.cka):
            raise StoreError(f"cka {cfg.cka} is not an activation store")
        cka_other = {la: _other_layer(cfg.cka, la, cfg.cka_layer, "cka") for la in layers}
    targets = _check_targets(cfg, layers[0], n) if cfg.encode else None
    return Inputs(layers, info["fingerprint"], n, rsa_other, cka_other, targets)


def _n_stimuli(store: str, layer: str) -> int:
    from bonnerlab.activations import open_activations

    return int(open_activations(store, layer).sizes["presentation"])


def _check_targets(cfg: AnalyzeConfig, layer: str, n: int) -> Any:
    """The targets, read and checked by the encoding's own loader; their ids against the store's
    stimuli, and cv against what the folds can hold, before any streaming."""
    from bonnerlab.activations import open_activations
    from bonnerlab.analysis import load_targets

    if not Path(cfg.encode).exists():
        raise ConfigError(f"encode targets {cfg.encode} not found")
    targets = load_targets(cfg.encode)
    stimuli = open_activations(cfg.store, layer)["stimulus"].values.astype(str)
    ids = np.asarray(targets["stimulus"].values).astype(str)
    unknown = sorted(set(ids) - set(stimuli))
    if unknown:
        raise ConfigError(
            f"encode targets {cfg.encode}: {len(unknown)} stimulus ids are not in {cfg.store}, "
            f"e.g. {', '.join(map(repr, unknown[:3]))}"
        )
    shared = len(set(ids))
    if cfg.cv > shared:
        raise ConfigError(f"cv {cfg.cv} is larger than the {shared} stimuli with targets")
    return targets


def config_key(cfg: AnalyzeConfig, fingerprint: str) -> str:
    """What a part was computed with (the store's identity and the analyses), not its layers."""
    fields = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_KEY}
    return json.dumps({"fingerprint": fingerprint, **fields}, sort_keys=True)


# ----------------------------------------------------------------------------- one layer


def analyze_layer(cfg: AnalyzeConfig, inputs: Inputs, layer: str) -> tuple[Any, dict[str, Any]]:
    """One layer's results as a Dataset (netCDF-safe attrs) and its summary record."""
    import xarray as xr

    from bonnerlab.analysis import cka, layer_gram, rdm, rsa, spectrum

    options = {"device": cfg.device, "memory_gb": cfg.memory_gb, "cache": cfg.cache}
    t0 = time.perf_counter()
    gram = layer_gram(cfg.store, layer, progress=cfg.progress, **options)
    record: dict[str, Any] = {
        "layer": layer,
        "n_stimuli": gram.n,
        "n_features": gram.n_features,
        "gram_cache": gram.attrs.get("cache", ""),
        "gram_seconds": round(time.perf_counter() - t0, 3),
    }
    variables: dict[str, Any] = {}
    if cfg.rdm != "none":
        r = rdm(gram, metric=cfg.rdm)
        variables["rdm"] = r
        if cfg.rsa:
            value = rsa(
                r,
                inputs.rsa_other[layer],
                cfg.rsa_method,
                bootstrap=cfg.bootstrap,
                seed=cfg.seed,
                metric=cfg.rdm,
                **options,
            )
            variables["rsa"] = value
            record["rsa"] = float(value)
            for bound in ("ci_low", "ci_high"):
                if bound in value.attrs:
                    variables[f"rsa_{bound}"] = xr.DataArray(value.attrs[bound])
                    record[f"rsa_{bound}"] = value.attrs[bound]
    if cfg.spectrum:
        s = spectrum(gram)
        variables["eigenvalues"] = s["eigenvalues"].assign_attrs(s.attrs)
        variables["effective_dim"] = s["effective_dim"]
        variables["power_law_alpha"] = s["alpha"]
        record["effective_dim"] = float(s["effective_dim"])
        record["power_law_alpha"] = float(s["alpha"])
    if cfg.cka:
        value = cka(gram, inputs.cka_other[layer], debiased=cfg.cka_debiased, **options)
        variables["cka"] = value
        record["cka"] = float(value)
    if cfg.encode:
        variables.update(_encoding(cfg, inputs, gram, record))
    ds = xr.Dataset(
        {name: da.assign_attrs(netcdf_attrs(da.attrs)) for name, da in variables.items()}
    )
    ds.attrs = netcdf_attrs(
        {"store": cfg.store, "fingerprint": inputs.fingerprint, "layer": layer, **gram.attrs}
    )
    return ds, record


def _encoding(cfg: AnalyzeConfig, inputs: Inputs, gram: Any, record: dict[str, Any]):
    """encode()'s variables as encode_<name>, and mean/median r (raw and ceiled) for the table."""
    from bonnerlab.analysis import encode

    result = encode(
        gram,
        targets=inputs.targets,
        cv=cfg.cv,
        alphas=np.asarray(cfg.alphas, dtype=float),
        groups=cfg.groups or None,
        seed=cfg.seed,
        device=cfg.device,
    )
    out = {}
    for name, da in result.data_vars.items():
        out[f"encode_{name}"] = da.assign_attrs({**result.attrs, **da.attrs})
        if "neuroid" in da.dims and da.ndim == 1 and np.issubdtype(da.dtype, np.floating):
            values = np.asarray(da.values, dtype=float)
            if np.isfinite(values).any():
                record[f"encode_{name}_mean"] = float(np.nanmean(values))
                record[f"encode_{name}_median"] = float(np.nanmedian(values))
    return out


def netcdf_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes netCDF can hold: str, numbers and flat number lists; the rest as JSON text."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bool | np.bool_):
            out[k] = int(v)
        elif isinstance(v, str | int | float | np.integer | np.floating):
            out[k] = v
        elif isinstance(v, list | tuple | np.ndarray) and all(
            isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
            for x in v
        ):
            out[k] = np.asarray(v)
        elif v is None:
            out[k] = ""
        else:
            out[k] = json.dumps(v, default=str)
    return out


# ----------------------------------------------------------------------------- the folder


def rebuild(out: Path, cfg: AnalyzeConfig, key: str) -> dict[str, Any]:
    """results.nc, summary.json, the PNGs and report.html from every current part, in the
    store's layer order (a part made with another config or store identity is removed)."""
    import xarray as xr

    order = {name: i for i, name in enumerate(store_info(cfg.store)["layers"])}
    records, datasets = [], []
    for path in sorted((out / "layers").glob("*.json")):
        record = json.loads(path.read_text())
        nc = path.with_suffix(".nc")
        if record.get("config_key") != key or not nc.exists():
            path.unlink(missing_ok=True)
            nc.unlink(missing_ok=True)
            continue
        records.append(record)
    records.sort(key=lambda r: order.get(r["layer"], len(order)))
    for record in records:
        with xr.open_dataset(out / "layers" / f"{_safe(record['layer'])}.nc") as ds:
            datasets.append(ds.load())
    layers = [r["layer"] for r in records]
    merged = xr.concat(
        datasets,
        dim=xr.DataArray(layers, dims="layer", name="layer"),
        join="outer",
        combine_attrs="drop_conflicts",
        coords="minimal",
        compat="override",
    )
    merged.attrs.pop("config_key", None)
    merged.attrs["layers"] = json.dumps(layers)
    _atomic_netcdf(merged, out / "results.nc")
    for record in records:
        record.pop("config_key", None)
    summary = {
        "output": str(out),
        "store": cfg.store,
        "fingerprint": datasets[0].attrs.get("fingerprint", "") if datasets else "",
        "layers": records,
        "config": {k: v for k, v in to_dict(cfg).items() if k != "layers"},
    }
    figures = write_figures(out, merged, records, cfg)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "report.html", render_report(out, records, figures, cfg))
    return {**summary, "figures": [f.name for f in figures]}


def write_figures(out: Path, merged: Any, records: list[dict[str, Any]], cfg: AnalyzeConfig):
    """RDM heatmaps (one per layer), spectra on log-log axes, encoding r and RSA/CKA per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    layers = [r["layer"] for r in records]
    if "rdm" in merged:
        for layer in layers:
            fig, ax = plt.subplots(figsize=(4.8, 4))
            image = ax.imshow(merged["rdm"].sel(layer=layer).values, cmap="viridis")
            fig.colorbar(image, ax=ax, label=f"{cfg.rdm} distance")
            ax.set_title(f"RDM: {layer}")
            ax.set_xlabel("stimulus")
            ax.set_ylabel("stimulus")
            fig.tight_layout()
            written.append(_save(fig, out / f"rdm-{_safe(layer)}.png"))
    if "eigenvalues" in merged:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for layer in layers:
            eig = merged["eigenvalues"].sel(layer=layer).values
            keep = np.isfinite(eig) & (eig > 0)
            ax.loglog(np.flatnonzero(keep) + 1, eig[keep], label=layer)
        ax.set_xlabel("component")
        ax.set_ylabel("eigenvalue")
        ax.set_title("PCA spectra")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "spectra.png"))
    if "encode_r" in merged:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(layers) + 2), 3.8))
        scores = [merged["encode_r"].sel(layer=la).values.ravel() for la in layers]
        ax.boxplot([s[np.isfinite(s)] for s in scores], showfliers=False)
        ax.set_xticks(range(1, len(layers) + 1), layers, rotation=30, ha="right")
        ax.set_ylabel("held-out Pearson r per target")
        ax.set_title("encoding")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        written.append(_save(fig, out / "encoding.png"))
    kinds = [k for k in ("rsa", "cka") if k in merged]
    if kinds:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(layers) + 2), 3.8))
        for kind in kinds:
            ax.plot(layers, merged[kind].values, "o-", label=kind)
        ax.set_ylabel("similarity")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "similarity.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    save_figure(fig, path)
    return path


def render_report(
    out: Path, records: list[dict[str, Any]], figures: list[Path], cfg: AnalyzeConfig
) -> str:
    import html

    from bonnerlab.pages import page, png_uri, sortable_table

    columns = [
        c for c in dict.fromkeys(k for r in records for k in r) if c not in ("gram_seconds",)
    ]
    rows = [[_cell_value(r.get(c)) for c in columns] for r in records]
    asked = [
        f"RDM ({cfg.rdm})" if cfg.rdm != "none" else "",
        "spectrum" if cfg.spectrum else "",
        f"RSA ({cfg.rsa_method}) against {cfg.rsa}" if cfg.rsa else "",
        f"CKA against {cfg.cka}" if cfg.cka else "",
        f"encoding of {cfg.encode} ({cfg.cv} folds)" if cfg.encode else "",
    ]
    body = [
        f"<p>store <code>{html.escape(cfg.store)}</code>; {len(records)} layer(s); "
        f"{html.escape(', '.join(a for a in asked if a))}</p>",
        "<h2>Layers</h2>",
        sortable_table(columns, rows, "layers"),
    ]
    for fig in figures:
        body.append(f"<h2>{html.escape(fig.stem)}</h2><img id='{fig.stem}' src='{png_uri(fig)}'>")
    return page(f"bonnerlab analysis: {out.resolve().name}", body)


def _cell_value(value: Any) -> Any:
    if value is None:
        return math.nan
    return value


# ----------------------------------------------------------------------------- files


def _safe(layer: str) -> str:
    """A layer name as a file name (dots and colons kept readable; slashes escaped)."""
    return quote(layer, safe=".:-_")


def _atomic_netcdf(ds: Any, path: Path) -> None:
    """Write beside, then rename: a reader never sees half a results.nc."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        ds.to_netcdf(tmp, engine=_engine())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _engine() -> str:
    import importlib.util

    return "h5netcdf" if importlib.util.find_spec("h5netcdf") else "scipy"


@contextmanager
def _locked(path: Path):
    """One task at a time rebuilds the folder (array tasks finish together). flock: advisory,
    and on NFS only where the mount supports locks; a lost race leaves a folder that the next
    rebuild (any rerun) makes whole."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress(items: list[str], show: bool):
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="layers", unit="layer")
