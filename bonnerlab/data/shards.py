"""Image sets as shards: a few large tar files in place of a million small ones, read by index.

Cluster file systems serve large files well and small ones badly (Lustre reads tiny files at a
few percent of its large-file rate; inode quotas of ~1e6 files are common). `pack` writes an
image folder or a stimulus sheet as tar shards in WebDataset's layout, with the `webdataset`
library's `ShardWriter`, plus `index.json`:

    OUT/shard-000000.tar   per image: <key>.<ext> (the file's bytes as they were), <key>.cls
                           (its label), <key>.json (id, class, sheet columns); <key> = its
                           position in the set, 8 digits
    OUT/index.json         a wids dataset descriptor (wids_version, shardlist: url, nsamples,
                           filesize) plus, per image, its shard, data offset, size, extension, id,
                           label and sha256; the folder's training collection (splits, classes)

Reading is by index (`ShardReader`): every shard is opened once, mapped (mmap) and its descriptor
closed, in the process that builds the dataset, so DataLoader workers forked from it inherit the
maps: one file opened per shard (per 1,000 images at the default size) whatever the workers,
ranks' slices or shuffling, and no descriptor limit however many shards. The samplers stay the
map-style ones of `bonnerlab.data.loaders`: every rank and worker gets equal, exact slices by
index and resumes mid-epoch as from a folder, and nothing waits for a shard another worker holds
(an iterable split by shard hangs or gives ranks unequal batches when shards < ranks x workers:
webdataset#188, #225). wids' own reader would copy each shard into a cache folder and scan every
tar header at open; here the index gives the offsets.

A shard whose size differs from the index's (truncated, or rewritten) is one line naming it when
the set is opened; one whose member headers disagree with the index (stale) when that member is
read; `verify` checks every image's sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import secrets
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonnerlab.data.folders import FileList, scan_collection, scan_stimulus_folder
from bonnerlab.data.sheets import SHEET_SUFFIXES, read_sheet
from bonnerlab.errors import DataError, UserError

FORMAT = "bonnerlab-shards/1"
INDEX = "index.json"
SHARD_NAME = "shard-%06d.tar"
BLOCK = 512  # a tar header (and the unit members are padded to)


def is_shard_set(path: str | Path) -> bool:
    """Whether `path` is a folder `pack` wrote (it holds the index)."""
    return (Path(path) / INDEX).is_file()


# ----------------------------------------------------------------------------- packing


@dataclass
class PackSource:
    """What to pack: the images in the set's order, with what extraction and training read."""

    root: str  # the folder or sheet, resolved
    kind: str  # folder | sheet
    files: list[Path]
    ids: list[str]  # relative paths (folder) or the sheet's stimulus ids
    labels: list[int]  # extraction's: a folder's first level, a sheet's label column; -1 unknown
    classes: list[str]
    coords: dict[str, np.ndarray] = field(default_factory=dict)  # a sheet's other columns
    collection: FileList | None = None  # training's splits, when the folder is a collection


def pack_source(path: Path) -> PackSource:
    """A folder in extraction's order (every image, sorted by relative path, labels from the first
    level) with its training collection when it is one; or a sheet in the sheet's order."""
    if path.suffix.lower() in SHEET_SUFFIXES:
        sheet = read_sheet(path)
        return PackSource(
            str(path.resolve()), "sheet", sheet.files, sheet.ids, sheet.labels, [], sheet.coords
        )
    files, labels, classes = scan_stimulus_folder(path)
    try:
        collection: FileList | None = scan_collection(path)
    except DataError:  # images without class folders: a stimulus set, not a training set
        collection = None
    ids = [f.relative_to(path).as_posix() for f in files]
    return PackSource(
        str(path.resolve()), "folder", files, ids, labels, classes, collection=collection
    )


def _extension(path: Path) -> str:
    # a WebDataset key ends at the first dot of a member's name, so the extension has none
    return path.suffix.lower().lstrip(".").replace(".", "") or "img"


def _json_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def pack(source: str | Path, out: str | Path, shard_size: int = 1000, overwrite: bool = False):
    """Write `source` (an image folder or a .csv/.tsv sheet) as shards and an index into `out`;
    returns the index's summary. Every check comes first; `out` appears whole or not at all."""
    try:
        import webdataset as wds
    except ImportError as e:  # reading needs it not: only packing writes through its ShardWriter
        raise UserError(
            "packing shards needs the webdataset package: pip install 'bonnerlab[shards]'"
        ) from e

    source, out = Path(source), Path(out)
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1; got {shard_size}")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise DataError(f"{out} is inside the set it packs ({source}); choose another folder")
    items = pack_source(source)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    n = len(items.ids)
    columns: dict[str, list] = {k: [] for k in ("shard", "offset", "size", "ext", "sha256")}
    shardlist: list[dict[str, Any]] = []
    names = {f"{i:08d}.{_extension(f)}": i for i, f in enumerate(items.files)}

    def index_shard(fname: str) -> None:
        # offsets of each image's data, read back from the tar the writer just closed
        with tarfile.open(fname) as tar:
            members = [m for m in tar.getmembers() if m.name in names]
        for m in members:
            columns["shard"].append(len(shardlist))
            columns["offset"].append(m.offset_data)
            columns["size"].append(m.size)
        shardlist.append(
            {"url": Path(fname).name, "nsamples": len(members), "filesize": os.stat(fname).st_size}
        )

    try:
        # mtime 0: the same set packs to the same bytes; maxsize: shards by count only
        with wds.ShardWriter(
            str(tmp / SHARD_NAME),
            maxcount=shard_size,
            maxsize=float("inf"),
            post=index_shard,
            verbose=0,
            encoder=False,
            mtime=0.0,
        ) as writer:
            for i, path in enumerate(items.files):
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise DataError(f"cannot read image {path}: {e}") from e
                label = items.labels[i]
                meta = {"id": items.ids[i], "label": label}
                if 0 <= label < len(items.classes):
                    meta["class"] = items.classes[label]
                meta.update({k: _json_value(v[i]) for k, v in items.coords.items()})
                ext = _extension(path)
                writer.write(
                    {
                        "__key__": f"{i:08d}",
                        ext: data,
                        "cls": str(label).encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
                columns["ext"].append(ext)
                columns["sha256"].append(hashlib.sha256(data).hexdigest())
        assert len(columns["offset"]) == n, "every image indexed once"
        index = {
            "wids_version": 1,  # wids.ShardListDataset(OUT/index.json) reads the same shards
            "format": FORMAT,
            "source": items.root,
            "kind": items.kind,
            "n": n,
            "shard_size": shard_size,
            "classes": items.classes,
            "shardlist": shardlist,
            "samples": {"id": items.ids, "label": items.labels, **columns},
            "coords": {
                k: {"dtype": v.dtype.str, "values": v.tolist()} for k, v in items.coords.items()
            },
            # every field of the scan (what files.json holds), so training reads the same list
            "collection": asdict(items.collection) if items.collection is not None else None,
        }
        from bonnerlab.runs import atomic_write_text

        atomic_write_text(tmp / INDEX, json.dumps(index))
        if out.exists():  # --overwrite: the old set goes only once the new one is complete
            trash = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"out": str(out), "images": n, "shards": len(shardlist), "source": items.root}


# ----------------------------------------------------------------------------- reading


class ShardReader:
    """Image bytes by position. Each shard is mapped once per process, on first use, its
    descriptor closed at once; `open_all` maps every shard now (before DataLoader workers fork,
    so they share the maps and open nothing)."""

    def __init__(self, root: Path, shardlist: list[dict], shard, offset, size, ext) -> None:
        self.root = root
        self.names = [s["url"] for s in shardlist]
        self.filesizes = [int(s["filesize"]) for s in shardlist]
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self.ext = list(ext)
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.offset)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # a spawned worker maps again

    def path(self, shard: int) -> Path:
        return self.root / self.names[shard]

    def _map(self, shard: int) -> mmap.mmap:
        m = self._maps.get(shard)
        if m is not None:
            return m
        path = self.path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"shard {path} cannot be opened: {e.strerror}") from e
        try:
            actual = os.fstat(fd).st_size
            check_size(path, actual, self.filesizes[shard])
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._maps[shard] = m
        return m

    def open_all(self) -> None:
        for shard in range(len(self.names)):
            self._map(shard)

    def read(self, position: int) -> bytes:
        """The image file's bytes; a member whose tar header is not the index's is stale."""
        shard = int(self.shard[position])
        m = self._map(shard)
        start, size = int(self.offset[position]), int(self.size[position])
        header = m[start - BLOCK : start]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        expected = f"{position:08d}.{self.ext[position]}"
        try:
            recorded = int(header[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
        except ValueError:
            recorded = -1
        if name != expected or recorded != size:
            raise DataError(
                f"shard {self.path(shard)} is stale: at offset {start} it holds {name!r} "
                f"({recorded} bytes), the index expects {expected!r} ({size} bytes); pack the "
                "set again"
            )
        return m[start : start + size]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def check_size(path: Path, actual: int, recorded: int) -> None:
    if actual < recorded:
        raise DataError(
            f"shard {path} is truncated: {actual:,d} bytes, the index says {recorded:,d}; "
            "copy it again or pack the set again"
        )
    if actual != recorded:
        raise DataError(
            f"shard {path} is stale: {actual:,d} bytes, the index says {recorded:,d} "
            "(rewritten after packing); pack the set again"
        )


class NamedBytes(io.BytesIO):
    """An image's bytes where a path goes: a file object PIL opens, with a path's `read_bytes`,
    printed as where it lives (`shard:id`), so errors name the image as they would a file."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def read_bytes(self) -> bytes:
        return self.getvalue()

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


@dataclass
class ShardSet:
    """An opened shard set: its index (ids, labels, hashes, coordinates, collection) and reader."""

    root: Path
    index: dict[str, Any]
    reader: ShardReader
    ids: list[str]
    positions: dict[str, int]

    @property
    def classes(self) -> list[str]:
        return list(self.index["classes"])

    @property
    def labels(self) -> list[int]:
        return [int(v) for v in self.index["samples"]["label"]]

    @property
    def sha256(self) -> list[str]:
        return list(self.index["samples"]["sha256"])

    def coords(self) -> dict[str, np.ndarray]:
        return {
            k: np.asarray(v["values"], dtype=np.dtype(v["dtype"]))
            for k, v in self.index["coords"].items()
        }

    def collection(self) -> FileList:
        """Training's view: the folder's splits and classes, as `scan_collection` found them."""
        found = self.index["collection"]
        if found is None:
            raise DataError(
                f"shards {self.root} were packed from {self.index['source']}, "
                "which has no class folders: no training splits (pack root/<class>/<image> or "
                "root/train/<class>/<image>)"
            )
        splits = {k: (v[0], v[1]) for k, v in found["splits"].items()}
        return FileList(**{**found, "splits": splits})

    def name(self, position: int) -> str:
        return f"{self.reader.path(int(self.reader.shard[position]))}:{self.ids[position]}"

    def member(self, position: int) -> NamedBytes:
        return NamedBytes(self.reader.read(position), self.name(position))

    def files(self, ids: list[str] | None = None) -> ShardFiles:
        """The images named `ids` (all, in the set's order, when None) as a files sequence."""
        if ids is None:
            return ShardFiles(self, list(range(len(self.ids))))
        missing = next((i for i in ids if i not in self.positions), None)
        if missing is not None:
            raise DataError(f"image {missing} is not in the shard set {self.root}")
        return ShardFiles(self, [self.positions[i] for i in ids])


def open_shards(root: str | Path, map_now: bool = True) -> ShardSet:
    """The shard set `pack` wrote into `root`; every shard checked (size) and, with `map_now`,
    mapped before any worker starts. Any problem is one line naming the file."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        raise DataError(
            f"{root} holds no {INDEX}: not a shard set "
            "(python -m bonnerlab.data pack FOLDER_OR_SHEET OUT writes one)"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the shard index {path}: {e}") from e
    if index.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} index (format {index.get('format')!r})")
    samples = index["samples"]
    for shard in index["shardlist"]:
        shard_path = root / shard["url"]
        try:
            actual = os.stat(shard_path).st_size
        except OSError as e:
            raise DataError(f"shard {shard_path} is missing: {e.strerror}") from e
        check_size(shard_path, actual, int(shard["filesize"]))
    reader = ShardReader(
        root,
        index["shardlist"],
        samples["shard"],
        samples["offset"],
        samples["size"],
        samples["ext"],
    )
    if map_now:
        reader.open_all()
    ids = list(samples["id"])
    return ShardSet(root, index, reader, ids, {sid: i for i, sid in enumerate(ids)})


def verify(root: str | Path) -> dict[str, Any]:
    """Read every image and check its sha256 against the index; the first mismatch is one line."""
    shards = open_shards(root, map_now=False)
    for position, expected in enumerate(shards.sha256):
        if hashlib.sha256(shards.reader.read(position)).hexdigest() != expected:
            raise DataError(
                f"shard {shards.reader.path(int(shards.reader.shard[position]))}: image "
                f"{shards.ids[position]!r} does not match its sha256 in the index (corrupt); "
                "pack the set again"
            )
    shards.reader.close()
    return {"shards": len(shards.index["shardlist"]), "images": len(shards.ids), "ok": True}


# ----------------------------------------------------------------------------- datasets


class ShardFiles:
    """Images of a shard set where a list of image paths goes (`FolderDataset.files`,
    extraction's `Stimuli.files`): indexing gives image i as a file object PIL opens
    (`NamedBytes`, printed as shard:id), read in the DataLoader worker that asks for it, so it
    decodes through the same code as a folder's file; iterating gives each image's name as a
    path under the set's folder (OUT/<id>, which does not exist), from which `FolderDataset`
    takes its ids without reading anything."""

    def __init__(self, shards: ShardSet, positions: list[int]) -> None:
        self.shards = shards
        self.positions = np.asarray(positions, dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [self.shards.ids[p] for p in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> NamedBytes:
        return self.shards.member(int(self.positions[index]))

    def __iter__(self) -> Iterator[Path]:
        return (self.shards.root / self.shards.ids[p] for p in self.positions)

    def read_bytes(self, index: int) -> tuple[bytes, str]:
        """The image file's bytes and the name errors give it (GPU decoding's workers)."""
        position = int(self.positions[index])
        return self.shards.reader.read(position), self.shards.name(position)


@dataclass
class ShardStimuli:
    """What extraction needs of a shard set, in the set's order (as the folder or sheet it was
    packed from): the fields of `bonnerlab.extract.stimuli.Stimuli`, plus content hashes."""

    ids: list[str]
    labels: list[int]
    root: str
    classes: list[str]
    files: ShardFiles
    coords: dict[str, np.ndarray]
    sha256: list[str]


def shard_stimuli(root: str | Path, limit: int = 0) -> ShardStimuli:
    """The stimuli of a shard set: ids, labels, classes and sheet coordinates as extraction from
    the packed folder or sheet gives them; `root` records the set packed (the shards' folder)."""
    shards = open_shards(root)
    n = min(limit, len(shards.ids)) if limit else len(shards.ids)
    return ShardStimuli(
        shards.ids[:n],
        shards.labels[:n],
        str(Path(root).resolve()),
        shards.classes,
        ShardFiles(shards, list(range(n))),
        {k: v[:n] for k, v in shards.coords().items()},
        shards.sha256[:n],
    )
