"""The logic of the CUDA code paths that a CPU can check: collectives on the group's device,
GPUs allocated but unusable, SLURM rendezvous, per-device RNG state, empty scaler states,
uneven evaluation shards under DDP, loader workers from the allocation, --deterministic.
(`make gpu-check` runs the same paths on a GPU.)"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from helpers import torchrun

from bonnerlab import checkpoint
from bonnerlab import distributed as dist
from bonnerlab.errors import ConfigError, UserError
from bonnerlab.train.build import build, check_deterministic
from bonnerlab.train.precision import Precision

SLURM_AND_TORCHRUN_VARS = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
    "SLURM_GPUS_ON_NODE",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
    "CUDA_VISIBLE_DEVICES",
    "SLURM_CPUS_PER_TASK",
    "SLURM_NTASKS_PER_NODE",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in SLURM_AND_TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class RecordingGroup:
    """Stands in for an initialized NCCL process group: records the device of every tensor
    handed to a collective (NCCL itself rejects CPU tensors)."""

    def __init__(self, monkeypatch, device: torch.device):
        self.devices: list[torch.device] = []
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "nccl")
        monkeypatch.setattr(torch.distributed, "all_reduce", self.all_reduce)
        monkeypatch.setattr(dist, "_info", dist.DistInfo(rank=0, world_size=2, device=device))

    def all_reduce(self, tensor, op=None, **_):
        self.devices.append(tensor.device)


def test_collectives_move_tensors_to_the_group_device(monkeypatch):
    # "meta" plays the GPU: a device other than the CPU that exists on every machine
    group = RecordingGroup(monkeypatch, torch.device("meta"))
    assert dist.group_device() == torch.device("meta")
    reduced = dist.all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64))  # built on the CPU
    assert group.devices == [torch.device("meta")]
    assert reduced.device == torch.device("meta") and reduced.dtype == torch.float64


def test_collectives_stay_on_cpu_under_gloo(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "gloo")
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append(t.device))
    t = torch.ones(3)
    assert dist.all_reduce_sum(t) is t and seen == [torch.device("cpu")]


def test_gpus_allocated_but_cuda_unavailable_is_one_line(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.resolve_device("auto", 0) == torch.device("cpu")  # a CPU node: silently the CPU
    clean_env.setenv("SLURM_GPUS_ON_NODE", "2")
    for requested in ("auto", "cuda"):
        with pytest.raises(UserError) as e:
            dist.resolve_device(requested, 0)
        message = str(e.value)
        assert "\n" not in message
        assert "GPUs allocated (SLURM_GPUS_ON_NODE=2) but CUDA is unavailable" in message
        assert torch.__version__ in message and "driver" in message and "--device cpu" in message
    assert dist.resolve_device("cpu", 0) == torch.device("cpu")  # asked for explicitly: fine
    clean_env.delenv("SLURM_GPUS_ON_NODE")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(UserError, match=r"CUDA_VISIBLE_DEVICES=3"):
        dist.resolve_device("auto", 0)
    for hidden in ("", "-1"):
        clean_env.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert dist.resolve_device("auto", 0) == torch.device("cpu")


def test_device_index_out_of_range_and_one_gpu_per_task(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"--device cuda:2: only 2 GPU\(s\) visible"):
        dist.resolve_device("cuda:2", 0)
    assert dist.resolve_device("cuda:1", 0) == torch.device("cuda", 1)
    assert dist.resolve_device("cuda", 1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="local rank 2 has no GPU"):
        dist.resolve_device("cuda", 2)
    # --gpus-per-task: each task sees only its own GPU, whatever its local rank
    clean_env.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist.resolve_device("cuda", 3) == torch.device("cuda", 0)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node7", "node7"),
        ("gpu[03-05,9]", "gpu03"),
        ("gpu[12,14-15],cpu1", "gpu12"),
        ("a1,b[1-2]", "a1"),
        ("rack2-n[008-010]", "rack2-n008"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_rendezvous_derived_from_slurm_variables(clean_env):
    # `srun -n 4 python jobs/train.py` with no MASTER_ADDR: the step's own variables suffice
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "2")
    clean_env.setenv("SLURM_LOCALID", "0")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    assert dist.resolve_env() == (2, 0, 4)
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_batch_script_with_several_tasks_is_one_process(clean_env):
    # the batch script of `sbatch --ntasks 4` sees SLURM_NTASKS=4 but is a single process
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu07")
    clean_env.setenv("SLURM_JOB_ID", "5")
    assert dist.resolve_env() == (0, 0, 1)
    assert "MASTER_ADDR" not in os.environ


def test_step_without_a_nodelist_is_one_line(clean_env):
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(UserError, match="no MASTER_ADDR and no SLURM_JOB_NODELIST"):
        dist.resolve_env()


def test_rng_state_of_this_processs_gpu_only(monkeypatch):
    states = {
        0: torch.tensor([1, 2], dtype=torch.uint8),
        1: torch.tensor([3, 4], dtype=torch.uint8),
    }
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device])
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, device: restored.append((s.tolist(), device))
    )
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state")
    )
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda"], states[1])
    checkpoint.set_rng_state(saved)
    assert restored == [([3, 4], 1)]
    # an older checkpoint holding a list (one per GPU of an 8-GPU node) resumes on one GPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    checkpoint.set_rng_state({**saved, "cuda": [states[1]] * 8})
    assert restored[-1] == ([3, 4], 0)


def test_empty_scaler_state_is_not_loaded():
    precision = Precision.resolve(torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler(
        "cpu", enabled=True, init_scale=2.0**10
    )  # as float16 would
    with pytest.raises(RuntimeError, match="empty"):
        precision.scaler.load_state_dict({})  # what resuming a bf16/CPU checkpoint did
    precision.load_scaler_state({})  # a bf16 or CPU checkpoint: the fresh scaler stays
    assert precision.scaler.get_scale() == 2.0**10
    other = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**5)
    precision.load_scaler_state(other.state_dict())
    assert precision.scaler.get_scale() == 2.0**5


@pytest.mark.parametrize("cpus, workers", [("1", 0), ("2", 1), ("5", 4), ("64", 8)])
def test_loader_workers_from_slurm_cpus_per_task(clean_env, cpus, workers):
    clean_env.setenv("SLURM_CPUS_PER_TASK", cpus)
    assert dist.default_num_workers() == workers


def test_loader_workers_from_affinity_shared_by_local_ranks(clean_env):
    clean_env.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert dist.default_num_workers() == 8
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.default_num_workers() == 3  # 16 CPUs / 4 ranks, one kept for the main process


def test_deterministic_names_the_op_without_a_deterministic_kernel(tiny_train_cfg):
    class NondeterministicHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            # put_ has no deterministic kernel on any device (on CUDA, many more ops, e.g.
            # adaptive_avg_pool2d_backward_cuda, refuse the same way)
            x.new_zeros(4).put_(torch.tensor([1]), torch.tensor([1.0]))
            return self.inner(x)

    cfg = tiny_train_cfg(deterministic=True)
    run = build(cfg, dist.setup("cpu"))
    try:
        check_deterministic(run)  # the plain CPU model has deterministic kernels
        run.model = NondeterministicHead(run.model)
        with pytest.raises(UserError) as e:
            check_deterministic(run)
        assert "put_ does not have a deterministic implementation" in str(
            e.value
        ) and "--deterministic" in str(e.value)
        assert "\n" not in str(e.value)
    finally:
        run.close()
        dist.teardown()
        dist.configure_backends(torch.device("cpu"), deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert dist.info() == dist.DistInfo()  # no rank/device left behind for the next test


def test_accumulate_steps_must_divide_the_per_process_batch(tiny_train_cfg):
    try:
        with pytest.raises(
            ConfigError, match="accumulate_steps 5 must divide the per-process batch 64"
        ):
            build(tiny_train_cfg(**{"optim.accumulate_steps": 5}), dist.setup("cpu"))
    finally:
        dist.teardown()


UNEVEN_EVAL = textwrap.dedent("""
    import json, sys, torch
    from bonnerlab import distributed as dist
    from bonnerlab.config import DataConfig
    from bonnerlab.data.augment import BatchAugment
    from bonnerlab.data.datasets import load_splits
    from bonnerlab.data.loaders import EvalBatches
    from bonnerlab.models.cnn import MnistCNN
    info = dist.setup("cpu")
    splits = load_splits(DataConfig())
    torch.manual_seed(0)
    model = dist.wrap_model(MnistCNN(width=8))  # BatchNorm buffers: DDP broadcasts them per forward
    # 359 images, batches of 179: rank 0 holds 2 batches, rank 1 holds 1
    batches = EvalBatches(splits.val, 179, info.rank, info.world_size, info.device)
    from bonnerlab.train.evaluate import evaluate_model
    result = evaluate_model(model, batches, BatchAugment(splits.mean, splits.std), 10)
    # one file per rank: two ranks printing at once interleave their lines
    out = sys.argv[1] + f"/rank{info.rank}.json"
    open(out, "w").write(json.dumps({"rank": info.rank, "batches": len(batches), \
"count": result["count"],
                                     "acc": result["acc"]}))
    dist.teardown()
""")


@pytest.mark.slow
def test_uneven_eval_shards_under_ddp_finish_and_count_every_example_once(tmp_path):
    script = tmp_path / "uneven_eval.py"
    script.write_text(UNEVEN_EVAL)
    torchrun(str(script), str(tmp_path), timeout=180)  # a hang fails here
    import json

    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["batches"] for r in rows] == [2, 1]
    assert [r["count"] for r in rows] == [359, 359]  # every validation image once, on both ranks
    assert rows[0]["acc"] == rows[1]["acc"]
