"""Extraction's hand-off: CPU capture buffers are each batch's own and freed once written;
`--decode gpu` is refused (one line) where batches could not be decoded on the device."""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import extract_cfg

from bonnerlab.errors import ConfigError
from bonnerlab.extract.capture import Capture, LayerPlan
from bonnerlab.extract.run import device_split
from bonnerlab.extract.stimuli import Stimuli
from bonnerlab.extract.writer import ChunkWriter
from bonnerlab.models.preprocess import FLOAT_OPS, resolve_preprocess

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


def test_cpu_captures_of_one_batch_survive_the_next():
    # each batch's captures are its own buffers: the writer may still be writing batch N while
    # batch N+1 is captured, and it must see batch N's values (the module's own output)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=True))
    plans = {"0": LayerPlan("0", None, "none")}
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    with torch.inference_mode():
        expect1, expect2 = model[0](x1), model[0](x2)
        with Capture({"0": model[0]}, plans, torch.float32) as cap:
            first = cap.run(model, x1)["0"]
            second = cap.run(model, x2)["0"]
    assert torch.equal(first, expect1) and torch.equal(second, expect2)
    assert (expect1 < 0).any()  # the in-place ReLU that followed did not reach the capture


class _Store:
    """What the writer needs of a store: records the chunks it is given."""

    def __init__(self) -> None:
        self.written: dict[int, dict[str, np.ndarray]] = {}

    def write_chunk(self, chunk, data, skipped, content, keep) -> None:
        self.written[chunk] = {k: v.copy() for k, v in data.items()}


def test_writer_drops_a_batch_once_written():
    # the writer holds a batch's only reference: once its slot is free again, the buffers are
    # gone, before the next batch is even put (they do not ride through its forward pass)
    store = _Store()
    writer = ChunkWriter(store, slots=1)
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4).numpy()  # as run_batches puts
    alive = weakref.ref(values)  # the array, which holds the tensor's memory
    writer.acquire()
    writer.put(0, {"a": values}, [], bad=[1])
    del values
    writer.acquire()  # the slot is free again: chunk 0 is written
    assert alive() is None
    writer.free.release()
    writer.close()
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    want[1] = np.nan
    np.testing.assert_array_equal(store.written[0]["a"], want)
    assert not any(t.name == "activation-writer" and t.is_alive() for t in threading.enumerate())


def _spec():
    published = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    return resolve_preprocess(published, 3, "center_crop", 32)


def _unsplittable(spec):
    """The same steps with the float ones first: they cannot run after the workers' uint8 part."""
    floats = [s for s in spec.steps if s["op"] in FLOAT_OPS]
    rest = [s for s in spec.steps if s["op"] not in FLOAT_OPS]
    return replace(spec, steps=tuple(floats + rest))


def _files(tmp_path: Path) -> Stimuli:
    return Stimuli(["a.jpg"], [-1], str(tmp_path), [], files=[tmp_path / "a.jpg"])


def test_decode_gpu_is_refused_when_the_transform_cannot_be_split(tmp_path):
    spec = _unsplittable(_spec())
    assert spec.split_at_float() is None
    cfg = extract_cfg(tmp_path / "x.zarr", decode="gpu")
    with pytest.raises(ConfigError, match="--decode gpu needs a preprocessing whose float steps"):
        device_split(cfg, spec, _files(tmp_path), CUDA)
    # without --decode gpu the same transform runs whole in the workers, as before
    for decode in ("auto", "cpu"):
        assert device_split(replace(cfg, decode=decode), spec, _files(tmp_path), CUDA) is None


def test_decode_gpu_is_refused_for_images_in_memory(tmp_path):
    stimuli = Stimuli(["digits/0"], [0], "digits", [], images=torch.zeros(1, 3, 32, 32))
    cfg = extract_cfg(tmp_path / "x.zarr", decode="gpu")
    with pytest.raises(ConfigError, match="images in memory"):
        device_split(cfg, _spec(), stimuli, CUDA)


def test_decode_gpu_gets_the_spec_split_on_cuda_and_nothing_on_cpu(tmp_path):
    spec = _spec()
    cfg = extract_cfg(tmp_path / "x.zarr", decode="gpu")
    assert device_split(cfg, spec, _files(tmp_path), CUDA) == spec.split_at_float()
    auto = replace(cfg, decode="auto")
    assert device_split(auto, spec, _files(tmp_path), torch.device("cpu")) is None
