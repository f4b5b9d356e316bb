"""Extraction benchmark: torchvision ResNet-50 and timm ViT-B/16 over non-square JPEG \
photographs, CPU.

    python bench/bench_extract.py                  # 1,000 images per model (long on 2 cores)
    python bench/bench_extract.py --n 200          # quicker look
    python bench/bench_extract.py --models resnet50 --modes bare,extract

Per model, each measurement runs in its own subprocess so that its peak RSS (ru_maxrss of the
main process; decoding workers are separate processes in every mode) is its own:
- bare:     the same DataLoader decoding and published preprocessing (`preprocess.Transform` in
            the same number of workers) + the full forward pass, nothing kept
- extract:  bonnerlab.extract.run.extract (hooks, early stop, writer thread, zarr store)
- reduce:   the same extraction with `--reduce LAYER=srp:4096` on the largest layer
Random weights (seeded; no download): the speed does not depend on the weights' values.
Modes run interleaved for `--rounds` rounds and each keeps its best images/s, so a burst of load
from other jobs hurts every mode alike. Also printed: CPU ms per image of the main process over
the batch loop only (all its threads: the writer's compression counts, the decoding workers do
not), a measure of the extra work that holds when the machine is busy; minor page faults and
system time per image (the whole process); the store's bytes per stimulus; and, for the
extraction, what a rerun's integrity pass costs (each file's bytes hashed again, each chunk's
checksum read) and how long `verify` takes on the store.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    # arch: (layers, pooling, the layer to reduce)
    "resnet50": (["layer2", "layer3", "avgpool"], ["none"], "layer3"),
    "timm:vit_base_patch16_224": (["blocks.5", "blocks.11", "norm"], ["norm=cls"], "blocks.5"),
}


def make_photos(root: Path, n: int) -> Path:
    """Non-square JPEGs cut from scikit-learn's two photographs (random crops, sizes, flips)."""
    import numpy as np
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_images

    root.mkdir(parents=True, exist_ok=True)
    have = len(list(root.glob("*.jpg")))
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for i in range(n):
        w, h = int(rng.integers(240, 640)), int(rng.integers(200, 427))
        x, y = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
        scale = float(rng.uniform(0.8, 1.25))
        if i < have:
            continue  # same draws every time: the folder is reused
        img = photos[i % 2].crop((x, y, x + w, y + h))
        img = img.resize((max(32, int(w * scale)), max(32, int(h * scale))), Image.BICUBIC)
        if i % 3 == 0:
            img = ImageOps.mirror(img)
        img.save(root / f"img{i:05d}.jpg", quality=90)
    return root


def _cfg(args, mode: str):
    from bonnerlab.config import ExtractConfig, ModelConfig

    layers, pooling, big = MODELS[args.arch]
    return ExtractConfig(
        model=ModelConfig(arch=args.arch),
        stimuli=str(args.images),
        limit=args.n,
        layers=layers,
        pooling=pooling,
        reduce=[f"{big}=srp:4096"] if mode == "reduce" else [],
        batch_size=args.batch,
        num_workers=args.workers,
        device="cpu",
        output=str(Path(args.out) / "store.zarr"),
        overwrite=True,
        progress=False,
    )


def run_bare(args) -> dict:
    import torch

    from bonnerlab.extract.run import load_model, load_preprocess
    from bonnerlab.extract.stimuli import iter_batches, load_stimuli

    cfg = _cfg(args, "bare")
    source = load_model(cfg)
    pre = load_preprocess(cfg, source)
    stimuli = load_stimuli(cfg, pre.square_size, pre.in_channels, None)
    rows = [
        range(i, min(i + cfg.batch_size, len(stimuli.ids)))
        for i in range(0, len(stimuli.ids), cfg.batch_size)
    ]
    t0, cpu0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for images, *_ in iter_batches(
            stimuli, rows, pre.transform(), (3, *pre.output_size), cfg.num_workers, False
        ):
            source.model(images)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


def run_extract(args) -> dict:
    from dataclasses import replace

    from bonnerlab.activations.store import ActivationStore, verify
    from bonnerlab.extract.run import extract

    cfg = _cfg(args, args.mode)
    # the peak so far when finalize starts: the batches' own, apart from finalize's verify
    real_finalize, at_finalize = ActivationStore.finalize, []

    def finalize(self: ActivationStore) -> dict:
        at_finalize.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return real_finalize(self)

    ActivationStore.finalize = finalize
    result = extract(cfg)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # before the checks below add their own
    ActivationStore.finalize = real_finalize
    store = Path(result["store"])
    # the integrity figures: a rerun re-hashes every file (bytes only) and checks every chunk's
    # checksum before deciding there is nothing to do; verify decodes every chunk
    again = extract(replace(cfg, overwrite=False))
    assert again["chunks_written"] == 0, again
    checks = {
        "rerun_check_ms_per_image": 1000 * again["check_seconds"] / result["n_stimuli"],
        "verify_seconds": verify(store)["seconds"],
    }
    nbytes = sum(
        f.stat().st_size for f in store.rglob("*") if f.is_file() and ".done" not in f.parts
    )
    return {
        "seconds": result["seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "store_bytes_per_stimulus": nbytes / result["n_stimuli"],
        "usage": usage,
        "peak_rss_before_finalize_mb": at_finalize[0],
        **checks,
    }


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    fn = run_bare if args.mode == "bare" else run_extract
    result = fn(args)
    result["cpu_ms_per_image"] = 1000 * result["cpu_seconds"] / args.n
    result["images_per_s"] = args.n / result["seconds"]
    usage = result.pop("usage", None) or resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["faults_per_image"] = usage.ru_minflt / args.n  # the whole process: build included
    result["sys_ms_per_image"] = 1000 * usage.ru_stime / args.n
    print("RESULT " + json.dumps(result))


def measure(args, arch: str, mode: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, __file__, "--child", mode, "--arch", arch, "--n", str(args.n),
        "--images", str(args.images), "--batch", str(args.batch), "--workers", str(args.workers),
        "--threads", str(args.threads), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{arch} {mode} failed:\n{run.stderr[-2000:]}")
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (all modes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--images", type=Path, default=None, help="photo folder (generated if missing)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default="bare,extract,reduce")
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds; each mode keeps its best"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--arch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    args.images = args.images or Path(tempfile.gettempdir()) / "bonnerlab-bench-photos"
    make_photos(args.images, args.n)
    print(
        f"{args.n} JPEG photographs (non-square, 190-800 px) in {args.images}; batch {args.batch}, "
        f"{args.workers} workers, CPU",
        flush=True,
    )
    for arch in args.models.split(","):
        rows: dict[str, dict] = {}
        with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
            for round_ in range(args.rounds):
                for mode in args.modes.split(","):
                    r = measure(
                        args, arch, mode, Path(tmp) / f"{mode}-{round_}"
                    )  # a fresh store each round
                    print(
                        f"  round {round_} {arch} {mode:<8} {r['images_per_s']:7.2f} images/s  "
                        f"CPU {r['cpu_ms_per_image']:5.0f} ms/img  "
                        f"peak RSS {r['peak_rss_mb']:7.0f} MB"
                        + (
                            f" ({r['peak_rss_before_finalize_mb']:.0f} before finalize)  "
                            if "peak_rss_before_finalize_mb" in r
                            else "  "
                        )
                        + f"faults {r['faults_per_image']:6.0f}/img  "
                        f"sys {r['sys_ms_per_image']:4.0f} ms/img",
                        flush=True,
                    )
                    best = rows.get(mode)
                    if best is None or r["images_per_s"] > best["images_per_s"]:
                        rows[mode] = {
                            **r,
                            "peak_rss_mb": max(r["peak_rss_mb"], best["peak_rss_mb"])
                            if best
                            else r["peak_rss_mb"],
                        }
                    elif best is not None:
                        best["peak_rss_mb"] = max(best["peak_rss_mb"], r["peak_rss_mb"])
        layers, pooling, big = MODELS[arch]
        print(
            f"\n{arch}: {', '.join(layers)} (pooling {' '.join(pooling)}; reduce: {big}=srp:4096)"
        )
        print(
            f"{'mode':<10}{'images/s':>10}{'vs bare':>9}"
            f"{'CPU ms/img':>12}{'peak RSS MB':>13}{'vs bare':>9}"
            f"{'store B/stimulus':>18}"
        )
        bare = rows.get("bare")
        for mode, r in rows.items():
            speed = f"{r['images_per_s'] / bare['images_per_s']:.2f}x" if bare else "-"
            rss = f"{r['peak_rss_mb'] / bare['peak_rss_mb']:.2f}x" if bare else "-"
            size = (
                f"{r['store_bytes_per_stimulus']:,.0f}" if "store_bytes_per_stimulus" in r else "-"
            )
            print(
                f"{mode:<10}{r['images_per_s']:>10.2f}{speed:>9}{r['cpu_ms_per_image']:>12.0f}"
                f"{r['peak_rss_mb']:>13.0f}{rss:>9}{size:>18}"
            )
        if "rerun_check_ms_per_image" in rows.get("extract", {}):
            r = rows["extract"]
            print(
                f"a rerun's content-hash and checksum pass: {r['rerun_check_ms_per_image']:.2f} "
                f"ms/image; verify of the store: {r['verify_seconds']:.2f} s "
                f"({args.n} stimuli)"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
