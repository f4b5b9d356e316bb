"""The GPU-ready training step, checked on the CPU: gradient accumulation equals the large
batch, SyncBatchNorm under 2 gloo processes equals one process, torch.compile equals eager; and
the signals that stop it (Ctrl-C once and twice, SIGTERM under torchrun)."""

from __future__ import annotations

import importlib
import math
import signal
import subprocess
import time

import pytest
import torch
from helpers import (
    JOBS,
    SMOKE_FLAGS,
    assert_same_weights,
    cli_flags,
    job,
    repo_env,
    run_weights,
    torchrun,
    torchrun_cmd,
    torchrun_env,
)

from bonnerlab.runs import read_metrics, read_state
from bonnerlab.train.loop import train

_weights = run_weights


def _max_diff(a, b) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_gradient_accumulation_equals_the_large_batch(tiny_train_cfg, tmp_path):
    common = {
        "epochs": 1,
        "max_steps_per_epoch": 6,
        "model.batchnorm": False,
        "optim.grad_clip": 1.0,
    }
    train(tiny_train_cfg(run_dir=str(tmp_path / "one"), **common))
    train(tiny_train_cfg(run_dir=str(tmp_path / "four"), **{**common, "optim.accumulate_steps": 4}))
    one, four = _weights(tmp_path / "one"), _weights(tmp_path / "four")
    assert_same_weights(one, four, atol=1e-5)
    assert (
        _max_diff(one, four) > 0
    )  # four micro-batches really ran (float sums differ in the last bits)
    m1, m4 = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "four")[0]
    assert m4["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m4["train_acc"] == m1["train_acc"]


def _torchrun(args, run_dir):
    return torchrun(str(JOBS / "train.py"), *args, "--run_dir", str(run_dir))


@pytest.mark.slow
def test_sync_batchnorm_two_gloo_processes_equal_one_process(tmp_path):
    # BatchNorm on (the default). Channels-last off: CPU channels-last convolutions sum in a
    # batch-size-dependent order, and AdamW turns those last-bit differences in the near-zero
    # gradients of BatchNorm-followed conv weights into lr-sized steps (1e-2 after 2 steps,
    # even between two single-process runs).
    args = [
        *SMOKE_FLAGS,
        "--data.batch_size",
        "64",
        "--max_steps_per_epoch",
        "6",
        "--channels_last",
        "false",
    ]
    env = repo_env(OMP_NUM_THREADS="1")
    subprocess.run(
        [*job("train"), *args, "--run_dir", str(tmp_path / "one")],
        check=True,
        env=env,
        capture_output=True,
    )
    _torchrun([*args, "--model.sync_batchnorm", "true"], tmp_path / "sync")
    _torchrun(args, tmp_path / "local")  # per-rank statistics: what sync_batchnorm corrects
    one = _weights(tmp_path / "one")
    synced, local = _weights(tmp_path / "sync"), _weights(tmp_path / "local")
    assert set(one) == set(synced)  # same parameter names: checkpoints stay interchangeable
    assert _max_diff(one, synced) < 1e-4
    assert _max_diff(one, local) > 10 * _max_diff(one, synced)


@pytest.mark.slow
def test_compile_runs_and_matches_eager(tiny_train_cfg, tmp_path):
    common = {"epochs": 1, "max_steps_per_epoch": 3, "model.batchnorm": False}
    train(tiny_train_cfg(run_dir=str(tmp_path / "eager"), **common))
    result = train(tiny_train_cfg(run_dir=str(tmp_path / "compiled"), compile=True, **common))
    assert result["epoch"] == 1
    assert_same_weights(_weights(tmp_path / "eager"), _weights(tmp_path / "compiled"), atol=1e-4)
    torch._dynamo.reset()


def test_compile_without_a_working_compiler_is_one_line(monkeypatch):
    from bonnerlab.errors import UserError
    from bonnerlab.train.build import compile_model

    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):  # what inductor raises at the first call when no C++ compiler exists
            raise RuntimeError(
                "InductorError: CppCompileError: C++ compile error\nFileNotFoundError: 'g++'"
            )

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError) as e:
        compile_model(model, torch.device("cpu"), fallback=False)
    assert "\n" not in str(e.value) and "drop --compile" in str(e.value) and "g++" in str(e.value)
    with pytest.warns(UserWarning, match="training uncompiled"):
        assert compile_model(model, torch.device("cpu"), fallback=True) is model


def test_cpu_bfloat16_autocast_when_asked(tiny_train_cfg, tmp_path, monkeypatch):
    """--amp_cpu computes in bfloat16 where the CPU runs it natively, in float32 where it would
    be emulated, and is off by default. The capability is forced both ways, so both branches run
    on any machine; what a layer computes in under the autocast is the answer, not the flag."""
    from bonnerlab.train.precision import Precision

    where = importlib.import_module(Precision.__module__)
    cpu, layer, x = torch.device("cpu"), torch.nn.Linear(4, 4), torch.ones(2, 4)

    def computes_in(precision) -> torch.dtype:
        with precision.autocast():
            return layer(x).dtype

    for native, dtype in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(where, "cpu_has_native_bf16", lambda native=native: native)
        asked = Precision.resolve(cpu, amp_cpu=True)
        assert computes_in(asked) == dtype and asked.enabled == native, native
        assert not asked.scaler.is_enabled()  # bfloat16 needs no loss scaling
        assert (
            computes_in(Precision.resolve(cpu)) == torch.float32
        )  # off by default: it changes results
    monkeypatch.setattr(where, "cpu_has_native_bf16", lambda: True)
    result = train(
        tiny_train_cfg(
            run_dir=str(tmp_path / "bf16"), amp_cpu=True, epochs=1, max_steps_per_epoch=4
        )
    )
    assert result["epoch"] == 1 and math.isfinite(result["train_loss"])


def test_resuming_a_run_saved_before_a_config_key_existed(tiny_train_cfg):
    import yaml

    from bonnerlab.runs import RunPaths as Paths

    cfg = tiny_train_cfg(epochs=2, max_steps_per_epoch=3)
    train(cfg)
    saved = yaml.safe_load(Paths(cfg.run_dir).config_yaml.read_text())
    del saved["amp_cpu"], saved["optim"]["accumulate_steps"]  # an older bonnerlab's config.yaml
    Paths(cfg.run_dir).config_yaml.write_text(yaml.safe_dump(saved))
    from dataclasses import replace

    assert train(replace(cfg, resume=True, epochs=2))["epoch"] == 2


# ----------------------------------------------------------------------------- signals

# long enough that the signal lands mid-training; a checkpoint every 4 steps shows it is
_SIGNAL_RUN = cli_flags(
    {"epochs": 3, "data.batch_size": 32, "max_steps_per_epoch": 16, "checkpoint_every_steps": 4}
)


def _popen_train(run_dir, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*job("train"), *SMOKE_FLAGS, *flags, "--run_dir", str(run_dir)],
        env=repo_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_file(path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended first:\n{proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, f"no {path} after {timeout:.0f} s"
        time.sleep(0.01)


def test_ctrl_c_saves_marks_interrupted_and_resumes_to_the_uninterrupted_run(tmp_path):
    ref = _popen_train(tmp_path / "ref", *_SIGNAL_RUN)
    run = tmp_path / "run"
    proc = _popen_train(run, *_SIGNAL_RUN)
    _wait_for_file(run / "checkpoints" / "latest.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Ctrl-C: saving at the next step" in err and "stopped by a signal; saved" in out
    assert read_state(run) == "INTERRUPTED" and not (run / "LOCK").exists()
    assert ref.wait(timeout=300) == 0
    resumed = subprocess.run(
        [*job("train"), *SMOKE_FLAGS, *_SIGNAL_RUN, "--run_dir", str(run), "--resume"],
        env=repo_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_state(run) == "DONE" and [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    assert_same_weights(run_weights(tmp_path / "ref"), run_weights(run))


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    run = tmp_path / "run"
    # steps of a few hundred ms: the second Ctrl-C lands while the step after the first runs
    proc = _popen_train(run, *cli_flags({"model.width": 96, "data.batch_size": 512, "epochs": 50}))
    _wait_for_file(run / "checkpoints" / "best.pt", proc)  # saved after latest.pt
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first Ctrl-C's line: it is saving, the next one aborts
        if "Ctrl-C again to abort" in line:
            break
    else:
        raise AssertionError(f"the first Ctrl-C did not ask to save (status {proc.wait()})")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), err[-2000:]
    assert "stopped by a signal; saved" not in err
    assert read_state(run) == "INTERRUPTED" and not (run / "LOCK").exists()
    assert (run / "checkpoints" / "latest.pt").is_file()  # the last epoch's, to resume from


@pytest.mark.slow
def test_sigterm_under_torchrun_with_no_check_inside_an_epoch_leaves_interrupted(tmp_path):
    """An epoch shorter than log_every_steps never agrees on a stop inside it (as on a loaded
    machine, where torchrun's 30 s before SIGKILL pass first): STATE says INTERRUPTED from the
    moment the signal lands, the run stops at the epoch's end, and resumes to the end."""
    flags = [*SMOKE_FLAGS, *cli_flags({"epochs": 6, "max_steps_per_epoch": 8})]
    flags += ["--log_every_steps", "1000"]
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_cmd(str(JOBS / "train.py"), *flags, "--run_dir", str(run)),
        env=torchrun_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_file(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 20
    while read_state(run) == "RUNNING" and time.monotonic() < end:
        time.sleep(0.01)
    assert read_state(run) == "INTERRUPTED"
    out, _ = proc.communicate(timeout=120)
    assert "stopped by a signal; saved" in out, out[-3000:]
    assert read_state(run) == "INTERRUPTED" and len(read_metrics(run)) < 6
    torchrun(str(JOBS / "train.py"), *flags, "--run_dir", str(run), "--resume")
    assert read_state(run) == "DONE" and [m["epoch"] for m in read_metrics(run)] == [*range(1, 7)]
