"""GPU check (`make gpu-check`): every CUDA code path the CPU suite cannot reach, in one run.

    make gpu-check                      # or: python bench/gpu_check.py [--out DIR] [--quick]

Sections (each prints figures; the run exits non-zero if any check fails):
  1. environment: driver, CUDA build, arch list, capability, native bf16, TF32 flags; --device
     auto must resolve to a GPU when GPUs are visible
  2. host syncs per training step (torch.cuda.set_sync_debug_mode) for mnist_cnn on digits and
     resnet18 on an image folder with erasing and gradient clipping: 0 outside logging steps
  3. DDP through the real entry point (torchrun jobs/train.py, an evaluation set that does not
     divide evenly across ranks), and an NCCL process group in-process (epoch totals and
     evaluation all-reduced on the GPU)
  4. resume on CUDA: SIGUSR2 mid-epoch then --resume; a CPU checkpoint resumed on the GPU;
     float16 + GradScaler resumed from a bfloat16 checkpoint; --deterministic
  5. extraction on CPU vs CUDA (resnet18, 64 images, a channel subset and avgpool): TF32 off,
     then AMP; on cuda:1 when there are 2 GPUs, nothing allocated on GPU 0
  6. throughput: resnet18/resnet50 samples/s at batch 256 (AMP, channels-last) against a plain
     loop of torchvision's reference recipe; extraction images/s, GPU utilisation, peak memory
  7. GPU decode and shards: nvJPEG + device resize vs the PIL path; ResNet-50 training from an
     image folder (CPU and GPU decode) and from shards as a share of synthetic input; extraction
     from JPEG files and from shards; the GPU-decode feed + forward (extraction's ceiling), each
     with GPU utilisation (`--sections 7` alone: about 3 minutes on an H200)
  8. analysis on the GPU: a layer's streamed Gram (n 2,000 x p 100,000 float16 from a store)
     on CUDA against the CPU stream (equal to float32 rounding), its product's rate against
     the device's float32 matmul rate (TF32 off; the issue asks >= 50%), and cross-validated
     ridge with per-target alphas (1,000 targets) on CUDA against the CPU, end to end
Figures go to the screen and to DIR/gpu-check.txt and DIR/gpu-check.json (default bench/out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bonnerlab import distributed as dist  # noqa: E402
from bonnerlab import interrupt  # noqa: E402
from bonnerlab.config import TrainConfig, apply_overrides  # noqa: E402

LINES: list[str] = []
RESULTS: list[dict] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def check(section: str, name: str, fn) -> object:
    start = time.perf_counter()
    try:
        detail = fn()
        status = "ok"
    except Exception as e:  # report every check, then fail at the end
        traceback.print_exc()
        detail, status = (
            None,
            f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        )
    seconds = time.perf_counter() - start
    RESULTS.append(
        {
            "section": section,
            "check": name,
            "status": status,
            "seconds": round(seconds, 1),
            "detail": detail,
        }
    )
    say(
        f"  [{status if status == 'ok' else 'FAIL'}] {name} ({seconds:.1f}s): "
        f"{detail if detail is not None else status}"
    )
    return detail


def train_cfg(tmp: Path, run: str, **overrides) -> TrainConfig:
    base = {"run_dir": str(tmp / run), "device": "cuda", "progress": False, "epochs": 2}
    return apply_overrides(TrainConfig(), {**base, **overrides})


def make_image_folder(root: Path, n_per_class: int = 160, size: int = 96) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image = rng.integers(0, 255, (size, size + 17, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / c / f"{i}.jpg", quality=90)
    return root


def child_env() -> dict[str, str]:
    """This checkout first on the path, keeping whatever PYTHONPATH already holds."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    from bonnerlab.checkpoint import load_checkpoint

    return load_checkpoint(Path(run_dir) / "checkpoints" / "latest.pt")["model"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


# ----------------------------------------------------------------------------- 1. environment


def section_environment() -> dict:
    device = dist.resolve_device("auto", 0)
    assert device.type == "cuda", f"--device auto resolved to {device} while GPUs are visible"
    dist.configure_backends(device)
    props = torch.cuda.get_device_properties(0)
    env = {
        "describe": dist.describe_device(torch.device("cuda", 0)),
        "cuda_build": torch.version.cuda,
        "arch_list": torch.cuda.get_arch_list(),
        "capability": f"sm_{props.major}{props.minor}",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        "bf16_with_emulation": torch.cuda.is_bf16_supported(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "auto_device": str(device),
    }
    from bonnerlab.train.precision import Precision

    env["amp_dtype"] = str(Precision.resolve(device).dtype)
    for k, v in env.items():
        say(f"    {k}: {v}")
    return env


# ----------------------------------------------------------------------------- 2. syncs


def count_syncs(cfg: TrainConfig, warmup: int = 5) -> dict:
    """Per-step synchronizing CUDA calls in bonnerlab's own train_one_epoch, after `warmup`."""
    from bonnerlab.runs import Logger
    from bonnerlab.train.build import build, wrap
    from bonnerlab.train.loop import train_one_epoch

    info = dist.setup(cfg.device)
    run = build(cfg, info)
    wrap(run, info)
    per_step: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            mark = [0]

            def syncs_so_far() -> int:
                return sum("synchroniz" in str(w.message) for w in caught)

            def on_step_end(state) -> None:
                n = syncs_so_far()
                per_step.append(n - mark[0])
                mark[0] = n

            start = time.perf_counter()
            train_one_epoch(
                run.model,
                run.batches,
                run.batch_augment,
                run.optimizer,
                run.scheduler,
                run.precision,
                cfg,
                run.state,
                Logger(None),
                on_step_end=on_step_end,
            )
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        finally:
            torch.cuda.set_sync_debug_mode("default")
            run.close()
    syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
    logging = {s for s in range(len(per_step)) if (s + 1) % cfg.log_every_steps == 0}
    measured = [n for s, n in enumerate(per_step) if s >= warmup and s not in logging]
    at_logging = [per_step[s] for s in sorted(logging) if s >= warmup]
    return {
        "steps_measured": len(measured),
        "syncs_per_step_max": max(measured, default=0),
        "syncs_total_outside_logging": sum(measured),
        "syncs_at_logging_steps": at_logging,
        "first_sync_messages": sorted(set(syncs))[:4],
        "samples_per_s": round(run.state.seen / seconds, 1),
    }


def section_syncs(tmp: Path, folder: Path) -> None:
    say("2. host syncs per training step (target 0 outside logging steps)")

    def digits():
        out = count_syncs(
            train_cfg(
                tmp,
                "sync-digits",
                max_steps_per_epoch=25,
                log_every_steps=10,
                **{"data.erasing": 0.5, "optim.grad_clip": 1.0},
            )
        )
        assert out["syncs_per_step_max"] == 0, out
        return out

    def resnet():
        out = count_syncs(
            train_cfg(
                tmp,
                "sync-resnet",
                max_steps_per_epoch=25,
                log_every_steps=10,
                **{
                    "model.arch": "resnet18",
                    "data.dataset": "imagefolder",
                    "data.root": str(folder),
                    "data.in_channels": 3,
                    "data.image_size": 96,
                    "data.batch_size": 8,
                    "data.erasing": 0.5,
                    "optim.grad_clip": 1.0,
                    "data.val_fraction": 0.1,
                },
            )
        )
        assert out["syncs_per_step_max"] == 0, out
        return out

    def digits_float16():
        out = count_syncs(
            train_cfg(
                tmp,
                "sync-fp16",
                max_steps_per_epoch=25,
                log_every_steps=10,
                amp_dtype="float16",
                **{"optim.grad_clip": 1.0},
            )
        )
        assert out["syncs_per_step_max"] == 0, out
        return out

    check("2", "mnist_cnn on digits, erasing + grad clip", digits)
    check("2", "mnist_cnn, float16 + GradScaler + grad clip (fused AdamW)", digits_float16)
    check("2", "resnet18 on an image folder, erasing + grad clip", resnet)


# ----------------------------------------------------------------------------- 3. DDP


def section_ddp(tmp: Path) -> None:
    say("3. DDP")
    n_gpus = torch.cuda.device_count()
    nproc = min(2, n_gpus)
    common = [
        "--device",
        "cuda",
        "--progress",
        "false",
        "--epochs",
        "2",
        "--max_steps_per_epoch",
        "12",
        "--model.batchnorm",
        "false",
        "--data.eval_batch_size",
        "179",
    ]  # 359 val images: uneven

    def torchrun():
        env = child_env()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(REPO / "jobs" / "train.py"),
            *common,
            "--run_dir",
            str(tmp / "ddp-torchrun"),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-1500:]
        metrics = [
            json.loads(line)
            for line in (tmp / "ddp-torchrun" / "metrics.jsonl").read_text().splitlines()
        ]
        detail = {"processes": nproc, "val_acc": [m["val_acc"] for m in metrics]}
        if nproc == 2:
            single = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "jobs" / "train.py"),
                    *common,
                    "--run_dir",
                    str(tmp / "ddp-one"),
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            assert single.returncode == 0, single.stderr[-1500:]
            detail["max_weight_diff_vs_one_process"] = max_diff(
                weights_of(tmp / "ddp-one"), weights_of(tmp / "ddp-torchrun")
            )
            assert detail["max_weight_diff_vs_one_process"] < 1e-2, detail
        return detail

    def nccl_in_process():
        import torch.distributed as tdist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000))
        tdist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        try:
            from bonnerlab.train.loop import train

            result = train(
                train_cfg(tmp, "ddp-nccl", max_steps_per_epoch=12)
            )  # DDP-wrapped, NCCL sums
            assert result["val_acc"] > 0.5, result
            return {
                "val_acc": result["val_acc"],
                "train_samples_per_s": result["train_samples_per_s"],
            }
        finally:
            tdist.destroy_process_group()

    check("3", f"torchrun --nproc_per_node {nproc} jobs/train.py, uneven eval shards", torchrun)
    check(
        "3",
        "NCCL process group in-process: epoch totals and eval all-reduced on the GPU",
        nccl_in_process,
    )


# ----------------------------------------------------------------------------- 4. resume


@contextlib.contextmanager
def sigusr2_at_call(n: int):
    """Send this process SIGUSR2 at the n-th stop check: the real handler path of a SLURM
    time-limit signal, at a reproducible step."""
    real = interrupt.stop_requested
    calls = [0]

    def stop_requested() -> bool:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
        return real()

    interrupt.install_handlers()
    interrupt.stop_requested = stop_requested
    try:
        yield
    finally:
        interrupt.stop_requested = real
        interrupt.reset()
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def section_resume(tmp: Path) -> None:
    from dataclasses import replace

    from bonnerlab.train.loop import train

    say("4. resume on CUDA")
    overrides = {"max_steps_per_epoch": 20, "model.dropout": 0.2}

    def sigusr2_resume():
        ref = train(train_cfg(tmp, "ref", **overrides))
        cfg = train_cfg(tmp, "split", **overrides)
        with sigusr2_at_call(15):  # epoch 2, step 5 (11 steps per epoch)
            first = train(cfg)
        assert first.get("interrupted"), first
        second = train(replace(cfg, resume=True))
        diff = max_diff(weights_of(tmp / "ref"), weights_of(tmp / "split"))
        # CUDA kernels are not bit-deterministic by default: close, not equal (see section
        # --deterministic)
        assert diff < 5e-2, diff
        return {
            "stopped_at": [first["epoch"], first["step"]],
            "val_acc": [ref["val_acc"], second["val_acc"]],
            "max_weight_diff_vs_uninterrupted": diff,
        }

    def cpu_checkpoint_on_gpu():
        cfg = train_cfg(tmp, "cpu-to-gpu", device="cpu", **overrides)
        with sigusr2_at_call(15):
            first = train(cfg)
        assert first.get("interrupted"), first
        second = train(replace(cfg, resume=True, device="cuda"))
        assert second["val_acc"] > 0.5, second
        return {"val_acc": second["val_acc"]}

    def float16_from_bfloat16():
        # a run interrupted mid-epoch under bfloat16 (empty scaler state), resumed under float16
        with sigusr2_at_call(15):
            first = train(train_cfg(tmp, "bf16-src", **overrides))
        assert first.get("interrupted"), first
        shutil.copytree(tmp / "bf16-src", tmp / "fp16")
        cfg = train_cfg(tmp, "fp16", **overrides)
        real = torch.cuda.is_bf16_supported
        torch.cuda.is_bf16_supported = lambda including_emulation=True: False  # a T4/V100
        try:
            from bonnerlab.train.precision import Precision

            assert Precision.resolve(torch.device("cuda")).dtype == torch.float16
            result = train(replace(cfg, resume=True))
        finally:
            torch.cuda.is_bf16_supported = real
        assert result["val_acc"] > 0.5, result
        return {"val_acc": result["val_acc"]}

    def deterministic():
        # fresh processes: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when its handle is created
        env = child_env()
        args = [
            "--device",
            "cuda",
            "--progress",
            "false",
            "--epochs",
            "2",
            "--max_steps_per_epoch",
            "20",
            "--model.dropout",
            "0.2",
            "--deterministic",
            "true",
        ]
        outs = []
        for name in ("det-a", "det-b"):
            out = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "jobs" / "train.py"),
                    *args,
                    "--run_dir",
                    str(tmp / name),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if out.returncode == 2:  # the one-line refusal naming the op
                lines = out.stderr.strip().splitlines()
                assert len(lines) == 1 and "--deterministic" in lines[0], out.stderr[-1500:]
                return {"refused_with": lines[0]}
            assert out.returncode == 0, out.stderr[-1500:]
            outs.append(out)
        diff = max_diff(weights_of(tmp / "det-a"), weights_of(tmp / "det-b"))
        assert diff == 0.0, diff
        return {"bit_identical_runs": True}

    check("4", "SIGUSR2 mid-epoch, --resume", sigusr2_resume)
    check("4", "CPU checkpoint resumed on the GPU", cpu_checkpoint_on_gpu)
    check("4", "float16 + GradScaler resumed from a bfloat16 checkpoint", float16_from_bfloat16)
    check(
        "4",
        "--deterministic: two runs bit-identical, or one-line refusal naming the op",
        deterministic,
    )
    dist.configure_backends(torch.device("cuda"))


# ----------------------------------------------------------------------------- 5. extraction


def section_extraction(tmp: Path, quick: bool) -> dict:
    say("5. extraction CPU vs CUDA")
    from bonnerlab.activations import open_activations
    from bonnerlab.config import ExtractConfig, ModelConfig
    from bonnerlab.extract.run import extract

    def run(device: str, name: str, **extra) -> tuple[dict, dict]:
        cfg = ExtractConfig(
            model=ModelConfig(arch="resnet18"),
            stimuli="digits",
            limit=64,
            image_size=64,
            preprocess="squash",
            in_channels=3,
            layers=["layer2", "avgpool"],
            channels=["layer2=0-31"],
            pooling=["layer2=none", "avgpool=flatten"],
            batch_size=32,
            device=device,
            output=str(tmp / f"{name}.zarr"),
            progress=False,
            **extra,
        )
        summary = extract(cfg)
        arrays = {layer: open_activations(cfg.output, layer).values for layer in cfg.layers}
        return summary, arrays

    def compare(a: dict, b: dict) -> dict:
        out = {}
        for layer in a:
            scale = float(np.abs(a[layer]).max())
            out[layer] = {
                "max_abs_diff": float(np.abs(a[layer] - b[layer]).max()),
                "max_abs": scale,
                "finite": bool(np.isfinite(b[layer]).all()),
            }
        return out

    results: dict = {}

    def tf32_off():  # extraction's default (--tf32 false), recorded in the store
        _, cpu = run("cpu", "cpu")
        summary, gpu = run("cuda", "cuda")
        diffs = compare(cpu, gpu)
        results["cpu"] = cpu
        assert all(
            d["max_abs_diff"] < 1e-4 * max(1.0, d["max_abs"]) and d["finite"]
            for d in diffs.values()
        ), diffs
        return diffs

    def amp():
        from bonnerlab.activations import store_info

        summary, gpu = run("cuda", "cuda-amp", amp=True)
        diffs = compare(results["cpu"], gpu)
        info = store_info(tmp / "cuda-amp.zarr")
        identity = info.get("identity", info)
        diffs["recorded"] = {k: identity.get(k) for k in ("dtype", "amp", "amp_dtype", "tf32")}
        diffs["stored_dtype"] = str(gpu["layer2"].dtype)
        assert all(
            d["finite"] and d["max_abs_diff"] < 5e-2 * max(1.0, d["max_abs"])
            for k, d in diffs.items()
            if k in ("layer2", "avgpool")
        ), diffs
        return diffs

    def second_gpu():
        if torch.cuda.device_count() < 2:
            return "skipped: one GPU"
        code = (
            f"import sys, torch; sys.path.insert(0, {str(REPO)!r})\n"
            + "from bonnerlab.config import ExtractConfig, ModelConfig\n"
            "from bonnerlab.extract.run import extract\n"
            + "extract(ExtractConfig(model=ModelConfig(arch='resnet18'), "
            "stimuli='digits', limit=64, "
            + "image_size=64, preprocess='squash', in_channels=3, layers=['avgpool'], "
            "device='cuda:1', progress=False, "
            + f"output={str(tmp / 'cuda1.zarr')!r}))\n"
            + "print(torch.cuda.memory_allocated(0), torch.cuda.is_initialized())"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            env=child_env(),
        )
        assert out.returncode == 0, out.stderr[-1500:]
        smi = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv"],
            capture_output=True,
            text=True,
        )
        allocated_on_0 = int(out.stdout.split()[-2])
        assert allocated_on_0 == 0, out.stdout
        return {"allocated_on_gpu0": allocated_on_0, "nvidia_smi": smi.stdout.strip()[-300:]}

    check("5", "TF32 off: CUDA within 1e-4 of CPU", tf32_off)
    check("5", "AMP: within tolerance, no inf", amp)
    check("5", "--device cuda:1 leaves GPU 0 untouched", second_gpu)
    dist.configure_backends(torch.device("cuda"))
    return results


# ----------------------------------------------------------------------------- 6. throughput


def gpu_utilisation() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "n/a"
    )


def section_throughput(tmp: Path, quick: bool) -> None:
    import torchvision

    from bonnerlab.train.build import build_optimizer
    from bonnerlab.train.loop import DeviceSums, train_step
    from bonnerlab.train.precision import Precision

    say("6. throughput (batch 256, AMP, channels-last, synthetic 224x224 on the GPU)")
    device = torch.device("cuda", 0)
    dist.setup("cuda")
    steps = 10 if quick else 25

    def timed(one_step) -> float:
        for _ in range(5):  # warm-up: cuDNN autotuning, allocator
            one_step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        torch.cuda.synchronize()
        return 256 * steps / (time.perf_counter() - start)

    def batch():
        x = torch.randn(256, 3, 224, 224, device=device).contiguous(
            memory_format=torch.channels_last
        )
        return x, torch.randint(0, 1000, (256,), device=device)

    def bonnerlab_runner(arch: str, amp_dtype: str = "auto"):
        model = getattr(torchvision.models, arch)(num_classes=1000).to(
            device, memory_format=torch.channels_last
        )
        cfg = apply_overrides(TrainConfig(), {"optim.optimizer": "sgd", "optim.lr": 0.1})
        optimizer = build_optimizer(model, cfg.optim)
        precision, sums = Precision.resolve(device, amp_dtype=amp_dtype), DeviceSums(device)
        x, y = batch()
        return lambda: train_step(model, x, y, optimizer, precision, cfg, sums)

    def reference_runner(arch: str, dtype: torch.dtype):
        # torchvision's references/classification/train.py loop: SGD, autocast (float16 there,
        # with GradScaler), the loss read back every step by its metric logger
        model = getattr(torchvision.models, arch)(num_classes=1000).to(
            device, memory_format=torch.channels_last
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        criterion = torch.nn.CrossEntropyLoss()
        x, y = batch()

        def one():
            with torch.autocast("cuda", dtype=dtype):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return loss.item()

        return one

    for arch in ("resnet18", "resnet50"):

        def measure(arch=arch):
            torch.cuda.reset_peak_memory_stats()
            runners = {
                "bonnerlab": bonnerlab_runner(arch),
                "bonnerlab_fp16": bonnerlab_runner(arch, "float16"),
                "reference_fp16": reference_runner(arch, torch.float16),
                "reference_bf16": reference_runner(arch, torch.bfloat16),
            }
            rates: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(2):  # interleaved rounds, best of each: clocks and neighbours shift
                for name, runner in runners.items():
                    rates[name].append(timed(runner))
            best = {k: max(v) for k, v in rates.items()}
            return {
                **{f"{k}_samples_per_s": round(v) for k, v in best.items()},
                "ratio_vs_reference_fp16": round(best["bonnerlab"] / best["reference_fp16"], 3),
                "ratio_vs_reference_bf16": round(best["bonnerlab"] / best["reference_bf16"], 3),
                "ratio_fp16_vs_reference_fp16": round(
                    best["bonnerlab_fp16"] / best["reference_fp16"], 3
                ),
                "amp_dtype": str(Precision.resolve(device).dtype),
                "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "utilisation_pct_after": gpu_utilisation(),
            }

        check("6", f"{arch} training step", measure)

    def extraction_rate():
        from bonnerlab.config import ExtractConfig, ModelConfig
        from bonnerlab.extract.run import extract

        torch.cuda.reset_peak_memory_stats()
        n = 512 if quick else 1797  # every digit
        cfg = ExtractConfig(
            model=ModelConfig(arch="resnet50"),
            stimuli="digits",
            split="all",
            limit=n,
            image_size=224,
            preprocess="squash",
            in_channels=3,
            layers=["layer3", "avgpool"],
            pooling=["layer3=avg", "avgpool=flatten"],
            batch_size=128,
            device="cuda",
            amp=True,
            output=str(tmp / "rate.zarr"),
            progress=False,
        )
        summary, util = polled_utilisation(lambda: extract(cfg))
        return {
            "images_per_s": round(summary["images_per_s"]),
            "images": summary["images"],
            "gpu_utilisation_pct_mean": util,
            "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }

    check("6", "extraction resnet50 (AMP), 2 layers", extraction_rate)


# ---------------------------------------------------------------------- 7. GPU decode, shards


def polled_utilisation(fn):
    """(fn(), mean GPU utilisation % sampled every 0.5 s while it ran)."""
    import threading

    samples: list[str] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            samples.append(gpu_utilisation())
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        out = fn()
    finally:
        stop.set()
        poller.join()
    util = [int(v) for v in samples if v.isdigit()]
    return out, (round(sum(util) / len(util)) if util else "n/a")


def section_decode_and_shards(tmp: Path, quick: bool) -> None:
    """nvJPEG vs the CPU path; ResNet-50 training from an image folder and from shards (GPU
    decode) against synthetic input; ResNet-50 extraction from files and from shards."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_natural import make_photos

    from bonnerlab.data import shards
    from bonnerlab.data.datasets import FolderDataset
    from bonnerlab.data.folders import scan_collection
    from bonnerlab.data.gpu_decode import EncodedImages, collate_encoded, decode_batch
    from bonnerlab.data.loaders import TrainBatches

    say("7. GPU decode (nvJPEG) and shards")
    n = 2048 if quick else 3072  # 7 or 11 steps of 256: the rate from step 3 on
    photos = tmp / "photos"
    make_photos(photos, n, 64)  # 160-512 px JPEG photographs under train/ and val/<photo>/
    packed = tmp / "photo-shards"
    shards.pack(photos, packed, 1000)  # the whole collection: ids train/<photo>/..., val/...
    names, labels = scan_collection(photos).splits["train"]
    folder = photos
    device = torch.device("cuda", 0)

    def nvjpeg_vs_cpu():
        out = {}
        for fit in ("squash", "canvas", "center_crop"):
            ds = FolderDataset(folder, [folder / f for f in names[:256]], labels[:256], 224, 3, fit)
            enc = EncodedImages(ds)
            batch = collate_encoded([enc[i] for i in range(len(ds))])
            gpu, _ = decode_batch(batch, ds, device)
            cpu = torch.stack([ds[i][0] for i in range(len(ds))])
            diff = (gpu.cpu().int() - cpu.int()).abs()
            out[fit] = {
                "max": int(diff.max()),
                "mean": round(float(diff.float().mean()), 3),
                "share_over_8": float((diff > 8).float().mean()),
            }
            assert out[fit]["mean"] <= 1.0 and out[fit]["share_over_8"] <= 1e-2, out
        return out

    check("7", "nvJPEG + device resize vs the PIL path, 224 px, 256 photographs", nvjpeg_vs_cpu)

    def cuda_unit_tests():
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "nvjpeg or cuda"]
            + [str(REPO / "tests" / "unit" / "test_gpu_decode.py")],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        assert out.returncode == 0 and "skipped" not in last, out.stdout[-1500:]
        return last

    check(
        "7", "tests/unit/test_gpu_decode.py CUDA tests (nvJPEG within the bounds)", cuda_unit_tests
    )

    steps = 10 if quick else 20
    base = {
        "model.arch": "resnet50",
        "data.dataset": "imagefolder",
        "data.root": str(photos),
        "data.in_channels": 3,
        "data.image_size": 224,
        "data.batch_size": 256,
        "data.val_fraction": 0.02,
        "max_steps_per_epoch": steps,
        "epochs": 1,
        "optim.optimizer": "sgd",
        "optim.lr": 0.1,
    }

    def train_rate(decode: str, from_shards: bool) -> dict:
        from bonnerlab.runs import Logger
        from bonnerlab.train.build import build, wrap
        from bonnerlab.train.loop import train_one_epoch

        cfg = train_cfg(tmp, f"rn50-{decode}-{from_shards}", **base, **{"data.decode": decode})
        info = dist.setup(cfg.device)
        run = build(cfg, info)
        wrap(run, info)
        source = run.batches.source
        if from_shards:  # the split as datasets.load_splits builds it for --data.dataset shards
            s = shards.open_shards(packed)
            source = FolderDataset(
                packed, s.files(source.ids), source.labels.tolist(), 224, 3, source.fit
            )
        run.batches.close()  # the loader again with this decode (whatever build.py passes)
        run.batches = TrainBatches(
            source,
            256,
            cfg.seed,
            info.rank,
            info.world_size,
            info.device,
            cfg.data.num_workers,
            steps,
            decode,
        )

        def epoch():
            # timed from the end of step 3: worker start, cuDNN autotuning and the first
            # batches' fill are not the steady rate
            marks: list[float] = []
            train_one_epoch(
                run.model,
                run.batches,
                run.batch_augment,
                run.optimizer,
                run.scheduler,
                run.precision,
                cfg,
                run.state,
                Logger(None),
                on_step_end=lambda state: marks.append(time.perf_counter()),
            )
            torch.cuda.synchronize()
            return 256 * (len(marks) - 3) / (time.perf_counter() - marks[2])

        try:
            rate, util = polled_utilisation(epoch)
        finally:
            run.close()
        return {"samples_per_s": round(rate), "gpu_utilisation_pct": util}

    def synthetic():
        import torchvision

        from bonnerlab.train.build import build_optimizer
        from bonnerlab.train.loop import DeviceSums, train_step
        from bonnerlab.train.precision import Precision

        model = torchvision.models.resnet50(num_classes=2).to(
            device, memory_format=torch.channels_last
        )
        cfg = apply_overrides(TrainConfig(), {"optim.optimizer": "sgd", "optim.lr": 0.1})
        optimizer = build_optimizer(model, cfg.optim)
        precision, sums = Precision.resolve(device), DeviceSums(device)
        x = torch.randn(256, 3, 224, 224, device=device).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, 2, (256,), device=device)
        for _ in range(5):
            train_step(model, x, y, optimizer, precision, cfg, sums)
        torch.cuda.synchronize()

        def timed():
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, x, y, optimizer, precision, cfg, sums)
            torch.cuda.synchronize()
            return 256 * steps / (time.perf_counter() - start)

        rate, util = polled_utilisation(timed)
        return {"samples_per_s": round(rate), "gpu_utilisation_pct": util}

    rates: dict = {}

    def training():
        rates["synthetic"] = synthetic()
        for name, decode, from_shards in (
            ("folder_cpu_decode", "cpu", False),
            ("folder_gpu_decode", "gpu", False),
            ("shards_gpu_decode", "gpu", True),
        ):
            rates[name] = train_rate(decode, from_shards)
        ref = rates["synthetic"]["samples_per_s"]
        for r in rates.values():
            r["share_of_synthetic"] = round(r["samples_per_s"] / ref, 3)
        return rates

    check(
        "7",
        "resnet50 training (AMP, batch 256): folder / shards vs synthetic (target >= 0.8)",
        training,
    )

    def extraction():
        import inspect

        from bonnerlab.activations import open_activations
        from bonnerlab.config import ExtractConfig, ModelConfig
        from bonnerlab.extract import run as extraction_run
        from bonnerlab.extract import stimuli as extraction_stimuli
        from bonnerlab.extract.run import extract

        real = extraction_run.load_stimuli

        def load(cfg, image_size, in_channels, data):  # the planned stimuli.py integration
            if shards.is_shard_set(cfg.stimuli):
                s = shards.shard_stimuli(cfg.stimuli, cfg.limit)
                return extraction_stimuli.Stimuli(
                    s.ids, s.labels, s.root, s.classes, files=s.files, coords=s.coords
                )
            return real(cfg, image_size, in_channels, data)

        # --decode gpu exists once extract/stimuli.py takes `decode_on` (the integration patch)
        decodes = ["cpu"]
        if "decode_on" in inspect.signature(extraction_stimuli.iter_batches).parameters:
            decodes.append("gpu")
        if "is_shard_set" not in vars(extraction_stimuli):  # shards not integrated yet: patch
            extraction_run.load_stimuli = load
        out = {}
        ref = None
        try:
            for decode in decodes:
                for name, stimuli in (("files", folder), ("shards", packed)):
                    cfg = ExtractConfig(
                        model=ModelConfig(arch="resnet50"),
                        stimuli=str(stimuli),
                        layers=["layer3", "avgpool"],
                        pooling=["layer3=avg", "avgpool=flatten"],
                        batch_size=256,
                        device="cuda",
                        amp=True,
                        decode=decode,
                        output=str(tmp / f"rn50-{name}-{decode}.zarr"),
                        progress=False,
                    )
                    summary, util = polled_utilisation(lambda cfg=cfg: extract(cfg))
                    row = {
                        "images_per_s": round(summary["images_per_s"]),
                        "gpu_utilisation_pct": util,
                    }
                    values = open_activations(cfg.output, "avgpool").values
                    if ref is None:
                        ref = values
                    else:  # against files + CPU decode: the README's per-layer figure
                        scale = float(np.abs(ref).max())
                        row["avgpool_max_rel_diff_vs_files_cpu"] = float(
                            np.abs(values - ref).max() / scale
                        )
                    out[f"{name}_decode_{decode}"] = row
        finally:
            extraction_run.load_stimuli = real
        if "gpu" not in decodes:
            out["note"] = "extraction --decode gpu not integrated (extract/stimuli.py)"
        return out

    check(
        "7",
        "resnet50 extraction (AMP) from JPEG files and from shards (target >= 3000/s)",
        extraction,
    )

    def decode_ceiling():
        # what GPU decode can feed extraction: byte-reading workers + nvJPEG + device resize
        # (center crop 224) + ResNet-50 forward under AMP, no store
        import torchvision

        from bonnerlab.data.loaders import _FolderLoader, resolve_workers

        model = torchvision.models.resnet50().to(device, memory_format=torch.channels_last).eval()
        ds = FolderDataset(folder, [folder / f for f in names], labels, 224, 3, "center_crop")
        loader = _FolderLoader(ds, resolve_workers(-1), device, gpu_decode=True)
        chunks = [list(range(i, min(i + 256, len(ds)))) for i in range(0, len(ds), 256)]

        def run():
            start, seen = time.perf_counter(), 0
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for x, _ in loader.batches(chunks):
                    model(x.float().div_(255).contiguous(memory_format=torch.channels_last))
                    seen += len(x)
            torch.cuda.synchronize()
            return seen / (time.perf_counter() - start)

        try:
            run()  # warm-up: workers, cuDNN, nvJPEG handles
            rate, util = polled_utilisation(run)
        finally:
            loader.close()
        return {"images_per_s": round(rate), "gpu_utilisation_pct": util}

    check("7", "GPU-decode feed + resnet50 forward (AMP): the extraction ceiling", decode_ceiling)


# ----------------------------------------------------------------------------- main


def section_analysis(tmp: Path, quick: bool) -> None:
    """The analysis job's CUDA paths: the streamed Gram and the encoding model, against the
    CPU's numbers, with the product's share of the device's float32 matmul rate."""
    from bonnerlab.activations.store import LayerSpec, open_store
    from bonnerlab.analysis import layer_gram
    from bonnerlab.analysis.encoding import kernel_ridge_cv, make_folds

    say("8. analysis on the GPU")
    n, p = (1000, 50_000) if quick else (2000, 100_000)
    path = tmp / "analysis.zarr"
    ids = [f"s{i:05d}" for i in range(n)]
    store, _ = open_store(path, identity={"gpu_check": 8, "n": n, "p": p},
                          layers=[LayerSpec("x", ("neuroid",), (p,), "float16")],
                          stimuli=ids, labels=None, chunk_size=100)  # fmt: skip
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((16, p), dtype=np.float32)
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        z = rng.standard_normal((sl.stop - sl.start, 16), dtype=np.float32)
        x = np.maximum(z @ basis + rng.standard_normal((len(z), p), dtype=np.float32), 0)
        store.write_chunk(c, {"x": x.astype(np.float16)})
    store.finalize()

    def matmul_rate() -> float:
        """float32 TFLOP/s of the device on a panel-shaped product, TF32 off."""
        torch.backends.cuda.matmul.allow_tf32 = False
        a = torch.randn(n, 16384, device="cuda")
        c = torch.empty(n, n, device="cuda")
        torch.mm(a, a.T, out=c)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            torch.mm(a, a.T, out=c)
        torch.cuda.synchronize()
        return 10 * 2 * n * n * 16384 / (time.perf_counter() - t) / 1e12

    def gram() -> str:
        rate = matmul_rate()
        cpu = layer_gram(path, "x", device="cpu", memory_gb=1.0, cache=False)
        gpu, util = polled_utilisation(
            lambda: layer_gram(path, "x", device="cuda", memory_gb=1.0, cache=False)
        )
        err = float(np.abs(gpu.gram - cpu.gram).max() / np.abs(cpu.gram).max())
        assert err < 1e-6, f"CUDA Gram differs from the CPU's by {err:.1e} of the largest entry"
        achieved = 2 * n * n * p / gpu.attrs["compute_s"] / 1e12
        return (
            f"n {n} x p {p:,}: max|dG|/max|G| {err:.1e}; CUDA stream {gpu.attrs['read_s']:.2f} s "
            f"reading + {gpu.attrs['compute_s']:.2f} s product ({achieved:.1f} TFLOP/s = "
            f"{100 * achieved / rate:.0f}% of the device's {rate:.1f} TFLOP/s float32 matmul, "
            f"TF32 off), CPU {cpu.attrs['read_s']:.2f} + {cpu.attrs['compute_s']:.2f} s, "
            f"GPU utilisation {util}%"
        )

    def encode() -> str:
        g = layer_gram(path, "x", device="cpu", memory_gb=1.0, cache=True)
        k = g.centered()
        w = np.random.default_rng(1).standard_normal((n, 1000)) / np.sqrt(n)
        y = k @ w / np.sqrt(p) + np.random.default_rng(2).standard_normal((n, 1000))
        folds = make_folds(n, 5)
        alphas = np.logspace(-2, 6, 9)
        t = time.perf_counter()
        cpu = kernel_ridge_cv(g.gram, y, folds, alphas, device="cpu")
        t_cpu = time.perf_counter() - t
        t = time.perf_counter()
        gpu = kernel_ridge_cv(g.gram, y, folds, alphas, device="cuda")
        t_gpu = time.perf_counter() - t
        same = float((gpu.alpha_index == cpu.alpha_index).mean())
        dp = float(np.abs(gpu.prediction - cpu.prediction).max() / np.abs(cpu.prediction).max())
        assert dp < 1e-6, f"CUDA encoding predictions differ from the CPU's by {dp:.1e}"
        return (
            f"1,000 targets, 5 folds, 9 alphas: max|d prediction| {dp:.1e} of the largest, "
            f"{100 * same:.1f}% of the alphas the same; CUDA {t_gpu:.2f} s, CPU {t_cpu:.2f} s"
        )

    check("8", "streamed Gram: CUDA vs CPU, and its matmul rate", gram)
    check("8", "encoding (per-target alphas): CUDA vs CPU", encode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(REPO / "bench" / "out"), help="folder for gpu-check.txt/.json"
    )
    parser.add_argument("--quick", action="store_true", help="fewer throughput steps")
    parser.add_argument("--sections", default="12345678", help="which sections to run, e.g. 145")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        allocated = dist.gpus_allocated()
        print(
            f"gpu-check: CUDA is not available (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}"
            f"{', ' + allocated if allocated else ''})",
            file=sys.stderr,
        )
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.perf_counter()
    sections = args.sections
    if "1" in sections:
        say("1. environment")
        check("1", "environment", section_environment)
    folder = make_image_folder(tmp / "images")
    if "2" in sections:
        section_syncs(tmp, folder)
    if "3" in sections:
        section_ddp(tmp)
    if "4" in sections:
        section_resume(tmp)
    if "5" in sections:
        section_extraction(tmp, args.quick)
    if "6" in sections:
        section_throughput(tmp, args.quick)
    if "7" in sections:
        section_decode_and_shards(tmp, args.quick)
    if "8" in sections:
        section_analysis(tmp, args.quick)
    failed = [r for r in RESULTS if r["status"] != "ok"]
    say(
        f"\ngpu-check: {len(RESULTS) - len(failed)} passed, {len(failed)} failed "
        f"in {time.perf_counter() - started:.0f}s"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.txt").write_text("\n".join(LINES) + "\n")
    (out / "gpu-check.json").write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
