"""Extraction: values against an independent forward pass, resume after SIGKILL, shards, bad
input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import JOBS, extract_cfg, job_module
from PIL import Image

from bonnerlab import activations
from bonnerlab.activations.store import ActivationStore
from bonnerlab.config import ExtractConfig, ModelConfig, parse_channels
from bonnerlab.errors import ConfigError, UserError
from bonnerlab.extract.capture import Capture, LayerPlan
from bonnerlab.extract.run import extract, load_model

JOB = str(JOBS / "extract.py")
SIZE = 64  # resnet18 at 64x64: small enough for CPU tests, every layer still spatial
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def make_images(root: Path, n: int, size: int = SIZE, seed: int = 0) -> list[str]:
    """PNGs in class folders (and one nested deeper); returns their relative paths, sorted."""
    rng = np.random.default_rng(seed)
    rel = []
    for i in range(n):
        sub = ["cat", "dog", "dog/puppies"][i % 3]
        path = root / sub / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        rel.append(path.relative_to(root).as_posix())
    return sorted(rel)


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stimuli")
    make_images(root, 12)
    return root


def rcfg(stimuli: Path, out: Path, **kw) -> ExtractConfig:
    fields = dict(
        model=ModelConfig(arch="resnet18"),
        preprocess="squash",  # the test images are already SIZE x SIZE: no resampling at all
        stimuli=str(stimuli),
        image_size=SIZE,
        batch_size=16,
    )
    return extract_cfg(out, **{**fields, **kw})


def reference_inputs(stimuli: Path) -> tuple[list[str], torch.Tensor]:
    """Decode and normalize by hand (PIL + numpy), independently of the extraction code."""
    rel = sorted(p.relative_to(stimuli).as_posix() for p in stimuli.rglob("*.png"))
    arrays = [
        np.asarray(Image.open(stimuli / r).convert("RGB"), dtype=np.float32) / 255 for r in rel
    ]
    x = (np.stack(arrays) - MEAN) / STD
    return rel, torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


@pytest.fixture(scope="module")
def resnet_run(stimuli, tmp_path_factory):
    """One extraction of several layers plus the reference activations computed directly."""
    from torchvision.models.feature_extraction import create_feature_extractor

    out = tmp_path_factory.mktemp("acts") / "r.zarr"
    layers = ["conv1", "bn1", "layer1.0.bn1", "layer2", "avgpool", "fc"]
    cfg = rcfg(stimuli, out, layers=layers)
    result = extract(cfg)
    model = load_model(cfg).model  # same seed -> same random weights
    rel, x = reference_inputs(stimuli)
    with torch.inference_mode():
        # Explicit calls for the layers an in-place ReLU follows: their true output, pre-ReLU.
        bn1 = model.bn1(model.conv1(x))
        stem = model.maxpool(model.relu(bn1.clone()))
        block = model.layer1[0]
        ref = {"conv1": model.conv1(x), "bn1": bn1, "layer1.0.bn1": block.bn1(block.conv1(stem))}
        fx = create_feature_extractor(model, return_nodes=["layer2", "avgpool", "fc"])(x)
        ref.update({k: v for k, v in fx.items()})
    return result, out, rel, {k: v.numpy() for k, v in ref.items()}


def test_activations_equal_direct_forward(resnet_run):
    result, out, rel, ref = resnet_run
    assert result["complete"] and result["images"] == 12 and result["chunks_written"] == 1
    for layer, expected in ref.items():
        da = activations.open_activations(out, layer)
        assert list(da["stimulus"].values) == rel
        np.testing.assert_allclose(da.values, expected, rtol=1e-4, atol=1e-5, err_msg=layer)
    # bn1 and layer1.0.bn1 are followed by ReLU(inplace=True); a hook that kept the tensor
    # without copying would see only non-negative values.
    assert (activations.open_activations(out, "bn1").values < 0).mean() > 0.2
    assert (activations.open_activations(out, "layer1.0.bn1").values < 0).mean() > 0.2
    da = activations.open_activations(out, "layer2")
    assert da.dims == ("presentation", "channel", "y", "x") and da.shape == (12, 128, 8, 8)
    assert activations.open_activations(out, "fc").dims == ("presentation", "neuroid")
    assert da["label"].values.tolist() == [{"cat": 0, "dog": 1}[r.split("/")[0]] for r in rel]
    assert da.attrs["arch"] == "resnet18" and len(da.attrs["weights_sha256"]) == 64
    assert (
        da.attrs["preprocessing"]["output_size"] == [SIZE, SIZE] and "torch" in da.attrs["versions"]
    )


def test_channel_subset_and_pooling_equal_reference(resnet_run, stimuli, tmp_path):
    _, full_out, _, _ = resnet_run
    full = {k: activations.open_activations(full_out, k).values for k in ("layer2", "bn1", "conv1")}
    channels = [0, 1, 2, 3, 10, 64]
    cfg = rcfg(
        stimuli,
        tmp_path / "sub.zarr",
        layers=["conv1", "bn1", "layer2"],
        channels=["layer2=0-3,10,64", "bn1=5"],
        pooling=["conv1=max", "bn1=flatten", "layer2=avg"],
    )
    extract(cfg)
    layer2 = activations.open_activations(tmp_path / "sub.zarr", "layer2")
    assert layer2.dims == ("presentation", "channel") and layer2.attrs["channels"] == channels
    np.testing.assert_allclose(
        layer2.values, full["layer2"][:, channels].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6
    )
    conv1 = activations.open_activations(tmp_path / "sub.zarr", "conv1").values
    np.testing.assert_array_equal(conv1, full["conv1"].max(axis=(2, 3)))
    bn1 = activations.open_activations(tmp_path / "sub.zarr", "bn1")
    assert bn1.dims == ("presentation", "neuroid")
    np.testing.assert_array_equal(bn1.values, full["bn1"][:, [5]].reshape(12, -1))


def test_channel_subset_is_exact_slice_and_float16(resnet_run, stimuli, tmp_path):
    _, full_out, _, _ = resnet_run
    extract(
        rcfg(stimuli, tmp_path / "s.zarr", layers=["layer2"], channels=["7-9"], dtype="float16")
    )
    da = activations.open_activations(tmp_path / "s.zarr", "layer2")
    assert da.dtype == np.float16
    full = activations.open_activations(full_out, "layer2").values
    np.testing.assert_array_equal(da.values, full[:, 7:10].astype(np.float16))


def test_forward_stops_after_last_requested_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ran = []
    model[2].register_forward_hook(lambda *a: ran.append(1))
    plans = {"0": LayerPlan("0", None, "none")}
    with Capture({"0": model[0]}, plans, torch.float32) as cap:
        out = cap.run(model, torch.ones(3, 4))
    assert not ran and out["0"].shape == (3, 4)


def test_parse_channels():
    assert parse_channels("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_channels("all") is None and parse_channels("") is None
    for bad in ("3-1", "a", "1,1", "-2"):
        with pytest.raises(ConfigError):
            parse_channels(bad)


def test_two_shards_equal_one_job(stimuli, tmp_path):
    def cfg(out: str, **kw) -> ExtractConfig:
        kw = dict(
            model=ModelConfig(arch="mnist_cnn"),
            image_size=28,
            layers=["features.0", "fc"],
            batch_size=4,
            **kw,
        )
        return rcfg(stimuli, tmp_path / out, **kw)

    one = extract(cfg("one.zarr"))
    assert one["chunks_written"] == 3
    s0 = extract(cfg("two.zarr", num_shards=2))
    assert s0["chunks_written"] == 2 and not s0["complete"] and s0["chunks_missing"] == 1
    s1 = extract(cfg("two.zarr", num_shards=2, shard_index=1))
    assert s1["chunks_written"] == 1 and s1["complete"]  # the last shard finalizes
    for layer in ("features.0", "fc"):
        a = activations.open_activations(tmp_path / "one.zarr", layer).values
        assert (
            a.tobytes()
            == activations.open_activations(tmp_path / "two.zarr", layer).values.tobytes()
        )
    # A rerun with the same config reuses the finished store and computes nothing.
    again = extract(cfg("one.zarr"))
    assert again["outcome"] == "reused" and again["chunks_written"] == 0


def _digits_args(out: Path) -> list[str]:
    return [
        "--stimuli", "digits", "--split", "all", "--limit", "320", "--layers", "features.1", "fc",
        "--batch_size", "8", "--device", "cpu", "--output", str(out), "--progress", "false",
    ]  # fmt: skip


def test_sigkill_then_restart_equals_uninterrupted(tmp_path):
    """Kill the job once a few chunks are marked; the restart redoes only the rest, bit for bit."""
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, JOB, *_digits_args(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    markers = killed / ".done" / "fc"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(os.listdir(markers)) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    store = ActivationStore(killed)
    done_before = store.n_chunks - len(store.missing_chunks())
    assert 0 < done_before < store.n_chunks

    from bonnerlab.config import parse_config

    resumed = extract(parse_config(ExtractConfig, _digits_args(killed)))
    assert resumed["outcome"] == "reused" and resumed["complete"]
    assert resumed["chunks_written"] == store.n_chunks - done_before

    fresh = extract(parse_config(ExtractConfig, _digits_args(tmp_path / "fresh.zarr")))
    assert fresh["chunks_written"] == store.n_chunks
    for layer in ("features.1", "fc"):
        a = activations.open_activations(killed, layer).values
        b = activations.open_activations(tmp_path / "fresh.zarr", layer).values
        assert a.tobytes() == b.tobytes(), layer
        chunk_files = sorted(
            p.relative_to(killed) for p in (killed / layer).rglob("*") if p.is_file()
        )
        assert chunk_files, layer
        for rel in chunk_files:
            assert (killed / rel).read_bytes() == (tmp_path / "fresh.zarr" / rel).read_bytes()


# ------------------------------------------------------------------------------------- bad input


def test_unknown_layer_lists_closest(stimuli, tmp_path):
    with pytest.raises(
        UserError, match=r"unknown layer 'layer5'; closest: .*layer1.*--list_layers"
    ):
        extract(rcfg(stimuli, tmp_path / "x.zarr", layers=["layer5"]))
    assert not (tmp_path / "x.zarr").exists()


def test_channel_out_of_range(stimuli, tmp_path):
    with pytest.raises(
        UserError, match=r"channel 64 is out of range for layer layer1, which has 64 channels"
    ):
        extract(rcfg(stimuli, tmp_path / "x.zarr", layers=["layer1"], channels=["layer1=0,64"]))
    assert not (tmp_path / "x.zarr").exists()


def test_bad_config_values():
    with pytest.raises(ConfigError, match="shard_index 2 is out of range for num_shards 2"):
        ExtractConfig(shard_index=2, num_shards=2)
    with pytest.raises(ConfigError, match="pooling for features.2 must be one of"):
        ExtractConfig(pooling=["median"])
    with pytest.raises(ConfigError, match="names 'fc'"):
        ExtractConfig(layers=["features.2"], channels=["fc=0"])
    with pytest.raises(ConfigError, match="dtype"):
        ExtractConfig(dtype="int8")


def test_empty_stimulus_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="no images in"):
        extract(rcfg(tmp_path / "empty", tmp_path / "x.zarr", layers=["layer1"]))


def test_corrupt_image_named_then_skipped(tmp_path):
    root = tmp_path / "stim"
    rel = make_images(root, 6)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UserError, match=r"cannot read image .*cat/broken.png.*--skip_bad_images"):
        extract(rcfg(root, tmp_path / "x.zarr", layers=["layer1"], batch_size=4))

    result = extract(
        rcfg(root, tmp_path / "y.zarr", layers=["avgpool"], batch_size=4, skip_bad_images=True)
    )
    assert result["skipped"] == 1 and result["complete"]
    assert activations.store_info(tmp_path / "y.zarr")["skipped_stimuli"] == ["cat/broken.png"]
    da = activations.open_activations(tmp_path / "y.zarr", "avgpool")
    assert list(da["stimulus"].values) == rel and not np.isnan(da.values).any()
    raw = activations.open_activations(tmp_path / "y.zarr", "avgpool", drop_skipped=False)
    assert np.isnan(activations.select_stimuli(raw, ["cat/broken.png"]).values).all()


def test_uint8_batches_normalized_on_the_device_give_the_same_store(tmp_path, monkeypatch):
    """What a GPU run does (workers hand uint8, the device scales and normalizes), forced on the
    CPU: the activations equal the default path's bit for bit, a skipped image included."""
    from bonnerlab.extract import run as extraction

    root = tmp_path / "stim"
    make_images(root, 6)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    common = dict(
        layers=["layer2", "avgpool"],
        batch_size=4,
        skip_bad_images=True,
        preprocess="center_crop",
        image_size=24,
        num_workers=1,
    )
    extract(rcfg(root, tmp_path / "cpu.zarr", **common))
    split = []
    real_split = extraction.PreprocessSpec.split_at_float
    monkeypatch.setattr(extraction, "finish_on_device", lambda device: True)
    monkeypatch.setattr(
        extraction.PreprocessSpec,
        "split_at_float",
        lambda self: split.append(1) or real_split(self),
    )
    extract(rcfg(root, tmp_path / "device.zarr", **common))
    assert split  # the split path ran
    for layer in common["layers"]:
        a = activations.open_activations(tmp_path / "cpu.zarr", layer, drop_skipped=False).values
        b = activations.open_activations(tmp_path / "device.zarr", layer, drop_skipped=False).values
        assert np.isnan(a).any() and np.array_equal(a, b, equal_nan=True)


def test_in_memory_uint8_batches_normalized_on_the_device_give_the_same_store(
    tmp_path, monkeypatch
):
    """The same for an in-memory dataset (digits at 64 px, centre-cropped): cropped here as uint8,
    scaled and normalized where the model runs."""
    from bonnerlab.extract import run as extraction

    common = dict(
        model=ModelConfig(arch="resnet18"),
        stimuli="digits",
        split="all",
        limit=40,
        image_size=64,
        preprocess="center_crop",
        in_channels=3,
        layers=["layer2", "avgpool"],
        batch_size=16,
        device="cpu",
        progress=False,
    )
    extract(ExtractConfig(**common, output=str(tmp_path / "cpu.zarr")))
    monkeypatch.setattr(extraction, "finish_on_device", lambda device: True)
    extract(ExtractConfig(**common, output=str(tmp_path / "device.zarr")))
    for layer in common["layers"]:
        a = activations.open_activations(tmp_path / "cpu.zarr", layer).values
        b = activations.open_activations(tmp_path / "device.zarr", layer).values
        assert np.abs(a).max() > 0 and np.array_equal(a, b)


def test_existing_store_with_other_config_or_weights_is_refused(stimuli, tmp_path):
    out = tmp_path / "x.zarr"
    extract(rcfg(stimuli, out, layers=["layer1"]))
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(UserError, match=r"different config \(.*--overwrite"):
        extract(rcfg(stimuli, out, layers=["layer1"], pooling=["avg"]))
    with pytest.raises(UserError, match=r"different config \(weights_sha256"):
        extract(rcfg(stimuli, out, layers=["layer1"], seed=1))  # other random weights
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot

    result = extract(rcfg(stimuli, out, layers=["layer1"], seed=1, overwrite=True))
    assert result["outcome"] == "replaced" and result["complete"]


def test_job_cli_one_line_error_exit_2(tmp_path):
    bad = subprocess.run(
        [sys.executable, JOB, "--layers", "features.7", "--output", str(tmp_path / "x.zarr")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown layer 'features.7'; closest: features")
    assert bad.stderr.count("\n") == 1
    assert not (tmp_path / "x.zarr").exists()


def test_job_list_layers_and_final_line(stimuli, tmp_path, capsys):
    job = job_module("extract")
    job.main(["--list_layers"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "[1, 32, 14, 14]" in lines["features.1.0"]  # default width 16: 2 x 16 channels
    assert "[1, 10]" in lines["fc"]

    out = tmp_path / "o.zarr"
    job.main(["--model.arch", "resnet18", "--stimuli", str(stimuli), "--image_size", "32",
              "--layers", "layer4", "--device", "cpu", "--output", str(out), "--num_workers", "1",
              "--progress", "false"])  # fmt: skip
    *_, summary, final = capsys.readouterr().out.strip().splitlines()
    assert json.loads(summary)["images"] == 12
    assert (
        final.startswith("extracted 12 images in")
        and "images/s" in final
        and final.endswith("o.zarr")
    )


def test_help_shows_field_comments(capsys):
    from bonnerlab.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(ExtractConfig, ["--help"])
    text = capsys.readouterr().out
    assert (
        "avg, max (over space, or over" in text
        and "--reduce" in text
        and "--shard_index" in text
        and "--model.arch" in text
    )


@pytest.mark.slow
def test_two_shard_processes_at_once_equal_one_job(tmp_path):
    """Real concurrency: two shard processes start together and race to create the store."""
    args = [*_digits_args(tmp_path / "two.zarr"), "--num_shards", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, JOB, *args, "--shard_index", str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    from bonnerlab.config import parse_config

    activations.finalize(tmp_path / "two.zarr")  # idempotent, whichever shard finished last
    extract(parse_config(ExtractConfig, _digits_args(tmp_path / "one.zarr")))
    for layer in ("features.1", "fc"):
        assert (
            activations.open_activations(tmp_path / "one.zarr", layer).values.tobytes()
            == activations.open_activations(tmp_path / "two.zarr", layer).values.tobytes()
        )


def _peak_rss_mb(stimuli: Path, out: Path, n: int) -> float:
    code = (
        "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
        "import extract; extract.main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    args = [
        "--model.arch", "resnet18", "--stimuli", str(stimuli), "--image_size", "64",
        "--limit", str(n), "--layers", "layer1", "layer2", "avgpool", "--batch_size", "32",
        "--device", "cpu", "--num_workers", "2", "--output", str(out), "--progress", "false",
    ]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, JOB, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split("PEAK")[-1]) / 1024


@pytest.mark.slow
def test_peak_rss_flat_in_number_of_stimuli(tmp_path):
    """2,000 stimuli cost no more memory than 200 (writes are per batch; queue is bounded)."""
    root = tmp_path / "stim"
    make_images(root, 2000)
    small = _peak_rss_mb(root, tmp_path / "small.zarr", 200)
    large = _peak_rss_mb(root, tmp_path / "large.zarr", 2000)
    stored = activations.open_activations(tmp_path / "large.zarr", "layer1")
    assert stored.shape == (2000, 64, 16, 16)
    # layer1 alone is 2000 x 64 x 16 x 16 x 4 B = 131 MB: accumulating would blow the margin.
    assert large <= small * 1.05 + 25, (small, large)


def test_checkpoint_from_train_run_equals_direct_forward(tmp_path, monkeypatch):
    """A `train` run folder as the model ("newest" = the newest run under runs/), digits val
    split."""
    from bonnerlab.checkpoint import find_checkpoint
    from bonnerlab.config import TrainConfig
    from bonnerlab.data.augment import BatchAugment
    from bonnerlab.data.datasets import load_splits
    from bonnerlab.models.sources import load_trained
    from bonnerlab.train.loop import train

    monkeypatch.chdir(tmp_path)
    train(TrainConfig(epochs=1, max_steps_per_epoch=2, run_dir="runs/r1", progress=False))
    cfg = ExtractConfig(checkpoint="newest", stimuli="digits", split="val", limit=40,
                        layers=["features.1", "fc"], batch_size=16, device="cpu",
                        output="acts.zarr", progress=False)  # fmt: skip
    result = extract(cfg)
    assert result["complete"] and result["images"] == 40

    model, train_cfg, payload = load_trained(find_checkpoint("runs/r1"), torch.device("cpu"))
    val = load_splits(train_cfg.data).val
    pre = payload["preprocess"]
    with torch.inference_mode():
        logits = model(
            BatchAugment(tuple(pre["mean"]), tuple(pre["std"])).normalize(val.images[:40])
        )
    fc = activations.open_activations("acts.zarr", "fc")
    np.testing.assert_allclose(fc.values, logits.numpy(), rtol=1e-5, atol=1e-5)
    assert fc["label"].values.tolist() == val.labels[:40].tolist()
    assert list(fc["stimulus"].values) == val.ids[:40]
    assert (
        fc.attrs["weights"].endswith("runs/r1/checkpoints/best.pt")
        and fc.attrs["weights_file_sha256"]
    )
