"""All distributed code lives here; at world size 1 every function is a no-op.

Environment is resolved in this order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), then SLURM
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, e.g. exported by submitit's
TorchDistributedEnvironment, or a hand-written `srun` step whose rendezvous is derived from
SLURM's own variables), then a single process.

Collectives take tensors on the process group's device (NCCL only accepts CUDA tensors), so the
helpers here move whatever they are given: no caller can hand NCCL a CPU tensor.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-05,9],cpu1` -> `gpu03` (zero padding kept)."""
    depth, head = 0, ""
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        head += char
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def node_address(node: str) -> str:
    """A SLURM node's address: its name when that resolves, else its NodeAddr (`scontrol show
    node`; the local cluster's node names resolve nowhere), else the name itself (the
    rendezvous's timeout then names it)."""
    import socket
    import subprocess

    try:
        socket.gethostbyname(node)
        return node
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", node, "-o"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    match = re.search(r"NodeAddr=(\S+)", out)
    return match.group(1) if match else node


# How long the processes of a job wait for each other at the start. Tasks of one SLURM step
# start within seconds; a wrong host would otherwise be retried for the whole collective
# timeout. BONNERLAB_RENDEZVOUS_TIMEOUT_S overrides it (a cluster whose nodes start slowly).
RENDEZVOUS_TIMEOUT_S = 120.0


def rendezvous_port(job_id: int) -> int:
    """A port from the job id, so two jobs sharing a node do not collide (as submitit does)."""
    return 20000 + job_id % 20000


def resolve_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun, else SLURM, else a single process.

    A SLURM step with several tasks (`srun python jobs/train.py` under `--ntasks 4`) and no
    MASTER_ADDR gets its rendezvous from SLURM's own variables: the first host of the job's node
    list and a port derived from the job id. Only a step (SLURM_STEP_NUM_TASKS, set by srun) is
    a distributed job: the batch script itself also sees SLURM_NTASKS but is one process, and
    must not wait for peers that will never come.
    """
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK"):
        return (
            int(os.environ["RANK"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ["WORLD_SIZE"]),
        )
    ntasks = (
        _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        if os.environ.get("MASTER_ADDR")
        else _env_int("SLURM_STEP_NUM_TASKS")
    )
    if ntasks and ntasks > 1:
        if not os.environ.get("MASTER_ADDR"):
            nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
            job_id = _env_int("SLURM_JOB_ID")
            if not nodelist or job_id is None:
                raise UserError(
                    f"SLURM step with {ntasks} tasks but no MASTER_ADDR and no SLURM_JOB_NODELIST/"
                    "SLURM_JOB_ID to derive it from: launch with torchrun or jobs/launch.py"
                )
            os.environ["MASTER_ADDR"] = node_address(first_host(nodelist))
            os.environ.setdefault("MASTER_PORT", str(rendezvous_port(job_id)))
        os.environ.setdefault("MASTER_PORT", "29500")
        return _env_int("SLURM_PROCID") or 0, _env_int("SLURM_LOCALID") or 0, ntasks
    return 0, 0, 1


def gpus_allocated() -> str:
    """What the scheduler or the user gave this process, e.g. `SLURM_GPUS_ON_NODE=2`; "" if none."""
    gpus_on_node = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus_on_node.isdigit() and int(gpus_on_node) > 0:
        return f"SLURM_GPUS_ON_NODE={gpus_on_node}"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(name, "").strip()
        if value and value not in ("-1", "NoDevFiles"):
            return f"{name}={value}"
    return ""


def _driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "unknown (no /proc/driver/nvidia/version)"
    # "NVRM version: NVIDIA UNIX (Open Kernel Module for) x86_64 ...  580.65.06  Release Build ..."
    match = re.search(r"\s(\d{3,}\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else "unknown"


def check_cuda_usable(requested: str) -> None:
    """Stop when the job was given GPUs but this torch cannot use them (driver/wheel mismatch).

    The PyPI torch wheel is a CUDA 13.0 build and needs an NVIDIA driver >= 580; on an older
    driver `torch.cuda.is_available()` is False and `--device auto` would train on the CPU
    without a word.
    """
    if requested == "cpu" or torch.cuda.is_available():
        return
    allocated = gpus_allocated()
    if not allocated:
        return  # no GPU here: --device auto means the CPU; --device cuda fails in resolve_device
    build = torch.version.cuda or "none (a CPU-only build)"
    raise UserError(
        f"GPUs allocated ({allocated}) but CUDA is unavailable to torch "
        f"{torch.__version__} (CUDA build {build}, NVIDIA driver {_driver_version()}): "
        "install a torch build for the node's CUDA driver "
        "(e.g. pip install -c constraints.txt torch torchvision "
        "--index-url https://download.pytorch.org/whl/cu126), or pass --device cpu"
    )


def resolve_device(requested: str, local_rank: int) -> torch.device:
    check_cuda_usable(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {requested} requested but CUDA is not available; use --device cpu")
    visible = torch.cuda.device_count()
    if requested == "cuda":
        if visible == 1:
            # One GPU per task (`--gpus-per-task`, or a GPU-bound step): whatever the local rank,
            # the task's own GPU is the only visible one.
            return torch.device("cuda", 0)
        if local_rank >= visible:
            raise UserError(
                f"local rank {local_rank} has no GPU: only {visible} visible "
                f"(tasks per node must equal GPUs per node; SLURM_NTASKS_PER_NODE="
                f"{os.environ.get('SLURM_NTASKS_PER_NODE', '?')})"
            )
        return torch.device("cuda", local_rank)
    device = torch.device(requested)
    if device.index is not None and device.index >= visible:
        raise UserError(
            f"--device {requested}: only {visible} GPU(s) visible (cuda:0..cuda:{visible - 1})"
        )
    return device


def use_device(requested: str, local_rank: int = 0) -> torch.device:
    """This process's device, made current: with --device cuda:1 the CUDA context, pinned
    buffers and streams belong on GPU 1, not GPU 0. Training (through `setup`) and extraction."""
    device = resolve_device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def describe_device(device: torch.device) -> str:
    """One line for the job log: torch and CUDA build, driver, the GPU and its capability."""
    if device.type != "cuda":
        return f"torch {torch.__version__} on cpu ({torch.get_num_threads()} threads)"
    props = torch.cuda.get_device_properties(device)
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), driver {_driver_version()}, "
        f"{device}: {props.name} sm_{props.major}{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
    )


def default_num_workers() -> int:
    """DataLoader workers that fit this process's CPU allocation: SLURM_CPUS_PER_TASK, else the
    CPUs this process may run on shared among the node's ranks; one core stays with the main
    process (it runs the training step). 0 when there is only one core."""
    cpus = _env_int("SLURM_CPUS_PER_TASK")
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            cpus = os.cpu_count() or 1
        cpus //= max(_env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE") or 1, 1)
    return max(0, min(8, cpus - 1))


def configure_backends(
    device: torch.device, deterministic: bool = False, benchmark: bool = True, tf32: bool = True
) -> None:
    """Throughput settings for CUDA, or bit-reproducibility when asked.

    TF32 matmuls and cuDNN autotuning (fixed shapes in training) are fast and change results in
    the 3rd-4th digit; `deterministic` turns on `torch.use_deterministic_algorithms` (an op with
    no deterministic kernel then raises) with the cuBLAS workspace setting it needs, and turns
    autotuning and TF32 off. Extraction asks for `tf32` only when configured (it is recorded in
    the store's identity) and no autotuning.
    """
    if deterministic:
        # must be set before the first cuBLAS handle is created (first matmul on the GPU)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        return
    if torch.are_deterministic_algorithms_enabled():
        # only when set: the call imports torch._inductor (over a second of every job's start)
        torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")  # TF32: Ampere and newer
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = benchmark


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; pick this rank's device."""
    global _info
    rank, local_rank, world_size = resolve_env()
    dev = use_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=10),
            **({"store": rendezvous(rank, world_size)} if _own_rendezvous() else {}),
            **({"device_id": dev} if backend == "nccl" else {}),
        )
    _info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)
    return _info


def _own_rendezvous() -> bool:
    """torchrun's workers meet at its agent's store (it has its own timeouts); everyone else
    (srun steps, submitit's tasks) at a store made here, with a timeout."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"


def rendezvous(rank: int, world_size: int) -> dist.TCPStore:
    """The store every process meets at (MASTER_ADDR:MASTER_PORT; rank 0 serves it), or one
    line naming the host and port after RENDEZVOUS_TIMEOUT_S."""
    host, port = os.environ.get("MASTER_ADDR", "localhost"), int(os.environ["MASTER_PORT"])
    seconds = float(os.environ.get("BONNERLAB_RENDEZVOUS_TIMEOUT_S") or RENDEZVOUS_TIMEOUT_S)
    import socket

    try:
        socket.getaddrinfo(host, port)
    except OSError as e:  # c10d would retry a name that resolves nowhere until the timeout
        raise UserError(
            f"rank {rank} of {world_size}: the rendezvous host {host} (MASTER_ADDR, port "
            f"{port}) does not resolve ({e.strerror or e}); set MASTER_ADDR to the first "
            "node's address"
        ) from None
    try:
        return dist.TCPStore(
            host,
            port,
            world_size,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=seconds),
            wait_for_workers=True,
        )
    except (RuntimeError, OSError) as e:  # DistStoreError, DistNetworkError are RuntimeErrors
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"rank {rank} of {world_size}: no rendezvous at {host}:{port} within {seconds:.0f}s "
            f"({reason}); check that every task started and that {host} is reachable from "
            "this node (MASTER_ADDR/MASTER_PORT)"
        ) from None


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistInfo]:
    """`setup` around a job, and `teardown` after it when it joined a process group: the one
    frame `train` and `evaluate` run in."""
    info = setup(device)
    try:
        yield info
    finally:
        if info.distributed:
            teardown()


def teardown() -> None:
    global _info
    if dist.is_initialized():
        # The DDP wrapper of a finished run may sit in a reference cycle, holding the process
        # group (and gloo's worker threads) until the interpreter's own teardown, where freeing
        # them can abort the process. Collect it now, while the interpreter is whole.
        gc.collect()
        dist.destroy_process_group()
    _info = DistInfo()


def info() -> DistInfo:
    return _info


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


def group_device() -> torch.device:
    """Where the default group's collectives take their tensors: this rank's GPU under NCCL."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return _info.device
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `tensor`, on the group's device (the input itself when it is there).

    Use the returned tensor: a CPU tensor given under NCCL is copied to the GPU and reduced there.
    """
    if not dist.is_initialized():
        return tensor
    tensor = tensor.to(group_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (so all ranks stop at the same step).

    Under NCCL this reads a GPU value back: a host sync, so callers ask only every few steps.
    """
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=group_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every rank's batch, for CPU (gloo) groups:
    torch's SyncBatchNorm runs on GPUs only. The sums cross ranks through a differentiable
    all-reduce, so gradients flow to every rank's inputs as they would in one process."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # (deprecated in favour of _functional_collectives, whose all_reduce has no autograd yet)
        from torch.distributed.nn.functional import all_reduce

        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        # float64 sums: E[x^2] - E[x]^2 cancels badly in float32 when |mean| >> std
        x64 = x.double()
        count = x64.new_full((1,), x.numel() // channels)
        total = all_reduce(torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count]))
        n = total[-1]
        mean64 = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean64 * mean64).clamp_min(0).to(x.dtype)
        mean = mean64.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(
                    var * n / (n - 1), alpha=m
                )  # unbiased, as BatchNorm
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_to_global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm layer of `module` as a `GlobalBatchNorm` with the same state."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm | torch.nn.SyncBatchNorm
    ):
        converted = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        # The same Parameter objects, not copies: the optimizer already holds them.
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_batchnorm(child))
    return module


def wrap_model(model: torch.nn.Module, sync_batchnorm: bool = False) -> torch.nn.Module:
    """DistributedDataParallel at world size > 1, the model itself otherwise.

    Gradients live in DDP's communication buckets (`gradient_as_bucket_view`: no copy in or out,
    less memory). `sync_batchnorm` converts BatchNorm layers so statistics span all ranks.
    """
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        model = (
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if _info.device.type == "cuda"
            else convert_to_global_batchnorm(model)
        )
    device_ids = [_info.device.index] if _info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside torch.compile's and DDP's wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model
