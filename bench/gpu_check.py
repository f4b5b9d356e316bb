"""GPU check, for when a GPU is lent (`make gpu-check`); never part of `make test`.

Runs, on CUDA: a few training steps with AMP and channels-last (mnist_cnn on digits, resnet18 on
an image folder through pinned-memory DataLoader workers), the same training under DDP with NCCL
at world size 1, evaluation, and extraction when available. Prints samples/s; exits non-zero on
any failure.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bonnerlab.config import EvaluateConfig, TrainConfig, apply_overrides  # noqa: E402


def check(name: str, fn, results: list) -> None:
    start = time.perf_counter()
    try:
        detail = fn()
        results.append((name, "ok", time.perf_counter() - start, detail))
    except Exception as e:  # report every check, then fail at the end
        traceback.print_exc()
        results.append((name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        time.perf_counter() - start, ""))


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: CUDA is not available on this machine", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16={torch.cuda.is_bf16_supported()}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results: list = []

    def train_digits(run: str, **extra):
        from bonnerlab.training import train

        cfg = apply_overrides(TrainConfig(), {
            "run_dir": str(tmp / run), "device": "cuda", "amp": True, "channels_last": True,
            "epochs": 3, "progress": False, **extra,
        })
        result = train(cfg)
        assert result["val_acc"] > 0.9, result
        return f"val_acc {result['val_acc']:.3f}, {result['train_samples_per_s']:.0f} samples/s"

    check("train mnist_cnn, AMP + channels-last", lambda: train_digits("amp"), results)

    def folder_resnet():
        from PIL import Image

        from bonnerlab.training import train

        rng = np.random.default_rng(0)
        for c in ("a", "b"):
            (tmp / "imgs" / c).mkdir(parents=True, exist_ok=True)
            for i in range(128):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "imgs" / c / f"{i}.png")
        cfg = apply_overrides(TrainConfig(), {
            "run_dir": str(tmp / "resnet"), "device": "cuda", "epochs": 1, "progress": False,
            "model.arch": "resnet18", "data.dataset": "imagefolder", "data.root": str(tmp / "imgs"),
            "data.channels": 3, "data.image_size": 64, "data.batch_size": 32, "data.num_workers": 4,
        })
        result = train(cfg)
        return f"{result['train_samples_per_s']:.0f} samples/s (pinned DataLoader workers)"

    check("train resnet18 on an image folder", folder_resnet, results)

    def ddp_nccl():
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        try:
            return train_digits("ddp")
        finally:
            dist.destroy_process_group()

    check("DDP with NCCL, world size 1", ddp_nccl, results)

    def evaluate_cuda():
        from bonnerlab.training import evaluate

        result = evaluate(EvaluateConfig(checkpoint=str(tmp / "amp"), device="cuda"))
        assert result["acc"] > 0.9, result
        return f"acc {result['acc']:.3f}"

    check("evaluate on CUDA", evaluate_cuda, results)

    def extract_cuda():
        try:
            from bonnerlab.extraction import ExtractConfig, extract
        except ImportError:
            return "skipped (no extraction module)"
        cfg = ExtractConfig(checkpoint=str(tmp / "amp"), stimuli="digits", layers=["features.1", "fc"],
                            output=str(tmp / "acts.zarr"), device="cuda", amp=True, progress=False)
        result = extract(cfg)
        return f"{result.get('images_per_s', 0):.0f} images/s"

    check("extract on CUDA", extract_cuda, results)

    width = max(len(r[0]) for r in results)
    print(f"\n{'check':<{width}}  {'status':<8} {'seconds':>8}  detail")
    for name, status, seconds, detail in results:
        print(f"{name:<{width}}  {status:<8} {seconds:8.1f}  {detail}")
    return 0 if all(r[1] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
