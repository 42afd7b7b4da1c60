"""Supervised CNN/ViT baselines from torchvision and timm; the embedding is the penultimate,
pooled feature vector (what a linear probe on the network would see).

Catalog keys (loader: torchvision):
  model        'mobilenet_v2' (1280-d, global-average-pooled `features`), 'resnet18/34/50/101/152',
               'resnext*', 'wide_resnet*' (2048-d for resnet50, input of `fc`), 'vgg11..19[_bn]'
               (4096-d, classifier[:-1]), 'vit_b_16', 'vit_l_16', ... (CLS token before `heads`).
  weights      local state-dict file (torch.load(weights_only=True) or .safetensors), or
  pretrained   torchvision weights tag, e.g. 'IMAGENET1K_V1' (file looked up in the torch hub cache,
               $TORCH_HOME/hub/checkpoints, not in `cache_dir`; downloaded only when not offline).
  num_classes  classifier width of the weights file (e.g. 1001); default 1000 / the tag's classes.
  image_size, resize ('shorter_crop' | 'squash'), resize_size, interpolation, mean, std:
               preprocessing; defaults come from the tag's transforms, else ImageNet's
               (224, shorter side 256 + centre crop, bilinear, ImageNet mean/std).

Catalog keys (loader: timm):
  model        timm name, e.g. 'vit_base_patch16_224.augreg_in21k'; features = `num_classes=0` output.
  weights      optional local file; otherwise the name's hf_hub_id files from the Hugging Face cache.
  Preprocessing from timm's resolved data config (input size, crop_pct, interpolation, mean, std);
  catalog preprocessing keys override it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError
from .base import (Embedder, _short_reason, hub_download, hub_env, hub_settings, load_state_dict_file,
                   require_local_file, weights_identity)
from .preprocess import PreprocessSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchFeatureEmbedder(Embedder):
    """Wraps a module mapping normalised images [N, 3, S, S] to features [N, dim]."""

    def __init__(self, net, **kwargs):
        self.net = net
        super().__init__(**kwargs)

    def _encode_images(self, x):
        return self.net(x)


def _preprocess(spec: dict, defaults: dict, model_id: str) -> PreprocessSpec:
    """Catalog preprocessing keys over the model's defaults."""
    merged = {**defaults, **{k: spec[k] for k in ("image_size", "resize", "resize_size", "interpolation",
                                                  "mean", "std") if spec.get(k) is not None}}
    if "resize" in spec and spec["resize"] == "squash" and "resize_size" not in spec:
        merged["resize_size"] = None
    try:
        return PreprocessSpec(size=int(merged["image_size"]), resize=merged["resize"],
                              interpolation=merged["interpolation"], mean=tuple(merged["mean"]),
                              std=tuple(merged["std"]), resize_size=merged.get("resize_size"))
    except ValueError as e:
        raise ModelLoadError(f"model {model_id!r}: bad preprocessing in catalog entry: {e}") from None


def feature_extractor(name: str, net, model_id: str):
    """(module giving penultimate pooled features, their width) for a torchvision classifier."""
    import torch.nn as nn

    if name == "mobilenet_v2":
        return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), net.last_channel
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        dim, net.fc = net.fc.in_features, nn.Identity()
        return net, dim
    if name.startswith("vgg"):
        dim, net.classifier = net.classifier[-1].in_features, net.classifier[:-1]
        return net, dim
    if name.startswith("vit_"):
        dim, net.heads = net.hidden_dim, nn.Identity()
        return net, dim
    raise ModelLoadError(f"model {model_id!r}: torchvision model {name!r} is not supported; use "
                         "mobilenet_v2, resnet*/resnext*/wide_resnet*, vgg* or vit_*, or the timm loader")


def _torchvision_tag_file(name: str, tag: str, model_id: str) -> tuple[str, object]:
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)[tag]
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"model {model_id!r}: {tag!r} is not a torchvision weights tag for {name} "
                             f"({_short_reason(e)})") from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"  # where torchvision itself caches weights
    path = folder / os.path.basename(weights.url)
    if not path.is_file():
        if hub_settings().offline:
            raise MissingWeightsError(
                f"model {model_id!r}: torchvision weights {name}/{tag} are not in {folder} (offline). "
                f"Download {weights.url} on a machine with internet into {folder}, or set "
                "`weights: /path/to/state_dict.pt` in the catalog entry.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path))  # writes a temp file, then renames
        except Exception as e:
            raise MissingWeightsError(
                f"model {model_id!r}: cannot download {weights.url} into {folder} ({_short_reason(e)}). "
                "Copy the file there from a machine with internet, or set `weights:` in the catalog.") from None
    return str(path), weights


def load_torchvision(spec: dict, *, model_id: str, device="cpu", precision="fp32",
                     cache_dir=None) -> TorchFeatureEmbedder:
    """Torchvision classifier -> penultimate-feature embedder (keys in the module docstring)."""
    import torchvision

    name = spec.get("model")
    if not name:
        raise ModelLoadError(f"model {model_id!r}: torchvision entry needs 'model'")
    defaults = dict(image_size=224, resize="shorter_crop", resize_size=256, interpolation="bilinear",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if spec.get("weights"):
        path = require_local_file(spec["weights"], model_id=model_id)
        num_classes = int(spec.get("num_classes", 1000))
    elif spec.get("pretrained"):
        path, tv_weights = _torchvision_tag_file(name, spec["pretrained"], model_id)
        num_classes = int(spec.get("num_classes", len(tv_weights.meta["categories"])))
        t = tv_weights.transforms()
        defaults.update(image_size=t.crop_size[0], resize_size=t.resize_size[0], mean=tuple(t.mean),
                        std=tuple(t.std), interpolation=t.interpolation.value)
    else:
        raise ModelLoadError(f"model {model_id!r}: torchvision entry needs 'weights' (a file) or "
                             "'pretrained' (a torchvision weights tag)")
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise ModelLoadError(f"model {model_id!r}: unknown torchvision model {name!r} ({e})") from None
    try:
        net.load_state_dict(load_state_dict_file(path, model_id=model_id), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"model {model_id!r}: {path} does not fit torchvision {name}(num_classes="
                             f"{num_classes}); check 'model' and 'num_classes' ({_short_reason(e)})") from None
    features, dim = feature_extractor(name, net, model_id)
    features.eval().to(device)
    return TorchFeatureEmbedder(
        features, model_id=model_id, loader="torchvision", preprocess=_preprocess(spec, defaults, model_id),
        weights=weights_identity(path), config={"model": name, "num_classes": num_classes},
        device=device, precision=precision, dim=dim, load_report={"weights_file": path})


def _timm_defaults(net, model_id: str) -> dict:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    size = cfg["input_size"][-1]
    if cfg["input_size"][-1] != cfg["input_size"][-2]:
        raise ModelLoadError(f"model {model_id!r}: non-square timm input {cfg['input_size']} is not supported")
    crop_pct, mode = cfg.get("crop_pct", 1.0), cfg.get("crop_mode", "center")
    if mode == "center":
        resize = dict(resize="shorter_crop", resize_size=math.floor(size / crop_pct))
    elif mode == "squash" and crop_pct == 1.0:
        resize = dict(resize="squash", resize_size=None)
    else:
        raise ModelLoadError(f"model {model_id!r}: timm crop_mode={mode!r} crop_pct={crop_pct} is not supported; "
                             "set image_size/resize in the catalog entry")
    return dict(image_size=size, interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]),
                std=tuple(cfg["std"]), **resize)


def load_timm(spec: dict, *, model_id: str, device="cpu", precision="fp32", cache_dir=None) -> TorchFeatureEmbedder:
    """timm model with its classifier removed (num_classes=0 -> pooled features)."""
    import timm

    name = spec.get("model")
    if not name:
        raise ModelLoadError(f"model {model_id!r}: timm entry needs 'model'")
    settings = hub_settings(cache_dir)
    with hub_env(settings):
        if spec.get("weights"):
            path = require_local_file(spec["weights"], model_id=model_id)
        else:
            cfg = timm.models.get_pretrained_cfg(name)
            if cfg is None or not cfg.hf_hub_id:
                raise ModelLoadError(f"model {model_id!r}: timm has no Hugging Face weights for {name!r}; "
                                     "set `weights: /path/to/file` in the catalog entry")
            files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            path = hub_download(cfg.hf_hub_id, files, model_id=model_id, settings=settings)
        try:
            # timm reads a 'file' override with weights_only=True and drops the classifier itself.
            net = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path})
        except Exception as e:
            raise ModelLoadError(f"model {model_id!r}: timm could not build {name} from {path} "
                                 f"({_short_reason(e)})") from None
    net.eval().to(device)
    return TorchFeatureEmbedder(
        net, model_id=model_id, loader="timm", preprocess=_preprocess(spec, _timm_defaults(net, model_id), model_id),
        weights=weights_identity(path), config={"model": name}, device=device, precision=precision,
        load_report={"weights_file": path})  # dim probed: some heads add a pre-logits layer
