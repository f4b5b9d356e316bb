"""Extract layer activations into a zarr store (read it back with bonnerlab.activations).

    python jobs/extract.py --checkpoint runs/<run> \
        --layers features.1 features.2                                            # CPU, digits
    python jobs/extract.py --checkpoint runs/<run> --list_layers                  # pick names
    python jobs/extract.py --model.arch resnet18 --model.weights DEFAULT --stimuli /data/stimuli \
        --layers layer2 layer3 avgpool --pooling layer2=avg --channels layer3=0-63 \
        --output acts/resnet18.zarr                                               # pretrained
    python jobs/extract.py --model.arch timm:vit_base_patch16_224 --model.weights DEFAULT \
        --stimuli sheet.csv --layers 'blocks.*' --pooling cls --reduce srp:4096   # timm ViT
    python jobs/extract.py --model.arch open_clip:ViT-B-32 --model.weights laion2b_s34b_b79k \
        --layers 'transformer.resblocks.*' output                                 # CLIP image tower
    python jobs/extract.py --model.arch hf:facebook/dinov2-small --model.weights DEFAULT \
        --layers 'encoder.layer.*:0' output:pooler_output                         # transformers
    python jobs/extract.py ... --plan                                             # sizes, then exit
    python jobs/extract.py ... --device cuda --amp                                # one GPU
    python jobs/extract.py ... --shard_index 3 --num_shards 8                     # one array task
    python jobs/launch.py ... extract --shards 8 ...                              # SLURM array
    python -m bonnerlab.activations finalize acts/resnet18.zarr                   # by hand

A killed job, started again with the same flags, only redoes the batches it had not finished.
"""

from __future__ import annotations

import json

from _cli import run_job

from bonnerlab.config import ExtractConfig


def main(argv: list[str]) -> dict:
    from bonnerlab.config import parse_config

    cfg = parse_config(ExtractConfig, argv, prog="jobs/extract.py")
    from bonnerlab.extract import run as extraction

    if cfg.list_layers:
        rows = extraction.list_layers(cfg)
        width = max(len(name) for name, *_ in rows)
        for name, kind, shape, calls in rows:
            note = f"  (runs {calls}x per forward; the last call is captured)" if calls > 1 else ""
            print(f"{name:<{width}}  {kind:<24} {shape}{note}")
        return {"layers": [r[0] for r in rows]}

    if cfg.plan:
        result = extraction.extract(cfg)
        print(result["plan"])
        print(f"store: {result['store']}")
        return result

    result = extraction.extract(cfg)
    print(json.dumps(result))
    state = (
        "complete"
        if result["complete"]
        else f"{result['chunks_missing']} chunks left to other shards"
    )
    print(
        f"extracted {result['images']} images in {result['seconds']:.1f} s "
        f"({result['images_per_s']:.1f} images/s); {state}; store: {result['store']}"
    )
    return result


if __name__ == "__main__":
    run_job(main)
