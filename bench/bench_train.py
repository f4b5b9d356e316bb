"""Training benchmark: bonnerlab vs the classic pytorch/examples MNIST recipe, in one run.

    python bench/bench_train.py                       # ~3.5 min on 2 idle CPU cores
    python bench/bench_train.py --quick               # one seed, reference <= 6 epochs,
                                                        short rounds
    python bench/bench_train.py --threads 2           # force torch's one thread per core
                                                        (see below)
    python bench/bench_train.py --recipe '{"model.width": 16, "data.batch_size": 64}'

Data: the MNIST test files (root/MNIST/raw/t10k-*), split 8,000 train / 2,000 held out with
bonnerlab's seeded split (data.val_fraction 0.2, split_seed 0); the reference uses the same split.

1. seconds to reach >= --target held-out accuracy (evaluated after every epoch; training plus the
   per-epoch evaluation, nothing before the first epoch), reference / ours. Ours is
   `bonnerlab.train.loop.train(cfg)` with RECIPE, read back from run_dir/metrics.jsonl
   (`epoch_time_s`, `val_acc`), for several seeds. The reference trains up to main.py's 14 epochs;
   when it never reaches the target the ratio is a lower bound, and row 1b compares the two at
   the best accuracy the reference did reach.
2. training samples/s of the reference's network at batch 64: bonnerlab's `train_one_epoch`
   (in-memory uint8 batches, batched normalize + random affine on the device) vs the reference's
   DataLoader of per-sample PIL -> ToTensor -> Normalize.
3. share of a training step spent fetching + augmenting the batch in bonnerlab's `train_one_epoch`,
   timed with time.perf_counter around the batch iterator and BatchAugment.augment, and around the
   model's forward (module hooks), backward and optimizer step (backward-pre / step hooks).

Results: a table on stdout and bench/out/train.json. Timings are wall-clock; compare ratios from
the same run. With other processes on the CPUs, torch's default of one thread per core stalls
badly (each small op waits for a descheduled thread; bonnerlab's small model suffers far more than
the reference's large convolutions), so by default the bench uses 1 thread when the load average
at start is at least half the core count, and torch's default otherwise; --threads N forces N.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import reference_mnist as ref  # noqa: E402

from bonnerlab import distributed as dist  # noqa: E402
from bonnerlab.config import DataConfig, TrainConfig, apply_overrides  # noqa: E402
from bonnerlab.data.augment import BatchAugment  # noqa: E402
from bonnerlab.data.datasets import load_splits  # noqa: E402
from bonnerlab.data.loaders import TrainBatches  # noqa: E402
from bonnerlab.runs import Logger  # noqa: E402
from bonnerlab.train.build import build, build_optimizer, build_scheduler, wrap  # noqa: E402
from bonnerlab.train.loop import train, train_one_epoch  # noqa: E402

DEFAULT_ROOT = os.path.normpath(REPO / ".." / "shared" / "data" / "mnist")
# The issue reports the reference reaching 98.5% after 4 epochs (~39 s); on this split and seed it
# may not get there at all, so the table also compares with its first 4 epochs.
ISSUE_REFERENCE_EPOCHS = 4

# The fastest configuration found that reaches 98.5% held-out on every seed tried: mnist_cnn
# at width 16 with its 3x3-pooled head, channels-last on CPU, batch 64, 2 epochs (98.6-98.95%
# over 7 seeds). Before the 3x3 head, width 16 landed at 98.1-98.65% and needed width 24 / batch 32.
RECIPE: dict[str, object] = {
    "model.arch": "mnist_cnn",
    "model.width": 16,
    "data.batch_size": 64,
    "optim.optimizer": "adamw",
    "optim.lr": 0.02,
    "optim.schedule": "onecycle",
    "epochs": 2,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def base_config(root: str) -> TrainConfig:
    data = DataConfig(
        dataset="mnist", root=root, mnist_files="test", val_fraction=0.2, download=False
    )
    return TrainConfig(data=data, device="cpu", progress=False)


# ----------------------------------------------------------------------------- 1. time to target


def seconds_to_target(rows: list[dict], target: float) -> tuple[float | None, int | None]:
    elapsed = 0.0
    for row in rows:
        elapsed += row["epoch_time_s"]
        if row["val_acc"] >= target:
            return elapsed, row["epoch"]
    return None, None


def run_ours(cfg: TrainConfig, target: float) -> dict:
    """bonnerlab.train.loop.train(cfg) in a scratch run folder; per-epoch metrics from
    metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        cfg = apply_overrides(cfg, {"run_dir": str(Path(scratch) / "run")})
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
        wall = time.perf_counter() - start
        rows = [
            json.loads(line)
            for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
    seconds, epoch = seconds_to_target(rows, target)
    return {
        "seed": cfg.seed,
        "val_acc": [r["val_acc"] for r in rows],
        "epoch_time_s": [r["epoch_time_s"] for r in rows],
        "train_samples_per_s": [r["train_samples_per_s"] for r in rows],
        "seconds_to_target": seconds,
        "epochs_to_target": epoch,
        "rows": rows,
        "train_call_wall_s": wall,
    }


# ----------------------------------------------------------------------------- 2./3. timed epochs


class PhaseTimer:
    """Wall-clock per phase of bonnerlab's train_one_epoch, without changing its code.

    fetch: the TrainBatches iterator's next(); augment: BatchAugment.augment; forward: the model's
    forward (module pre-/post-hooks); backward: from the first gradient reaching the model's
    output to the optimizer step; optimizer: optimizer.step (step pre-/post-hooks). The rest of the
    loop (loss, zero_grad, scheduler, bookkeeping) is `other`.
    """

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self._mark: dict[str, float] = {}

    def attach(
        self,
        batches: TrainBatches,
        preprocess: BatchAugment,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        timer, clock = self, time.perf_counter
        produce = batches.batches

        def timed_batches(epoch: int, start_step: int = 0):
            it = produce(epoch, start_step)
            while True:
                t0 = clock()
                try:
                    item = next(it)
                except StopIteration:
                    return
                timer.t["fetch"] += clock() - t0
                yield item

        batches.batches = timed_batches  # type: ignore[method-assign]
        augment = preprocess.augment

        def timed_augment(*args, **kwargs):
            t0 = clock()
            out = augment(*args, **kwargs)
            timer.t["augment"] += clock() - t0
            return out

        preprocess.augment = timed_augment  # type: ignore[method-assign]
        model.register_forward_pre_hook(lambda *_: self._start("forward"))
        model.register_forward_hook(lambda *_: self._stop("forward"))
        model.register_full_backward_pre_hook(lambda *_: self._start("backward"))

        def before_step(*_) -> None:  # must return None: a tuple would replace step()'s arguments
            self._stop("backward")
            self._start("optimizer")

        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(lambda *_: self._stop("optimizer"))

    def _start(self, name: str) -> None:
        self._mark[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        if name in self._mark:
            self.t[name] += time.perf_counter() - self._mark.pop(name)


class ProductRun:
    """bonnerlab's own train_one_epoch on what `bonnerlab.train.build.build` builds (as train()
    does), timed per phase.

    `model` replaces the configured one (the reference's network, which no model.arch names);
    the optimizer and schedule are then rebuilt for it, as build() would have.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module | None = None) -> None:
        info = dist.setup(cfg.device)
        run = build(cfg, info)
        if model is not None:
            model = model.to(info.device)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            run.model = model
            run.optimizer = build_optimizer(model, cfg.optim)
            run.scheduler = build_scheduler(run.optimizer, cfg.optim, len(run.batches), cfg.epochs)
        wrap(run, info)
        self.cfg, self.run, self.model = cfg, run, run.model
        self.timer = PhaseTimer()
        self.timer.attach(run.batches, run.batch_augment, run.model, run.optimizer)
        # a real Logger (TensorBoard scalars every log_every_steps), as train() has
        self._scratch = tempfile.TemporaryDirectory(prefix="bench-train-log-")
        self.logger = Logger(self._scratch.name)

    def close(self) -> None:
        self.run.close()
        self.logger.close()
        self._scratch.cleanup()

    def epoch(self) -> dict:
        """One (possibly max_steps_per_epoch-shortened) epoch; seconds per phase."""
        self.timer.t.clear()
        run = self.run
        state = run.state
        state.step, state.seen = 0, 0
        start = time.perf_counter()
        train_one_epoch(
            run.model,
            run.batches,
            run.batch_augment,
            run.optimizer,
            run.scheduler,
            run.precision,
            self.cfg,
            state,
            self.logger,
        )
        total = time.perf_counter() - start
        state.epoch += 1
        phases = dict(self.timer.t)
        phases["other"] = total - sum(phases.values())
        return {
            "samples": state.seen,
            "seconds": total,
            "samples_per_s": state.seen / total,
            "phases_s": phases,
            "load_augment_share": (phases.get("fetch", 0) + phases.get("augment", 0)) / total,
        }


class ReferenceLoaderRun:
    """The reference's own training loop on its DataLoader, timed in chunks of `steps` batches
    (0: epochs)."""

    def __init__(self, root: str, steps: int) -> None:
        torch.manual_seed(1)
        train_set, _ = ref.reference_datasets(root)
        self.loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
        self.model = ref.Net()
        self.optimizer = torch.optim.Adadelta(self.model.parameters(), lr=1.0)
        self.steps = steps

    def chunk(self) -> dict:
        loader = itertools.islice(self.loader, self.steps or None)
        seen, seconds = ref.train_epoch(self.model, loader, self.optimizer)
        return {"samples": seen, "seconds": seconds, "samples_per_s": seen / seconds}


# ----------------------------------------------------------------------------- report


def set_threads(threads: int) -> tuple[float, bool]:
    """torch's thread count for a bench: `threads` when given; else torch's default (one per core),
    or 1 when the load average is at least half the core count (a busy machine stalls
    multi-threaded small ops). Returns (load average, busy)."""
    load = os.getloadavg()[0]
    busy = load >= 0.5 * (os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(threads)
    elif busy:
        torch.set_num_threads(1)
    return load, busy


def fmt(v: float | None, spec: str = ".1f", none: str = "not reached") -> str:
    return none if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root", default=DEFAULT_ROOT, help="folder with MNIST/raw/t10k-* (default: %(default)s)"
    )
    p.add_argument("--target", type=float, default=0.985, help="held-out accuracy to reach")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds of our recipe (default 0 1 2)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads for everything "
        "(default: 1 on a busy machine, else torch's default)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one seed, reference up to 6 epochs, one short throughput round",
    )
    p.add_argument(
        "--reference-max-epochs",
        type=int,
        default=0,
        help="stop the reference here if it has not reached --target "
        "(default: main.py's 14; 6 with --quick)",
    )
    p.add_argument(
        "--reference-no-shuffle",
        action="store_true",
        help="train the reference in file order, as main.py does on a CPU",
    )
    p.add_argument(
        "--recipe",
        default="{}",
        metavar="JSON",
        help='overrides of our recipe, dotted keys, e.g. \'{"model.width": 16, "epochs": 3}\'',
    )
    p.add_argument("--out", default=str(HERE / "out" / "train.json"))
    args = p.parse_args(argv)
    recipe = {**RECIPE, **json.loads(args.recipe)}
    load, busy = set_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    rounds, chunk_steps = (1, 40) if args.quick else (2, 0)  # 0: whole epochs
    bench_start = time.perf_counter()
    dist.setup("cpu")

    log(
        f"bonnerlab training bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load:.1f}; data {args.root}"
    )
    if busy:
        log(
            "  note: other processes are using the CPUs: absolute times will be inflated; "
            + ("consider --threads 1" if torch.get_num_threads() > 1 else "running on 1 thread")
        )
    cfg0 = base_config(args.root)
    splits = load_splits(cfg0.data)
    ref_train, ref_val = ref.reference_datasets(args.root)
    assert torch.equal(ref_train.targets, splits.train.labels) and torch.equal(
        ref_val.targets, splits.val.labels
    ), "reference split differs from bonnerlab's"
    log(f"split: {len(splits.train)} train / {len(splits.val)} held out (identical in both)")

    # 1. time to target ---------------------------------------------------------------------
    log(f"[1] reference (pytorch/examples mnist recipe) until val_acc >= {args.target}:")
    ref_epochs = args.reference_max_epochs or (6 if args.quick else 14)
    reference = ref.run_reference(
        args.root, args.target, ref_epochs, shuffle=not args.reference_no_shuffle, log=log
    )
    recipe_cfg = apply_overrides(cfg0, recipe)
    log(f"[1] bonnerlab train() with {json.dumps(recipe)}:")
    ours = []
    for seed in seeds:
        run = run_ours(apply_overrides(recipe_cfg, {"seed": seed}), args.target)
        ours.append(run)
        log(
            f"  seed {seed}: val_acc {[round(a, 4) for a in run['val_acc']]}, epoch s "
            f"{[round(s, 2) for s in run['epoch_time_s']]} -> "
            f"{fmt(run['seconds_to_target'], '.2f')} s "
            f"(train() call {run['train_call_wall_s']:.1f} s incl. setup and checkpoints)"
        )
    reached = [r["seconds_to_target"] for r in ours if r["seconds_to_target"] is not None]
    ours_s = statistics.median(reached) if len(reached) == len(ours) else None
    ours_worst = max(reached) if len(reached) == len(ours) else None
    ref_s = reference["seconds_to_target"]
    speedup = ref_s / ours_s if ref_s and ours_s else None

    # 2. throughput at the reference's model and batch ----------------------------------------
    log(
        "[2] reference network, batch 64, Adadelta lr 1.0: "
        "bonnerlab train_one_epoch vs reference DataLoader"
    )
    thr_cfg = apply_overrides(
        cfg0,
        {
            "data.batch_size": 64,
            "optim.optimizer": "adadelta",
            "optim.lr": 1.0,
            "optim.weight_decay": 0.0,
            "optim.schedule": "step",
            "epochs": 14,
        },
    )
    # Alternate the two paths (an epoch, or `chunk_steps` batches, each; model and optimizer state
    # evolving on each side) so that load from other processes hits both alike.
    thr_cfg = apply_overrides(thr_cfg, {"max_steps_per_epoch": chunk_steps})
    torch.manual_seed(1)
    ours_run = ProductRun(thr_cfg, model=ref.Net())
    ref_run = ReferenceLoaderRun(args.root, chunk_steps)
    ours_ref_net, ref_loader = [], []
    for r in range(rounds):
        ours_ref_net.append(ours_run.epoch())
        ref_loader.append(ref_run.chunk())
        log(
            f"  round {r + 1}: bonnerlab path {ours_ref_net[-1]['samples_per_s']:.0f} samples/s, "
            f"reference path {ref_loader[-1]['samples_per_s']:.0f} samples/s"
        )
    # Best of the rounds, the least disturbed measurement of each path; the reference also gets
    # its training epochs from [1] (same loop, same loader), which can only favour it.
    ours_run.close()
    ours_rate = max(e["samples_per_s"] for e in ours_ref_net)
    ref_rate = max(
        [e["samples_per_s"] for e in ref_loader]
        + [e["train_samples_per_s"] for e in reference["epochs"]]
    )

    # 3. phase shares in our path -----------------------------------------------------------
    log("[3] phase times in bonnerlab train_one_epoch, recipe model:")
    recipe_run = ProductRun(recipe_cfg)
    recipe_epochs = [recipe_run.epoch() for _ in range(int(recipe_cfg.epochs))]
    recipe_run.close()
    for name, epochs in (("recipe", recipe_epochs), ("reference net, batch 64", ours_ref_net)):
        for e in epochs:
            log(
                f"  {name}: {e['samples']} samples at {e['samples_per_s']:.0f}/s; "
                + ", ".join(f"{k} {100 * v / e['seconds']:.1f}%" for k, v in e["phases_s"].items())
            )
    recipe_share = statistics.median(e["load_augment_share"] for e in recipe_epochs)
    refnet_share = statistics.median(e["load_augment_share"] for e in ours_ref_net)

    # table -------------------------------------------------------------------------------
    n_seeds = f"{len(seeds)} seed" + ("s" if len(seeds) > 1 else "")
    ref_total = sum(e["epoch_time_s"] for e in reference["epochs"])
    ref_best = reference["best_val_acc"]
    if ref_s is not None:
        ref_cell = f"{ref_s:.1f} s ({reference['epochs_to_target']} ep)"
    else:
        ref_cell = f"> {ref_total:.1f} s (best {ref_best:.2%} in {len(reference['epochs'])} ep)"
    if ours_s is not None:
        ep = sorted({r["epochs_to_target"] for r in ours})
        ours_cell = (
            f"{ours_s:.2f} s ({'/'.join(map(str, ep))} ep; median of {n_seeds}, "
            f"worst {ours_worst:.2f})"
        )
    else:
        ours_cell = f"{len(reached)}/{len(seeds)} seeds reached it" + (
            f" (median {statistics.median(reached):.2f} s)" if reached else ""
        )
    if speedup:
        ratio_cell = f"{speedup:.1f}x (target >= 10x)"
    elif ref_s is None and ours_s:
        ratio_cell = f"> {ref_total / ours_s:.1f}x (lower bound; target >= 10x)"
    else:
        ratio_cell = "n/a (target >= 10x)"
    rows = [(f"1. seconds to >= {args.target:.1%} held-out", ref_cell, ours_cell, ratio_cell)]
    equal = None
    if ref_s is None:
        # The reference never got there: compare at the best accuracy it did reach.
        ref_at, ref_ep = seconds_to_target(reference["epochs"], ref_best)
        ours_at = [seconds_to_target(r["rows"], ref_best)[0] for r in ours]
        if all(v is not None for v in ours_at):
            ours_med = statistics.median(ours_at)
            equal = {
                "accuracy": ref_best,
                "reference_s": ref_at,
                "ours_median_s": ours_med,
                "speedup": ref_at / ours_med,
            }
            rows.append(
                (
                    f"1b. seconds to the reference's best, {ref_best:.2%}",
                    f"{ref_at:.1f} s ({ref_ep} ep)",
                    f"{ours_med:.2f} s (median of {n_seeds})",
                    f"{ref_at / ours_med:.1f}x",
                )
            )
        # The issue saw the reference reach the target after 4 epochs elsewhere: the ratio to that.
        k = ISSUE_REFERENCE_EPOCHS
        if ours_s is not None and len(reference["epochs"]) >= k:
            ref_k = sum(e["epoch_time_s"] for e in reference["epochs"][:k])
            equal = {
                **(equal or {}),
                "reference_first_4_epochs_s": ref_k,
                "speedup_vs_4_epochs": ref_k / ours_s,
            }
            rows.append(
                (
                    f"1c. ... vs the reference's first {k} epochs",
                    f"{ref_k:.1f} s ({k} ep)",
                    f"{ours_s:.2f} s (as in 1.)",
                    f"{ref_k / ours_s:.1f}x",
                )
            )
    rows += [
        (
            "2. train samples/s, ref net, batch 64 (best)",
            f"{ref_rate:.0f}",
            f"{ours_rate:.0f}",
            f"{ours_rate / ref_rate:.2f}x",
        ),
        (
            "3. step time in loading+augment",
            "-",
            f"{100 * recipe_share:.1f}% (ref net {100 * refnet_share:.1f}%)",
            "target < 10%",
        ),
    ]
    widths = [
        max(len(r[i]) for r in [("metric", "reference", "bonnerlab", "ratio"), *rows])
        for i in range(4)
    ]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    log("")
    log(line(("metric", "reference", "bonnerlab", "ratio")))
    log(line(["-" * w for w in widths]))
    for r in rows:
        log(line(r))
    log(
        f"recipe: {json.dumps(recipe)}; {torch.get_num_threads()} torch threads; "
        f"bench took {time.perf_counter() - bench_start:.0f} s"
    )

    result = {
        "target": args.target,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_start": load,
        "root": args.root,
        "recipe": recipe,
        "reference": reference,
        "ours": ours,
        "time_to_target": {
            "reference_s": ref_s,
            "ours_median_s": ours_s,
            "ours_worst_s": ours_worst,
            "speedup": speedup,
            "at_reference_best": equal,
        },
        "throughput_ref_net_batch64": {
            "reference_samples_per_s": ref_rate,
            "ours_samples_per_s": ours_rate,
            "ratio": ours_rate / ref_rate,
            "ours_epochs": ours_ref_net,
            "reference_loader_epochs": ref_loader,
        },
        "load_augment_share": {
            "recipe": recipe_share,
            "reference_net": refnet_share,
            "recipe_epochs": recipe_epochs,
        },
        "bench_seconds": time.perf_counter() - bench_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
