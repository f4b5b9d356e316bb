"""jobs/analyze.py on a tiny real store (mnist_cnn on digits): the analysis folder's files hold
what the API computes, checked once independently with numpy; reruns reuse the Gram cache; bad
input is one line before anything is computed; the launcher's per-layer array and --after."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import yaml
from helpers import extract_cfg, job, job_module, repo_env, tiny_store

from bonnerlab.errors import UserError

LAYERS = ["features.1", "fc"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny extraction: an untrained mnist_cnn on 40 digits, two layers (seconds)."""
    from bonnerlab.config import ModelConfig
    from bonnerlab.extract.run import extract

    out = tmp_path_factory.mktemp("acts") / "cnn-digits.zarr"
    extract(
        extract_cfg(
            out,
            model=ModelConfig(arch="mnist_cnn", width=4),
            stimuli="digits",
            limit=40,
            batch_size=16,
            layers=LAYERS,
        )
    )
    return out


@pytest.fixture(scope="module")
def analysed(store, tmp_path_factory):
    """One run of the job: RDMs, spectra, RSA and CKA of each layer against itself."""
    out = tmp_path_factory.mktemp("analysis") / "a"
    argv = ["--store", str(store), "--output", str(out), "--device", "cpu", "--progress", "false"]
    argv += ["--rsa", str(store), "--cka", str(store), "--bootstrap", "20"]
    result = job_module("analyze").main(argv)
    return out, result, argv


def test_the_folder_holds_every_file_and_the_api_values(store, analysed):
    from bonnerlab.analysis import rdm, spectrum

    out, result, _ = analysed
    for name in ("results.nc", "summary.json", "report.html", "spectra.png", "similarity.png"):
        assert (out / name).is_file(), name
    for layer in LAYERS:
        png = (out / f"rdm-{layer}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    summary = json.loads((out / "summary.json").read_text())
    assert (
        [r["layer"] for r in summary["layers"]] == LAYERS == [r["layer"] for r in result["layers"]]
    )
    with xr.open_dataset(out / "results.nc") as ds:
        assert list(ds["layer"].values) == LAYERS
        for layer, record in zip(LAYERS, summary["layers"], strict=True):
            expected = rdm(store, layer, metric="correlation", device="cpu")
            got = ds["rdm"].sel(layer=layer)
            np.testing.assert_allclose(got.values, expected.values, rtol=1e-12, atol=1e-12)
            assert list(got["stimulus"].values) == list(expected["stimulus"].values)
            spec = spectrum(store, layer, device="cpu")
            eig = ds["eigenvalues"].sel(layer=layer).values
            np.testing.assert_allclose(eig[: spec.sizes["component"]], spec["eigenvalues"].values)
            assert record["effective_dim"] == pytest.approx(float(spec["effective_dim"]))
            # a layer against itself: identical RDMs, identical Grams
            assert float(ds["rsa"].sel(layer=layer)) == pytest.approx(1.0)
            assert float(ds["cka"].sel(layer=layer)) == pytest.approx(1.0)
            assert record["rsa_ci_low"] <= 1.0 + 1e-9
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(LAYERS) + 2  # RDMs, spectra, similarity
    assert all(f">{layer}<" in page for layer in LAYERS) and "<script>" in page


def test_one_rdm_recomputed_with_numpy_from_the_activations(store, analysed):
    from bonnerlab.activations import flatten, open_activations

    out, _, _ = analysed
    x = np.asarray(flatten(open_activations(store, LAYERS[1])).values, dtype=np.float64)
    expected = 1 - np.corrcoef(x)
    np.fill_diagonal(expected, 0.0)
    with xr.open_dataset(out / "results.nc") as ds:
        # the Gram is streamed as float32 products (into float64 sums): digits go where the
        # features' common offset cancels (1 - r of ~0.01 here), so not float64's 1e-12
        np.testing.assert_allclose(
            ds["rdm"].sel(layer=LAYERS[1]).values, expected, rtol=1e-4, atol=1e-6
        )


def test_a_rerun_reuses_the_gram_cache_and_keeps_the_values(analysed):
    out, _, argv = analysed
    before = xr.load_dataset(out / "results.nc")
    again = job_module("analyze").main(argv)
    assert [r["gram_cache"] for r in again["layers"]] == ["reused", "reused"]
    xr.testing.assert_allclose(xr.load_dataset(out / "results.nc")["rdm"], before["rdm"])


def test_each_layer_task_adds_its_part_and_the_folder_covers_all(tmp_path):
    """What the tasks of a per-layer array do: one layer each, into one folder."""
    store = tiny_store(tmp_path / "t.zarr")
    out = tmp_path / "analysis"
    base = ["--store", str(store), "--output", str(out), "--device", "cpu", "--progress", "false"]
    for layer in ("fc", "conv"):
        job_module("analyze").main([*base, "--layers", layer, "--rdm", "euclidean"])
    summary = json.loads((out / "summary.json").read_text())
    assert [r["layer"] for r in summary["layers"]] == ["conv", "fc"]  # the store's order
    # another metric makes the old parts stale: they are dropped, not mixed in
    job_module("analyze").main([*base, "--layers", "fc"])
    summary = json.loads((out / "summary.json").read_text())
    assert [r["layer"] for r in summary["layers"]] == ["fc"]
    assert not (out / "rdm-conv.png").exists() or (out / "rdm-fc.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "nope"], "layer 'nope' is not in"),
        (["--layers", "conv.*"], "pattern 'conv.*' is not in"),
        (["--cv", "1"], "cv must be >= 2"),
        (["--alphas", "1", "0"], "alphas must be > 0"),
        (["--rsa_layer", "fc"], "rsa_layer goes with rsa"),
        (["--cka", "STORE", "--cka_layer", "nope"], "has no layer 'nope'"),
        (["--rsa", "missing.nc"], "neither an activation store nor an RDM file"),
    ],
)
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, args, message):
    store = tiny_store(tmp_path / "t.zarr")
    out = tmp_path / "analysis"
    args = [str(store) if a == "STORE" else a for a in args]
    with pytest.raises(UserError, match=message.replace("*", r"\*").replace("(", r"\(")):
        job_module("analyze").main(["--store", str(store), "--output", str(out), *args])
    assert not out.exists()


def test_a_missing_or_unfinished_store_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run(
        [*job("analyze"), "--store", str(tmp_path / "none.zarr")],
        capture_output=True,
        text=True,
        env=repo_env(),
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: activation store {tmp_path / 'none.zarr'} not found"
    ]


# ----------------------------------------------------------------------------- the launcher


def launch(*args, cwd=None):
    return subprocess.run(
        [*job("launch"), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_launch_sends_one_array_task_per_layer_into_one_folder(tmp_path):
    store = tiny_store(tmp_path / "t.zarr")
    sweep = tmp_path / "runs" / "an"
    out = launch(
        "--dry-run", "--sweep_dir", str(sweep), "analyze", "--store", str(store), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    script = (sweep / "submit.sh").read_text()
    assert "#SBATCH --array=0-1%" in script and "--dependency" not in script
    tasks = [yaml.safe_load((sweep / f"task-{i:03d}" / "config.yaml").read_text()) for i in (0, 1)]
    assert [t["layers"] for t in tasks] == [["conv"], ["fc"]]  # every layer of the store
    assert {t["output"] for t in tasks} == {str(tmp_path / "analysis" / "t")}
    assert {t["store"] for t in tasks} == {str(store)} and tasks[0]["progress"] is False


def test_after_a_sweep_folder_waits_for_its_whole_arrays(tmp_path):
    earlier = tmp_path / "extract"
    earlier.mkdir()
    (earlier / "sweep.yaml").write_text("job: extract\n")
    lines = [{"task": 0, "job_id": "4242_0"}, {"task": 1, "job_id": "4242_1"}]
    lines.append({"task": 1, "job_id": "4250_0"})  # task 1 retried in a second array
    (earlier / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    sweep = tmp_path / "an"
    out = launch(
        "--dry-run", "--after", str(earlier), "--sweep_dir", str(sweep), "analyze",
        "--store", str(tmp_path / "later.zarr"), "--layers", "features.1", "fc",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    script = (sweep / "submit.sh").read_text()
    assert "#SBATCH --dependency=afterok:4242:4250" in script
    assert "#SBATCH --array=0-1%" in script
    record = yaml.safe_load((sweep / "task-000" / "slurm.yaml").read_text())
    assert record["submitted"]["after"] == ["4242", "4250"]
    assert "dependency" not in record["additional_parameters"]  # not asked for again on reuse


def test_after_a_job_id_for_any_job(tmp_path):
    run = tmp_path / "run"
    out = launch("--dry-run", "--after", "1234", "train", "--run_dir", str(run))
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --dependency=afterok:1234" in (run / "submit.sh").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--after", "RUN", "analyze", "--store", "STORE"], "holds no submitted job id"),
        (["--after", "nowhere", "analyze", "--store", "STORE"], "neither a job id"),
        (["analyze", "--store", "missing.zarr"], "store missing.zarr does not exist"),
        (["analyze", "--store", "STORE", "--layers", "nope"], "layer 'nope' is not in"),
        (["--after", "7", "analyze", "--store", "missing.zarr"], "name its layers exactly"),
        (["--after", "7", "--cluster", "local", "train"], "--after needs --cluster slurm"),
    ],
)
def test_bad_launch_input_is_one_line_and_nothing_queued(tmp_path, args, message):
    store = tiny_store(tmp_path / "t.zarr")
    run = tmp_path / "run"  # submitted with --dry-run: a run folder without a job id
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "slurm.yaml").write_text("cluster: slurm\nsubmitted:\n  job: extract\n")
    args = [{"RUN": str(run), "STORE": str(store)}.get(a, a) for a in args]
    dry = [] if "local" in args else ["--dry-run"]
    out = launch(*dry, "--sweep_dir", str(tmp_path / "s"), *args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- encoding


def test_encoding_scores_per_layer_equal_the_api_and_the_planted_layer_wins(tmp_path):
    """Targets planted in `fc` (Y = X_fc W + noise): the job's scores are encode()'s own, and
    fc predicts them better than conv."""
    from bonnerlab.activations import flatten, open_activations
    from bonnerlab.analysis import encode

    store = tiny_store(tmp_path / "t.zarr", n=60)
    x = flatten(open_activations(store, "fc"))
    rng = np.random.default_rng(1)
    y = x.values @ rng.standard_normal((5, 8)) + 0.3 * rng.standard_normal((60, 8))
    targets = tmp_path / "responses.nc"
    xr.DataArray(
        y,
        dims=("presentation", "neuroid"),
        coords={"stimulus": ("presentation", x["stimulus"].values.astype(str))},
    ).to_netcdf(targets)
    out = tmp_path / "analysis"
    result = job_module("analyze").main(
        ["--store", str(store), "--output", str(out), "--encode", str(targets), "--cv", "3"]
        + ["--rdm", "none", "--spectrum", "false", "--device", "cpu"]
        + ["--progress", "false"]
    )
    assert (out / "encoding.png").is_file()
    expected = encode(store, "fc", targets=str(targets), cv=3, device="cpu")
    with xr.open_dataset(out / "results.nc") as ds:
        np.testing.assert_allclose(ds["encode_r"].sel(layer="fc").values, expected["r"].values)
        scores = {la: float(np.nanmean(ds["encode_r"].sel(layer=la))) for la in ("conv", "fc")}
    assert scores["fc"] > 0.8 > scores["conv"]
    assert result["layers"][1]["encode_r_mean"] == pytest.approx(scores["fc"])


def test_targets_with_ids_the_store_lacks_are_one_line_before_streaming(tmp_path):
    store = tiny_store(tmp_path / "t.zarr")
    targets = tmp_path / "responses.nc"
    xr.DataArray(
        np.ones((2, 1)),
        dims=("presentation", "neuroid"),
        coords={"stimulus": ("presentation", ["s00.png", "ghost.png"])},
    ).to_netcdf(targets)
    with pytest.raises(UserError, match="ghost.png"):
        job_module("analyze").main(
            ["--store", str(store), "--encode", str(targets), "--output", str(tmp_path / "a")]
        )
    assert not (tmp_path / "t.zarr.gram").exists()  # nothing streamed


# ----------------------------------------------------------------------------- no torch on a CPU

NO_TORCH = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python jobs/analyze.py` would
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("TORCH LOADED" if "torch" in sys.modules else "NO TORCH", flush=True)
"""


def test_the_job_on_the_cpu_never_imports_torch(tmp_path):
    """Every analysis and the common result line (print_result's rank read without torch):
    torch would add seconds and 0.45 GB to a job that never uses it."""
    from helpers import JOBS

    store = tiny_store(tmp_path / "t.zarr", n=24)
    targets = tmp_path / "responses.csv"
    ids = [f"s{i:02d}.png" for i in range(24)]
    targets.write_text("stimulus_id,v1\n" + "".join(f"{s},{i % 5}\n" for i, s in enumerate(ids)))
    out = tmp_path / "analysis"
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(JOBS / "analyze.py"), "--store", str(store)]
        + ["--output", str(out), "--device", "cpu", "--progress", "false", "--cv", "3"]
        + ["--encode", str(targets), "--rsa", str(store), "--cka", str(store)],
        capture_output=True,
        text=True,
        env=repo_env(),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "NO TORCH", run.stdout[-2000:]
    result = json.loads(lines[0])  # print_result's one JSON line
    assert [r["layer"] for r in result["layers"]] == ["conv", "fc"]
    assert (out / "results.nc").is_file()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"},  # torchrun
        {"SLURM_NTASKS": "4", "SLURM_PROCID": "2"},  # the batch script: one process
        {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "MASTER_ADDR": "h"},  # srun step
        {"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "MASTER_ADDR": "h"},  # submitit's export
        {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},
        {
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_PROCID": "1",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": "7",
        },
    ],
)
def test_the_torch_free_rank_is_the_rank_distributed_resolves(monkeypatch, env):
    from bonnerlab import distributed

    cli = job_module("_cli")
    monkeypatch.setattr(os, "environ", dict(env))  # resolve_env exports a rendezvous: a copy
    assert cli.env_rank() == distributed.resolve_env()[0]
