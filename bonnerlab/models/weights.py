"""Model sources: one spec for torchvision, mnist_cnn, timm, open_clip and Hugging Face models.

`model.arch` is `NAME` (torchvision, or mnist_cnn), `timm:NAME`, `open_clip:NAME` (the image
tower) or `hf:REPO_ID_OR_FOLDER` (transformers, built with the Auto classes). `model.weights` is
`none` (seeded random init), a published name (downloaded once into each library's own cache:
TORCH_HOME, HF_HOME), or a local file (`.pth`/`.pt`/`.safetensors` state dict) or, for `hf:`, a
`save_pretrained` folder. Each source also hands out the evaluation transform its weights were
published with (`Source.published_transform`), which `bonnerlab.models.preprocess` turns into explicit,
recorded steps.

The optional libraries are imported only when their prefix is used; a missing one is a one-line
error naming the `pip install 'bonnerlab[...]'` that brings it.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonnerlab.config import DataConfig, ModelConfig, TrainConfig, from_dict, to_dict
from bonnerlab.errors import CheckpointError, ConfigError, UserError, WeightsError
from bonnerlab.models.cnn import MnistCNN, adapt_input_channels, classifier_head, set_module

PREFIXES = ("timm", "open_clip", "hf")
PACKAGES = {"timm": ("timm", "timm"), "open_clip": ("open_clip", "clip"), "hf": ("transformers", "hf")}
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
OFFLINE_FIX = "download it on a login node with internet (it lands in the library's cache: {cache}) or pass a local file with --model.weights /path/to/weights"


def split_arch(arch: str) -> tuple[str, str]:
    """`timm:resnet50` -> ("timm", "resnet50"); `resnet18` -> ("torchvision", "resnet18")."""
    prefix, sep, name = arch.partition(":")
    if not sep:
        return ("mnist_cnn" if arch == "mnist_cnn" else "torchvision"), arch
    if prefix not in PREFIXES or not name:
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


# ----------------------------------------------------------------------------- weights files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """sha256 over parameter/buffer names and bytes: identifies the weights whatever their source."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # a view, no copy
    return h.hexdigest()


def is_weights_file(weights: str) -> bool:
    path = Path(weights)
    return path.suffix in WEIGHT_FILE_SUFFIXES or path.is_file()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pt/.pth/.safetensors file (or a bonnerlab checkpoint's model)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot load weights file {path}: {str(e).splitlines()[0]}") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a bonnerlab checkpoint
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # open_clip / lightning checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict")
    return obj


def fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], weights: str, arch: str) -> None:
    """Load `state` into `model`, or a one-line error saying what does not fit."""
    if not fits(model, state):
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        shape = [k for k in own if k in state and own[k].shape != state[k].shape]
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra
                  else f"shape differs at {shape[:2]}")
        raise WeightsError(f"weights {weights} do not fit model.arch {arch}: {detail}")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A source model as published: the module to run and the transform its weights expect."""

    model: nn.Module  # eval mode, CPU; called as model(x) with a preprocessed float batch
    arch: str
    source: str  # torchvision, mnist_cnn, timm, open_clip, hf, checkpoint
    weights: str
    weights_file_sha256: str | None
    channels: int
    # what bonnerlab.models.preprocess resolves: a torchvision/timm/open_clip transform, a Hugging Face
    # image processor, or {"image_size", "mean", "std"} (mnist_cnn and our own checkpoints)
    published_transform: Any
    published_by: str  # where the transform comes from, recorded with it
    data: DataConfig | None = None  # the training data config of a checkpoint
    weights_sha256: str = ""

    def finish(self) -> Source:
        self.model.eval()
        self.weights_sha256 = state_sha256(self.model)
        return self


def load_source(cfg: ModelConfig, seed: int = 0, channels: int = 0, num_classes: int = 0) -> Source:
    """The model of `cfg` for extraction (its own head), in eval mode on CPU."""
    source, name = split_arch(cfg.arch)
    torch.manual_seed(seed)  # weights "none": the same random network in every task
    weights = cfg.weights
    file_sha = file_sha256(Path(weights)) if weights != "none" and Path(weights).is_file() else None
    if source == "mnist_cnn":
        channels = channels or 1
        model: nn.Module = MnistCNN(channels, num_classes or 10, cfg.width, cfg.dropout, cfg.batchnorm)
        if weights != "none":
            load_matching(model, read_state_dict(weights), weights, cfg.arch)
        published, origin = _mnist_cnn_transform(channels)
    elif source == "torchvision":
        model = _torchvision(name, weights, num_classes or 1000, channels or 3)
        published, origin = _torchvision_transform(name, weights)
    elif source == "timm":
        model = _timm(name, weights, num_classes=num_classes or None, channels=channels or 3)
        published, origin = _timm_transform(model)
    elif source == "open_clip":
        model, published = _open_clip(name, weights)
        origin = OPEN_CLIP_ORIGIN
    else:
        model, published = _hf(name, weights)
        origin = f"transformers {type(published).__name__}"
    if channels and source in ("open_clip", "hf") and channels != 3:
        raise ConfigError(f"image_channels {channels}: {cfg.arch} takes RGB (3 channels)")
    return Source(model, cfg.arch, source, weights, file_sha, channels or (1 if source == "mnist_cnn" else 3),
                  published, origin).finish()


def _torchvision(name: str, weights: str, num_classes: int, channels: int) -> nn.Module:
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
            state = _download_torchvision(torchvision_weights(name, weights))
    # Pretrained files match the original 1000-class head; our own checkpoints match the new
    # head. Load into whichever shape fits.
    if state is not None and fits(model, state):
        model.load_state_dict(state)
        state = None
    head_name, head = classifier_head(model)
    if head.out_features != num_classes:
        set_module(model, head_name, nn.Linear(head.in_features, num_classes))
    adapt_input_channels(model, channels)
    if state is not None:
        load_matching(model, state, weights, name)
    return model


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


def _download_torchvision(weights: Any) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, HTTPError, socket errors: offline
        raise WeightsError(
            f"cannot download {weights} ({type(e).__name__}: offline?); "
            + OFFLINE_FIX.format(cache="TORCH_HOME")
        ) from e


def _mnist_cnn_transform(channels: int) -> tuple[dict[str, Any], str]:
    mean, std = ((0.5,), (0.25,)) if channels == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return {"image_size": 28, "mean": mean, "std": std}, "mnist_cnn default"


def _torchvision_transform(arch: str, weights: str) -> tuple[Any, str]:
    """The weights' own transforms(); for random or local weights, the architecture's DEFAULT's
    (what torchvision publishes for it: the metadata only, nothing is downloaded)."""
    from torchvision.models import get_model_weights

    if weights != "none" and not is_weights_file(weights):
        return torchvision_weights(arch, weights).transforms(), "torchvision the weights' transforms()"
    return get_model_weights(arch).DEFAULT.transforms(), f"torchvision {arch} DEFAULT weights' transforms()"


def _timm_transform(model: nn.Module) -> tuple[Any, str]:
    """timm's eval transform from the model's pretrained_cfg (kept when the head is replaced)."""
    timm = require("timm")
    return (timm.data.create_transform(**timm.data.resolve_data_config(model=model)),
            "timm resolve_data_config + create_transform")


OPEN_CLIP_ORIGIN = "open_clip preprocess (image_transform_v2 of the model's preprocess_cfg)"


def _timm(name: str, weights: str, num_classes: int | None, channels: int) -> nn.Module:
    timm = require("timm")
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        raise _closest(base, timm.list_models(), "timm model")
    kwargs: dict[str, Any] = {"in_chans": channels}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights == "none" or is_weights_file(weights):
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights != "none":
            state = read_state_dict(weights)
            if num_classes is not None and not fits(model, state):
                # a published checkpoint with its own head: load it, then give the model a new one
                model = timm.create_model(name, pretrained=False, in_chans=channels)
                load_matching(model, state, weights, f"timm:{name}")
                model.reset_classifier(num_classes)
            else:
                load_matching(model, state, weights, f"timm:{name}")
        return model
    full = name if weights.upper() == "DEFAULT" else f"{base}.{weights}"
    tags = timm.list_pretrained(f"{base}.*")
    if weights.upper() != "DEFAULT" and full not in tags:
        raise WeightsError(f"unknown timm pretrained tag {weights!r} for {base}; published: {', '.join(t.split('.', 1)[1] for t in tags[:8]) or 'none'}")
    try:
        return timm.create_model(full, pretrained=True, **kwargs)
    except Exception as e:
        raise WeightsError(
            f"cannot get timm weights {full} ({type(e).__name__}: offline?); "
            + OFFLINE_FIX.format(cache="HF_HOME")
        ) from e


def _open_clip(name: str, weights: str) -> tuple[nn.Module, Any]:
    """The image tower (`model.visual`: its forward is `encode_image` without normalizing)."""
    open_clip = require("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if name not in open_clip.list_models():
        raise _closest(name, open_clip.list_models(), "open_clip model")
    if weights == "none" or is_weights_file(weights):
        model = open_clip.create_model(name, pretrained=None)
        if weights != "none":
            state = read_state_dict(weights)
            if any(k.startswith("visual.") for k in state):
                state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
            load_matching(model.visual, state, weights, f"open_clip:{name}")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if weights not in tags:
            raise WeightsError(f"unknown open_clip pretrained tag {weights!r} for {name}; published: {', '.join(tags) or 'none'}")
        try:
            model = open_clip.create_model(name, pretrained=weights)
        except Exception as e:
            raise WeightsError(
                f"cannot get open_clip weights {name}/{weights} ({type(e).__name__}: offline?); "
                + OFFLINE_FIX.format(cache="HF_HOME or ~/.cache/clip")
            ) from e
    visual = model.visual
    transform = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    return visual, transform


def _hf_pixel_model(model: nn.Module) -> nn.Module:
    # CLIP-style checkpoints hold a text tower too; extraction runs the vision tower
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return model.vision_model
    return model


def _hf(name: str, weights: str) -> tuple[nn.Module, Any]:
    transformers = require("hf")
    where = weights if weights != "none" and Path(weights).is_dir() else name
    try:
        config = transformers.AutoConfig.from_pretrained(where)
        if weights == "none":
            model = transformers.AutoModel.from_config(config)
        elif Path(weights).is_file() or Path(weights).suffix in WEIGHT_FILE_SUFFIXES:
            model = transformers.AutoModel.from_config(config)
            state = read_state_dict(weights)
            load_matching(model, state, weights, f"hf:{name}")
        elif weights.upper() == "DEFAULT" or Path(weights).is_dir():
            model = transformers.AutoModel.from_pretrained(where)
        else:
            raise WeightsError(f"weights {weights!r} for hf:{name}: use none, DEFAULT (the repo's own), a save_pretrained folder or a .safetensors/.pt file")
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"cannot load hf:{name} from {where} ({type(e).__name__}: {first[:160]}); for a hub repo "
            "download it on a login node with internet (it lands in HF_HOME) or pass a "
            "save_pretrained folder with --model.weights /path/to/folder"
        ) from e
    return _hf_pixel_model(model), _hf_processor(transformers, where, config)


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


# ----------------------------------------------------------------------------- checkpoints of train


def load_trained(checkpoint_path: Path, device: torch.device) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as and load its weights."""
    from bonnerlab.checkpoint import load_checkpoint

    payload = load_checkpoint(checkpoint_path)
    try:
        train_cfg = from_dict(TrainConfig, payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {checkpoint_path} holds an unreadable config: {e}") from e
    pre = payload["preprocess"]
    model = build_model(
        # the head is rebuilt from the checkpoint itself; never download weights again
        type(train_cfg.model)(**{**to_dict(train_cfg.model), "weights": "none", "freeze_backbone": False}),
        pre["channels"], len(payload["classes"]),
    )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit {train_cfg.model.arch}: "
                              f"{str(e).splitlines()[0]}") from e
    return model.to(device).eval(), train_cfg, payload


def load_checkpoint_source(checkpoint: str, which: str) -> Source:
    """A `train` run's model (its own head and channels) with the preprocessing it was trained with."""
    from bonnerlab.checkpoint import find_checkpoint

    latest = checkpoint == "latest" and not Path("latest").exists()
    path = find_checkpoint("" if latest else checkpoint, which)
    model, train_cfg, payload = load_trained(path, torch.device("cpu"))
    pre = payload["preprocess"]
    published = {"image_size": int(pre["image_size"]), "mean": tuple(pre["mean"]), "std": tuple(pre["std"])}
    return Source(
        model, train_cfg.model.arch, "checkpoint", str(path), file_sha256(path), int(pre["channels"]),
        published, "the training run's evaluation preprocessing", train_cfg.data,
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


def build_model_and_transform(cfg: ModelConfig, in_channels: int, num_classes: int) -> tuple[nn.Module, Any, str]:
    """`build_model`, with the transform its weights were published with and where that comes
    from (as `Source.published_transform` / `published_by`), from the same single load."""
    source, name = split_arch(cfg.arch)
    if source == "mnist_cnn":
        model: nn.Module = MnistCNN(in_channels, num_classes, cfg.width, cfg.dropout, cfg.batchnorm)
        if cfg.weights != "none":
            load_matching(model, read_state_dict(cfg.weights), cfg.weights, cfg.arch)
        return model, *_mnist_cnn_transform(in_channels)
    if source == "torchvision":
        model = _torchvision(name, cfg.weights, num_classes, in_channels)
        head = classifier_head(model)[0]
        published, origin = _torchvision_transform(name, cfg.weights)
    elif source == "timm":
        model = _timm(name, cfg.weights, num_classes=num_classes, channels=in_channels)
        classifier = model.get_classifier()
        head = next(n for n, m in model.named_modules() if m is classifier)
        published, origin = _timm_transform(model)
    else:
        if in_channels != 3:
            raise ConfigError(f"data.channels {in_channels}: {cfg.arch} takes RGB (3 channels)")
        backbone, published = _open_clip(name, cfg.weights) if source == "open_clip" else _hf(name, cfg.weights)
        if source == "open_clip":
            features, origin = backbone.output_dim, OPEN_CLIP_ORIGIN
        else:
            config = backbone.config
            features = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
            origin = f"transformers {type(published).__name__}"
        model = TowerClassifier(backbone, features, num_classes, hf=source == "hf")
        head = "head"
    if cfg.freeze_backbone:
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(head + ".")
    return model, published, origin
