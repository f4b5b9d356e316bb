"""Finding images on disk: ONE scanner (`walk_images`, `os.scandir` without a stat per file) for
training's collections (`scan_collection`: ImageNet's train/val/test layout, or class folders)
and extraction's stimulus folders (`scan_stimulus_folder`). Dot files and folders are skipped
(`._x.jpg`, `.ipynb_checkpoints`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bonnerlab.data.images import sample_looks
from bonnerlab.errors import DataError

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


def walk_images(folder: Path) -> list[str]:
    """Image files under `folder`, relative to it, sorted: one os.scandir walk, no stat per file
    (scandir's entry type comes with the directory listing)."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(folder / rel if rel else folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    stack.append(path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(path)
    return sorted(found)


def class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


@dataclass
class FileList:
    """A scanned image collection: class names and, per split, files (relative to the root)
    with their class index. Written to the run folder (`files.json`), so a tree of a million
    images is walked once per run, not per epoch, rank or restart."""

    classes: list[str]
    splits: dict[str, tuple[list[str], list[int]]]  # "train" / "val" / "test" -> files, labels
    # what the training images are (images.sample_looks), which `data.augment auto` follows;
    # None in lists saved before it was recorded (those runs keep the natural preset)
    looks: dict[str, int] | None = None

    def save(self, path: Path) -> None:
        from bonnerlab.runs import atomic_write_text

        data = {"classes": self.classes, "splits": self.splits, "looks": self.looks}
        atomic_write_text(path, json.dumps(data))

    @staticmethod
    def load(path: Path) -> FileList:
        data = json.loads(Path(path).read_text())
        splits = {k: (v[0], v[1]) for k, v in data["splits"].items()}
        return FileList(data["classes"], splits, data.get("looks"))


def scan_collection(root: Path) -> FileList:
    """An image collection as labs keep it: `root/train/<class>/...` with optional `val/` and
    `test/` beside it (ImageNet's layout), or `root/<class>/...` (a validation split is then
    carved from it). Classes come from `train/`; a `val/` or `test/` class unknown to `train/`
    is an error."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (set --data.root)")
    split_layout = (root / "train").is_dir() and bool(class_folders(root / "train"))
    base = root / "train" if split_layout else root
    classes = class_folders(base)
    if split_layout is False and (root / "train").is_dir():
        raise DataError(
            f"{root / 'train'} has no class folders: expected {root}/train/<class>/<image>"
        )
    if len(classes) < 2:
        raise DataError(
            f"image folder {base} has {len(classes)} class folder(s); need at least 2 "
            f"({base}/<class>/<image>)"
        )
    splits: dict[str, tuple[list[str], list[int]]] = {}
    for split in ("train", "val", "test") if split_layout else ("train",):
        folder = root / split if split_layout else root
        if not folder.is_dir():
            continue
        names = class_folders(folder)
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(
                f"{folder} has class folder(s) {', '.join(unknown[:5])} that {base} does not; "
                "every class must have training images"
            )
        files: list[str] = []
        labels: list[int] = []
        prefix = f"{split}/" if split_layout else ""
        for label, name in enumerate(classes):
            if not (folder / name).is_dir():
                continue
            found = walk_images(folder / name)
            files += [f"{prefix}{name}/{f}" for f in found]
            labels += [label] * len(found)
        if not files and split == "train":
            raise DataError(
                f"no images in {base}: expected "
                f"{base}/<class>/<image>{{{','.join(IMAGE_EXTENSIONS[:3])},...}}"
            )
        splits[split] = (files, labels)
    return FileList(classes, splits, sample_looks(splits["train"][0], root))


def scan_stimulus_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Every image under `root`, recursively, sorted by relative path; labels from the first
    folder level when images sit in class folders (-1 for images at the top)."""
    if not root.is_dir():
        raise DataError(f"stimulus folder {root} does not exist")
    rel = walk_images(root)
    if not rel:
        raise DataError(
            f"no images in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS[:4])}, ...)"
        )
    parts = [r.split("/") for r in rel]
    classes = sorted({p[0] for p in parts if len(p) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p[0]] if len(p) > 1 else -1 for p in parts]
    return [root / r for r in rel], labels, classes
