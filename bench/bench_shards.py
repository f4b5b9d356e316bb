"""Shards vs the same image folder, in one run: training batches/s, extraction images/s, files
opened and read calls.

    python bench/bench_shards.py                 # 1,000 photographs, ~3 min on 2 busy cores
    python bench/bench_shards.py --n 400 --rounds 1 --workers 1     # a quick look

Data: JPEG photographs cut from scikit-learn's two sample photographs (bench_natural's
make_photos: shorter side 160-512 px) under train/<photo>/, packed with
`python -m bonnerlab.data pack` semantics (`shards.pack`, --shard_size images per shard).

- training: one epoch of `TrainBatches` over the training split (the natural preset's canvas at
  --size, --workers persistent workers, --batch), from the folder's files and from the shards;
  the loader only (decode + batching: what a training step waits on), samples/s;
- extraction: `extract()` of --arch (mnist_cnn by default, random weights: on a CPU a ResNet's
  forward pass hides the data path) at --size (squash) over the folder and over the shard set,
  images/s;
- files opened (Python's audit hook, in this process: one pass with no workers) and read
  syscalls (/proc/self/io syscr) per 1,000 images.

The paths take turns for --rounds rounds; each keeps its best: the machine is shared. Ratios are
shards / folder. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_natural import make_photos  # noqa: E402

from bonnerlab.data import shards  # noqa: E402
from bonnerlab.data.datasets import FolderDataset  # noqa: E402
from bonnerlab.data.folders import scan_collection  # noqa: E402
from bonnerlab.data.loaders import TrainBatches  # noqa: E402

CPU = torch.device("cpu")
LAYER = {"mnist_cnn": "fc", "resnet18": "avgpool", "resnet50": "avgpool"}  # what extraction keeps


def splits(folder: Path, packed: Path, size: int) -> dict[str, FolderDataset]:
    names, labels = scan_collection(folder).splits["train"]
    s = shards.open_shards(packed)
    return {
        "folder": FolderDataset(folder, [folder / n for n in names], labels, size, 3, "canvas"),
        "shards": FolderDataset(packed, s.files(names), labels, size, 3, "canvas"),
    }


def train_rate(source: FolderDataset, batch: int, workers: int) -> float:
    batches = TrainBatches(source, batch, 0, 0, 1, CPU, workers)
    try:
        start, n = time.perf_counter(), 0
        for x, _, _ in batches.batches(epoch=0):
            n += len(x)
        return n / (time.perf_counter() - start)
    finally:
        batches.close()


def use_shard_stimuli() -> None:
    """Extraction from a shard folder as the planned integration in extract/stimuli.py does it
    (load_stimuli -> shards.shard_stimuli), applied here when that file does not yet."""
    from bonnerlab.extract import run, stimuli

    real = stimuli.load_stimuli

    def load(cfg, image_size, in_channels, data):
        if shards.is_shard_set(cfg.stimuli):
            s = shards.shard_stimuli(cfg.stimuli, cfg.limit)
            return stimuli.Stimuli(
                s.ids, s.labels, s.root, s.classes, files=s.files, coords=s.coords
            )
        return real(cfg, image_size, in_channels, data)

    run.load_stimuli = load


def extract_rate(stimuli: Path, out: Path, size: int, workers: int, batch: int, arch: str) -> float:
    from bonnerlab.config import ExtractConfig, ModelConfig
    from bonnerlab.extract.run import extract

    cfg = ExtractConfig(
        model=ModelConfig(arch=arch),
        stimuli=str(stimuli),
        image_size=size,
        preprocess="squash",
        in_channels=3,
        layers=[LAYER[arch]],
        batch_size=batch,
        device="cpu",
        num_workers=workers,
        output=str(out),
        progress=False,
    )
    return extract(cfg)["images_per_s"]


def io_counts(make, under: Path) -> dict[str, float]:
    """Files opened under `under` and read syscalls, per 1,000 images, for building the split
    with `make()` (the shards are opened there) and one pass over it in this process (no
    workers)."""
    opened = [0]
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and str(args[0]).startswith(str(under)):
            opened[0] += 1

    sys.addaudithook(hook)

    def syscr() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("syscr:"):
                return int(line.split()[1])
        return 0

    before = syscr()
    source = make()
    for i in range(len(source)):
        source[i]
    reads = syscr() - before
    active[0] = False
    per = 1000 / len(source)
    return {"files_opened_per_1000": opened[0] * per, "read_syscalls_per_1000": reads * per}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="photographs")
    p.add_argument("--shard_size", type=int, default=1000)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--arch",
        default="mnist_cnn",
        choices=sorted(LAYER),
        help="the extracted model: small on a CPU, so the data path shows",
    )
    p.add_argument("--data", default="", help="keep the photographs here for reuse")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        data = Path(args.data) if args.data else work / "photos"
        make_photos(data, args.n, 0)
        folder = data / "train"
        packed = work / "shards"
        t = time.perf_counter()
        shards.pack(folder, packed, args.shard_size)
        pack_s = time.perf_counter() - t
        n_shards = len(list(packed.glob("*.tar")))
        print(f"{args.n} photographs packed into {n_shards} shards in {pack_s:.1f} s")
        sources = splits(folder, packed, args.size)
        use_shard_stimuli()
        rates: dict[str, dict[str, list[float]]] = {
            "train_samples_per_s": {"folder": [], "shards": []},
            "extract_images_per_s": {"folder": [], "shards": []},
        }
        for r in range(args.rounds):
            order = ("folder", "shards") if r % 2 == 0 else ("shards", "folder")
            for path in order:
                rate = train_rate(sources[path], args.batch, args.workers)
                rates["train_samples_per_s"][path].append(rate)
                stimuli = folder if path == "folder" else packed
                store = work / f"{path}-{r}.zarr"  # a new one each round: a rerun computes nothing
                ext = extract_rate(stimuli, store, args.size, args.workers, args.batch, args.arch)
                rates["extract_images_per_s"][path].append(ext)
                print(f"  round {r + 1} {path}: train {rate:.0f}/s, extract {ext:.0f} images/s")
        result: dict = {"n": args.n, "shard_size": args.shard_size, "workers": args.workers}
        for kind, by_path in rates.items():
            best = {k: max(v) for k, v in by_path.items()}
            result[kind] = {k: round(v, 1) for k, v in best.items()}
            result[kind]["ratio_shards_vs_folder"] = round(best["shards"] / best["folder"], 3)
        for path, under in (("folder", folder), ("shards", packed)):
            result[f"io_{path}"] = io_counts(
                lambda p=path: splits(folder, packed, args.size)[p], under
            )
        result["pack_seconds"] = round(pack_s, 1)
        print(json.dumps(result, indent=1))
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "shards.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the photographs too, unless --data


if __name__ == "__main__":
    raise SystemExit(main())
