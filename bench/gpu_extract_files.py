"""Extraction from image files on a GPU: uint8 batches finished on the device vs float batches
normalized in the workers (the path before), in one run.

    python bench/gpu_extract_files.py [--n 1024] [--arch resnet50] [--workers 8]

Writes N JPEG files (random crops of smooth random fields, 256-640 px, so decoding costs what a
photograph's does), then extracts `layer3` (mean-pooled) and `avgpool` with AMP from them twice
per path, alternating, and prints images/s of each path's best run, their ratio, and the largest
difference between the two stores (the same input tensors: only cuDNN's algorithm choice can
differ). Needs CUDA; not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bonnerlab.activations import open_activations  # noqa: E402
from bonnerlab.config import ExtractConfig, ModelConfig  # noqa: E402
from bonnerlab.extract import run as extraction  # noqa: E402
from bonnerlab.extract.run import extract  # noqa: E402


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "a").mkdir(parents=True)
    for i in range(n):
        h, w = rng.integers(256, 641, size=2)
        coarse = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC)
        img.save(folder / "a" / f"{i:05d}.jpg", quality=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    work = Path(tempfile.mkdtemp(prefix="gpu-extract-files-"))
    t = time.perf_counter()
    write_images(work / "stimuli", args.n)
    print(
        f"{args.n} JPEGs written in {time.perf_counter() - t:.1f} s; "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    real = extraction.finish_on_device
    rates: dict[str, list[float]] = {"uint8 to the device": [], "float32 from the workers": []}
    stores = {}
    for r in range(args.rounds):
        for path in rates:
            extraction.finish_on_device = (
                real if path.startswith("uint8") else (lambda device: False)
            )
            out = work / f"{path.split()[0]}-{r}.zarr"
            cfg = ExtractConfig(
                model=ModelConfig(arch=args.arch),
                stimuli=str(work / "stimuli"),
                layers=["layer3", "avgpool"],
                pooling=["layer3=avg", "avgpool=flatten"],
                batch_size=128,
                device="cuda",
                amp=True,
                num_workers=args.workers,
                output=str(out),
                progress=False,
            )
            summary = extract(cfg)
            rates[path].append(summary["images_per_s"])
            stores[path] = out
            print(f"  round {r + 1}: {path}: {summary['images_per_s']:.0f} images/s")
    extraction.finish_on_device = real
    best = {k: max(v) for k, v in rates.items()}
    a, b = (open_activations(stores[k], "avgpool").values for k in rates)
    print(
        f"best: uint8 {best['uint8 to the device']:.0f} "
        f"vs float32 {best['float32 from the workers']:.0f} images/s: "
        f"{best['uint8 to the device'] / best['float32 from the workers']:.2f}x; "
        f"max |difference| of avgpool {float(np.abs(a - b).max()):.2e} "
        f"(values up to {float(np.abs(b).max()):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
