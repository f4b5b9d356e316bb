"""Batches: seeded, resumable, sliced across ranks.

Batches are a pure function of (seed, epoch, step): a resumed run sees exactly the batches
an uninterrupted one would, and N processes each take a contiguous slice of the same global
batch a single process would see.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bonnerlab.data.datasets import Dataset, FolderDataset, InMemoryDataset
from bonnerlab.errors import DataError
from bonnerlab.seeds import epoch_generator


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync: through pinned memory, `non_blocking`.

    A plain `.to("cuda")` of pageable memory waits until the GPU is idle. Pinned blocks come from
    torch's caching host allocator, which keeps a block until the copy that reads it is done, so
    a fresh pinned tensor per call is safe to refill on the next one.
    """
    if device.type != "cuda" or x.device == device:
        return x.to(device)
    if not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def place_in_memory(source: Dataset, device: torch.device, cap_bytes: float) -> Dataset:
    """An in-memory dataset copied once to `device` when it fits under `cap_bytes`.

    Above the cap (MNIST at 224x224x3 is 7.2 GB per rank) it stays in host memory and each batch
    is gathered into pinned memory and copied asynchronously.
    """
    if device.type != "cuda" or not isinstance(source, InMemoryDataset):
        return source
    if source.images.numel() * source.images.element_size() > cap_bytes:
        return source
    return InMemoryDataset(
        to_device(source.images, device), to_device(source.labels, device), source.ids
    )


def _gather(
    source: InMemoryDataset, idx: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `idx` of an in-memory source, on `device` (gathered there when the data lives
    there)."""
    images, labels = source.images, source.labels
    if images.device == device:
        return images.index_select(0, idx.to(device)), labels.index_select(0, idx.to(device))
    pin = device.type == "cuda"
    x = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, pin_memory=pin)
    y = torch.empty(len(idx), dtype=labels.dtype, pin_memory=pin)
    torch.index_select(images, 0, idx, out=x)
    torch.index_select(labels, 0, idx, out=y)
    return to_device(x, device), to_device(y, device)


class _ReplaceableBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are replaced before each pass, so one DataLoader (and its
    persistent workers) serves every epoch and evaluation instead of forking new workers."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _FolderLoader:
    """One persistent DataLoader over a folder or shard source; `batches(index_lists)` runs one
    pass. With `gpu_decode`, its workers read file bytes and JPEGs are decoded on `device`
    (`bonnerlab.data.gpu_decode`); else they decode on the CPU."""

    def __init__(
        self, source: FolderDataset, num_workers: int, device: torch.device, gpu_decode: bool
    ) -> None:
        self.sampler = _ReplaceableBatches()
        self.device, self.source, self.gpu_decode = device, source, gpu_decode
        if gpu_decode:
            from bonnerlab.data.gpu_decode import EncodedImages, collate_encoded

            dataset, collate = EncodedImages(source), collate_encoded
        else:
            dataset, collate = source, None
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            # bytes go to nvJPEG from pageable memory; decoded batches cross pinned
            pin_memory=device.type == "cuda" and not gpu_decode,
            persistent_workers=num_workers > 0,
            collate_fn=collate,
        )

    def close(self) -> None:
        """Stop the persistent workers now (else they linger until garbage collection)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def batches(self, index_lists: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.batches = index_lists
        if self.gpu_decode:
            from bonnerlab.data.gpu_decode import decode_batch

            for batch in _unwrap_worker_errors(self.loader):
                yield decode_batch(batch, self.source, self.device)
            return
        for x, y in _unwrap_worker_errors(self.loader):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _folder_loader(
    source: Dataset, num_workers: int, device: torch.device, decode: str
) -> _FolderLoader | None:
    """The persistent loader of a folder or shard source (None for in-memory data)."""
    if not isinstance(source, FolderDataset):
        return None
    from bonnerlab.data.gpu_decode import use_gpu_decode

    return _FolderLoader(source, num_workers, device, use_gpu_decode(decode, device))


def resolve_workers(num_workers: int) -> int:
    """-1 (auto) -> workers that fit this task's CPUs; any other value as given."""
    if num_workers >= 0:
        return num_workers
    from bonnerlab.distributed import default_num_workers

    return default_num_workers()


class TrainBatches:
    """The training batches of one rank: contiguous slices of seeded global batches.

    `batches(epoch, start_step)` yields (uint8 images, labels, step) on `device`, skipping
    `start_step` batches of the epoch without loading them (mid-epoch resume). Nothing in the
    loop waits for the GPU: an epoch's indices move to the device once, in-memory data is
    indexed where it lives, folder batches arrive pinned from persistent workers. `decode` is
    `data.decode` (auto = on the GPU when `device` is CUDA: `bonnerlab.data.gpu_decode`); cpu
    unless a caller passes the config's.
    """

    def __init__(
        self,
        source: Dataset,
        global_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_workers: int = 0,
        max_steps: int = 0,
        decode: str = "cpu",
    ) -> None:
        if global_batch % world_size:
            raise DataError(
                f"data.batch_size {global_batch} must be divisible by the {world_size} processes"
            )
        if len(source) < global_batch:
            raise DataError(
                f"training split has {len(source)} images, "
                f"fewer than data.batch_size {global_batch}"
            )
        self.source, self.global_batch, self.seed = source, global_batch, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.local_batch = global_batch // world_size
        self.num_workers = resolve_workers(num_workers)
        steps = len(source) // global_batch  # drop the ragged last batch: equal work per rank
        self.steps_per_epoch = min(steps, max_steps) if max_steps else steps
        self._folder = _folder_loader(source, self.num_workers, device, decode)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self) -> None:
        if self._folder is not None:
            self._folder.close()

    def _rank_indices(self, epoch: int, start_step: int) -> torch.Tensor:
        """[steps left, local batch]: this rank's slice of each remaining global batch."""
        perm = epoch_permutation(len(self.source), self.seed, epoch)
        steps = perm[: self.steps_per_epoch * self.global_batch].view(
            self.steps_per_epoch, self.global_batch
        )
        lo = self.rank * self.local_batch
        return steps[start_step:, lo : lo + self.local_batch]

    def batches(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        indices = self._rank_indices(epoch, start_step)
        if self._folder is not None:
            for step, (x, y) in enumerate(self._folder.batches(indices.tolist()), start=start_step):
                yield x, y, step
            return
        source = self.source
        if source.images.device == self.device:
            indices = to_device(indices.contiguous(), self.device)  # once per epoch
        for step, idx in enumerate(indices, start=start_step):
            x, y = _gather(source, idx, self.device)
            yield x, y, step


def _unwrap_worker_errors(loader: torch.utils.data.DataLoader) -> Iterator:
    """A DataError raised in a worker arrives wrapped in the worker's traceback; keep its line."""
    try:
        yield from loader
    except DataError as e:
        message = str(e)
        if "DataError: " in message:
            raise DataError(message.rsplit("DataError: ", 1)[1].strip()) from None
        raise


class EvalBatches:
    """Every example of `source` exactly once across ranks (strided shards), in order within a
    rank; built once and iterated at every evaluation (persistent workers for folders)."""

    def __init__(
        self,
        source: Dataset,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        num_workers: int = 0,
        decode: str = "cpu",
    ) -> None:
        self.source, self.device = source, device
        self.chunks = list(torch.arange(rank, len(source), world_size).split(batch_size))
        self._folder = _folder_loader(source, resolve_workers(num_workers), device, decode)

    def __len__(self) -> int:
        return len(self.chunks)

    def close(self) -> None:
        if self._folder is not None:
            self._folder.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._folder is not None:
            yield from self._folder.batches([c.tolist() for c in self.chunks])
            return
        for idx in self.chunks:
            yield _gather(self.source, idx, self.device)


def eval_batches(
    source: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    num_workers: int = 0,
    decode: str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of `EvalBatches` (for a single evaluation); its workers stop after it."""
    batches = EvalBatches(source, batch_size, rank, world_size, device, num_workers, decode)
    try:
        yield from batches
    finally:
        batches.close()
