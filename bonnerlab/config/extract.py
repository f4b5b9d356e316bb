"""The extraction job's config and the WHOLE layer-name grammar it is written in.

A layer is named by its module (`layer2`, `blocks.3.attn`), optionally followed by `:INDEX` or
`:KEY` to pick one element of a tuple, list, dict or transformers `ModelOutput` output
(`blocks.3.attn:0`, `encoder.layer.5:0`, `output:last_hidden_state`, where `output` is the
model's own output). Patterns expand in model order: `*` matches within one dotted part
(`blocks.*` -> blocks.0, blocks.1, ...; not blocks.0.attn), `**` across parts. Per-layer options
(`channels`, `pooling`, `reduce`) are `VALUE` for every layer or `LAYER=VALUE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bonnerlab.config.core import check, check_checkpoint, check_choice
from bonnerlab.config.train import ModelConfig
from bonnerlab.errors import ConfigError

POOLINGS = ("none", "avg", "max", "flatten", "cls", "mean")
PREPROCESS_MODES = ("model", "squash", "center_crop")
DTYPES = ("auto", "float32", "float16")
DATASET_STIMULI = ("digits", "mnist")
OUTPUT = "output"  # the model's own output, unless the model has a top-level module of that name


@dataclass
class ExtractConfig:
    """Extract layer activations of a model over a set of stimuli into a zarr store."""

    # keys of configs saved before a rename (a store's config attribute, a YAML file) -> today's
    renamed_keys: ClassVar[dict[str, str]] = {"image_channels": "in_channels"}

    # run folder or checkpoint file from `train`, or newest (the newest run under runs/);
    # empty = build model.arch with model.weights
    checkpoint: str = ""
    # which checkpoint of a run folder: best or latest
    which: str = "best"
    # the model when no checkpoint is given: arch is NAME (torchvision, mnist_cnn), timm:NAME,
    # open_clip:NAME (the image tower) or hf:REPO_ID_OR_FOLDER; weights is auto (the checkpoint
    # arch names: an hf: repo or folder, timm:NAME.TAG, open_clip:NAME:TAG or NAME:FILE, a
    # hf-hub:/local-dir: name; else seeded random), none (seeded random), a published name
    # (torchvision weights name, timm/open_clip pretrained tag, DEFAULT), or a local
    # .pth/.pt/.safetensors file (a save_pretrained folder for hf:); the store records which
    model: ModelConfig = field(default_factory=ModelConfig)
    # outputs of the model when no checkpoint is given; 0 = 1000 (torchvision) or 10 (mnist_cnn)
    num_classes: int = 0
    # seed of the random initialization when the weights are random (none, or auto for a bare
    # architecture name), so a resumed job matches
    seed: int = 0
    # stimuli: an image folder (searched recursively), a sheet (.csv/.tsv with a `path` column,
    # relative to the sheet, an optional `stimulus_id`, other columns become coordinates), or a
    # dataset: digits, mnist
    stimuli: str = "digits"
    # dataset split: digits: all, train, val; mnist: test (10k test files), train, val
    split: str = "val"
    # MNIST folder (torchvision layout); empty = the checkpoint's data.root, else "data"
    data_root: str = ""
    # use only the first N stimuli (0 = all); for quick looks and smoke tests
    limit: int = 0
    # preprocessing: model (the transform the weights were published with: resize, crop,
    # normalize), squash (resize to image_size x image_size, no crop), center_crop (shorter side
    # to image_size, then the central square)
    preprocess: str = "model"
    # side of the model's input; 0 = the preprocessing's own (a checkpoint's, 28 for mnist_cnn)
    image_size: int = 0
    # normalization mean and std per channel; empty = the preprocessing's own
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # input colour channels (1 or 3); 0 = the checkpoint's, 1 (mnist_cnn) or 3 (other models)
    in_channels: int = 0
    # layers by module name, NAME:INDEX or NAME:KEY for an element of a tuple/dict output
    # (blocks.3.attn:0, vision_model:last_hidden_state), `output` for the model's own output, and
    # patterns where * stays within one dotted part (blocks.*); see --list_layers
    layers: list[str] = field(default_factory=lambda: ["features.2"])
    # channels to keep: "LAYER=SPEC" per layer or "SPEC" for all; SPEC like 0-7,12 (empty = all);
    # for token outputs (batch, token, dim) the channels are the last dim
    channels: list[str] = field(default_factory=list)
    # pooling: "LAYER=MODE" per layer or "MODE" for all; none, avg, max (over space, or over
    # tokens), flatten, cls (the first token), mean (over tokens)
    pooling: list[str] = field(default_factory=lambda: ["none"])
    # random projection per layer: "LAYER=srp:K" or "srp:K" for all: a seeded sparse random
    # projection of the layer's features to K dims, applied on the device before writing
    reduce: list[str] = field(default_factory=list)
    # stimuli per forward pass; also the store's chunk length (keep it when resuming)
    batch_size: int = 64
    # dtype of the stored activations: float32, float16, or auto = float16 when AMP computes in
    # float16 (nothing to lose), else float32 (bfloat16 values can exceed float16's range, 65504)
    dtype: str = "auto"
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # mixed precision on CUDA: bfloat16 autocast where the GPU has it natively (float32's range:
    # no overflow), else float16
    amp: bool = False
    # TF32 matmuls and convolutions on Ampere and newer GPUs: faster, but activations differ by
    # ~1e-3 relative from float32; recorded in the store's identity
    tf32: bool = False
    # DataLoader worker processes that decode and preprocess image files while the model computes;
    # -1 = from the CPUs this task was given (SLURM_CPUS_PER_TASK, else its CPU affinity)
    num_workers: int = -1
    # output store (a folder ending in .zarr); empty = activations/<model>-<stimuli>.zarr
    output: str = ""
    # chunk compression: zstd, lz4 or none
    compression: str = "zstd"
    # this task's share of the chunks: shard shard_index of num_shards (a job array)
    shard_index: int = 0
    num_shards: int = 1
    # replace an existing store that was made with a different config, weights or stimuli
    overwrite: bool = False
    # re-extract only the stimuli whose content changed since the store was written (the other
    # rows stay bit-identical); without it a changed stimulus is refused
    update: bool = False
    # refuse images with more pixels than this (a decompression bomb); PIL's own limit when 0
    max_image_pixels: int = 0
    # where JPEGs are decoded: cpu (PIL, bit-exact with the published preprocessing), gpu
    # (nvJPEG on the device; recorded in the store's identity), auto = cpu
    decode: str = "auto"
    # store NaN for unreadable images and record them (default: stop with an error)
    skip_bad_images: bool = False
    # print each layer name with its output shape for one input, then exit
    list_layers: bool = False
    # print each layer's bytes per stimulus and the store's total size, then exit
    plan: bool = False
    # show a progress bar over batches
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("which", self.which, ("best", "latest"))
        check_checkpoint(self.checkpoint)
        check(self.num_classes >= 0, f"num_classes must be >= 0; got {self.num_classes}")
        check(
            bool(self.stimuli),
            "stimuli must be an image folder, a .csv/.tsv sheet or one of digits, mnist",
        )
        check(self.limit >= 0, f"limit must be >= 0; got {self.limit}")
        check_choice("preprocess", self.preprocess, PREPROCESS_MODES)
        check(
            self.image_size == 0 or self.image_size >= 8,
            f"image_size must be 0 or >= 8; got {self.image_size}",
        )
        check(
            len(self.mean) == len(self.std),
            f"mean and std must have the same length; got {self.mean} and {self.std}",
        )
        check(all(s > 0 for s in self.std), f"std must be > 0; got {self.std}")
        check(
            self.in_channels in (0, 1, 3), f"in_channels must be 0, 1 or 3; got {self.in_channels}"
        )
        check(
            self.list_layers or bool(self.layers),
            "layers must name at least one layer (see --list_layers)",
        )
        check(len(set(self.layers)) == len(self.layers), f"layers has duplicates: {self.layers}")
        check(self.batch_size > 0, f"batch_size must be > 0; got {self.batch_size}")
        check_choice("dtype", self.dtype, DTYPES)
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )
        check(
            self.num_workers >= -1,
            f"num_workers must be >= 0 (or -1 = auto); got {self.num_workers}",
        )
        check_choice("compression", self.compression, ("zstd", "lz4", "none"))
        check(not (self.update and self.overwrite), "pass one of --update and --overwrite")
        check(
            self.max_image_pixels >= 0,
            f"max_image_pixels must be >= 0 (0 = PIL's limit); got {self.max_image_pixels}",
        )
        check_choice("decode", self.decode, ("auto", "cpu", "gpu"))
        check(self.num_shards >= 1, f"num_shards must be >= 1; got {self.num_shards}")
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index {self.shard_index} is out of range for num_shards {self.num_shards} "
            f"(0..{self.num_shards - 1})",
        )
        # Parse now so a bad spec fails before any model is built.
        layer_options(self, self.layers)


def parse_channels(spec: str) -> list[int] | None:
    """ "0-7,12" -> [0, 1, ..., 7, 12]; "" or "all" -> None (every channel)."""
    spec = spec.strip()
    if spec in ("", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(
                f"bad channel spec {spec!r}: use indices and ranges like 0-7,12"
            ) from None
    if any(c < 0 for c in out):
        raise ConfigError(f"bad channel spec {spec!r}: channels are >= 0")
    if len(set(out)) != len(out):
        raise ConfigError(f"channel spec {spec!r} lists a channel twice")
    return out


def parse_reduce(spec: str) -> int | None:
    """ "srp:4096" -> 4096 (output dims of a sparse random projection); "" or "none" -> None."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    method, _, k = spec.partition(":")
    if method != "srp" or not k.isdigit() or int(k) < 1:
        raise ConfigError(f"bad reduce spec {spec!r}: use srp:K with K >= 1, e.g. srp:4096")
    return int(k)


def _per_layer(
    entries: list[str], layers: list[str], configured: list[str], what: str, default: str
) -> dict[str, str]:
    """Entries "VALUE" (every layer) then "NAME=VALUE"; NAME is a configured layer (a pattern
    applies to each layer it expanded to) or one expanded name."""
    out = dict.fromkeys(layers, default)
    # Entries for all layers first, then the per-layer ones, whatever order they came in.
    for entry in [e for e in entries if "=" not in e] + [e for e in entries if "=" in e]:
        name, sep, value = entry.rpartition("=")
        if not sep:
            out = dict.fromkeys(layers, value)
            continue
        targets = [n for n in layers if n == name] or (
            [n for n in layers if layer_matches(name, n)] if name in configured else []
        )
        if not targets:
            if layers == configured and any(
                is_pattern(c) and layer_matches(c, name) for c in configured
            ):
                continue  # a layer a pattern will expand to; checked again after the expansion
            raise ConfigError(
                f"{what} entry {entry!r} names {name!r}, which is not in layers {configured}"
            )
        for n in targets:
            out[n] = value
    return out


def layer_matches(pattern: str, name: str) -> bool:
    """`blocks.*` matches blocks.0 but not blocks.0.attn (* stays within one dotted part; **
    crosses)."""
    import re

    module, sep, element = pattern.partition(":")
    regex = "".join(
        ".*"
        if part == "**"
        else "[^.]*"
        if part == "*"
        else "[^.]"
        if part == "?"
        else re.escape(part)
        for part in re.split(r"(\*\*|\*|\?)", module)
    )
    name_module, name_sep, name_element = name.partition(":")
    return re.fullmatch(regex, name_module) is not None and (sep, element) == (
        name_sep,
        name_element,
    )


def split_layer(name: str) -> tuple[str, int | str | None]:
    """ "blocks.3.attn:0" -> ("blocks.3.attn", 0); "vision_model:last_hidden_state" -> (.., key)."""
    module, sep, element = name.partition(":")
    if not sep:
        return module, None
    if not element:
        raise ConfigError(f"layer {name!r}: name an element after ':' (an index like 0 or a key)")
    return module, int(element) if element.lstrip("-").isdigit() else element


def is_pattern(layer: str) -> bool:
    return any(c in layer.partition(":")[0] for c in "*?")


@dataclass
class LayerOptions:
    channels: list[int] | None
    pooling: str
    reduce: int | None  # output dims of the random projection, or None


def layer_options(cfg: ExtractConfig, layers: list[str]) -> dict[str, LayerOptions]:
    """layer -> its options, for the configured layers or their expansion."""
    channels = _per_layer(cfg.channels, layers, cfg.layers, "channels", "")
    pooling = _per_layer(cfg.pooling, layers, cfg.layers, "pooling", "none")
    reduce = _per_layer(cfg.reduce, layers, cfg.layers, "reduce", "")
    for layer, mode in pooling.items():
        check_choice(f"pooling for {layer}", mode, POOLINGS)
    return {
        n: LayerOptions(parse_channels(channels[n]), pooling[n], parse_reduce(reduce[n]))
        for n in layers
    }


def default_store_name(cfg: ExtractConfig) -> str:
    """activations/<model>-<stimuli>.zarr, from the config alone: a plain extract and every shard
    of `launch.py --shards N extract` name the same store."""
    import re

    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        # runs/<run>/checkpoints/best.pt -> <run>; runs/<run> -> <run>
        model = (
            path.parent.parent.name
            if path.suffix == ".pt" and path.parent.name == "checkpoints"
            else path.name
        )
    else:
        source, sep, name = cfg.model.arch.partition(":")
        if sep and source == "hf" and name.startswith(("/", ".", "~")):
            name = Path(name.rstrip("/")).name  # a local folder: its name, not its whole path
        model = f"{source}-{name}" if sep else source
    if cfg.stimuli in DATASET_STIMULI:
        stimuli = cfg.stimuli
    else:
        path = Path(cfg.stimuli).resolve()
        stimuli = path.stem if path.suffix.lower() in (".csv", ".tsv") else path.name
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{model}-{stimuli}").strip("-")
    return str(Path("activations") / f"{safe}.zarr")
