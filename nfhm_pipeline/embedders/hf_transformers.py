"""Vision towers loaded with Hugging Face transformers' `from_pretrained`.

Catalog keys (loader: transformers):
  model       hub repo id ('openai/clip-vit-base-patch32', 'facebook/dinov2-base') or a local folder
              written by save_pretrained.
  weights     optional local folder; overrides `model` as the place to load from.
  revision    hub revision (default 'main' as cached).
  pooling     'image_embeds' (CLIP projection; default for CLIP), 'pooler' (pooler_output; default
              for SigLIP, DINOv2 and other AutoModels), 'cls' (last_hidden_state[:, 0]) or
              'mean_tokens' (mean over all output tokens; the only choice for Florence-2, as in
              seed 000: mean over the 577 projected image tokens).
  trust_remote_code  Florence-2 original repos (microsoft/Florence-2-*) only: load with the repo's
              own code and pool `model._encode_image(pixels)`. That path cannot run offline in the
              tests here and is untested; transformers >= 4.56 loads converted Florence-2 repos
              (e.g. florence-community/Florence-2-base) natively, which is tested with a tiny model.

Model class by config.model_type: clip -> CLIPVisionModelWithProjection, siglip ->
SiglipVisionModel, florence2 -> Florence2ForConditionalGeneration (vision tower + projector),
anything else -> AutoModel. Size/mean/std/resize come from the repo's AutoImageProcessor config.
With HF_HUB_OFFLINE=1 everything is read with local_files_only=True.
"""
from __future__ import annotations

import os
from pathlib import Path

from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError
from .base import Embedder, _short_reason, file_sha256, hub_env, hub_settings, missing_hub_message
from .preprocess import PreprocessSpec

POOLINGS = ("image_embeds", "pooler", "cls", "mean_tokens")
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


class TransformersVisionEmbedder(Embedder):
    def __init__(self, model, pooling: str, remote_florence: bool = False, **kwargs):
        self.model, self.pooling, self.remote_florence = model, pooling, remote_florence
        super().__init__(**kwargs)

    def _encode_images(self, x):
        if self.remote_florence:
            return self.model._encode_image(x).mean(dim=1)
        if hasattr(self.model, "get_image_features") and type(self.model).__name__.startswith("Florence2"):
            return self.model.get_image_features(pixel_values=x).pooler_output.mean(dim=1)
        out = self.model(pixel_values=x)
        if self.pooling == "image_embeds":
            return out.image_embeds
        if self.pooling == "pooler":
            return out.pooler_output
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        return out.last_hidden_state.mean(dim=1)


def _get(obj, key):
    """Read a size field from a dict or a transformers SizeDict."""
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def preprocess_from_image_processor(proc, model_id: str) -> PreprocessSpec:
    """PreprocessSpec from a transformers image processor (CLIP/SigLIP/BitImageProcessor/Florence-2)."""
    size, crop = getattr(proc, "size", None), getattr(proc, "crop_size", None)
    resample = getattr(proc, "resample", 3)
    resample = getattr(resample, "value", resample)  # PILImageResampling enum or int
    interpolation = _PIL_RESAMPLE.get(int(resample) if resample is not None else 3)
    if interpolation is None:
        raise ModelLoadError(f"model {model_id!r}: image processor resample={resample!r} is not "
                             "bilinear or bicubic; set image_size/interpolation in the catalog")
    common = dict(interpolation=interpolation, mean=tuple(proc.image_mean), std=tuple(proc.image_std))
    if getattr(proc, "do_center_crop", False) and _get(size, "shortest_edge") and crop is not None:
        if _get(crop, "height") != _get(crop, "width"):
            raise ModelLoadError(f"model {model_id!r}: non-square crop {crop} is not supported")
        return PreprocessSpec(size=int(_get(crop, "height")), resize="shorter_crop",
                              resize_size=int(_get(size, "shortest_edge")), **common)
    if _get(size, "height") and _get(size, "height") == _get(size, "width"):
        return PreprocessSpec(size=int(_get(size, "height")), resize="squash", **common)
    raise ModelLoadError(f"model {model_id!r}: image processor size={size} crop={crop} is not a "
                         "supported square preprocessing")


def load_transformers(spec: dict, *, model_id: str, device="cpu", precision="fp32",
                      cache_dir=None) -> TransformersVisionEmbedder:
    """Build a vision-only embedder from a catalog entry (keys in the module docstring)."""
    import transformers

    source = str(spec.get("weights") or spec.get("model") or "")
    if not source:
        raise ModelLoadError(f"model {model_id!r}: transformers entry needs 'model' (hub id or folder)")
    local = os.path.isdir(os.path.expanduser(source))
    if not local and (source.startswith(("/", "./", "~")) or spec.get("weights")):
        raise MissingWeightsError(f"model {model_id!r}: model folder {source} does not exist. Copy the "
                                  "save_pretrained folder there or change the catalog entry.")
    trust = bool(spec.get("trust_remote_code", False))
    settings = hub_settings(cache_dir)
    kw = dict(cache_dir=settings.cache_dir, local_files_only=settings.offline, revision=spec.get("revision"))
    with hub_env(settings):
        try:
            config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust, **kw)
            model_type = config.model_type
            remote_florence = trust and model_type == "florence2"
            if remote_florence:
                model = transformers.AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, **kw)
                proc = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=True, **kw).image_processor
            else:
                cls = {"clip": transformers.CLIPVisionModelWithProjection,
                       "clip_vision_model": transformers.CLIPVisionModelWithProjection,
                       "siglip": transformers.SiglipVisionModel,
                       "siglip_vision_model": transformers.SiglipVisionModel,
                       "florence2": getattr(transformers, "Florence2ForConditionalGeneration", None),
                       }.get(model_type) or transformers.AutoModel
                model = cls.from_pretrained(source, **kw)
                proc = transformers.AutoImageProcessor.from_pretrained(source, **kw)
        except OSError as e:  # transformers reports missing/uncached files as OSError
            if local:
                raise MissingWeightsError(f"model {model_id!r}: folder {source} is incomplete "
                                          f"({_short_reason(e)})") from None
            raise MissingWeightsError(missing_hub_message(model_id, source, ["config/weights/preprocessor"],
                                                          settings, e)) from None
        except Exception as e:
            raise ModelLoadError(f"model {model_id!r}: transformers could not load {source} "
                                 f"({_short_reason(e)})") from None
    florence = model_type == "florence2"
    default = ("mean_tokens" if florence else "image_embeds" if model_type.startswith("clip") else "pooler")
    pooling = spec.get("pooling", default)
    if pooling not in POOLINGS or (florence and pooling != "mean_tokens"):
        raise ModelLoadError(f"model {model_id!r}: pooling {pooling!r} is not one of {POOLINGS} "
                             "(Florence-2 supports only mean_tokens)")
    if local:
        files = sorted(p for p in Path(source).expanduser().iterdir()
                       if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        weights = {p.name: f"sha256:{file_sha256(p)}" for p in files}
    else:
        weights = f"hf:{source}@{getattr(config, '_commit_hash', None) or spec.get('revision') or 'unknown'}"
    model.eval().to(device)
    return TransformersVisionEmbedder(
        model, pooling, remote_florence, model_id=model_id, loader="transformers",
        preprocess=preprocess_from_image_processor(proc, model_id), weights=weights,
        config={"model": source, "model_type": model_type, "class": type(model).__name__, "pooling": pooling},
        device=device, precision=precision, load_report={"source": source})
