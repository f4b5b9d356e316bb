"""Analyse layers of an activation store: RDMs, RSA, CKA, PCA spectra, ridge encoding models.

    python jobs/extract.py && python jobs/analyze.py                  # CPU: every digits layer
    python jobs/analyze.py --store activations/x.zarr --layers layer3 avgpool --rdm correlation \
        --spectrum --encode responses.nc --output analysis/x                 # targets by id
    python jobs/analyze.py --store acts/a.zarr --layers 'blocks.*' --rsa acts/b.zarr \
        --rsa_layer blocks.5 --bootstrap 1000 --cka acts/b.zarr --cka_layer blocks.5
    python jobs/analyze.py ... --device cuda --memory_gb 4                   # one GPU
    python jobs/launch.py analyze --store acts/x.zarr --layers layer3 avgpool   # SLURM: a task
    python jobs/launch.py --after runs/extract-<date> analyze --store acts/x.zarr --layers fc

Writes analysis/<store name>/ (results.nc, summary.json, PNGs, report.html). Each layer's Gram
is cached beside the store (<store>.gram/), so a rerun reads no features.
"""

from __future__ import annotations

from _cli import print_result, run_job

from bonnerlab.config import AnalyzeConfig


def main(argv: list[str]) -> dict:
    from bonnerlab.config import parse_config

    cfg = parse_config(AnalyzeConfig, argv, prog="jobs/analyze.py")
    from bonnerlab.analysis.run import analyze

    result = analyze(cfg)
    print_result(result)
    layers = ", ".join(r["layer"] for r in result["layers"])
    print(f"analysed {layers} in {result['seconds']:.1f} s; report: {result['output']}/report.html")
    return result


if __name__ == "__main__":
    run_job(main)
