"""Natural-image training benchmark: bonnerlab's `natural` preset vs a plain PyTorch loop, \
in one run.

    python bench/bench_natural.py                    # ~4 min on 2 busy CPU cores
                                                       (make bench-natural)
    python bench/bench_natural.py --cpu-bf16         # also bonnerlab with --amp_cpu
                                                       (CPU bfloat16 autocast)
    python bench/bench_natural.py --quick            # 2 short rounds, to check that it runs
    python bench/bench_natural.py --threads 2 --workers 1 --batch 64 --steps 8 --rounds 4

Data: 2,000 JPEG photographs cut from the two real photographs scikit-learn ships
(`sklearn.datasets.load_sample_images`, 427x640 each): random crops (10-100% of the area,
aspect 3:4 to 4:3) saved at a random shorter side of 160-512 pixels (quality 90), under
train/<photo>/ and val/<photo>/ of a temporary folder (or --data, kept for reuse).

Both paths train torchvision ResNet-18 (random weights, 2 classes) at 112x112 with SGD (lr 0.1,
Nesterov momentum 0.9, weight decay 5e-4), at the same batch size and number of workers
(default: bonnerlab's auto, one core left to training):
- bonnerlab: `bonnerlab.train.build.build` + `wrap` + `bonnerlab.train.loop.train_one_epoch` with
  `data.augment natural`
  (workers decode with JPEG draft to a 1.14 x 112 canvas; random-resized crop + flip batched in
  `BatchAugment.natural`) and the config's defaults otherwise (channels-last on, no CPU autocast);
- reference: a DataLoader of torchvision `RandomResizedCrop(112)` + `RandomHorizontalFlip` +
  `ToTensor` + `Normalize` per sample (full-size PIL decode), and the classic loop
  (zero_grad, forward, cross-entropy, backward, step) on a contiguous (NCHW) model.

The paths take turns, --steps training steps each per round (each a fresh pass over a seeded
sample of the folder, persistent workers on every side, pipeline fill included; the order
rotates every round), and each keeps its best round: the least disturbed by other processes.
bonnerlab's step is split into phases by bench_train.PhaseTimer: `fetch` (waiting for the next
batch from the workers) + `augment` (BatchAugment.augment) is the share "spent loading +
augmenting"; the reference's time waiting on its DataLoader is reported beside it. Then two
attributions: each data path alone (ms per image: decode + transforms in one thread as in a
worker; bonnerlab's batched augmentation in the training process), and the model step alone on
a fixed batch (NCHW, channels-last, channels-last + CPU bf16 autocast), which tell how much of
the ratio is the data path and how much the memory format.

Threads: torch's default (one per core), or 1 when the load average at start is at least half
the core count (see bench_train.py: a busy machine stalls multi-threaded small ops); --threads N
forces N. Results: a table on stdout and bench/out/natural.json. Not a test: nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_train import ProductRun, set_threads  # noqa: E402

from bonnerlab.config import DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from bonnerlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

SIZE = 112
N_TRAIN, N_VAL = 2000, 20
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data


def make_photos(root: Path, n_train: int = N_TRAIN, n_val: int = N_VAL, seed: int = 0) -> dict:
    """train/<photo>/*.jpg and val/<photo>/*.jpg cut from scikit-learn's two sample photographs;
    skipped when root already holds them (a --data folder from an earlier run)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    marker = root / "photos.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    photos = load_sample_images()
    names = [Path(f).stem for f in photos.filenames]  # china, flower
    rng = np.random.default_rng(seed)
    sides = []
    for split, n in (("train", n_train), ("val", n_val)):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k = i % len(names)
            image = photos.images[k]
            h, w = image.shape[:2]
            for _ in range(20):  # a crop of 10-100% of the area at aspect 3:4..4:3 that fits
                area = h * w * rng.uniform(0.1, 1.0)
                ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                cw, ch = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
                if cw <= w and ch <= h:
                    break
            else:
                cw, ch = w, h
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = Image.fromarray(image[top : top + ch, left : left + cw])
            short = int(rng.integers(160, 513))  # many scales, below and above the source's
            scale = short / min(cw, ch)
            crop = crop.resize(
                (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR
            )
            crop.save(root / split / names[k] / f"{i:05d}.jpg", quality=90)
            sides.append(crop.size)
    arr = np.array(sides)
    info = {
        "photos": names,
        "train": n_train,
        "val": n_val,
        "mean_size": arr.mean(0).round(1).tolist(),
        "min_short_side": int(arr.min()),
        "max_long_side": int(arr.max()),
        "bytes": sum(p.stat().st_size for p in root.rglob("*.jpg")),
    }
    marker.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- the two paths


def bonnerlab_config(root: Path, batch: int, workers: int, steps: int) -> TrainConfig:
    data = DataConfig(
        dataset="imagefolder",
        root=str(root),
        image_size=SIZE,
        in_channels=3,
        augment="natural",
        batch_size=batch,
        eval_batch_size=batch,
        num_workers=workers,
    )
    optim = OptimConfig(optimizer="sgd", schedule="constant", **SGD)
    return TrainConfig(
        data=data,
        model=ModelConfig(arch="resnet18"),
        optim=optim,
        device="cpu",
        progress=False,
        max_steps_per_epoch=steps,
        epochs=1000,
        log_every_steps=50,
    )


class BonnerlabRun(ProductRun):
    """bonnerlab's own build() + wrap() + train_one_epoch, timed per phase (bench_train's)."""

    def __init__(self, cfg: TrainConfig, cpu_bf16: bool = False) -> None:
        # --amp_cpu: bfloat16 autocast where the CPU runs it natively
        super().__init__(replace(cfg, amp_cpu=True) if cpu_bf16 else cfg)

    def chunk(self) -> dict:
        return self.epoch()


class ReferenceRun:
    """The plain PyTorch loop: torchvision transforms per sample in DataLoader workers."""

    def __init__(self, root: Path, batch: int, workers: int, steps: int, num_classes: int) -> None:
        import torchvision
        from torchvision import transforms as T

        torch.manual_seed(0)
        transform = T.Compose(
            [
                T.RandomResizedCrop(SIZE),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
        # each pass is `steps` batches of a fresh random sample: no batch is prefetched for a
        # pass that is never timed (it would run during the other path's round)
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=steps * batch)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=True,
        )
        self.model = torchvision.models.resnet18(num_classes=num_classes)
        self.optimizer = torch.optim.SGD(self.model.parameters(), nesterov=True, **SGD)

    def chunk(self) -> dict:
        self.model.train()
        seen, wait = 0, 0.0
        start = time.perf_counter()
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                images, labels = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(images), labels)
            loss.backward()
            self.optimizer.step()
            seen += len(labels)
        total = time.perf_counter() - start
        return {
            "samples": seen,
            "seconds": total,
            "samples_per_s": seen / total,
            "fetch_share": wait / total,
        }

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


def data_path_ms(root: Path, run: BonnerlabRun, n: int) -> dict:
    """Milliseconds of one core per image of each data path alone, in this process (best of 2):
    the reference's decode + RandomResizedCrop + flip + ToTensor + Normalize; bonnerlab's draft
    decode to the canvas (what its workers do) and its share of BatchAugment.natural on a batch."""
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(SIZE),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    source, preprocess = run.run.splits.train, run.run.batch_augment
    index = np.random.default_rng(1).choice(len(source), n, replace=False).tolist()

    def best(fn) -> float:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * min(times) / n

    canvases = torch.stack([source[i][0] for i in index])
    threads = torch.get_num_threads()
    # decoding in one thread, as in a DataLoader worker: on a busy machine the small tensor ops of
    # a multi-threaded pool wait for descheduled threads (8 ms instead of 2 ms per image here)
    torch.set_num_threads(1)
    try:
        out = {
            "reference": best(lambda: [dataset[i] for i in index]),
            "bonnerlab_decode": best(lambda: [source[i] for i in index]),
        }
    finally:
        torch.set_num_threads(threads)
    # the batched augmentation runs in the training process, with its threads
    out["bonnerlab_augment"] = best(lambda: preprocess.augment(canvases, 0, 0, 0, 0, 1))
    return out


def model_step_rates(batch: int, num_classes: int, rounds: int, steps: int = 2) -> dict:
    """Samples/s of forward + backward + SGD step alone on one fixed batch: NCHW vs channels-last,
    and channels-last under CPU bfloat16 autocast (--amp_cpu); the variants
    alternate, `steps` timed steps each per round, best step kept."""
    import torchvision

    x = torch.randn(batch, 3, SIZE, SIZE)
    y = torch.randint(0, num_classes, (batch,))
    variants = {}
    for name, fmt, bf16 in (
        ("nchw", torch.contiguous_format, False),
        ("channels_last", torch.channels_last, False),
        ("channels_last_bf16", torch.channels_last, True),
    ):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=num_classes).to(memory_format=fmt)
        variants[name] = (
            model,
            torch.optim.SGD(model.parameters(), nesterov=True, **SGD),
            x.contiguous(memory_format=fmt),
            bf16,
        )
    best = dict.fromkeys(variants, float("inf"))
    for r in range(rounds):
        for name, (model, opt, xf, bf16) in variants.items():
            for i in range(steps + (r == 0)):
                t0 = time.perf_counter()
                opt.zero_grad()
                with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(model(xf), y)
                loss.backward()
                opt.step()
                if r or i:  # the very first step allocates
                    best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch / t for name, t in best.items()}


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default="",
        help="folder for the photographs, kept for reuse (default: a temporary one)",
    )
    p.add_argument("--batch", type=int, default=32, help="batch size of both paths")
    p.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="DataLoader workers of both paths "
        "(default: bonnerlab's auto, one core left to training)",
    )
    p.add_argument("--steps", type=int, default=4, help="training steps per path per round")
    p.add_argument(
        "--rounds", type=int, default=6, help="alternating rounds; each path keeps its best"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads of the training process "
        "(default: torch's, 1 on a busy machine)",
    )
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="also time bonnerlab with --amp_cpu "
        "(bfloat16 autocast where the CPU runs it natively)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds of 3 steps at batch 16, to check that it runs",
    )
    p.add_argument("--out", default=str(HERE / "out" / "natural.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.rounds = 16, 3, 2
    load, busy = set_threads(args.threads)
    from bonnerlab.data.loaders import resolve_workers

    workers = resolve_workers(args.workers)
    bench_start = time.perf_counter()
    log(
        f"bonnerlab natural-image bench: torch {torch.__version__}, "
        f"{torch.get_num_threads()} training threads, "
        f"{workers} loader worker(s), batch {args.batch}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), "
        f"load average {load:.1f}"
    )
    if busy:
        log(
            "  note: other processes are using the CPUs: absolute rates are deflated; "
            "compare the ratios"
        )

    scratch = None if args.data else tempfile.TemporaryDirectory(prefix="bench-natural-photos-")
    root = Path(args.data or scratch.name)
    try:
        t0 = time.perf_counter()
        photos = make_photos(root)
        log(
            f"photographs: {photos['train']} train + {photos['val']} val JPEGs "
            f"cut from {photos['photos']}, "
            f"mean {photos['mean_size'][0]:.0f}x{photos['mean_size'][1]:.0f} px, "
            f"{photos['bytes'] / 2**20:.0f} MiB, in {root} ({time.perf_counter() - t0:.1f} s)"
        )

        cfg = bonnerlab_config(root, args.batch, workers, args.steps)
        ours = BonnerlabRun(cfg)
        paths = {
            "bonnerlab": ours,
            "reference": ReferenceRun(
                root, args.batch, workers, args.steps, ours.run.splits.num_classes
            ),
        }
        if args.cpu_bf16:
            paths["bonnerlab --amp_cpu (CPU bf16 autocast)"] = BonnerlabRun(cfg, cpu_bf16=True)
        # warm-up: workers started, allocator and kernels warm on every path; not timed
        warm = {name: path.chunk()["samples_per_s"] for name, path in paths.items()}
        log("warm-up: " + ", ".join(f"{name} {v:.1f}" for name, v in warm.items()) + " samples/s")
        rounds: dict[str, list[dict]] = {name: [] for name in paths}
        names = list(paths)
        for r in range(args.rounds):
            # rotate which path goes first, so a drift in load hits them alike
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rounds[name].append(paths[name].chunk())
            parts = []
            for name in names:
                e = rounds[name][-1]
                if "phases_s" in e:
                    detail = f"load+augment {100 * e['load_augment_share']:.1f}%: " + ", ".join(
                        f"{k} {100 * v / e['seconds']:.1f}%" for k, v in e["phases_s"].items()
                    )
                else:
                    detail = f"waiting on its loader {100 * e['fetch_share']:.1f}%"
                parts.append(f"{name} {e['samples_per_s']:.1f} samples/s ({detail})")
            log(f"  round {r + 1}: " + "; ".join(parts))
        paths["reference"].close()
        data_ms = data_path_ms(root, ours, 4 * args.batch)
        for name, path in paths.items():
            if name != "reference":
                path.close()
    finally:
        if scratch is not None:
            scratch.cleanup()

    best = {name: max(rs, key=lambda e: e["samples_per_s"]) for name, rs in rounds.items()}
    best_ours, best_ref = best["bonnerlab"], best["reference"]
    ratio = best_ours["samples_per_s"] / best_ref["samples_per_s"]
    # the same round's two rates share its load: their ratio, median over rounds, is steadier
    # than the ratio of bests when the machine's load swings
    paired = statistics.median(
        o["samples_per_s"] / f["samples_per_s"]
        for o, f in zip(rounds["bonnerlab"], rounds["reference"], strict=True)
    )
    share = best_ours["load_augment_share"]
    share_median = statistics.median(e["load_augment_share"] for e in rounds["bonnerlab"])
    ours_data = data_ms["bonnerlab_decode"] + data_ms["bonnerlab_augment"]
    log(
        f"data path alone, ms per image: reference {data_ms['reference']:.2f}; "
        f"bonnerlab {ours_data:.2f} "
        f"(decode to canvas {data_ms['bonnerlab_decode']:.2f} "
        f"+ batched augment {data_ms['bonnerlab_augment']:.2f})"
    )
    log(
        "model step alone "
        "(forward + backward + SGD on one fixed batch; best of 3 rounds of 2 steps):"
    )
    step = model_step_rates(args.batch, ours.run.splits.num_classes, 3)
    log("  " + ", ".join(f"{k} {v:.1f}" for k, v in step.items()) + " samples/s")

    rows = [
        (
            "train samples/s, ResNet-18 112px (best round)",
            f"{best_ref['samples_per_s']:.1f}",
            f"{best_ours['samples_per_s']:.1f}",
            f"{ratio:.2f}x (target >= 1.3x)",
        ),
        ("... ratio within each round (median)", "", "", f"{paired:.2f}x"),
        (
            "step time loading + augmenting (best round)",
            f"{100 * best_ref['fetch_share']:.1f}% waiting",
            f"{100 * share:.1f}% (median {100 * share_median:.1f}%)",
            "target < 10%",
        ),
        (
            "data path alone, ms per image",
            f"{data_ms['reference']:.2f}",
            f"{ours_data:.2f}",
            f"{data_ms['reference'] / ours_data:.2f}x",
        ),
        (
            "model step alone, samples/s",
            f"{step['nchw']:.1f} (NCHW)",
            f"{step['channels_last']:.1f} (channels-last)",
            f"{step['channels_last'] / step['nchw']:.2f}x",
        ),
        (
            "... with --amp_cpu (CPU bf16 autocast)",
            f"{step['nchw']:.1f} (NCHW)",
            f"{step['channels_last_bf16']:.1f}",
            f"{step['channels_last_bf16'] / step['nchw']:.2f}x",
        ),
    ]
    for name in names[2:]:
        rate = best[name]["samples_per_s"]
        rows.append(
            (
                f"train samples/s, {name}",
                f"{best_ref['samples_per_s']:.1f}",
                f"{rate:.1f}",
                f"{rate / best_ref['samples_per_s']:.2f}x",
            )
        )
    head = ("metric", "reference", "bonnerlab", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    log("")
    log(line(head))
    log(line(["-" * w for w in widths]))
    for r in rows:
        log(line(r))
    seconds = time.perf_counter() - bench_start
    log(
        f"{torch.get_num_threads()} torch threads, {workers} worker(s), batch {args.batch}, "
        f"{args.rounds} rounds of "
        f"{args.steps} steps per path; bench took {seconds:.0f} s"
    )

    result = {
        "threads": torch.get_num_threads(),
        "workers": workers,
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_start": load,
        "photos": photos,
        "rounds_by_path": rounds,
        "bonnerlab_samples_per_s": best_ours["samples_per_s"],
        "reference_samples_per_s": best_ref["samples_per_s"],
        "ratio": ratio,
        "ratio_within_rounds_median": paired,
        "load_augment_share": share,
        "load_augment_share_median": share_median,
        "data_path_ms_per_image": data_ms,
        "model_step_samples_per_s": step,
        "bench_seconds": seconds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
