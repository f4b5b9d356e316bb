"""Analysis benchmark: bonnerlab's streamed Gram/RDM and encoding vs in-memory tools, in one run.

    python bench/bench_analysis.py                   # the issue's sizes (long on 2 cores: the
                                                       references alone take ~10 min)
    python bench/bench_analysis.py --scale 0.2       # n, p and targets x 0.2: a quick look
    python bench/bench_analysis.py --only gram       # or --only encode
    python bench/bench_analysis.py --only gram --compression none   # the store uncompressed
                                                       (default zstd, as extraction writes)

Data: one synthetic float16 store in bench/out/analysis/ (written once per scale, reused on
reruns; gitignored) of n stimuli with three layers, each ReLU(Z B + noise) (16 latent factors,
so the RDM has structure and features have nonzero means, as post-ReLU activations do):
`gram` (p features), `rsa` (p_rsa, where rsatoolbox finishes) and `encode` (p_enc), plus a
netCDF of targets Y = X_encode A B' + noise (rank 64, noise per target from 0.3x to 30x the
signal, so the best alpha differs per target). Defaults at --scale 1: n 5,000, p 200,000
(2 GB), p_rsa 20,000, p_enc 50,000, 10,000 targets, 5 folds, 9 alphas logspace(-2, 6).

Each measurement runs in its own subprocess, so its peak RSS (ru_maxrss of that process,
imports included: torch when device auto imports it) is its own:
1. gram:     bonnerlab `layer_gram` (cache off) + `rdm(correlation)` from the store, vs
             numpy float32 `X @ X.T` of the same layer loaded into memory (the load from the
             store is timed and reported apart; the ratio is against the product alone), and
             at p_rsa, bonnerlab vs rsatoolbox `calc_rdm(method="correlation")` on the loaded
             float64 array. Agreement: max |RDM difference| (the reference's Gram goes
             through the same correlation formula; rsatoolbox's RDM is its own). The store is
             written by bonnerlab's writer (layers sharded along features, so each panel
             decodes only its own chunks: the row's detail says how often each was decoded),
             compressed as --compression says; --rounds N measures bonnerlab and the GEMM N
             times, interleaved, and keeps each one's best.
2. encode:   bonnerlab `encode` (per-target alphas by leave-one-out inside each training fold)
             from the store and the targets file, vs scikit-learn `RidgeCV(alphas,
             alpha_per_target=True)` fitted per training fold and himalaya `KernelRidgeCV`
             (linear kernel, intercept, per-target alphas by its own inner 5-fold CV: it has no
             leave-one-out, so its r may differ by more) on the same folds, and himalaya
             `KernelRidge` refitted with the alphas bonnerlab chose (the same fit: its r must
             agree to float rounding); the references load
             X (float32) and Y apart, and the ratio is against their fits. The folds are the
             bench's (a seeded permutation cut in `cv` parts), handed to encode as `groups`
             (one group per fold, so grouped k-fold must put each group in its own fold).
             Agreement: max |r difference| over targets (r: Pearson of the pooled out-of-fold
             predictions, or the mean over folds with --r-mode fold-mean).
Also printed: the load average before starting (a busy machine slows every row, the ratios
less). Timings are wall-clock; compare ratios from the same run. Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

OUT = HERE / "out" / "analysis"
FULL = {"n": 5000, "p": 200_000, "p_rsa": 20_000, "p_enc": 50_000, "targets": 10_000}
ALPHAS = np.logspace(-2, 6, 9)
LATENT, RANK, CHUNK = 16, 64, 100


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sizes(scale: float) -> dict[str, int]:
    return {k: max(50 if k == "n" else 100, int(round(v * scale))) for k, v in FULL.items()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- the data


def store_path(s: dict[str, int], compression: str = "zstd") -> Path:
    name = f"store-n{s['n']}-p{s['p']}-q{s['p_rsa']}-e{s['p_enc']}-t{s['targets']}-{compression}"
    return OUT / f"{name}.zarr"


def targets_path(s: dict[str, int], compression: str = "zstd") -> Path:
    return store_path(s, compression).with_suffix(".targets.nc")


def folds(n: int, cv: int, seed: int = 0) -> np.ndarray:
    """The fold of each stimulus: a seeded permutation cut into `cv` near-equal parts."""
    fold = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), cv)):
        fold[part] = k
    return fold


def make_data(s: dict[str, int], cv: int, compression: str = "zstd") -> tuple[Path, Path]:
    """The store and targets for sizes `s`, written once (a half-written store is resumed)."""
    import xarray as xr

    from bonnerlab.activations.store import LayerSpec, open_store

    path, tpath = store_path(s, compression), targets_path(s, compression)
    n = s["n"]
    widths = {"gram": s["p"], "rsa": s["p_rsa"], "encode": s["p_enc"]}
    ids = [f"img{i:05d}.png" for i in range(n)]
    specs = [LayerSpec(name, ("neuroid",), (p,), "float16") for name, p in widths.items()]
    identity = {"bench_analysis": 1, **s, "cv": cv, "compression": compression}
    OUT.mkdir(parents=True, exist_ok=True)
    store, outcome = open_store(
        path,
        identity=identity,
        layers=specs,
        stimuli=ids,
        labels=None,
        chunk_size=CHUNK,
        coords={"fold": folds(n, cv)},
        overwrite=True,
        compression=compression,
    )
    missing = store.missing_chunks()
    if not missing and tpath.is_file():
        return path, tpath
    log(f"writing {path.name} ({len(missing)} of {store.n_chunks} chunks) and its targets ...")
    t0 = time.perf_counter()
    rng = np.random.default_rng(1234)
    bases = {name: rng.standard_normal((LATENT, p), dtype=np.float32) for name, p in widths.items()}
    a = rng.standard_normal((s["p_enc"], RANK), dtype=np.float32) / np.sqrt(s["p_enc"])
    b = rng.standard_normal((RANK, s["targets"]), dtype=np.float32) / np.sqrt(RANK)
    noise = np.geomspace(0.3, 30, s["targets"]).astype(np.float32)
    y = np.empty((n, s["targets"]), dtype=np.float32)
    for c in range(store.n_chunks):  # the targets need every chunk's features
        sl = store.chunk_slice(c)
        r = np.random.default_rng([7, c])
        z = r.standard_normal((sl.stop - sl.start, LATENT), dtype=np.float32)
        data = {}
        for name, basis in bases.items():
            x = z @ basis + r.standard_normal((len(z), basis.shape[1]), dtype=np.float32)
            data[name] = np.maximum(x, 0, out=x).astype(np.float16)
        signal = data["encode"].astype(np.float32) @ a @ b
        y[sl] = signal + noise * r.standard_normal(signal.shape, dtype=np.float32)
        if c in missing:
            store.write_chunk(c, data)
    store.finalize()
    targets = xr.DataArray(
        y,
        dims=("presentation", "neuroid"),
        coords={"stimulus": ("presentation", ids), "neuroid": np.arange(s["targets"])},
        name="responses",
    )
    targets.to_netcdf(tpath, engine="h5netcdf")
    log(f"  {time.perf_counter() - t0:.0f} s")
    return path, tpath


def load_layer(store: Path, layer: str, dtype) -> np.ndarray:
    """A layer read chunk by chunk into one array of `dtype` (no float16 copy of the whole)."""
    from bonnerlab.activations import open_activations

    da = open_activations(store, layer)
    x = np.empty(da.shape, dtype=dtype)
    for a in range(0, len(x), CHUNK):
        x[a : a + CHUNK] = da[a : a + CHUNK].values
    return x


def load_targets(path: Path) -> np.ndarray:
    import xarray as xr

    return xr.load_dataarray(path, engine="h5netcdf").values.astype(np.float32)


# ----------------------------------------------------------------------------- the children


def child_gram_ours(spec: dict) -> dict:
    from bonnerlab.analysis import layer_gram, rdm

    t0, c0 = time.perf_counter(), time.process_time()
    g = layer_gram(
        spec["store"],
        spec["layer"],
        device=spec["device"],
        memory_gb=spec["memory_gb"],
        cache=False,
    )
    t1 = time.perf_counter()
    d = rdm(g, metric="correlation").values
    t2 = time.perf_counter()
    np.save(spec["save"], d)
    return {
        "seconds": t2 - t0,
        "cpu_s": time.process_time() - c0,
        "gram_s": t1 - t0,
        "rdm_s": t2 - t1,
        "passes": g.attrs.get("passes"),
        "store_reads": g.attrs.get("store_reads"),
        "read_s": g.attrs.get("read_s"),
        "compute_s": g.attrs.get("compute_s"),
        "device": g.attrs.get("device"),
    }


def child_gram_numpy(spec: dict) -> dict:
    from bonnerlab.analysis import Gram, rdm

    t0 = time.perf_counter()
    x = load_layer(Path(spec["store"]), spec["layer"], np.float32)
    t1, c1 = time.perf_counter(), time.process_time()
    g = x @ x.T
    t2, c2 = time.perf_counter(), time.process_time()
    sums = x.sum(axis=1, dtype=np.float64)
    ids = np.arange(len(x)).astype(str)
    d = rdm(Gram(g.astype(np.float64), sums, x.shape[1], ids), metric="correlation").values
    np.save(spec["save"], d)
    return {"seconds": t2 - t1, "cpu_s": c2 - c1, "load_s": t1 - t0}


def child_gram_rsatoolbox(spec: dict) -> dict:
    import rsatoolbox

    t0 = time.perf_counter()
    x = load_layer(Path(spec["store"]), spec["layer"], np.float64)
    t1, c1 = time.perf_counter(), time.process_time()
    rdms = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(x), method="correlation")
    t2, c2 = time.perf_counter(), time.process_time()
    np.save(spec["save"], rdms.get_matrices()[0])
    return {"seconds": t2 - t1, "cpu_s": c2 - c1, "load_s": t1 - t0}


def child_encode_ours(spec: dict) -> dict:
    from bonnerlab.analysis.encoding import encode, make_folds

    fold = folds(spec["n"], spec["cv"])
    t0, c0 = time.perf_counter(), time.process_time()
    ds = encode(
        spec["store"],
        spec["layer"],
        targets=spec["targets"],
        cv=spec["cv"],
        alphas=np.asarray(spec["alphas"]),
        groups=fold,
        seed=0,
        device=spec["device"],
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if "neuroid" in ds.coords:  # back to the targets file's order
        ds = ds.sortby("neuroid")
    np.save(spec["save"], np.asarray(ds["r"].values, dtype=np.float64))
    # the alpha each target got in each fold, by the bench's fold (encode's GroupKFold numbers
    # the groups its own way): himalaya-fixed refits with exactly these
    alphas = np.empty((spec["cv"], ds.sizes["neuroid"]))
    for f, (_, test) in enumerate(make_folds(spec["n"], spec["cv"], fold)):
        alphas[fold[test[0]]] = ds["alpha"].isel(fold=f).values
    np.save(spec["save_alphas"], alphas)
    return {"seconds": seconds, "cpu_s": cpu}


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def child_encode_ref(spec: dict) -> dict:
    """scikit-learn RidgeCV or himalaya KernelRidgeCV fitted per training fold."""
    t0 = time.perf_counter()
    x = load_layer(Path(spec["store"]), spec["layer"], np.float32)
    y = load_targets(Path(spec["targets"]))
    t1, c1 = time.perf_counter(), time.process_time()
    fold = folds(spec["n"], spec["cv"])
    alphas = np.asarray(spec["alphas"])
    if spec["tool"].startswith("himalaya"):
        from himalaya.backend import set_backend
        from himalaya.kernel_ridge import KernelRidge, KernelRidgeCV

        set_backend("numpy", on_error="raise")
    if spec["tool"] == "himalaya":

        def model(k):
            return KernelRidgeCV(alphas=alphas, kernel="linear", fit_intercept=True, cv=5)
    elif spec["tool"] == "himalaya-fixed":
        chosen = np.load(spec["alphas_from"])  # (fold, target): bonnerlab's choice

        def model(k):
            return KernelRidge(alpha=chosen[k], kernel="linear", fit_intercept=True)
    else:
        from sklearn.linear_model import RidgeCV

        def model(k):
            return RidgeCV(alphas=alphas, alpha_per_target=True)

    pred = np.empty_like(y)
    per_fold = []
    for k in range(spec["cv"]):
        train, test = fold != k, fold == k
        m = model(k).fit(x[train], y[train])
        pred[test] = np.asarray(m.predict(x[test]))
        per_fold.append(_pearson_columns(pred[test], y[test]))
    t2, c2 = time.perf_counter(), time.process_time()
    r = _pearson_columns(pred, y) if spec["r_mode"] == "pooled" else np.mean(per_fold, axis=0)
    np.save(spec["save"], r.astype(np.float64))
    return {"seconds": t2 - t1, "cpu_s": c2 - c1, "load_s": t1 - t0}


CHILDREN = {
    "gram-ours": child_gram_ours,
    "gram-numpy": child_gram_numpy,
    "gram-rsatoolbox": child_gram_rsatoolbox,
    "encode-ours": child_encode_ours,
    "encode-ref": child_encode_ref,
}


def measure(name: str, spec: dict) -> dict:
    """One child process: its result and its own peak RSS."""
    cmd = [sys.executable, __file__, "--child", name, "--spec", json.dumps(spec)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the table


def row(method, seconds, rss, ref=None, agreement="", width=44, cpu=None) -> str:
    """One line; `ref` (a result) adds the ratios. CPU seconds (all the process's threads, over
    the timed part): on a busy machine they say what the work cost, the wall what it took."""
    cpu_s = f"{cpu:.2f}" if cpu is not None else "-"
    if ref:
        ratio = f"{seconds / ref['seconds']:.2f}x"
        mem = f"{rss / ref['peak_rss_gb']:.2f}x" if rss is not None else "-"
        cpu_ratio = f"{cpu / ref['cpu_s']:.2f}x" if cpu is not None and ref.get("cpu_s") else "-"
    else:
        ratio = mem = cpu_ratio = "-" if rss is None else "ref"
    rss_s = f"{rss:.2f}" if rss is not None else "-"
    return (
        f"{method:<{width}}{seconds:>9.2f}{cpu_s:>8}{rss_s:>8}{ratio:>9}{cpu_ratio:>9}{mem:>9}"
        f"  {agreement}"
    )


def result_row(method: str, result: dict, ref: dict | None = None, agreement: str = "") -> str:
    return row(method, result["seconds"], result["peak_rss_gb"], ref, agreement,
               cpu=result.get("cpu_s"))  # fmt: skip


HEADER = (
    f"{'method':<44}{'wall s':>9}{'CPU s':>8}{'RSS GB':>8}{'t/t_ref':>9}{'cpu/ref':>9}"
    f"{'RSS/ref':>9}  agreement"
)


def layout(store: Path, layer: str) -> str:
    """How the store holds `layer`: its compression and chunks, from zarr's own metadata."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr on the store's .done folder
        array = zarr.open_group(str(store), mode="r")[layer]
    codecs = "+".join(type(c).__name__.removesuffix("Codec").lower() for c in array.compressors)
    if array.shards is None:
        return f"chunks of {array.chunks[0]} rows, {codecs}"
    return (
        f"a shard per {array.shards[0]} rows, inner chunks of {math.prod(array.chunks[1:]):,} "
        f"features, {codecs}"
    )


def bench_gram(args, s, store: Path, tmp: Path) -> list[str]:
    base = {"store": str(store), "device": args.device, "memory_gb": args.memory_gb}
    out = [
        f"gram/RDM: n {s['n']:,} x p {s['p']:,} float16 from the store ({layout(store, 'gram')}),"
        f" memory_gb {args.memory_gb:g}, best of {args.rounds}",
        HEADER,
    ]
    ours = ref = None
    for _ in range(args.rounds):  # interleaved: a burst of load hits both alike
        o = measure("gram-ours", {**base, "layer": "gram", "save": str(tmp / "ours.npy")})
        log(f"  bonnerlab gram+rdm p={s['p']:,}: {o['seconds']:.2f} s, {o['peak_rss_gb']:.2f} GB")
        r = measure("gram-numpy", {**base, "layer": "gram", "save": str(tmp / "numpy.npy")})
        log(f"  numpy X @ X.T: {r['seconds']:.2f} s (+ load {r['load_s']:.2f} s)")
        ours = o if ours is None or o["seconds"] < ours["seconds"] else ours
        ref = r if ref is None or r["seconds"] < ref["seconds"] else ref
    diff = np.abs(np.load(tmp / "ours.npy") - np.load(tmp / "numpy.npy")).max()
    detail = (
        f"{ours['passes']} panels, each chunk decoded {ours['store_reads']:g}x, "
        f"read {ours['read_s']:.1f} s, rdm from the Gram {ours['rdm_s']:.2f} s, "
        f"compute {ours['compute_s']:.1f} s, {ours['device']}"
    )
    out += [
        result_row("numpy float32 X @ X.T (in memory)", ref),
        row("  its load from the store (apart)", ref["load_s"], None),
        result_row("bonnerlab layer_gram + rdm", ours, ref, f"max|dRDM| {diff:.1e} ({detail})"),
        target("<= 1.2x the in-memory GEMM's time", ours["seconds"] <= 1.2 * ref["seconds"]),
        target("<= 1/3 of its peak RSS and <= 1 GB",
               ours["peak_rss_gb"] <= min(ref["peak_rss_gb"] / 3, 1.0)),
    ]  # fmt: skip
    if args.rsatoolbox:
        small = measure("gram-ours", {**base, "layer": "rsa", "save": str(tmp / "ours_rsa.npy")})
        rsa = measure("gram-rsatoolbox", {**base, "layer": "rsa", "save": str(tmp / "rsa.npy")})
        log(f"  rsatoolbox p={s['p_rsa']:,}: {rsa['seconds']:.2f} s")
        diff = np.abs(np.load(tmp / "ours_rsa.npy") - np.load(tmp / "rsa.npy")).max()
        speedup = rsa["seconds"] / small["seconds"]
        out += [
            f"at p {s['p_rsa']:,}:",
            result_row("rsatoolbox calc_rdm (float64 in memory)", rsa),
            row("  its load from the store (apart)", rsa["load_s"], None),
            result_row("bonnerlab layer_gram + rdm", small, rsa,
                       f"max|dRDM| {diff:.1e}; rsatoolbox/ours {speedup:.2g}x"),
            target(">= 10x faster than rsatoolbox", speedup >= 10),
        ]  # fmt: skip
    return out


ENCODE_LABELS = {
    "sklearn": "sklearn RidgeCV per fold (LOO, as ours)",
    "himalaya": "himalaya KernelRidgeCV (inner 5-fold CV)",
    "himalaya-fixed": "himalaya KernelRidge, bonnerlab's alphas",
}


def bench_encode(args, s, store: Path, targets: Path, tmp: Path) -> list[str]:
    base = {
        "store": str(store), "layer": "encode", "targets": str(targets), "n": s["n"],
        "cv": args.cv, "alphas": ALPHAS.tolist(), "device": args.device, "r_mode": args.r_mode,
    }  # fmt: skip
    out = [
        f"encode: n {s['n']:,} x p {s['p_enc']:,} float16 -> {s['targets']:,} targets, "
        f"{args.cv} folds, {len(ALPHAS)} alphas, per-target alphas, r {args.r_mode}",
        "  alpha per target and fold: bonnerlab and RidgeCV by efficient leave-one-out on the",
        "  training fold (the same rule: same alphas, scores within 1e-3 expected); KernelRidgeCV",
        "  by its inner 5-fold CV (it has no leave-one-out: its own alphas, r near but not equal);",
        "  himalaya KernelRidge refits bonnerlab's chosen alphas (the fit itself compared)",
        HEADER,
    ]
    gram_cache = store.with_name(f"{store.name}.gram")
    shutil.rmtree(gram_cache, ignore_errors=True)  # encode streams the store, not a cache
    saved = {"save": str(tmp / "ours_r.npy"), "save_alphas": str(tmp / "ours_alphas.npy")}
    try:
        ours = measure("encode-ours", {**base, **saved})
        log(f"  bonnerlab encode: {ours['seconds']:.2f} s, {ours['peak_rss_gb']:.2f} GB")
    except SystemExit as e:
        out.append(f"bonnerlab encode: not measured ({str(e).strip().splitlines()[-1]})")
        ours = None
    finally:
        shutil.rmtree(gram_cache, ignore_errors=True)
    tools = list(args.encode_refs)
    if ours is not None and "himalaya" in tools:
        tools.append("himalaya-fixed")
    refs = {}
    for tool in tools:
        spec = {**base, "tool": tool, "save": str(tmp / f"{tool}.npy")}
        refs[tool] = measure("encode-ref", {**spec, "alphas_from": saved["save_alphas"]})
        log(f"  {tool}: {refs[tool]['seconds']:.2f} s, {refs[tool]['peak_rss_gb']:.2f} GB")
    for tool, ref in refs.items():
        out += [
            result_row(ENCODE_LABELS[tool], ref),
            row("  its load of X and Y (apart)", ref["load_s"], None),
        ]
    if ours is None:
        return out
    r = np.load(tmp / "ours_r.npy")
    for tool, ref in refs.items():
        diff = np.abs(r - np.load(tmp / f"{tool}.npy"))
        out.append(
            result_row(f"bonnerlab encode vs {tool}", ours, ref,
                       f"max|dr| {np.nanmax(diff):.1e}, median {np.nanmedian(diff):.1e}, "
                       f"{np.mean(diff > 1e-3):.1%} over 1e-3")
        )  # fmt: skip
    out.append(f"  bonnerlab r: median {np.nanmedian(r):.3f}, range {r.min():.3f}..{r.max():.3f}")
    for tool in ("sklearn", "himalaya"):
        if tool in refs:
            ref = refs[tool]
            diff = np.nanmax(np.abs(r - np.load(tmp / f"{tool}.npy")))
            out.append(
                target(f"encode vs {tool}: >= 2x faster, <= 1/2 the RSS",
                       ref["seconds"] / ours["seconds"] >= 2
                       and ours["peak_rss_gb"] <= ref["peak_rss_gb"] / 2)
                + ("" if tool != "sklearn" else f"; scores within 1e-3: {diff <= 1e-3}")
            )  # fmt: skip
    return out


def target(what: str, met: bool) -> str:
    return f"  target {what}: {'met' if met else 'NOT met'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="scales n, p and targets")
    p.add_argument("--only", choices=("gram", "encode"), default=None)
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--device", default="auto", help="bonnerlab's device (auto: CUDA if present)")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=0.7,
        help="layer_gram's memory bound (0.7: the process, imports and the RDM included, stays "
        "under 1 GB: 0.8 reached 1.0 GB at n = 5,000)",
    )
    p.add_argument(
        "--compression",
        choices=("zstd", "lz4", "none"),
        default="zstd",
        help="the store's compression (zstd: extraction's default; the Gram pays its decode)",
    )
    p.add_argument("--rounds", type=int, default=1, help="gram: best of N, interleaved")
    p.add_argument("--no-rsatoolbox", dest="rsatoolbox", action="store_false")
    p.add_argument(
        "--encode-refs", default="sklearn,himalaya", help="comma-separated: sklearn, himalaya"
    )
    p.add_argument("--r-mode", choices=("pooled", "fold-mean"), default="pooled")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = CHILDREN[args.child](json.loads(args.spec))
        result["peak_rss_gb"] = peak_rss_gb()
        print("RESULT " + json.dumps(result), flush=True)
        return

    args.encode_refs = [t for t in args.encode_refs.split(",") if t]
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    idle = load[0] < 0.5 * cores
    log(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {cores} cores: "
        f"{'looked idle' if idle else 'busy (other processes slow every row)'}; "
        f"scale {args.scale:g}"
    )
    s = sizes(args.scale)
    store, targets = make_data(s, args.cv, args.compression)
    tmp = OUT / "results"
    tmp.mkdir(parents=True, exist_ok=True)
    lines = []
    if args.only in (None, "gram"):
        lines += bench_gram(args, s, store, tmp) + [""]
    if args.only in (None, "encode"):
        lines += bench_encode(args, s, store, targets, tmp) + [""]
    end = os.getloadavg()
    log(f"\nscale {args.scale:g}; load average {load[0]:.2f} at start, {end[0]:.2f} at the end")
    log("t/t_ref, cpu/ref, RSS/ref: bonnerlab / the reference above it (its load apart); CPU s:")
    log("all threads of the process over the timed part (less hit by a busy machine than wall)\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
