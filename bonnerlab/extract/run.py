"""Extract layer activations of a model over a set of stimuli into an activation store.

`extract(cfg)` runs the model over the stimuli and writes the chosen layers, batch by batch, into
the zarr store of `bonnerlab.activations` (one chunk per batch). The rooms it draws on:
`sources` (the model and its published transform), `preprocess` (that transform as recorded
steps), `stimuli` (what to show, decoded in DataLoader workers), `capture` (hooks, elements,
pooling, projection) and `activations` (the store, resume markers, shards).

- overlap: DataLoader workers decode and preprocess images while the model computes; a writer
  thread compresses and writes the previous batch. A bounded queue keeps memory flat in the
  number of stimuli.
- resume and shards: the store marks each finished chunk; a restarted job (or shard
  `shard_index` of `num_shards`) only computes its unmarked chunks. Batches are the store's
  chunks, so a redone chunk sees exactly the same inputs and gives the same bits.
- before writing, a run checks the rows its chunks already hold (`plan_work`): their files are
  hashed again (bytes only, in threads) against the store's content hashes, and their chunk files
  against their checksums. A changed stimulus is refused unless --update (only the chunks holding
  changed rows are computed again, and only those rows change) or --overwrite; a damaged chunk is
  simply computed again.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonnerlab import distributed as dist
from bonnerlab.activations.store import LayerSpec, open_store, shard_chunks
from bonnerlab.config import ExtractConfig, default_store_name, layer_options
from bonnerlab.data.loaders import resolve_workers
from bonnerlab.errors import ConfigError, DataError, DiskSpaceError, StoreError, UserError
from bonnerlab.extract.capture import (
    Capture,
    LayerPlan,
    SparseProjection,
    check_plan,
    feature_dims,
    list_layer_shapes,
    probe,
    resolve_layers,
    select,
    split_layer,
)
from bonnerlab.extract.provenance import provenance
from bonnerlab.extract.stimuli import Stimuli, content_hashes, iter_batches, load_stimuli
from bonnerlab.extract.writer import ChunkWriter, release_free_memory, share_one_heap
from bonnerlab.models.preprocess import PreprocessSpec, Transform, resolve_preprocess
from bonnerlab.models.sources import LoadedModel, load_checkpoint_source, load_source
from bonnerlab.seeds import projection_seed
from bonnerlab.train.precision import Precision


def load_model(cfg: ExtractConfig) -> LoadedModel:
    """The configured model (a `train` checkpoint or model.arch with model.weights), eval, CPU."""
    if cfg.checkpoint:
        source = load_checkpoint_source(cfg.checkpoint, cfg.which)
    else:
        source = load_source(cfg.model, cfg.seed, cfg.in_channels, cfg.num_classes)
    if cfg.in_channels and cfg.in_channels != source.in_channels:
        raise ConfigError(
            f"in_channels {cfg.in_channels} does not match the model's "
            f"{source.in_channels} input channels"
        )
    return source


def load_preprocess(cfg: ExtractConfig, source: LoadedModel) -> PreprocessSpec:
    spec = resolve_preprocess(
        source.published_transform,
        source.in_channels,
        cfg.preprocess,
        cfg.image_size,
        cfg.mean,
        cfg.std,
        source.published_by,
    )
    if spec.output_size is None:
        raise ConfigError(
            "this model's preprocessing keeps each image's aspect ratio (no crop); "
            "pass --preprocess center_crop or squash"
        )
    return spec


def example_input(spec: PreprocessSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    assert spec.output_size is not None
    return torch.zeros(1, spec.in_channels, *spec.output_size, device=device)


def list_layers(cfg: ExtractConfig) -> list[tuple[str, str, str, int]]:
    """(name, module type, output shape(s), calls per forward) of every module, for one input."""
    source = load_model(cfg)
    return list_layer_shapes(source.model, example_input(load_preprocess(cfg, source)))


@dataclass
class Plan:
    """What an extraction will compute and write, known before anything is written."""

    layers: list[str]  # the configured layers with patterns expanded, in model order
    modules: dict[str, nn.Module]
    plans: dict[str, LayerPlan]
    specs: list[LayerSpec]
    bytes_per_stimulus: dict[str, int]
    n_stimuli: int

    @property
    def total_bytes(self) -> int:
        return self.n_stimuli * sum(self.bytes_per_stimulus.values())

    def table(self) -> str:
        width = max(len(n) for n in self.layers)
        rows = [
            f"{s.name:<{width}}  {list(s.shape)!s:<20} "
            f"{self.bytes_per_stimulus[s.name]:>12,d} B/stimulus"
            for s in self.specs
        ]
        rows.append(
            f"{'total':<{width}}  {self.n_stimuli:,d} stimuli x "
            f"{sum(self.bytes_per_stimulus.values()):,d} B "
            f"= {self.total_bytes / 1e9:.3f} GB (before compression)"
        )
        return "\n".join(rows)


def plan_layers(cfg: ExtractConfig, model: nn.Module, x0: torch.Tensor, n_stimuli: int) -> Plan:
    """Expand patterns, probe one input for every layer's shape and call count, and check the
    options against them: every mistake fails here, before anything is written."""
    modules = resolve_layers(model, cfg.layers)
    layers = list(modules)
    options = layer_options(cfg, layers)
    by_module = {split_layer(n)[0]: m for n, m in modules.items()}
    seen = probe(model, by_module, x0)
    plans: dict[str, LayerPlan] = {}
    specs: list[LayerSpec] = []
    sizes: dict[str, int] = {}
    itemsize = np.dtype(cfg.dtype).itemsize
    for name in layers:
        module_name, element = split_layer(name)
        if module_name not in seen:
            raise UserError(f"layer {name} did not run in the forward pass")
        struct, calls = seen[module_name]
        shape = select(struct, element, name)
        if not isinstance(shape, tuple):
            raise UserError(
                f"layer {name} outputs a {type(shape).__name__}, not a tensor; pick an element "
                f"(NAME:0 or NAME:KEY, see --list_layers) or a submodule"
            )
        opt = options[name]
        check_plan(name, shape, opt.channels, opt.pooling)
        plan = LayerPlan(name, opt.channels, opt.pooling, calls, element)
        reduced = tuple(plan.reduce(torch.zeros(shape, device=x0.device)).shape[1:])
        if opt.reduce is not None:
            d = int(np.prod(reduced))
            plan.projection = SparseProjection(
                d, opt.reduce, projection_seed(cfg.seed, name)
            ).build(x0.device)
            reduced = (opt.reduce,)
        plans[name] = plan
        sizes[name] = int(np.prod(reduced)) * itemsize
        specs.append(
            LayerSpec(
                name,
                feature_dims(len(shape), opt.pooling, opt.reduce is not None),
                reduced,
                cfg.dtype,
                {
                    "layer": name,
                    "module": type(modules[name]).__name__,
                    "output_shape": list(shape[1:]),
                    "channels": opt.channels if opt.channels is not None else "all",
                    "pooling": opt.pooling,
                    "reduce": plan.projection.to_dict() if plan.projection else "none",
                    "calls_per_forward": calls,
                },
            )
        )
    return Plan(layers, modules, plans, specs, sizes, n_stimuli)


def check_disk_space(output: Path, needed: int) -> None:
    """Refuse (one line, nothing written) when the output's filesystem has less free space than
    the uncompressed store."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DiskSpaceError(
            f"the store needs up to {needed / 1e9:.2f} GB "
            f"but {existing} has {free / 1e9:.2f} GB free; "
            "choose another --output, fewer layers, pooling or --reduce LAYER=srp:K"
        )


@dataclass
class Work:
    """What a run computes: chunks to (re)write, and for --update the rows of each that keep
    their stored values."""

    todo: list[int]
    keep: dict[int, list[int]]
    changed: list[str]  # stimuli whose content changed since their rows were written
    damaged: dict[int, str]  # chunk -> its first problem (missing or damaged file)
    check_seconds: float  # the hash pass over the written rows and the checksum pass
    replace: bool = False  # --overwrite with changed stimuli: the store is started over


def plan_work(
    cfg: ExtractConfig, store: Any, stimuli: Stimuli, chunks: range, workers: int
) -> Work:
    """This run's chunks: the unmarked ones, the damaged ones, and (with --update) those holding
    a stimulus whose content changed. A changed stimulus without --update or --overwrite is one
    line naming it, before anything is written."""
    t0 = time.perf_counter()
    missing = store.missing_chunks(chunks)
    unmarked = set(missing)
    done = [c for c in chunks if c not in unmarked]
    rows = [i for c in done for i in range(store.chunk_slice(c).start, store.chunk_slice(c).stop)]
    stored = store.content_hashes()
    now = content_hashes(stimuli, rows, workers)
    changed = [i for i, h in zip(rows, now, strict=True) if stored[i] != h]
    if changed and not (cfg.update or cfg.overwrite):
        more = f", and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise StoreError(
            f"{store.path}: stimulus {stimuli.ids[changed[0]]!r} changed since it was extracted "
            f"(its content differs{more}); pass --update to extract only the changed stimuli "
            "again, or --overwrite to start the store over"
        )
    if changed and cfg.overwrite:
        return Work([], {}, [stimuli.ids[i] for i in changed], {}, 0.0, replace=True)
    damaged = store.damaged_chunks(done, workers)
    by_chunk: dict[int, set[int]] = {}
    for i in changed:
        by_chunk.setdefault(i // store.chunk_size, set()).add(i)
    keep: dict[int, list[int]] = {}  # --update: the other rows keep their bits (damaged: none)
    for c, rows_changed in by_chunk.items():
        if c not in damaged:
            sl = store.chunk_slice(c)
            keep[c] = [i - sl.start for i in range(sl.start, sl.stop) if i not in rows_changed]
    todo = sorted({*missing, *damaged, *by_chunk})
    changed_ids = [stimuli.ids[i] for i in changed]
    return Work(todo, keep, changed_ids, damaged, time.perf_counter() - t0)


def storage_dtype(cfg: ExtractConfig, precision: Precision) -> str:
    """`dtype auto`: float16 when AMP computes in float16 (storing it loses nothing and halves
    the store), else float32 (numpy has no bfloat16, and bfloat16 values can exceed float16's
    largest value)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float16" if precision.dtype_name == "float16" else "float32"


def extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Write the configured layers' activations to the store; returns a summary dict."""
    t_start = time.perf_counter()
    share_one_heap()  # before zarr's threads and the writer's exist
    device = dist.use_device(cfg.device)
    # recorded in the identity: TF32 changes activations by ~1e-3; autotuning would pick kernels
    # that differ between runs
    dist.configure_backends(device, benchmark=False, tf32=cfg.tf32)
    if cfg.decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"--decode gpu needs a CUDA device; this extraction runs on {device}")
    precision = Precision.resolve(device, amp=cfg.amp)  # on CUDA only: amp_cpu stays off
    cfg = replace(cfg, dtype=storage_dtype(cfg, precision))
    source = load_model(cfg)
    pre = load_preprocess(cfg, source)
    model = source.model.to(device)
    stimuli = load_stimuli(cfg, pre.square_size, pre.in_channels, source.data)
    split = device_split(cfg, pre, stimuli, device)
    plan = plan_layers(cfg, model, example_input(pre, device), len(stimuli.ids))
    output = Path(cfg.output or default_store_name(cfg))
    if cfg.plan:
        return {
            "plan": plan.table(),
            "store": str(output),
            "bytes_per_stimulus": plan.bytes_per_stimulus,
            "total_bytes": plan.total_bytes,
            "layers": plan.layers,
        }
    identity, attrs = provenance(cfg, source, pre, stimuli, plan.specs, device, precision)
    if not output.exists():
        check_disk_space(output, plan.total_bytes)
    output.parent.mkdir(parents=True, exist_ok=True)
    specs = plan.specs

    def open_output(replace: str | None = None) -> tuple[Any, str]:
        return open_store(
            output,
            identity=identity,
            layers=specs,
            stimuli=stimuli.ids,
            labels=stimuli.labels,
            chunk_size=cfg.batch_size,
            attrs=attrs,
            overwrite=cfg.overwrite,
            compression=cfg.compression,
            coords=stimuli.coords,
            replace=replace,
        )

    store, outcome = open_output()
    workers = max(1, resolve_workers(cfg.num_workers))
    chunks = shard_chunks(store.n_chunks, cfg.shard_index, cfg.num_shards)
    work = plan_work(cfg, store, stimuli, chunks, workers)
    if work.replace:  # --overwrite and a stimulus changed: start over
        changed = work.changed
        store, outcome = open_output(replace=store.key)
        work = plan_work(cfg, store, stimuli, chunks, workers)
        work.changed = changed
    todo = work.todo
    if set(todo) - set(store.missing_chunks(todo)):
        store.mark_incomplete()  # rewriting finished chunks: not finished until finalized again
    store.clear_partial_writes(todo)  # a kill mid-write leaves zarr's temp files behind
    rows = [range(store.chunk_slice(c).start, store.chunk_slice(c).stop) for c in todo]
    t0, cpu0 = time.perf_counter(), time.process_time()
    n_skipped = run_batches(
        cfg,
        model,
        plan,
        pre,
        stimuli,
        store,
        todo,
        rows,
        device,
        precision,
        output.name,
        split,
        work.keep,
    )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    layers = plan.layers
    # finalize's verify decodes a chunk per thread on top of whatever is left (ResNet-50 at batch
    # 32: +650 MB): give back the model (100 MB) and the heap the forward passes freed first
    del model, source, plan
    gc.collect()
    release_free_memory()
    missing = store.missing_chunks()
    verify_seconds = 0.0
    finished = bool(store.group.attrs["bonnerlab"].get("complete"))
    if not missing and (todo or not finished):
        # the last shard to finish (or a rerun that wrote) verifies and consolidates the store;
        # a rerun with nothing to do has just checked every file and chunk it covers
        verify_seconds = store.finalize()["verify_seconds"]
    n_images = sum(len(r) for r in rows)
    return {
        "store": str(output),
        "outcome": outcome,
        "layers": layers,
        "n_stimuli": len(stimuli.ids),
        "images": n_images,
        "chunks_written": len(todo),
        "changed": len(work.changed),
        "repaired": len(work.damaged),
        "check_seconds": work.check_seconds,
        "verify_seconds": verify_seconds,
        "skipped": n_skipped,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # this process, all threads (the writer's too); not the workers
        "images_per_s": n_images / seconds if n_images and seconds > 0 else 0.0,
        "total_seconds": time.perf_counter() - t_start,
        "complete": not missing,
        "chunks_missing": len(missing),
    }


def finish_on_device(device: torch.device) -> bool:
    """Whether images cross to the device as uint8 (from the loader's workers, or cropped in this
    process for in-memory datasets) and are scaled and normalized there: on a GPU, a quarter of
    the bytes through shared memory, pinning and PCIe (float32 batches of 224 px images are 77 MB
    per 128), and the float work off the CPU. On a CPU the workers normalize in parallel with
    the forward pass; moving it into the main process would only add to its work."""
    return device.type == "cuda"


def device_split(
    cfg: ExtractConfig, pre: PreprocessSpec, stimuli: Stimuli, device: torch.device
) -> tuple[Transform, Transform] | None:
    """The transform split at its float step (workers' uint8 part, the device's float part) when
    batches are finished on the device, else None. `--decode gpu` needs that split and image
    files: without them the JPEGs would be decoded by PIL while the store's identity says
    `decode: gpu`, so it is one line instead, before anything is written."""
    split = pre.split_at_float() if finish_on_device(device) else None
    if cfg.decode != "gpu":
        return split
    if stimuli.files is None:
        raise ConfigError(
            f"--decode gpu decodes image files, but the stimuli {cfg.stimuli!r} are images in "
            "memory; drop --decode gpu"
        )
    if split is None:
        ops = " -> ".join(step["op"] for step in pre.steps)
        raise ConfigError(
            f"--decode gpu needs a preprocessing whose float steps come after every resize and "
            f"crop, and this one's do not ({ops}); pass --decode cpu or another --preprocess"
        )
    return split


def run_batches(
    cfg: ExtractConfig,
    model: nn.Module,
    plan: Plan,
    pre: PreprocessSpec,
    stimuli: Stimuli,
    store: Any,
    todo: list[int],
    rows: list[range],
    device: torch.device,
    precision: Precision,
    label: str,
    split: tuple[Transform, Transform] | None = None,
    keep: dict[int, list[int]] | None = None,
) -> int:
    """Forward each unfinished chunk and hand its captures to the writer; returns skipped images."""
    from tqdm import tqdm

    # One slot: the capture of batch N+1 waits for the writer only at its first requested layer
    # (Capture.before_first_copy), so writing N still overlaps the layers before it.
    slots = 1
    writer = ChunkWriter(store, slots)
    n_skipped = 0
    bar = tqdm(
        total=sum(len(r) for r in rows),
        unit="img",
        disable=not cfg.progress or not todo,
        desc=f"extract {label}",
    )
    shape = (pre.in_channels, *pre.output_size)
    try:
        with (
            Capture(
                plan.modules,
                plan.plans,
                getattr(torch, cfg.dtype),
                slots=slots,
                pin_memory=device.type == "cuda",
                before_first_copy=writer.acquire,
            ) as capture,
            torch.inference_mode(),
        ):
            in_workers, on_device = split if split is not None else (None, None)
            batches = iter_batches(
                stimuli,
                rows,
                pre.transform(),
                shape,
                resolve_workers(cfg.num_workers),
                device.type == "cuda",
                in_workers,
                cfg.max_image_pixels,
                device if cfg.decode == "gpu" else None,
            )
            for step, (chunk, r, (images, bad, errors, hashes)) in enumerate(
                zip(todo, rows, batches, strict=True)
            ):
                if bad and not cfg.skip_bad_images:
                    raise DataError(f"{errors[0]} (pass --skip_bad_images to store NaN and go on)")
                x = images.to(device, non_blocking=True)
                if on_device is not None:
                    x = on_device(x)
                with precision.autocast():
                    outputs = capture.run(model, x, slot=step, wait=False)
                data = {name: t.numpy() for name, t in outputs.items()}  # views of the slot buffers
                skipped = [stimuli.ids[r.start + i] for i in bad]
                n_skipped += len(skipped)
                writer.put(
                    chunk,
                    data,
                    skipped,
                    ready=capture.ready,
                    bad=list(bad),
                    content=hashes,
                    keep=(keep or {}).get(chunk, []),
                )
                del outputs, data  # the writer holds the batch's only references: see Capture
                bar.update(len(r))
    finally:
        bar.close()
        writer.close()
    return n_skipped
