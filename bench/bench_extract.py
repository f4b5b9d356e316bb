"""Extraction benchmark: ResNet-18 layer2 + layer3 + avgpool over PNG images, batch 64, CPU.

    python bench/bench_extract.py              # 2,000 images 224x224 (several minutes on 2 cores)
    python bench/bench_extract.py --n 400      # quicker look

Each measurement runs in its own subprocess so that its peak RSS (ru_maxrss of the main process;
decoding workers are separate processes in every mode, and their RSS counts the pages they share
with the parent they were forked from) is its own:
- bare:        DataLoader decode (same workers) + normalize + full forward pass, nothing kept
- extract:     bonnerlab.extraction.extract (hooks, early stop, writer thread, zarr store)
- accumulate:  hooks that keep every batch in RAM, concatenate, then np.save (the naive way)
- extract@200: the same extraction over the first 200 images (is memory flat in N?)
Then the time to lazily read 1,000 random stimuli of layer3 from the store.
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

LAYERS = ["layer2", "layer3", "avgpool"]


def make_images(root: Path, n: int, size: int) -> Path:
    """Smooth random PNGs (photo-like compressibility, unlike white noise); reused if present."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    have = len(list(root.glob("*.png")))
    rng = np.random.default_rng(0)
    for i in range(have, n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        noise = rng.integers(-8, 9, (size, size, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i:05d}.png")
    return root


def _model():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def _loader(images: Path, n: int, size: int, batch: int, workers: int):
    import torch

    from bonnerlab.extraction import _FileImages, scan_stimuli

    files = scan_stimuli(images)[0][:n]
    return torch.utils.data.DataLoader(
        _FileImages(files, size, 3), batch_size=batch, num_workers=workers
    )


def run_bare(args) -> dict:
    import torch

    from bonnerlab.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    model, normalize = _model(), Preprocess(IMAGENET_MEAN, IMAGENET_STD).normalize
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, _ in _loader(args.images, args.n, args.size, args.batch, args.workers):
            model(normalize(images))
    return {"seconds": time.perf_counter() - t0}


def run_accumulate(args) -> dict:
    import numpy as np
    import torch

    from bonnerlab.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    model, normalize = _model(), Preprocess(IMAGENET_MEAN, IMAGENET_STD).normalize
    kept: dict[str, list] = {name: [] for name in LAYERS}
    for name in LAYERS:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: kept[name].append(out.detach().clone())
        )
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, _ in _loader(args.images, args.n, args.size, args.batch, args.workers):
            model(normalize(images))
        for name in LAYERS:
            np.save(Path(args.out) / f"{name}.npy", torch.cat(kept[name]).numpy())
    return {"seconds": time.perf_counter() - t0}


def run_extract(args) -> dict:
    from bonnerlab.config import ModelConfig
    from bonnerlab.extraction import ExtractConfig, extract

    cfg = ExtractConfig(
        model=ModelConfig(arch="resnet18"),
        stimuli=str(args.images),
        limit=args.n,
        image_size=args.size,
        layers=LAYERS,
        batch_size=args.batch,
        num_workers=args.workers,
        device="cpu",
        output=str(Path(args.out) / "store.zarr"),
        compression=args.compression,
        overwrite=True,
        progress=False,
    )
    result = extract(cfg)
    return {"seconds": result["seconds"], "store": result["store"]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args) -> None:
    fn = {"bare": run_bare, "accumulate": run_accumulate, "extract": run_extract}[args.mode]
    cpu = _cpu_seconds()
    result = fn(args)
    # CPU time of the main process per image (model build included): a check on images/s
    # when other jobs share the machine.
    result["cpu_ms_per_image"] = 1000 * (_cpu_seconds() - cpu) / args.n
    result["images_per_s"] = args.n / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(args, mode: str, n: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, __file__, "--child", mode, "--n", str(n), "--images", str(args.images),
        "--size", str(args.size), "--batch", str(args.batch), "--workers", str(args.workers),
        "--out", str(out), "--compression", args.compression,
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{run.stderr[-2000:]}")
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def lazy_read(store: str, n_read: int) -> tuple[float, tuple[int, ...]]:
    import numpy as np

    from bonnerlab.activations import open_activations

    t0 = time.perf_counter()
    da = open_activations(store, "layer3")
    pick = np.random.default_rng(0).choice(
        da.sizes["presentation"], min(n_read, da.sizes["presentation"]), replace=False
    )
    values = da.isel(presentation=pick).values
    return time.perf_counter() - t0, values.shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="number of images")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (all modes)")
    p.add_argument("--compression", default="zstd", help="store compression: zstd, lz4, none")
    p.add_argument("--images", type=Path, default=None, help="image folder (generated if missing)")
    p.add_argument("--modes", default="bare,extract,accumulate,extract200")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    args.images = args.images or Path(tempfile.gettempdir()) / f"bonnerlab-bench-{args.size}px"
    t0 = time.perf_counter()
    make_images(args.images, args.n, args.size)
    print(
        f"{args.n} PNG images {args.size}x{args.size} in {args.images} ({time.perf_counter() - t0:.0f} s)"
    )
    modes = args.modes.split(",")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        for mode in modes:
            n = 200 if mode == "extract200" else args.n
            rows[mode] = measure(args, mode.replace("200", ""), n, Path(tmp) / mode)
            r = rows[mode]
            print(
                f"  {mode:<11} {r['images_per_s']:7.1f} images/s  peak RSS {r['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
        read = lazy_read(rows["extract"]["store"], 1000) if "extract" in rows else None

    bare = rows.get("bare")
    print(f"\nResNet-18 {'+'.join(LAYERS)}, {args.n} PNG {args.size}px, batch {args.batch}, "
          f"{args.workers} workers, CPU, compression {args.compression}")  # fmt: skip
    print(
        f"{'mode':<12}{'images/s':>10}{'vs bare':>9}{'CPU ms/img':>12}"
        f"{'peak RSS MB':>13}{'vs bare':>9}{'workers MB':>12}"
    )
    for mode, r in rows.items():
        speed = f"{r['images_per_s'] / bare['images_per_s']:.2f}x" if bare else "-"
        rss = f"{r['peak_rss_mb'] / bare['peak_rss_mb']:.2f}x" if bare else "-"
        label = "extract@200" if mode == "extract200" else mode
        print(
            f"{label:<12}{r['images_per_s']:>10.1f}{speed:>9}{r['cpu_ms_per_image']:>12.0f}"
            f"{r['peak_rss_mb']:>13.0f}{rss:>9}{r['workers_peak_rss_mb']:>12.0f}"
        )
    if "extract" in rows and "extract200" in rows:
        growth = rows["extract"]["peak_rss_mb"] / rows["extract200"]["peak_rss_mb"]
        print(f"peak RSS extract@{args.n} / extract@200: {growth:.3f}")
    if read:
        print(
            f"lazy read of {read[1][0]} random stimuli of layer3 {list(read[1][1:])}: {read[0]:.2f} s"
        )


if __name__ == "__main__":
    main()
