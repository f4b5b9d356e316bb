"""Model sources: ONE table for torchvision, mnist_cnn, timm, open_clip and Hugging Face models,
used by training (a new head) and by extraction (the model as published).

`model.arch` is `NAME` (torchvision, or mnist_cnn), `timm:NAME`, `open_clip:NAME` (the image
tower) or `hf:REPO_ID_OR_FOLDER` (transformers, built with the Auto classes). `model.weights` is
`auto` (the default: the checkpoint the spec itself names, else seeded random init; see
`resolve_weights`), `none` (seeded random init), a published name (downloaded once into each
library's own cache: TORCH_HOME, HF_HOME), or a local file (`.pth`/`.pt`/`.safetensors` state
dict) or, for `hf:`, a `save_pretrained` folder. Each source also hands out the evaluation
transform its weights were published with (`LoadedModel.published_transform`), which
`bonnerlab.models.preprocess` turns into explicit, recorded steps.

The optional libraries are imported only when their prefix is used; a missing one is a one-line
error naming the `pip install 'bonnerlab[...]'` that brings it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonnerlab.config import DataConfig, ModelConfig, TrainConfig, from_dict, to_dict
from bonnerlab.errors import CheckpointError, ConfigError, UserError, WeightsError
from bonnerlab.models.cnn import MnistCNN, adapt_input_channels, classifier_head, set_module
from bonnerlab.models.weights import (
    WEIGHT_FILE_SUFFIXES,
    downloading,
    file_sha256,
    fits,
    folder_weights,
    is_weights_file,
    load_matching,
    read_state_dict,
    state_sha256,
)

PACKAGES = {
    "timm": ("timm", "timm"),
    "open_clip": ("open_clip", "clip"),
    "hf": ("transformers", "hf"),
}


def split_arch(arch: str) -> tuple[str, str]:
    """`timm:resnet50` -> ("timm", "resnet50"); `resnet18` -> ("torchvision", "resnet18")."""
    prefix, sep, name = arch.partition(":")
    if not sep:
        return ("mnist_cnn" if arch == "mnist_cnn" else "torchvision"), arch
    if prefix not in PACKAGES or not name:
        raise ConfigError(
            f"unknown model source {prefix!r} in model.arch {arch!r}; use NAME (torchvision or "
            "mnist_cnn), timm:NAME, open_clip:NAME or hf:REPO_ID_OR_FOLDER"
        )
    return prefix, name


def require(source: str) -> Any:
    """The optional library of `source`, or a one-line error naming the extra to install."""
    import importlib

    module, extra = PACKAGES[source]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"model.arch {source}:... needs the {module} package: pip install 'bonnerlab[{extra}]'"
        ) from None


def _closest(name: str, names: list[str], what: str) -> UserError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return WeightsError(f"unknown {what} {name!r}{hint}")


# ----------------------------------------------------------------------------- weights: auto

AUTO = "auto"
# timm's and open_clip's own spellings of a checkpoint that brings its config and weights: a Hub
# repo or a local folder (`timm:local-dir:/path/to/folder`, `open_clip:hf-hub:org/repo`)
SCHEMAS = ("hf-hub:", "local-dir:")


def _names_no_weights(name: str) -> str:
    return "none"


def _timm_named(name: str) -> str:
    """`NAME.TAG` (timm's own spelling of a published checkpoint) names the tag; `hf-hub:` and
    `local-dir:` a checkpoint with its own weights; a bare NAME only an architecture."""
    if name.startswith(SCHEMAS):
        return "DEFAULT"
    return name.partition(".")[2] or "none"


def _open_clip_named(name: str) -> str:
    """`NAME:TAG` (open_clip's own spelling: `list_pretrained(as_str=True)`) names a published
    tag, `NAME:FILE` a local weights file (both what open_clip's `pretrained=` takes); `hf-hub:`
    and `local-dir:` a checkpoint with its own weights; a bare NAME only an architecture. Model
    names and tags hold no colon, so the first one after NAME splits them."""
    if name.startswith(SCHEMAS):
        return "DEFAULT"
    return name.partition(":")[2] or "none"


def resolve_weights(arch: str, weights: str) -> str:
    """The weights `model.weights` means for `model.arch`: `auto` is the checkpoint the spec names
    (an `hf:` repo or folder, a timm `NAME.TAG`, an open_clip `NAME:TAG` or `NAME:FILE`, a
    `hf-hub:`/`local-dir:` name), else `none` (a bare torchvision, timm or open_clip name, or
    mnist_cnn, names only an architecture: seeded random init); any other value is taken as
    given."""
    if weights.lower() != AUTO:
        return weights
    kind, name = split_arch(arch)
    return SOURCES[kind].named(name)


def resolved(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with `auto` weights resolved (`resolve_weights`): what every loader reads."""
    return dataclasses.replace(cfg, weights=resolve_weights(cfg.arch, cfg.weights))


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class ModelSource:
    """How one library's models are built, what preprocessing their weights were published with,
    and where a new classification head goes."""

    # (model config, name without the prefix, num_classes or None = the published head,
    # in_channels) -> the module, the transform its weights were published with, and where that
    # transform comes from
    load: Callable[[ModelConfig, str, int | None, int], tuple[nn.Module, Any, str]]
    # the published head's size when extraction asks for none (None: the library's own)
    default_classes: int | None
    default_in_channels: int
    # the qualified name of the classifier a new head replaces; None: the model is a tower that
    # outputs features, and training puts a `TowerClassifier` head on it
    head: Callable[[nn.Module], str] | None = None
    # a tower's feature size (towers only)
    features: Callable[[nn.Module], int] | None = None
    # the weights `auto` means for a name without the prefix (`resolve_weights`)
    named: Callable[[str], str] = _names_no_weights

    @property
    def rgb_only(self) -> bool:
        return self.head is None


def _load_mnist_cnn(cfg: ModelConfig, name: str, num_classes: int | None, in_channels: int):
    weights = cfg.weights
    model = MnistCNN(in_channels, num_classes or 10, cfg.width, cfg.dropout, cfg.batchnorm)
    if weights != "none":
        load_matching(model, read_state_dict(weights), weights, cfg.arch)
    mean, std = (
        ((0.5,), (0.25,)) if in_channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    return model, {"image_size": 28, "mean": mean, "std": std}, "mnist_cnn default"


def _load_torchvision(cfg: ModelConfig, name: str, num_classes: int | None, in_channels: int):
    weights = cfg.weights
    from torchvision import models as tvm

    available = set(tvm.list_models(module=tvm))
    if name not in available:
        raise _closest(name, sorted(available | {"mnist_cnn"}), "model.arch")
    model = tvm.get_model(name, weights=None)
    state = None
    if weights != "none":
        if is_weights_file(weights):
            state = read_state_dict(weights)
        else:
            published = torchvision_weights(name, weights)
            with downloading(f"download {published}", "the library's cache: TORCH_HOME"):
                state = published.get_state_dict(progress=False, check_hash=True)
    # Pretrained files match the original 1000-class head; our own checkpoints match the new
    # head. Load into whichever shape fits.
    if state is not None and fits(model, state):
        model.load_state_dict(state)
        state = None
    head_name, head = classifier_head(model)
    if num_classes is not None and head.out_features != num_classes:
        set_module(model, head_name, nn.Linear(head.in_features, num_classes))
    adapt_input_channels(model, in_channels)
    if state is not None:
        load_matching(model, state, weights, name)
    # the weights' own transforms(); for random or local weights, the architecture's DEFAULT's
    # (what torchvision publishes for it: the metadata only, nothing is downloaded)
    if weights != "none" and not is_weights_file(weights):
        return (
            model,
            torchvision_weights(name, weights).transforms(),
            "torchvision the weights' transforms()",
        )
    transform = tvm.get_model_weights(name).DEFAULT.transforms()
    return model, transform, f"torchvision {name} DEFAULT weights' transforms()"


def torchvision_weights(arch: str, name: str) -> Any:
    from torchvision.models import get_model_weights, get_weight

    try:
        if name.upper() == "DEFAULT":
            return get_model_weights(arch).DEFAULT
        return get_weight(name if "." in name else f"{get_model_weights(arch).__name__}.{name}")
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(
            f"unknown weights {name!r} for {arch}: use none, DEFAULT, a name like "
            f"{get_model_weights(arch).__name__}.IMAGENET1K_V1, or a local file path"
        ) from e


def _fetching(
    name: str, what: str, cache: str, published: bool = False
) -> contextlib.AbstractContextManager[None]:
    """What comes from a Hub (an `hf-hub:` name's config, `published` weights) fails offline as
    one line (`downloading`); a local folder's errors, and a bare name's, are their own."""
    if name.startswith("local-dir:"):
        folder = Path(name.partition(":")[2])
        if not folder.is_dir():
            raise WeightsError(f"{name}: folder {folder} not found")
        return contextlib.nullcontext()
    if published or name.startswith("hf-hub:"):
        return downloading(what, cache)
    return contextlib.nullcontext()


def _schema_weights(source: str, name: str, weights: str) -> None:
    """A Hub repo or local folder brings its own weights: DEFAULT (or auto) takes them, and a
    local folder's files are checked first (0 bytes, cut short)."""
    if weights.upper() != "DEFAULT":
        raise WeightsError(
            f"{source}:{name} brings its own weights: use model.weights auto (or DEFAULT), none "
            f"or a local weights file, not {weights!r}"
        )
    folder = Path(name.partition(":")[2])
    if name.startswith("local-dir:") and folder.is_dir() and not folder_weights(folder):
        raise WeightsError(
            f"{source}:{name}: folder {folder} holds no weights file; pass --model.weights none "
            "for random weights"
        )


def _load_timm(cfg: ModelConfig, name: str, num_classes: int | None, in_channels: int):
    weights = cfg.weights
    timm = require("timm")
    schema = name.startswith(SCHEMAS)
    base = name.partition(".")[0]
    if not schema and not timm.is_model(base):
        raise _closest(base, timm.list_models(), "timm model")
    kwargs: dict[str, Any] = {"in_chans": in_channels}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    cache = "the library's cache: HF_HOME"
    if weights == "none" or is_weights_file(weights):
        with _fetching(name, f"get the timm config of {name}", cache):  # hf-hub: config.json
            model = timm.create_model(name, pretrained=False, **kwargs)
        if weights != "none":
            state = read_state_dict(weights)
            if num_classes is not None and not fits(model, state):
                # a published checkpoint with its own head: load it, then give the model a new one
                model = timm.create_model(name, pretrained=False, in_chans=in_channels)
                load_matching(model, state, weights, f"timm:{name}")
                model.reset_classifier(num_classes)
            else:
                load_matching(model, state, weights, f"timm:{name}")
    else:
        if schema:
            _schema_weights("timm", name, weights)
            full = name
        else:
            full = name if weights.upper() == "DEFAULT" else f"{base}.{weights}"
            tags = timm.list_pretrained(f"{base}.*")
            if weights.upper() != "DEFAULT" and full not in tags:
                published = ", ".join(t.split(".", 1)[1] for t in tags[:8]) or "none"
                raise WeightsError(
                    f"unknown timm pretrained tag {weights!r} for {base}; published: {published}"
                )
        with _fetching(name, f"get timm weights {full}", cache, published=True):
            model = timm.create_model(full, pretrained=True, **kwargs)
    # timm's eval transform from the model's pretrained_cfg (kept when the head is replaced)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    return model, transform, "timm resolve_data_config + create_transform"


def _timm_head(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is classifier)


def _load_open_clip(cfg: ModelConfig, name: str, num_classes: int | None, in_channels: int):
    """The image tower (`model.visual`: its forward is `encode_image` without normalizing)."""
    weights = cfg.weights
    open_clip = require("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    schema = name.startswith(SCHEMAS)
    # NAME:TAG / NAME:FILE: the weights part is read by `resolve_weights`; here, the architecture
    model_name = name if schema else name.partition(":")[0]
    if not schema and model_name not in open_clip.list_models():
        raise _closest(model_name, open_clip.list_models(), "open_clip model")
    cache = "the library's cache: HF_HOME or ~/.cache/clip"
    if weights == "none" or is_weights_file(weights):
        # a Hub repo or local folder loads its own weights unless told not to
        with _fetching(name, f"get the open_clip config of {name}", cache):
            model = open_clip.create_model(
                model_name, pretrained=None, **({"load_weights": False} if schema else {})
            )
        if weights != "none":
            state = read_state_dict(weights)
            if any(k.startswith("visual.") for k in state):
                state = {
                    k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")
                }
            load_matching(model.visual, state, weights, f"open_clip:{model_name}")
    elif schema:
        _schema_weights("open_clip", name, weights)
        with _fetching(name, f"get open_clip weights {name}", cache, published=True):
            model = open_clip.create_model(name, require_pretrained=True)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if weights not in tags:
            raise WeightsError(
                f"unknown open_clip pretrained tag {weights!r} for {model_name}; "
                f"published: {', '.join(tags) or 'none'}"
            )
        with downloading(f"get open_clip weights {model_name}/{weights}", cache):
            model = open_clip.create_model(model_name, pretrained=weights)
    visual = model.visual
    transform = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    return (
        visual,
        transform,
        "open_clip preprocess (image_transform_v2 of the model's preprocess_cfg)",
    )


def _load_hf(cfg: ModelConfig, name: str, num_classes: int | None, in_channels: int):
    weights = cfg.weights
    transformers = require("hf")
    where = weights if weights != "none" and Path(weights).is_dir() else name
    weights_file = weights != "none" and (
        Path(weights).is_file() or Path(weights).suffix in WEIGHT_FILE_SUFFIXES
    )
    if weights != "none" and not weights_file and Path(where).is_dir():
        # transformers' own errors for an empty or cut-short file name no file
        if not folder_weights(Path(where)):
            raise WeightsError(
                f"hf:{name}: folder {where} holds no weights file (model.safetensors, "
                "pytorch_model.bin); pass --model.weights none for random weights of its config"
            )
    with downloading(
        f"load hf:{name} from {where}",
        "HF_HOME",
        detail=True,
        local="a save_pretrained folder with --model.weights /path/to/folder",
    ):
        config = transformers.AutoConfig.from_pretrained(where)
        if weights == "none":
            model = transformers.AutoModel.from_config(config)
        elif weights_file:
            model = transformers.AutoModel.from_config(config)
            load_matching(model, read_state_dict(weights), weights, f"hf:{name}")
        elif weights.upper() == "DEFAULT" or Path(weights).is_dir():
            model = transformers.AutoModel.from_pretrained(where)
        else:
            raise WeightsError(
                f"weights {weights!r} for hf:{name}: use auto or DEFAULT (the repo's own), none, "
                "a save_pretrained folder or a .safetensors/.pt file"
            )
    # CLIP-style checkpoints hold a text tower too; extraction runs the vision tower
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        model = model.vision_model
    processor = _hf_processor(transformers, where, config)
    return model, processor, f"transformers {type(processor).__name__}"


def _hf_processor(transformers: Any, where: str, config: Any) -> Any:
    """The repo's image processor; without one (a config-only folder), the default processor of
    the architecture (what transformers would build for it)."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(where)
    except Exception:
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""), None)
        if isinstance(names, dict):
            names = tuple(names.values())
        if isinstance(names, str):
            names = (names,)
        for cls_name in names or ():
            if cls_name and hasattr(transformers, cls_name):
                return getattr(transformers, cls_name)()
        raise ConfigError(
            f"{where} has no image processor and transformers knows none for "
            f"{getattr(config, 'model_type', '?')}; pass --preprocess squash with --mean and --std"
        ) from None


def _hf_features(model: nn.Module) -> int:
    return getattr(model.config, "hidden_size", None) or model.config.hidden_sizes[-1]


# Adding a model library is one entry here (and its extra in pyproject.toml).
SOURCES: dict[str, ModelSource] = {
    "mnist_cnn": ModelSource(_load_mnist_cnn, 10, 1, head=lambda model: "fc"),
    "torchvision": ModelSource(
        _load_torchvision, 1000, 3, head=lambda model: classifier_head(model)[0]
    ),
    "timm": ModelSource(_load_timm, None, 3, head=_timm_head, named=_timm_named),
    "open_clip": ModelSource(
        _load_open_clip, None, 3, features=lambda tower: tower.output_dim, named=_open_clip_named
    ),
    # a repo or a save_pretrained folder is a checkpoint: auto means its own weights
    "hf": ModelSource(_load_hf, None, 3, features=_hf_features, named=lambda name: "DEFAULT"),
}


# ----------------------------------------------------------------------------- extraction


@dataclass
class LoadedModel:
    """A model as published (or as a `train` run left it): the module to run and the transform
    its weights expect."""

    model: nn.Module  # eval mode, CPU; called as model(x) with a preprocessed float batch
    arch: str
    source: str  # a key of SOURCES, or checkpoint
    weights: str  # the weights used: `auto` resolved (none, DEFAULT, a tag, a file or folder)
    weights_file_sha256: str | None
    in_channels: int
    # what bonnerlab.models.preprocess resolves: a torchvision/timm/open_clip transform, a Hugging
    # Face image processor, or {"image_size", "mean", "std"} (mnist_cnn and our own checkpoints)
    published_transform: Any
    published_by: str  # where the transform comes from, recorded with it
    data: DataConfig | None = None  # the training data config of a checkpoint
    weights_sha256: str = ""

    def finish(self) -> LoadedModel:
        self.model.eval()
        self.weights_sha256 = state_sha256(self.model)
        return self


def _check_rgb(source: ModelSource, arch: str, in_channels: int, what: str) -> None:
    if source.rgb_only and in_channels != 3:
        raise ConfigError(f"{what} {in_channels}: {arch} takes RGB (3 channels)")


def load_source(
    cfg: ModelConfig, seed: int = 0, in_channels: int = 0, num_classes: int = 0
) -> LoadedModel:
    """The model of `cfg` for extraction (its own head), in eval mode on CPU; its `weights` are
    the ones used (`auto` resolved), which the store records."""
    cfg = resolved(cfg)
    kind, name = split_arch(cfg.arch)
    source = SOURCES[kind]
    in_channels = in_channels or source.default_in_channels
    _check_rgb(source, cfg.arch, in_channels, "in_channels")
    torch.manual_seed(seed)  # weights "none": the same random network in every task
    weights = cfg.weights
    file_sha = file_sha256(Path(weights)) if weights != "none" and Path(weights).is_file() else None
    model, published, origin = source.load(
        cfg, name, num_classes or source.default_classes, in_channels
    )
    return LoadedModel(
        model, cfg.arch, kind, weights, file_sha, in_channels, published, origin
    ).finish()


# ----------------------------------------------------------------------------- training: new heads


class TowerClassifier(nn.Module):
    """A backbone that outputs a feature vector (open_clip image tower, a transformers model's
    pooled output) with a new Linear `head`."""

    def __init__(self, backbone: nn.Module, features: int, num_classes: int, hf: bool = False):
        super().__init__()
        self.backbone, self.hf = backbone, hf
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if self.hf:
            pooled = getattr(out, "pooler_output", None)
            out = pooled if pooled is not None else out.last_hidden_state[:, 0]
            out = out.flatten(1)
        return self.head(out)


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The configured network for training: `num_classes` outputs, `in_channels` inputs."""
    return build_model_and_transform(cfg, in_channels, num_classes)[0]


def build_model_and_transform(
    cfg: ModelConfig, in_channels: int, num_classes: int
) -> tuple[nn.Module, Any, str]:
    """`build_model`, with the transform its weights were published with and where that comes
    from (as `LoadedModel.published_transform` / `published_by`), from the same single load."""
    cfg = resolved(cfg)
    kind, name = split_arch(cfg.arch)
    source = SOURCES[kind]
    _check_rgb(source, cfg.arch, in_channels, "data.in_channels")
    model, published, origin = source.load(cfg, name, num_classes, in_channels)
    if source.head is None:
        model = TowerClassifier(model, source.features(model), num_classes, hf=kind == "hf")
        head = "head"
    else:
        head = source.head(model)
    if cfg.freeze_backbone:
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(head + ".")
    return model, published, origin


# ----------------------------------------------------------------------------- checkpoints of train


def load_trained(
    checkpoint_path: Path, device: torch.device
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as and load its weights."""
    from bonnerlab.checkpoint import load_checkpoint

    payload = load_checkpoint(checkpoint_path)
    try:
        train_cfg = from_dict(TrainConfig, payload["config"])
    except ConfigError as e:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} holds an unreadable config: {e}"
        ) from e
    pre = payload["preprocess"]
    model = build_model(
        # the head is rebuilt from the checkpoint itself; never download weights again
        type(train_cfg.model)(
            **{**to_dict(train_cfg.model), "weights": "none", "freeze_backbone": False}
        ),
        pre["channels"],
        len(payload["classes"]),
    )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {checkpoint_path} does not fit {train_cfg.model.arch}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    return model.to(device).eval(), train_cfg, payload


def load_checkpoint_source(checkpoint: str, which: str) -> LoadedModel:
    """A `train` run's model (its own head and channels) with the preprocessing it was trained
    with."""
    from bonnerlab.checkpoint import find_checkpoint

    path = find_checkpoint(checkpoint, which)
    model, train_cfg, payload = load_trained(path, torch.device("cpu"))
    pre = payload["preprocess"]
    published = {
        "image_size": int(pre["image_size"]),
        "mean": tuple(pre["mean"]),
        "std": tuple(pre["std"]),
    }
    return LoadedModel(
        model,
        train_cfg.model.arch,
        "checkpoint",
        str(path),
        file_sha256(path),
        int(pre["channels"]),
        published,
        "the training run's evaluation preprocessing",
        train_cfg.data,
    ).finish()
