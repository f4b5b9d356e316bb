"""All distributed code lives here; at world size 1 every function is a no-op.

Environment is resolved in this order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), then SLURM
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, e.g. exported by submitit's
TorchDistributedEnvironment), then a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bonnerlab.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_info = DistInfo()


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def resolve_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun, else SLURM, else a single process."""
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK"):
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    ntasks = _env_int("SLURM_NTASKS")
    if ntasks and ntasks > 1 and os.environ.get("MASTER_ADDR"):
        # Only a multi-task SLURM step with a rendezvous address is a distributed job; a
        # single-task sbatch job must not try to form a group.
        return _env_int("SLURM_PROCID") or 0, _env_int("SLURM_LOCALID") or 0, ntasks
    return 0, 0, 1


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {requested} requested but CUDA is not available; use --device cpu")
    if requested == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(
                f"local rank {local_rank} has no GPU: only {visible} visible "
                f"(tasks per node must equal GPUs per node; SLURM_NTASKS_PER_NODE="
                f"{os.environ.get('SLURM_NTASKS_PER_NODE', '?')})"
            )
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; pick this rank's device."""
    global _info
    rank, local_rank, world_size = resolve_env()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=10),
            **({"device_id": dev} if backend == "nccl" else {}),
        )
    _info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)
    return _info


def teardown() -> None:
    global _info
    if dist.is_initialized():
        dist.destroy_process_group()
    _info = DistInfo()


def info() -> DistInfo:
    return _info


def is_main() -> bool:
    return _info.is_main


def print0(*args: Any, **kwargs: Any) -> None:
    if _info.is_main:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. a run folder name chosen from the clock)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (so all ranks stop at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel at world size > 1, the model itself otherwise."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [_info.device.index] if _info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
